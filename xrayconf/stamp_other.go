//go:build !linux

package xrayconf

import "io/fs"

// sysStamp is empty where this package does not read the system's own
// stat fields: size and modification time must do.
type sysStamp struct{}

func sysStampOf(fs.FileInfo) sysStamp { return sysStamp{} }
