package opsfiles

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Errors of the readers and writers for symbolic links (see "Symbolic links"
// in the package documentation). Each is wrapped in an *fs.PathError naming
// the link.
var (
	// ErrSymlink is a file of the agent's own (a usage file) that is a
	// symbolic link: it is not read. The writers replace such a link with
	// the file.
	ErrSymlink = errors.New("is a symbolic link")

	// ErrUntrustedLink is a symbolic link at the path of an operator's file
	// (the limits file, the block log) that is owned by neither root nor the
	// agent's own user: it is neither followed nor replaced. Replace it with
	// the file, or with a link made by root.
	ErrUntrustedLink = errors.New("symbolic link owned by neither root nor this process's user; not followed (replace it with the file, or a link made by root)")
)

var (
	errNotRegular = errors.New("not a regular file")
	errTooLarge   = errors.New("file too large")
)

// maxLinks bounds the symbolic links followTrusted follows, as the kernel
// bounds a path's.
const maxLinks = 40

// followTrusted returns the path of the file path leads to once the
// symbolic links at its last component are followed, each only if it is
// owned by root or by this process's effective user: a link the operator
// made, not one planted by someone who can write to the directory (which
// could lead the agent to any file on the system). A link owned by anyone
// else gives ErrUntrustedLink. Links among the directories above are left
// to the kernel, which follows them. A missing file, or a link to one, is
// no error: the result is where the file would be.
func followTrusted(path string) (string, error) {
	p := path
	for range maxLinks {
		info, err := os.Lstat(p)
		if errors.Is(err, fs.ErrNotExist) {
			return p, nil
		}
		if err != nil {
			return "", err
		}
		if info.Mode()&fs.ModeSymlink == 0 {
			return p, nil
		}
		uid := -1
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			uid = int(st.Uid)
		}
		if uid != 0 && uid != os.Geteuid() {
			return "", &fs.PathError{Op: "follow", Path: p, Err: fmt.Errorf("%w; its owner is uid %d", ErrUntrustedLink, uid)}
		}
		target, err := os.Readlink(p)
		if err != nil {
			return "", err
		}
		if !filepath.IsAbs(target) {
			// Relative to the link's directory, not cleaned (see
			// rawDir).
			target = p[:strings.LastIndexByte(p, '/')+1] + target
		}
		p = target
	}
	return "", &fs.PathError{Op: "follow", Path: path, Err: unix.ELOOP}
}

// rawDir returns the directory part of path, as the kernel reads it: not
// cleaned, so that ".." after a linked directory leads where it leads the
// kernel, not where filepath.Dir's lexical cleaning would.
func rawDir(path string) string {
	i := strings.LastIndexByte(path, '/')
	switch {
	case i < 0:
		return "."
	case i == 0:
		return "/"
	}
	return path[:i]
}

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
