package agent

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"
)

// dirWatch reports files of one directory that someone other than the agent
// deleted, moved away or wrote, so the agent can put its version back within
// a tick. The agent itself only ever renames finished files into place,
// which raises none of the watched events for the final name.
//
// The inotify descriptor is non-blocking and drained once per tick by the
// loop, and pumped by the usage file writer while it writes (see pump): no
// goroutine of its own, and nothing to do when nobody touched the
// directory.
type dirWatch struct {
	// mu protects the following: the loop drains the watch, the usage
	// file writer pumps it.
	mu    sync.Mutex
	dir   string
	fd    int
	buf   []byte
	names []string // read by pump, not yet drained
	all   bool     // read by pump: every file must be written again
}

const watchMask = unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_CLOSE_WRITE | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF

func newDirWatch(dir string) *dirWatch { return &dirWatch{dir: dir, fd: -1} }

// setDir makes the watch watch dir from the next drain on.
func (w *dirWatch) setDir(dir string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.closeLocked()
	w.dir, w.names, w.all = dir, nil, false
}

// start (re)creates the directory and the watch.
func (w *dirWatch) start() error {
	w.closeLocked()
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
	w.mu.Lock()
	defer w.mu.Unlock()
	w.closeLocked()
}

func (w *dirWatch) closeLocked() {
	if w.fd >= 0 {
		unix.Close(w.fd)
		w.fd = -1
	}
}

// drain returns the names touched since the last call, and all=true when
// the directory itself was removed or moved, the kernel's queue of events
// overflowed (or the watch was not running), in which case every file must
// be written again. A failed restart of the watch is returned as an error
// and retried next time.
func (w *dirWatch) drain() (names []string, all bool, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fd < 0 {
		w.names, w.all = nil, false
		return nil, true, w.start()
	}
	err = w.read()
	names, all = w.names, w.all
	w.names, w.all = nil, false
	return names, all, err
}

// pump reads the events queued so far and keeps them for the next drain.
// The usage file writer calls it after each chunk of files: each file the
// agent writes raises two events (for its temporary name, which drain
// skips), and the kernel keeps at most fs.inotify.max_queued_events (16,384
// by default) before it drops them all for an overflow, which makes every
// file be written again, which overflows again: an agent that writes more
// than some 8,000 files between two ticks would rewrite every file for
// ever.
func (w *dirWatch) pump() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fd >= 0 {
		w.read()
	}
}

// read reads the queued events into names and all. An event that asks for
// every file, or a failed read, restarts the watch.
func (w *dirWatch) read() error {
	for {
		n, err := unix.Read(w.fd, w.buf)
		if errors.Is(err, unix.EAGAIN) || n == 0 {
			return nil
		}
		if err != nil {
			w.all = true
			return w.start()
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&w.buf[off]))
			nameBytes := w.buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)]
			off += unix.SizeofInotifyEvent + int(ev.Len)
			switch {
			case ev.Mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF|unix.IN_IGNORED|unix.IN_Q_OVERFLOW) != 0:
				w.all = true
			default:
				name := string(bytes.TrimRight(nameBytes, "\x00"))
				if base, ok := strings.CutSuffix(name, ".json"); ok && !strings.HasPrefix(name, ".") {
					w.names = append(w.names, base)
				}
			}
		}
		if w.all {
			return w.start()
		}
	}
}
