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
	if err := fillAndClose(fd, nil, data, perm, sync); err != nil {
		_ = unix.Unlinkat(dirfd, tmp, 0)
		return "", err
	}
	return tmp, nil
}

// fillAndClose makes the file open at fd hold exactly data with the
// permission bits perm, fsyncs it if sync is set, and closes fd: it writes
// data from offset 0, cuts what a longer old content leaves after it, and
// sets perm if the file lacks it (a new file has 0600, less the umask).
// st is the file's status if the caller has it, nil to have fd's read.
func fillAndClose(fd int, st *unix.Stat_t, data []byte, perm os.FileMode, sync bool) error {
	err := func() error {
		if st == nil {
			st = new(unix.Stat_t)
			if err := unix.Fstat(fd, st); err != nil {
				return fmt.Errorf("stat: %w", err)
			}
		}
		for off := 0; off < len(data); {
			var n int
			err := ignoringEINTR(func() (err error) {
				n, err = unix.Pwrite(fd, data[off:], int64(off))
				return err
			})
			if err != nil {
				return fmt.Errorf("write: %w", err)
			}
			if n == 0 {
				return fmt.Errorf("write: %w", unix.EIO)
			}
			off += n
		}
		if st.Size > int64(len(data)) {
			if err := ignoringEINTR(func() error { return unix.Ftruncate(fd, int64(len(data))) }); err != nil {
				return fmt.Errorf("truncate: %w", err)
			}
		}
		if os.FileMode(st.Mode).Perm() != perm.Perm() {
			if err := ignoringEINTR(func() error { return unix.Fchmod(fd, uint32(perm.Perm())) }); err != nil {
				return fmt.Errorf("chmod: %w", err)
			}
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
	return err
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
// per file: it writes every new content, calls syncfs(2) once on dir's
// filesystem, moves each into place, and fsyncs dir once. This is how the
// agent writes thousands of usage files every few seconds.
//
// A file that is rewritten costs no inode: beside each file WriteBatch
// keeps its previous content in a hidden spare, "." + name + ".spare". The
// next write overwrites the spare in place, and renameat2(2) with
// RENAME_EXCHANGE swaps it with the file, so the name points at the old
// inode or the new one, never a mix, and the old one becomes the next
// spare. Creating a file and renaming it over the old one, as WriteFile
// does, allocates an inode and frees one per write, which on ext4 costs
// 5 to 40 times the rest once thousands are freed a minute (the allocator
// passes over recently freed inodes). A spare that is anything but a
// regular file with one link, owned by this process's user, is removed and
// made anew, so nothing is written through a link (a directory there is
// left, and the file written as a temporary file); a target that is not a
// regular file (a symbolic link, or missing) is replaced by a plain
// rename, as WriteFile does. The one reader that can see a spare's
// content change is one that opened the file before a write and still
// reads it after the next write of the same file; a watcher of the
// directory sees each rewrite as the spare moved to the name and the name
// moved to the spare. Two WriteBatch calls must not write one directory
// at once: they would share its spares. After a failed fsync of the
// directory the moved files' spares are removed, since on disk a name may
// still be its spare's inode.
//
// The result has one entry per file, nil for each file written: a file that
// fails (a bad name, a target that is a directory, a full disk) is reported
// in its own entry and does not stop the others. errors.Join(errs...) gives
// one error for all. Failed files keep their old content. If the final
// fsync of the directory fails, every file moved into place reports that
// error: its new content is in place but may not survive a crash. If two
// files have the same name, the later one alone is written, and the
// earlier reports nil.
//
// syncfs flushes all dirty data of the filesystem, not only this batch's:
// on a filesystem busy with other writers it can take longer than a few
// fsyncs. Before Linux 5.8 syncfs did not report writeback errors.
func WriteBatch(dir string, files []File) []error {
	return writeBatch(dir, files, batchOpts{syncfs: true, spares: true})
}

// batchOpts are writeBatch's choices.
type batchOpts struct {
	// syncfs: one syncfs(2) for the batch; otherwise an fsync per file,
	// for small batches.
	syncfs bool
	// spares: keep a spare beside each file (see WriteBatch); otherwise
	// each write is a new temporary file renamed over the old one, for
	// files that come and go (markers).
	spares bool
}

// euid is this process's effective user, the owner of the spares it makes.
var euid = os.Geteuid()

// spareSuffix ends the name of a file's spare (see WriteBatch); it does not
// end in the usage files' ".json", so no reader of those takes it for one.
const spareSuffix = ".spare"

// SpareName returns the name of the spare WriteBatch keeps beside the file
// name, and false if it keeps none for so long a name.
func SpareName(name string) (string, bool) {
	if len(name) > tmpNameMax {
		return "", false // cut, two names could share a spare
	}
	return "." + name + spareSuffix, true
}

// SpareTarget returns the file whose spare (see WriteBatch) name is, if it
// is one.
func SpareTarget(name string) (string, bool) {
	if !strings.HasPrefix(name, ".") {
		return "", false
	}
	target, ok := strings.CutSuffix(name[1:], spareSuffix)
	return target, ok && target != "" && checkFileName(target) == nil
}

// A pending move of writeBatch: the file's new content, under tmp, waits
// for the sync and is then moved over its target, or exchanged with it if
// tmp is its spare.
type pendingMove struct {
	tmp   string
	spare bool
}

// writeBatch implements WriteBatch.
func writeBatch(dir string, files []File, opts batchOpts) []error {
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

	// The later of two files of one name wins: the earlier is not written
	// (with spares, both would write one spare and swap twice).
	last := make(map[string]int, len(files))
	for i, f := range files {
		last[f.Name] = i
	}
	moves := make([]pendingMove, len(files))
	pending := 0
	for i, f := range files {
		if err := checkFileName(f.Name); err != nil {
			fail(i, "write", err)
			continue
		}
		if last[f.Name] != i {
			continue
		}
		perm := f.Perm
		if perm == 0 {
			perm = 0o644
		}
		var m pendingMove
		if opts.spares {
			m.tmp, m.spare, err = writeSpare(dirfd, f.Name, f.Data, perm, !opts.syncfs)
		} else {
			m.tmp, err = writeTemp(dirfd, f.Name, f.Data, perm, !opts.syncfs)
		}
		if err != nil {
			fail(i, "write", err)
			continue
		}
		moves[i] = m
		pending++
	}
	if pending == 0 {
		return errs
	}
	if opts.syncfs {
		if err := ignoringEINTR(func() error { return unix.Syncfs(dirfd) }); err != nil {
			for i, m := range moves {
				if m.tmp != "" {
					_ = unix.Unlinkat(dirfd, m.tmp, 0)
					fail(i, "write", fmt.Errorf("syncfs: %w", err))
				}
			}
			return errs
		}
	}
	moved := 0
	for i, m := range moves {
		if m.tmp == "" {
			continue
		}
		if err := moveIntoPlace(dirfd, m, files[i].Name); err != nil {
			_ = unix.Unlinkat(dirfd, m.tmp, 0)
			fail(i, "write", err)
			moves[i].tmp = ""
			continue
		}
		moved++
	}
	if moved == 0 {
		return errs
	}
	if err := ignoringEINTR(func() error { return unix.Fsync(dirfd) }); err != nil {
		for i, m := range moves {
			if m.tmp != "" {
				fail(i, "write", fmt.Errorf("written, but fsync of the directory failed: %w", err))
				// On disk the name may still be the old inode, which is
				// now the spare: the next write must not fill it in place.
				if m.spare {
					_ = unix.Unlinkat(dirfd, m.tmp, 0)
				}
			}
		}
	}
	return errs
}

// moveIntoPlace makes name the content written under m.tmp: exchanged with
// it when m.tmp is name's spare and name is a regular file (the old content
// becomes the spare), renamed over it otherwise.
func moveIntoPlace(dirfd int, m pendingMove, name string) error {
	if m.spare {
		var st unix.Stat_t
		err := ignoringEINTR(func() error { return unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) })
		if err == nil && st.Mode&unix.S_IFMT == unix.S_IFREG {
			// Not retried on EINTR: an exchange that was done and still
			// reports it would be undone by a second one.
			err = unix.Renameat2(dirfd, m.tmp, dirfd, name, unix.RENAME_EXCHANGE)
			switch {
			case err == nil:
				return nil
			case errors.Is(err, unix.EINTR):
				return fmt.Errorf("exchange with the spare interrupted: %w", err)
			}
			// Replaced or removed since, or a filesystem without
			// RENAME_EXCHANGE: a plain rename does.
		}
	}
	if err := ignoringEINTR(func() error { return unix.Renameat(dirfd, m.tmp, dirfd, name) }); err != nil {
		return fmt.Errorf("rename temporary file: %w", err)
	}
	return nil
}

// writeSpare writes data to name's spare in the directory dirfd, in place,
// making the spare first if there is none, or none fit to write (see
// WriteBatch); if name can have no spare or one cannot be made, it writes a
// temporary file (writeTemp). It returns the name written and whether it
// is the spare. On failure the spare is removed: it held only an old copy.
func writeSpare(dirfd int, name string, data []byte, perm os.FileMode, sync bool) (string, bool, error) {
	spare, ok := SpareName(name)
	if !ok {
		tmp, err := writeTemp(dirfd, name, data, perm, sync)
		return tmp, false, err
	}
	var st unix.Stat_t
	fd, err := openSpare(dirfd, spare, &st)
	if err != nil {
		tmp, err := writeTemp(dirfd, name, data, perm, sync)
		return tmp, false, err
	}
	if err := fillAndClose(fd, &st, data, perm, sync); err != nil {
		_ = unix.Unlinkat(dirfd, spare, 0)
		return "", false, err
	}
	return spare, true, nil
}

// openSpare opens the spare named spare for writing in place, making it if
// it is missing. Anything there but a regular file with one link owned by
// this process's user is removed first: it is not a spare this package
// made, and writing it could write through a hard link. A FIFO is not
// waited for (O_NONBLOCK), a terminal not taken (O_NOCTTY), a symbolic
// link not followed; a directory cannot be removed, and the caller writes
// a temporary file instead. It fills st with the status of the file it
// opened.
func openSpare(dirfd int, spare string, st *unix.Stat_t) (int, error) {
	var fd int
	err := ignoringEINTR(func() (err error) {
		fd, err = unix.Openat(dirfd, spare, unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
		return err
	})
	if err == nil {
		if err := unix.Fstat(fd, st); err == nil && st.Mode&unix.S_IFMT == unix.S_IFREG && st.Nlink == 1 && int(st.Uid) == euid {
			return fd, nil
		}
		unix.Close(fd)
	}
	if err == nil || !errors.Is(err, unix.ENOENT) {
		if err := unix.Unlinkat(dirfd, spare, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return -1, err // a directory, say: the caller writes a temporary file
		}
	}
	err = ignoringEINTR(func() (err error) {
		fd, err = unix.Openat(dirfd, spare, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		return err
	})
	if err != nil {
		return -1, err
	}
	if err := unix.Fstat(fd, st); err != nil {
		unix.Close(fd)
		_ = unix.Unlinkat(dirfd, spare, 0)
		return -1, err
	}
	return fd, nil
}

// RemoveStaleTemps removes the temporary files this package's writers left
// in dir when they were interrupted (a crash or a power cut between creating
// and renaming one), and the spares of files that are gone (see
// WriteBatch), that were last modified more than olderThan ago, and returns
// their names. A temporary file of a write still in progress is younger
// than any sensible olderThan (a minute is plenty). Nothing else is
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
	names := make(map[string]bool, len(ents))
	for _, e := range ents {
		names[e.Name()] = true
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		if target, spare := SpareTarget(e.Name()); !isTempName(e.Name()) && (!spare || names[target]) {
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
