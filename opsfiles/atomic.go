package opsfiles

import (
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// ErrBadFileName is returned by WriteBatch for a File whose Name is not a
// plain file name (empty, ".", "..", or containing '/' or NUL).
var ErrBadFileName = errors.New("not a plain file name")

// File is one file of a WriteBatch.
type File struct {
	Name string      // the file's name within the batch's directory, no '/'
	Data []byte      // the complete new content
	Perm os.FileMode // permission bits, set exactly (not masked by the umask); 0 means 0644
}

// Temporary files are named "." + the target's name (cut to tmpNameMax
// bytes) + ".tmp-" + 16 random hex digits: a dotfile, so no tool takes it for
// a user's file, and recognisable, so a stale one left by a crash can be
// cleaned up (RemoveStaleTemps, SyncMarkers).
const (
	tmpInfix   = ".tmp-"
	tmpRandLen = 16
	tmpNameMax = 200 // leaves room for the affixes within NAME_MAX (255)
)

// tmpName returns a fresh temporary name for a file named name.
func tmpName(name string) string {
	if len(name) > tmpNameMax {
		name = name[:tmpNameMax]
	}
	return "." + name + tmpInfix + fmt.Sprintf("%016x", rand.Uint64())
}

// isTempName reports whether name has the form of the temporary files this
// package creates.
func isTempName(name string) bool {
	if len(name) < 1+len(tmpInfix)+tmpRandLen || name[0] != '.' {
		return false
	}
	suffix := name[len(name)-tmpRandLen:]
	if !strings.HasSuffix(name[:len(name)-tmpRandLen], tmpInfix) {
		return false
	}
	for _, c := range []byte(suffix) {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// ignoringEINTR retries f while it fails with EINTR (the Go runtime's
// preemption signals can interrupt a system call).
func ignoringEINTR(f func() error) error {
	for {
		if err := f(); !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// openDir opens dir for the *at system calls and for fsync.
func openDir(dir string) (int, error) {
	var fd int
	err := ignoringEINTR(func() (err error) {
		fd, err = unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return -1, &fs.PathError{Op: "open", Path: dir, Err: err}
	}
	return fd, nil
}

// writeTemp creates a temporary file for name in the directory dirfd, writes
// data to it, sets perm, fsyncs it if sync is set, and closes it. It returns
// the temporary name; on failure nothing is left behind.
func writeTemp(dirfd int, name string, data []byte, perm os.FileMode, sync bool) (string, error) {
	var tmp string
	var fd int
	for range 100 {
		tmp = tmpName(name)
		err := ignoringEINTR(func() (err error) {
			fd, err = unix.Openat(dirfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
			return err
		})
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EEXIST) {
			return "", fmt.Errorf("create temporary file: %w", err)
		}
		fd = -1
	}
	if fd < 0 {
		return "", fmt.Errorf("create temporary file: %w", unix.EEXIST)
	}
	err := func() error {
		for rest := data; len(rest) > 0; {
			var n int
			err := ignoringEINTR(func() (err error) {
				n, err = unix.Write(fd, rest)
				return err
			})
			if err != nil {
				return fmt.Errorf("write: %w", err)
			}
			if n == 0 {
				return fmt.Errorf("write: %w", unix.EIO)
			}
			rest = rest[n:]
		}
		if err := ignoringEINTR(func() error { return unix.Fchmod(fd, uint32(perm.Perm())) }); err != nil {
			return fmt.Errorf("chmod: %w", err)
		}
		if sync {
			if err := ignoringEINTR(func() error { return unix.Fsync(fd) }); err != nil {
				return fmt.Errorf("fsync: %w", err)
			}
		}
		return nil
	}()
	// close(2) must not be retried on EINTR: the descriptor is gone anyway.
	if cerr := unix.Close(fd); err == nil && cerr != nil {
		err = fmt.Errorf("close: %w", cerr)
	}
	if err != nil {
		_ = unix.Unlinkat(dirfd, tmp, 0)
		return "", err
	}
	return tmp, nil
}

// WriteFile replaces the file at path with data, atomically: it writes a
// temporary dotfile in the same directory, fsyncs it, renames it over path
// and fsyncs the directory. Readers see the old content or the new, never a
// mix. perm is set exactly, whatever the umask. On any failure before the
// rename the temporary file is removed and the old file is intact. If only
// the final fsync of the directory fails, the new content is in place but
// may not survive a crash; the error says so.
//
// A symbolic link at path is replaced by the file, not followed.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	dir, name := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	if err := checkFileName(name); err != nil {
		return &fs.PathError{Op: "write", Path: path, Err: err}
	}
	dirfd, err := openDir(dir)
	if err != nil {
		return err
	}
	defer unix.Close(dirfd)
	tmp, err := writeTemp(dirfd, name, data, perm, true)
	if err != nil {
		return &fs.PathError{Op: "write", Path: path, Err: err}
	}
	if err := ignoringEINTR(func() error { return unix.Renameat(dirfd, tmp, dirfd, name) }); err != nil {
		_ = unix.Unlinkat(dirfd, tmp, 0)
		return &fs.PathError{Op: "write", Path: path, Err: fmt.Errorf("rename temporary file: %w", err)}
	}
	if err := ignoringEINTR(func() error { return unix.Fsync(dirfd) }); err != nil {
		return &fs.PathError{Op: "write", Path: path, Err: fmt.Errorf("written, but fsync of the directory failed: %w", err)}
	}
	return nil
}

// checkFileName refuses a name that is not a plain file name.
func checkFileName(name string) error {
	switch {
	case name == "", name == ".", name == "..":
		return fmt.Errorf("%w: %q", ErrBadFileName, name)
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("%w: %q", ErrBadFileName, name)
	}
	return nil
}

// WriteBatch replaces many files in the directory dir, each atomically as
// WriteFile does, but with one filesystem-wide flush instead of one fsync
// per file: it writes every temporary file, calls syncfs(2) once on dir's
// filesystem, renames each temporary file over its target, and fsyncs dir
// once. This is how the agent writes thousands of usage files every few
// seconds.
//
// The result has one entry per file, nil for each file written: a file that
// fails (a bad name, a target that is a directory, a full disk) is reported
// in its own entry and does not stop the others. errors.Join(errs...) gives
// one error for all. Failed files keep their old content, and no temporary
// file is left behind. If the final fsync of the directory fails, every
// renamed file reports that error: its new content is in place but may not
// survive a crash. If two files have the same name, the later one wins.
//
// syncfs flushes all dirty data of the filesystem, not only this batch's:
// on a filesystem busy with other writers it can take longer than a few
// fsyncs. Before Linux 5.8 syncfs did not report writeback errors.
func WriteBatch(dir string, files []File) []error {
	return writeBatch(dir, files, true)
}

// writeBatch implements WriteBatch. With syncfs false it fsyncs each
// temporary file instead of syncing the filesystem, for small batches.
func writeBatch(dir string, files []File, syncfs bool) []error {
	errs := make([]error, len(files))
	if len(files) == 0 {
		return errs
	}
	fail := func(i int, op string, err error) {
		errs[i] = &fs.PathError{Op: op, Path: filepath.Join(dir, files[i].Name), Err: err}
	}
	dirfd, err := openDir(dir)
	if err != nil {
		for i := range files {
			fail(i, "write", err)
		}
		return errs
	}
	defer unix.Close(dirfd)

	tmps := make([]string, len(files))
	pending := 0
	for i, f := range files {
		if err := checkFileName(f.Name); err != nil {
			fail(i, "write", err)
			continue
		}
		perm := f.Perm
		if perm == 0 {
			perm = 0o644
		}
		tmp, err := writeTemp(dirfd, f.Name, f.Data, perm, !syncfs)
		if err != nil {
			fail(i, "write", err)
			continue
		}
		tmps[i] = tmp
		pending++
	}
	if pending == 0 {
		return errs
	}
	if syncfs {
		if err := ignoringEINTR(func() error { return unix.Syncfs(dirfd) }); err != nil {
			for i, tmp := range tmps {
				if tmp != "" {
					_ = unix.Unlinkat(dirfd, tmp, 0)
					fail(i, "write", fmt.Errorf("syncfs: %w", err))
				}
			}
			return errs
		}
	}
	renamed := 0
	for i, tmp := range tmps {
		if tmp == "" {
			continue
		}
		if err := ignoringEINTR(func() error { return unix.Renameat(dirfd, tmp, dirfd, files[i].Name) }); err != nil {
			_ = unix.Unlinkat(dirfd, tmp, 0)
			fail(i, "write", fmt.Errorf("rename temporary file: %w", err))
			tmps[i] = ""
			continue
		}
		renamed++
	}
	if renamed == 0 {
		return errs
	}
	if err := ignoringEINTR(func() error { return unix.Fsync(dirfd) }); err != nil {
		for i, tmp := range tmps {
			if tmp != "" {
				fail(i, "write", fmt.Errorf("written, but fsync of the directory failed: %w", err))
			}
		}
	}
	return errs
}

// RemoveStaleTemps removes the temporary files this package's writers left
// in dir when they were interrupted (a crash or a power cut between creating
// and renaming one) and that were last modified more than olderThan ago, and
// returns their names. A temporary file of a write still in progress is
// younger than any sensible olderThan (a minute is plenty). Nothing else is
// touched.
func RemoveStaleTemps(dir string, olderThan time.Duration) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	return removeStaleTemps(dir, ents, olderThan)
}

func removeStaleTemps(dir string, ents []os.DirEntry, olderThan time.Duration) ([]string, error) {
	var removed []string
	var errs []error
	now := time.Now()
	for _, e := range ents {
		if !e.Type().IsRegular() || !isTempName(e.Name()) {
			continue
		}
		info, err := e.Info()
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
			continue
		}
		if now.Sub(info.ModTime()) < olderThan {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, e.Name())
	}
	return removed, errors.Join(errs...)
}

// syncDir fsyncs the directory dir.
func syncDir(dir string) error {
	fd, err := openDir(dir)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := ignoringEINTR(func() error { return unix.Fsync(fd) }); err != nil {
		return &fs.PathError{Op: "fsync", Path: dir, Err: err}
	}
	return nil
}
