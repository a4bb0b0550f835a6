package opsfiles

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/quota"
)

// Marker is the marker file of a blocked Xray user,
// <marker_dir>/<user>: its presence blocks the user; its one line,
// "YYYY-MM-DD HH:MM:SS | reason", says since when and why.
type Marker struct {
	Reason string    // why the user is blocked, e.g. quota.ReasonLimit
	Time   time.Time // when the user was blocked; the zero time writes an empty timestamp
}

// Content returns the marker file's content: the time in loc as TimeLayout
// (a nil loc keeps the time's own location), " | ", the reason with any line
// break replaced by a space, and a newline.
func (m Marker) Content(loc *time.Location) []byte {
	return []byte(FormatTime(m.Time, loc) + " | " + oneLine(m.Reason) + "\n")
}

// oneLine replaces line breaks with spaces.
func oneLine(s string) string {
	if !strings.ContainsAny(s, "\r\n") {
		return s
	}
	return strings.NewReplacer("\r\n", " ", "\r", " ", "\n", " ").Replace(s)
}

// markerSyncfsMin is the number of marker files from which SyncMarkers
// flushes them with one syncfs(2) rather than an fsync each: for a few
// files, fsyncs are cheaper than flushing a whole, possibly busy,
// filesystem.
const markerSyncfsMin = 16

// staleTempAge is the age from which SyncMarkers removes a temporary file
// left by an interrupted write.
const staleTempAge = time.Minute

// SyncMarkers makes the directory dir hold exactly one marker file per
// entry of want, each with the content Marker.Content(loc) gives, and no
// other marker file. It creates dir (0755) if it is missing, writes the
// missing markers and rewrites those whose content differs (each
// atomically), and removes every other regular file or symbolic link whose
// name is a valid user name (quota.ValidName): the names of users no longer
// blocked. It leaves alone dotfiles, subdirectories and anything else whose
// name is not a valid user name, except temporary files of an interrupted
// write of this package older than a minute, which it removes.
//
// added lists the markers created and removed the markers removed, sorted;
// a rewritten marker is in neither. A name of want that is not a valid user
// name is reported in err, naming it, and nothing is written for it; the
// other names are still synced, and err joins every failure.
//
// Cost: one ReadDir of dir and, per wanted marker already present, one
// open, read and close of at most the expected length plus one byte (no
// stat: ReadDir tells a regular file from the rest). Comparing sizes alone
// would not do: the timestamp has a fixed width, so a marker rewritten for
// a new block time or a reason of the same length keeps its size, and
// reading a file of a few dozen bytes costs about what a stat does. Nothing
// is written when nothing changed.
func SyncMarkers(dir string, want map[string]Marker, loc *time.Location) (added, removed []string, err error) {
	var errs []error
	names := make([]string, 0, len(want))
	for name := range want {
		if err := quota.ValidName(name); err != nil {
			errs = append(errs, fmt.Errorf("marker file not written: %w", err))
			continue
		}
		names = append(names, name)
	}
	slices.Sort(names)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, nil, errors.Join(append(errs, err)...)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, errors.Join(append(errs, err)...)
	}
	have := make(map[string]fs.FileMode, len(ents))
	for _, e := range ents {
		have[e.Name()] = e.Type()
	}

	var files []File
	var isNew []bool
	for _, name := range names {
		content := want[name].Content(loc)
		typ, exists := have[name]
		switch {
		case !exists:
		case typ.IsDir():
			errs = append(errs, &fs.PathError{Op: "write marker", Path: filepath.Join(dir, name), Err: errors.New("is a directory")})
			continue
		case typ.IsRegular():
			if same, _ := sameContent(filepath.Join(dir, name), content); same {
				continue
			}
		}
		// Not present, different, unreadable, or not a regular file (a
		// symbolic link is replaced, never followed).
		files = append(files, File{Name: name, Data: content, Perm: 0o644})
		isNew = append(isNew, !exists)
	}
	if len(files) > 0 {
		for i, err := range writeBatch(dir, files, batchOpts{syncfs: len(files) >= markerSyncfsMin}) {
			switch {
			case err != nil:
				errs = append(errs, err)
			case isNew[i]:
				added = append(added, files[i].Name)
			}
		}
	}

	for _, e := range ents {
		name := e.Name()
		if _, ok := want[name]; ok {
			continue
		}
		if typ := e.Type(); !typ.IsRegular() && typ&fs.ModeSymlink == 0 {
			continue
		}
		if quota.ValidName(name) != nil {
			continue
		}
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
			continue
		}
		removed = append(removed, name)
	}
	if _, err := removeStaleTemps(dir, ents, staleTempAge); err != nil {
		errs = append(errs, err)
	}
	if len(removed) > 0 {
		if err := syncDir(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return added, removed, errors.Join(errs...)
}

// sameContent reports whether the regular file at path holds exactly want.
// It never follows a symbolic link and never blocks on a FIFO.
func sameContent(path string, want []byte) (bool, error) {
	var fd int
	err := ignoringEINTR(func() (err error) {
		fd, err = unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return false, err
	}
	defer unix.Close(fd)
	buf := make([]byte, len(want)+1)
	n := 0
	for n < len(buf) {
		var m int
		err := ignoringEINTR(func() (err error) {
			m, err = unix.Read(fd, buf[n:])
			return err
		})
		if err != nil {
			return false, err
		}
		if m == 0 {
			break
		}
		n += m
	}
	return bytes.Equal(buf[:n], want), nil
}
