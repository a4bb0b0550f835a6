package opsfiles

import (
	"errors"
	"io"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"
)

// Errors of the readers for symbolic links (see "Symbolic links" in the
// package documentation). Each is wrapped in an *fs.PathError naming the
// link.
var (
	// ErrSymlink is a file of the agent's own (a usage file) that is a
	// symbolic link: it is not read. The writers replace such a link with
	// the file.
	ErrSymlink = errors.New("is a symbolic link")
)

var (
	errNotRegular = errors.New("not a regular file")
	errTooLarge   = errors.New("file too large")
)

// openRegular opens name, relative to the directory dirfd (unix.AT_FDCWD:
// the working directory), for reading. It never follows a symbolic link at
// name's last component (ErrSymlink), never blocks on a FIFO, and refuses
// anything but a regular file. path names the file in errors.
func openRegular(dirfd int, name, path string) (*os.File, error) {
	var fd int
	err := ignoringEINTR(func() (err error) {
		fd, err = unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		return err
	})
	if errors.Is(err, unix.ELOOP) {
		// With O_NOFOLLOW: the last component is a link, or the
		// directories above hold too many.
		var st unix.Stat_t
		if unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFLNK {
			err = ErrSymlink
		}
	}
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	info, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !info.Mode().IsRegular() {
		f.Close()
		return nil, &fs.PathError{Op: "read", Path: path, Err: errNotRegular}
	}
	return f, nil
}

// readRegular reads name, relative to dirfd, as openRegular opens it,
// refusing a file larger than max bytes (errTooLarge). path names the file
// in errors.
func readRegular(dirfd int, name, path string, max int64) ([]byte, error) {
	f, err := openRegular(dirfd, name, path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, &fs.PathError{Op: "read", Path: path, Err: err}
	}
	if int64(len(data)) > max {
		return nil, &fs.PathError{Op: "read", Path: path, Err: errTooLarge}
	}
	return data, nil
}
