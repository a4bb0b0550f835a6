package xrayaccess

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// idlePoll is how often [Follower.Next] polls while a watch of the log's
// directory is in place and reports nothing: a safety net, since the
// watch reports every write.
const idlePoll = time.Second

// watchRetry is how often a lost watch (the directory removed, inotify
// refused) is tried again; Next polls every Interval meanwhile.
const watchRetry = 5 * time.Second

// wakeMask is what the watch of the log's directory reports: the log
// written or truncated (IN_MODIFY), a new file at its name, the file moved
// or removed, and the directory itself gone.
const wakeMask = unix.IN_MODIFY | unix.IN_CREATE | unix.IN_MOVED_TO | unix.IN_MOVED_FROM | unix.IN_DELETE |
	unix.IN_DELETE_SELF | unix.IN_MOVE_SELF

// wake lets Next sleep while Xray writes nothing. Polling every Interval
// (10 ms in the agent, so that a connection is claimed within
// milliseconds of its line) costs about 1% of a core on an idle server; an
// inotify watch of the log's directory wakes Next when the log changes,
// and Next polls idlePoll apart otherwise. The watch only wakes: what is
// read is still what each poll finds, so an event missed or a file the
// watch cannot see (a rotated-away log in another directory: Next polls
// every Interval while it reads one) costs latency, never a line.
type wake struct {
	dir, base []byte // the log's directory and name, as inotify reports them
	buf       []byte // events, read by wait alone

	mu     sync.Mutex // protects the following
	f      *os.File   // the inotify descriptor, through the runtime's poller; nil without a watch
	closed bool
	tried  time.Time // the last attempt at a watch
}

func newWake(path string) *wake {
	w := &wake{dir: []byte(filepath.Dir(path)), base: []byte(filepath.Base(path)), buf: make([]byte, 4096)}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.openLocked()
	return w
}

// openLocked sets up the watch, if it can, now.
func (w *wake) openLocked() {
	w.tried = time.Now()
	fd, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
	if err != nil {
		return
	}
	if _, err := unix.InotifyAddWatch(fd, string(w.dir), wakeMask); err != nil {
		unix.Close(fd)
		return
	}
	// Non-blocking: os.NewFile puts it in the runtime's poller, so a read
	// waits without a thread and honours a deadline.
	w.f = os.NewFile(uintptr(fd), "inotify")
}

// file returns the watch's descriptor, nil without one: it tries to set
// one up again watchRetry after the last attempt.
func (w *wake) file() *os.File {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil && !w.closed && time.Since(w.tried) >= watchRetry {
		w.openLocked()
	}
	return w.f
}

// drop closes the watch's descriptor f, if it is still the current one.
func (w *wake) drop(f *os.File) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == f {
		f.Close()
		w.f = nil
	}
}

// close closes the watch; a wait under way returns.
func (w *wake) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.closed = true
	if w.f != nil {
		w.f.Close()
		w.f = nil
	}
}

// wait returns once the log changed, ctx ended or timeout passed, and
// reports whether a watch is in place; without one it returns at once, and
// the caller polls every Interval. One goroutine at a time.
func (w *wake) wait(ctx context.Context, timeout time.Duration) (watching bool) {
	f := w.file()
	if f == nil {
		return false
	}
	stop := context.AfterFunc(ctx, func() { f.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	deadline := time.Now().Add(timeout)
	for {
		if err := f.SetReadDeadline(deadline); err != nil {
			w.drop(f)
			return false
		}
		if ctx.Err() != nil {
			return true
		}
		n, err := f.Read(w.buf)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			return true
		case err != nil: // closed, or failed
			w.drop(f)
			return false
		}
		woken, lost := w.scan(w.buf[:n])
		if lost {
			w.drop(f)
			return false
		}
		if woken {
			return true
		}
	}
}

// scan reads a batch of events: woken if one is about the log (or the
// queue overflowed), lost if the watch is gone (the directory removed or
// moved).
func (w *wake) scan(buf []byte) (woken, lost bool) {
	for off := 0; off+unix.SizeofInotifyEvent <= len(buf); {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
		end := min(len(buf), off+unix.SizeofInotifyEvent+int(ev.Len))
		name := bytes.TrimRight(buf[off+unix.SizeofInotifyEvent:end], "\x00")
		off = end
		switch {
		case ev.Mask&(unix.IN_IGNORED|unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) != 0:
			lost = true
		case ev.Mask&unix.IN_Q_OVERFLOW != 0 || bytes.Equal(name, w.base):
			woken = true
		}
	}
	return woken, lost
}
