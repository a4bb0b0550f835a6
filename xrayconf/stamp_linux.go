package xrayconf

import (
	"io/fs"
	"syscall"
)

// sysStamp is the part of a file's stamp that Linux adds.
type sysStamp struct {
	dev, ino uint64
	ctime    int64 // ns
}

func sysStampOf(fi fs.FileInfo) sysStamp {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return sysStamp{}
	}
	return sysStamp{dev: uint64(st.Dev), ino: uint64(st.Ino), ctime: st.Ctim.Nano()}
}
