package agent

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// dirWatch reports files of one directory that someone other than the agent
// deleted, moved away or wrote, so the agent can put its version back within
// a tick. The agent itself only ever renames finished files into place,
// which raises none of the watched events for the final name.
//
// The inotify descriptor is non-blocking and drained once per tick: no
// goroutine, and nothing to do when nobody touched the directory.
type dirWatch struct {
	dir string
	fd  int
	buf []byte
}

const watchMask = unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_CLOSE_WRITE | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF

func newDirWatch(dir string) *dirWatch { return &dirWatch{dir: dir, fd: -1} }

// start (re)creates the directory and the watch.
func (w *dirWatch) start() error {
	w.close()
	if err := os.MkdirAll(w.dir, 0o755); err != nil {
		return err
	}
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return fmt.Errorf("inotify: %w", err)
	}
	if _, err := unix.InotifyAddWatch(fd, w.dir, watchMask); err != nil {
		unix.Close(fd)
		return fmt.Errorf("watch %s: %w", w.dir, err)
	}
	w.fd = fd
	if w.buf == nil {
		w.buf = make([]byte, 64*1024)
	}
	return nil
}

func (w *dirWatch) close() {
	if w.fd >= 0 {
		unix.Close(w.fd)
		w.fd = -1
	}
}

// drain returns the names touched since the last call, and all=true when
// the directory itself was removed or moved (or the watch was not running),
// in which case every file must be written again. A failed restart of the
// watch is returned as an error and retried next time.
func (w *dirWatch) drain() (names []string, all bool, err error) {
	if w.fd < 0 {
		return nil, true, w.start()
	}
	for {
		n, err := unix.Read(w.fd, w.buf)
		if errors.Is(err, unix.EAGAIN) || n == 0 {
			return names, all, nil
		}
		if err != nil {
			return names, true, w.start()
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&w.buf[off]))
			nameBytes := w.buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)]
			off += unix.SizeofInotifyEvent + int(ev.Len)
			switch {
			case ev.Mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED|unix.IN_Q_OVERFLOW) != 0:
				all = true
			default:
				name := string(bytes.TrimRight(nameBytes, "\x00"))
				if base, ok := strings.CutSuffix(name, ".json"); ok && !strings.HasPrefix(name, ".") {
					names = append(names, base)
				}
			}
		}
		if all {
			return names, true, w.start()
		}
	}
}
