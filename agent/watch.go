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

	"github.com/myvpn/bwagent/opsfiles"
)

// dirWatch reports files of one directory that someone other than the agent
// deleted, moved away or wrote, so the agent can put its version back within
// a tick. The agent itself only ever moves finished files into place: a
// rename, which raises none of the reported events for the final name, or
// an exchange with the file's spare (see opsfiles.WriteBatch), whose four
// events (the spare moved to the name, the name moved to the spare) the
// watch recognises as one (see swap).
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
	swap  swap     // an exchange of a file with its spare, being read
}

const watchMask = unix.IN_DELETE | unix.IN_MOVED_FROM | unix.IN_MOVED_TO | unix.IN_CLOSE_WRITE | unix.IN_DELETE_SELF | unix.IN_MOVE_SELF

// swap follows the events of a file's exchange with its spare, which the
// kernel queues as two moves in a row: the spare to the file's name, then
// the file's name to the spare, each a MOVED_FROM and a MOVED_TO of one
// cookie. Only the whole sequence is the agent's own write; a plain move
// of the file away, to its spare's name included, is someone else's.
type swap struct {
	step   int    // events of the sequence seen so far, 0 to 3
	file   []byte // the file's name (its room reused: no allocation a file)
	cookie uint32 // the cookie of the move under way
	// drains counts the drains that found the sequence at step 3: the
	// last event comes from the same system call, so one that never comes
	// is the file moved away by someone else.
	drains int
}

// next takes one event of name (with its cookie and mask) and reports
// whether it belongs to an exchange under way; if not, and the events
// before it turn out not to be one either, moved is a file someone moved
// away. name need not outlive the call.
func (s *swap) next(mask, cookie uint32, name string) (ours bool, moved string) {
	from, to := mask&unix.IN_MOVED_FROM != 0, mask&unix.IN_MOVED_TO != 0
	switch s.step {
	case 1: // the spare moved from
		if to && cookie == s.cookie && name == string(s.file) {
			s.step = 2
			return true, ""
		}
	case 2: // and to the file's name: the file must come next
		if from && name == string(s.file) {
			s.step, s.cookie = 3, cookie
			return true, ""
		}
		// A plain rename of the spare into place: the agent's own, when
		// the file was missing.
	case 3: // the file moved from
		if file, ok := opsfiles.SpareTarget(name); to && cookie == s.cookie && ok && file == string(s.file) {
			s.reset()
			return true, ""
		}
		moved = string(s.file) // moved elsewhere, by someone else
	}
	s.reset()
	if file, ok := opsfiles.SpareTarget(name); from && ok {
		s.step, s.file, s.cookie = 1, append(s.file, file...), cookie
		return true, moved
	}
	return false, moved
}

// reset makes s the zero swap, keeping the room of its file's name.
func (s *swap) reset() { *s = swap{file: s.file[:0]} }

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
	w.swap.reset()
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
	if w.swap.step == 3 {
		if w.swap.drains++; w.swap.drains > 1 {
			if base, ok := strings.CutSuffix(string(w.swap.file), ".json"); ok {
				w.names = append(w.names, base)
			}
			w.swap.reset()
		}
	}
	names, all = w.names, w.all
	w.names, w.all = nil, false
	return names, all, err
}

// pump reads the events queued so far and keeps them for the next drain.
// The usage file writer calls it after each chunk of files: each file the
// agent writes raises events (a new one two, for its temporary name; a
// rewritten one five: the spare written, then exchanged), and the kernel
// keeps at most fs.inotify.max_queued_events (16,384 by default) before it
// drops them all for an overflow, which makes every file be written again,
// which overflows again: an agent that wrote more than some 3,000 files
// between two reads would rewrite every file for ever.
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
				// The name as read, until the next read: events of the
				// agent's own writes (five a file) allocate nothing.
				nameBytes = bytes.TrimRight(nameBytes, "\x00")
				name := unsafe.String(unsafe.SliceData(nameBytes), len(nameBytes))
				ours, moved := w.swap.next(ev.Mask, ev.Cookie, name)
				if base, ok := strings.CutSuffix(moved, ".json"); ok {
					w.names = append(w.names, base)
				}
				if ours || ev.Mask&unix.IN_MOVED_TO != 0 {
					continue // the agent's own, or a file moved in
				}
				if base, ok := strings.CutSuffix(name, ".json"); ok && !strings.HasPrefix(name, ".") {
					w.names = append(w.names, strings.Clone(base))
				}
			}
		}
		if w.all {
			return w.start()
		}
	}
}
