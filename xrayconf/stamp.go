package xrayconf

import (
	"io/fs"
	"os"
	"slices"
)

// fileStamp is what changes when a file is written or replaced: its size,
// modification time and, where the system has them, inode, device and
// change time (which, unlike the modification time, no tool can set back).
type fileStamp struct {
	name  string
	size  int64
	mtime int64 // ns
	sys   sysStamp
}

// stampOf returns the stamp of the file name whose info is fi.
func stampOf(name string, fi fs.FileInfo) fileStamp {
	return fileStamp{name: name, size: fi.Size(), mtime: fi.ModTime().UnixNano(), sys: sysStampOf(fi)}
}

// Changed reports whether reading the config again could give another
// result: for a config from [Load], the files it would read now are other
// files (one of paths appeared or went, the directory lists other config
// files) or one of them was written or replaced since it was read; for one
// from [LoadFiles], one of the files changed. It costs a stat of each file
// (and a read of the directory), so a caller can poll it, and reload when it
// reports true. A Config from [Parse] never changes.
func (c *Config) Changed() bool {
	if c.src.kind == srcNone {
		return false
	}
	files, err := c.src.files()
	if err != nil || !slices.Equal(files, c.Files) || len(files) != len(c.stamps) {
		return true
	}
	for i, name := range files {
		fi, err := os.Stat(name)
		if err != nil || stampOf(name, fi) != c.stamps[i] {
			return true
		}
	}
	return false
}
