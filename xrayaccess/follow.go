package xrayaccess

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults of [Options].
const (
	DefaultInterval = 100 * time.Millisecond
	DefaultMaxLine  = 4096
	DefaultGrace    = 2 * time.Minute
)

const (
	// forgeWindow bounds the client's bytes that one line of Xray's can
	// carry raw: a domain name of up to 255 bytes, line breaks included
	// (see the package documentation). Lines that start less than this far
	// past the end of a line that can carry them may be forged.
	forgeWindow = 256
	// minMaxLine is the least Options.MaxLine: a line of Xray's with a
	// domain of 255 bytes, two long tags and an email of quota.MaxNameLen
	// bytes fits.
	minMaxLine = 1024
	// maxRead bounds the bytes that one Poll reads from one file, so that
	// a large backlog is returned in parts.
	maxRead = 1 << 20
	// checkLen is how many bytes before a Position's offset its Check
	// covers, and how many the follower compares to tell a truncated and
	// written-again file from one that only grew: enough for a whole line
	// of Xray's, whose time tells it from other lines.
	checkLen = 256
	// maxOld bounds the rotated-away files that are still read.
	maxOld = 8
)

// Options configures a [Follower]; the zero value is the defaults.
type Options struct {
	// Resume continues where an earlier Follower of the same path left off
	// (its [Follower.Position]), if the file at the path is still that
	// file, not truncated since. If it is another file (rotated while no
	// follower ran) or was truncated, every line of the file at the path
	// is new: it is read from its start. Nil: from the file's end.
	Resume *Position
	// Interval is how often [Follower.Next] polls the file while there is
	// nothing new, DefaultInterval if zero: with a watch of the file's
	// directory (inotify), when the file changed, at most once an
	// Interval, and a second apart while it does not; without one, or
	// while a rotated-away file is read, every Interval.
	Interval time.Duration
	// MaxLine bounds a line, its line break excluded: a longer line is
	// skipped, never buffered, and counted in Stats.TooLong.
	// DefaultMaxLine if zero; at least 1024.
	MaxLine int
	// Grace is how long a file that was rotated away (renamed, and a new
	// file made at the path) is still read after it last grew: Xray
	// writes on to the file it has open until its log writer has had
	// nothing to write for a minute (common/log/logger.go), so on a busy
	// server a renamed access log keeps growing. DefaultGrace if zero.
	Grace time.Duration
	// Location is the time zone that Xray writes its times in; time.Local
	// if nil.
	Location *time.Location
}

// Position is where a Follower is in the file at its path, to resume from
// with [Options.Resume] after a restart.
type Position struct {
	Dev, Inode uint64 // the file
	Offset     int64  // the start of the first line not returned yet
	// Check is the CRC-32 (IEEE) of the up to 256 bytes before Offset, to
	// tell the file from one truncated and written again past Offset.
	Check uint32
}

// Stats counts the lines a Follower read. Lines is the sum of the other
// counts but Rotations and Truncations.
type Stats struct {
	Lines        uint64 // complete lines read
	Attributions uint64 // accepted lines with an email, returned
	NoEmail      uint64 // accepted lines without an email
	BadEmail     uint64 // accepted lines whose email fails quota.ValidName
	Suspect      uint64 // accepted lines that may be forged, skipped (see the package documentation)
	Rejected     uint64 // rejected connections
	DNS          uint64 // lines of DNS queries (log.dnsLog)
	Malformed    uint64 // lines that are none of Xray's
	TooLong      uint64 // lines longer than MaxLine, skipped
	Rotations    uint64 // a new file at the path
	Truncations  uint64 // the file got shorter, or was written again before the follower's offset
}

// Follower reads the lines that Xray appends to its access log and
// returns the connections it attributes to users. Poll and Next must not
// be called concurrently; Position, Stats and Close may be called from any
// goroutine.
type Follower struct {
	// Constant after Open.
	path     string
	maxLine  int
	interval time.Duration
	grace    time.Duration
	loc      *time.Location

	lastErr string // Next's last error, for Next only
	// found is when Next's last poll found attributions and read to the
	// end of the file, for Next only: zero otherwise.
	found time.Time

	wakeOnce sync.Once
	wake     *wake // wakes Next when the file changes; made by its first call

	mu      sync.Mutex // protects the following
	cur     *file      // the file at the path; nil while there is none
	old     []*file    // files rotated away, still read
	stats   Stats
	buf     []byte
	priming bool // reading the lines before the start: no returns, no counts
	closed  bool
}

// file is an open access log file and where the follower is in it.
type file struct {
	fd       int
	dev, ino uint64
	off      int64  // the next byte to read
	line     []byte // the line being read, up to maxLine bytes
	lineAt   int64  // the offset of its first byte
	skip     bool   // it is longer than maxLine: the rest is discarded
	suspect  int64  // lines that start before this offset may be forged
	grewAt   time.Time
	// last holds the last lastN (up to checkLen) bytes read, those before
	// off: if the file no longer has them there, it was truncated.
	last  [checkLen]byte
	lastN int
}

// Open starts following the access log at path (the [xrayconf.Config]
// AccessLog): from its end, or from opts.Resume. A file that does not
// exist yet is waited for, and read from its start once it does. The path
// is opened with O_NOFOLLOW and must be a regular file, else the error
// wraps [ErrUnsafeFile]; the follower never follows a symbolic link it did
// not make (directories above the file are the operator's). Close the
// Follower when done.
func Open(path string, opts Options) (*Follower, error) {
	f := &Follower{
		path:     path,
		maxLine:  opts.MaxLine,
		interval: opts.Interval,
		grace:    opts.Grace,
		loc:      opts.Location,
		buf:      make([]byte, 64<<10),
	}
	if f.maxLine == 0 {
		f.maxLine = DefaultMaxLine
	}
	if f.maxLine < minMaxLine {
		return nil, fmt.Errorf("xrayaccess: MaxLine %d, want %d or more", f.maxLine, minMaxLine)
	}
	if f.interval <= 0 {
		f.interval = DefaultInterval
	}
	if f.grace <= 0 {
		f.grace = DefaultGrace
	}
	if f.loc == nil {
		f.loc = time.Local
	}
	fl, size, err := f.openFile()
	switch {
	case errors.Is(err, unix.ENOENT):
		return f, nil
	case err != nil:
		return nil, err
	}
	f.cur = fl
	start := size
	if r := opts.Resume; r != nil {
		start = 0
		if r.Dev == fl.dev && r.Inode == fl.ino && r.Offset >= 0 && r.Offset <= size {
			if sum, err := checksum(fl.fd, r.Offset); err == nil && sum == r.Check {
				start = r.Offset
			}
		}
	}
	if err := f.prime(fl, start); err != nil {
		fl.close()
		return nil, err
	}
	return f, nil
}

// openFile opens the regular file at the path for reading, refusing a
// symbolic link or any other kind of file, and returns it with its size.
func (f *Follower) openFile() (*file, int64, error) {
	path := f.path
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ELOOP) {
		return nil, 0, fmt.Errorf("xrayaccess: %w: %s is a symbolic link", ErrUnsafeFile, path)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("xrayaccess: open %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, 0, fmt.Errorf("xrayaccess: stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, 0, fmt.Errorf("xrayaccess: %w: %s has mode %#o", ErrUnsafeFile, path, st.Mode)
	}
	fl := &file{fd: fd, dev: st.Dev, ino: st.Ino, line: make([]byte, 0, f.maxLine), grewAt: time.Now()}
	return fl, st.Size, nil
}

// prime positions fl at start, having read (without returning or counting
// anything) the bytes before it that can make the first lines suspect: a
// line that can carry a client's raw bytes less than forgeWindow bytes
// before start. The line those bytes begin in is of unknown kind, so it
// counts as such a line.
func (f *Follower) prime(fl *file, start int64) error {
	from := max(0, start-int64(f.maxLine+forgeWindow))
	fl.off, fl.lineAt, fl.skip = from, from, from > 0
	f.priming = true
	defer func() { f.priming = false }()
	for fl.off < start {
		n, err := unix.Pread(fl.fd, f.buf[:min(int64(len(f.buf)), start-fl.off)], fl.off)
		if err != nil {
			return fmt.Errorf("xrayaccess: read %s: %w", f.path, err)
		}
		if n == 0 { // shorter than it was a moment ago: see poll
			break
		}
		f.consume(fl, f.buf[:n], nil)
	}
	return nil
}

// checksum returns the CRC-32 of the up to checkLen bytes before off.
func checksum(fd int, off int64) (uint32, error) {
	var b [checkLen]byte
	from := max(0, off-checkLen)
	n, err := unix.Pread(fd, b[:off-from], from)
	if err != nil {
		return 0, err
	}
	if int64(n) != off-from {
		return 0, errors.New("short read")
	}
	return crc32.ChecksumIEEE(b[:n]), nil
}

// Poll reads what was appended to the access log since the last call
// (up to 1 MiB of each file per call) and returns the attributions in it:
// the accepted connections with an email, not suspect, in the order of
// the file. It notices a rotation (a new file at the path: the old one is
// read to its end, and on while it grows, see Options.Grace) and a
// truncation (copytruncate: read again from the start). An error says
// what is wrong now, such as a path that became a symbolic link
// ([ErrUnsafeFile]); the entries returned with it are valid, and the
// follower goes on with the files it has open.
func (f *Follower) Poll() ([]Entry, error) {
	es, _, err := f.poll(nil)
	return es, err
}

// poll is Poll, appending to es; more tells that a file has more to read
// now.
func (f *Follower) poll(es []Entry) (_ []Entry, more bool, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, false, ErrClosed
	}
	now := time.Now()
	err = f.checkPath()
	var keep []*file
	for _, fl := range f.old {
		m, rerr := f.read(fl, &es, now)
		more = more || m
		if rerr == nil && !m && now.Sub(fl.grewAt) > f.grace {
			fl.close()
			continue
		}
		err = errors.Join(err, rerr)
		keep = append(keep, fl)
	}
	f.old = keep
	if f.cur != nil {
		m, rerr := f.read(f.cur, &es, now)
		more = more || m
		err = errors.Join(err, rerr)
	}
	return es, more, err
}

// checkPath looks at the path: a new regular file there becomes the
// current one, the current one goes to f.old.
func (f *Follower) checkPath() error {
	var st unix.Stat_t
	err := unix.Lstat(f.path, &st)
	if errors.Is(err, unix.ENOENT) {
		return nil // renamed, no new one yet: Xray may write on to it
	}
	if err != nil {
		return fmt.Errorf("xrayaccess: stat %s: %w", f.path, err)
	}
	if f.cur != nil && st.Dev == f.cur.dev && st.Ino == f.cur.ino {
		return nil
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		kind := fmt.Sprintf("has mode %#o", st.Mode)
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			kind = "is a symbolic link"
		}
		return fmt.Errorf("xrayaccess: %w: %s %s", ErrUnsafeFile, f.path, kind)
	}
	fl, _, err := f.openFile()
	if err != nil {
		return err
	}
	if f.cur != nil && fl.dev == f.cur.dev && fl.ino == f.cur.ino {
		fl.close() // replaced and back between the two looks
		return nil
	}
	if f.cur != nil {
		f.cur.grewAt = time.Now()
		f.old = append(f.old, f.cur)
		if len(f.old) > maxOld {
			f.old[0].close()
			f.old = f.old[1:]
		}
		f.stats.Rotations++
	}
	f.cur = fl // a new file: every line in it is new
	return nil
}

// read reads up to maxRead new bytes of fl; more tells that it stopped
// before the end.
func (f *Follower) read(fl *file, es *[]Entry, now time.Time) (more bool, err error) {
	var st unix.Stat_t
	if err := unix.Fstat(fl.fd, &st); err != nil {
		return false, fmt.Errorf("xrayaccess: stat %s: %w", f.path, err)
	}
	if st.Size < fl.off || st.Size > fl.off && !f.sameBefore(fl) {
		// Truncated (copytruncate), and perhaps written again since.
		f.stats.Truncations++
		*fl = file{fd: fl.fd, dev: fl.dev, ino: fl.ino, line: fl.line[:0], grewAt: now}
	}
	for budget := maxRead; budget > 0; {
		n, err := unix.Pread(fl.fd, f.buf[:min(len(f.buf), budget)], fl.off)
		if err != nil {
			return false, fmt.Errorf("xrayaccess: read %s: %w", f.path, err)
		}
		if n == 0 {
			return false, nil
		}
		fl.grewAt = now
		f.consume(fl, f.buf[:n], es)
		budget -= n
	}
	return true, nil
}

// sameBefore tells whether the bytes before fl.off are still those the
// follower read there, as far as the last checkLen of them tell.
func (f *Follower) sameBefore(fl *file) bool {
	if fl.off == 0 {
		return true
	}
	var b [checkLen]byte
	from := max(0, fl.off-checkLen)
	n, err := unix.Pread(fl.fd, b[:fl.off-from], from)
	if err != nil || int64(n) != fl.off-from {
		return false
	}
	t := fl.tail()
	return bytes.HasSuffix(b[:n], t)
}

// consume processes the bytes of fl that start at fl.off, adding the
// attributions to es (nil while priming).
func (f *Follower) consume(fl *file, data []byte, es *[]Entry) {
	fl.remember(data)
	for len(data) > 0 {
		i := bytes.IndexByte(data, '\n')
		chunk := data
		if i >= 0 {
			chunk = data[:i]
		}
		if !fl.skip {
			if len(fl.line)+len(chunk) > f.maxLine {
				fl.skip, fl.line = true, fl.line[:0]
			} else {
				fl.line = append(fl.line, chunk...)
			}
		}
		if i < 0 {
			fl.off += int64(len(data))
			return
		}
		fl.off += int64(i + 1)
		f.endLine(fl, es)
		fl.line, fl.skip, fl.lineAt = fl.line[:0], false, fl.off
		data = data[i+1:]
	}
}

// endLine handles the line of fl that ends at fl.off.
func (f *Follower) endLine(fl *file, es *[]Entry) {
	count := func(n *uint64) {
		if !f.priming {
			*n++
			f.stats.Lines++
		}
	}
	suspect := fl.lineAt < fl.suspect
	// Every line but an accepted one or a rejected one with a closed
	// reason can carry a client's raw bytes, line breaks included: lines
	// that start soon after its end may be made of them.
	opens := func() { fl.suspect = max(fl.suspect, fl.off+forgeWindow) }
	if fl.skip {
		count(&f.stats.TooLong)
		opens()
		return
	}
	e, err := Parse(fl.line, f.loc)
	switch {
	case (err == nil || errors.Is(err, ErrBadEmail)) && e.Status == Accepted:
		switch {
		case suspect:
			count(&f.stats.Suspect)
		case err != nil:
			count(&f.stats.BadEmail)
		case e.Email == "":
			count(&f.stats.NoEmail)
		default:
			count(&f.stats.Attributions)
			if es != nil && !f.priming {
				*es = append(*es, e)
			}
		}
	case err == nil:
		count(&f.stats.Rejected)
		if !closedReason(e.Reason) {
			opens()
		}
	case errors.Is(err, ErrNotConnection):
		count(&f.stats.DNS)
		opens()
	default:
		count(&f.stats.Malformed)
		opens()
	}
}

// Next returns the next attributions, waiting for them: it polls (see
// Options.Interval) until Poll returns some or a new error (not the same
// one as the last time Next returned one, which it returns once), or ctx
// ends (ctx.Err()). After Close it returns [ErrClosed]. While lines keep
// coming, the polls are an Interval apart: a call after one whose poll
// found lines and read to the end first waits until an Interval after
// that poll, without waking for the watch in between.
func (f *Follower) Next(ctx context.Context) ([]Entry, error) {
	return f.AppendNext(ctx, nil)
}

// AppendNext is Next, appending the attributions to buf, whose room it
// reuses: a caller that hands buf[:0] back once done with the entries
// allocates no new slice for each batch.
func (f *Follower) AppendNext(ctx context.Context, buf []Entry) ([]Entry, error) {
	f.wakeOnce.Do(func() {
		w := newWake(f.path)
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.closed {
			w.close()
		}
		f.wake = w
	})
	t := time.NewTimer(0)
	defer t.Stop()
	sleep := func(d time.Duration) {
		if d > 0 {
			t.Reset(d)
			select {
			case <-ctx.Done():
			case <-t.C:
			}
		}
	}
	if !f.found.IsZero() {
		// The last poll found lines: while Xray writes, Next polls an
		// Interval apart, without waking for the watch's events in
		// between (a wake of the process costs about as much CPU as a
		// poll, on a VM more).
		sleep(time.Until(f.found.Add(f.interval)))
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
	for {
		polled := time.Now()
		es, more, err := f.poll(buf)
		if errors.Is(err, ErrClosed) {
			return nil, err
		}
		var msg string
		if err != nil {
			msg = err.Error()
		}
		newErr := err != nil && msg != f.lastErr
		f.lastErr = msg
		f.found = time.Time{}
		if len(es) > len(buf) && !more {
			f.found = polled // caught up: the next lines are still to come
		}
		if len(es) > len(buf) || newErr {
			if !newErr {
				err = nil
			}
			return es, err
		}
		if more {
			continue
		}
		wait := f.interval
		if !f.readingOld() && f.wake.wait(ctx, idlePoll) {
			// The file changed, or idlePoll passed: the lines of up to an
			// Interval are read together.
			wait = time.Until(polled.Add(f.interval))
		}
		sleep(wait)
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
}

// readingOld reports whether a rotated-away file is still read: it may
// have moved out of the watched directory.
func (f *Follower) readingOld() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.old) > 0
}

// Position returns where the follower is in the file at its path, for
// [Options.Resume]: the start of the line it is reading. Lines that a file
// rotated away still gets after it are not covered. The zero Position if
// there is no file yet.
func (f *Follower) Position() Position {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.cur == nil || f.closed {
		return Position{}
	}
	p := Position{Dev: f.cur.dev, Inode: f.cur.ino, Offset: f.cur.lineAt}
	p.Check, _ = checksum(f.cur.fd, p.Offset)
	return p
}

// Stats returns the counts of the lines read so far.
func (f *Follower) Stats() Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stats
}

// Close closes the files. Poll and Next fail with [ErrClosed] after it.
func (f *Follower) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed = true
	if f.wake != nil {
		f.wake.close()
	}
	if f.cur != nil {
		f.cur.close()
	}
	for _, fl := range f.old {
		fl.close()
	}
	f.cur, f.old = nil, nil
	return nil
}

func (fl *file) close() { unix.Close(fl.fd) }

// remember keeps the last checkLen bytes of what was read, data being the
// newest.
func (fl *file) remember(data []byte) {
	if len(data) >= checkLen {
		copy(fl.last[:], data[len(data)-checkLen:])
		fl.lastN = checkLen
		return
	}
	keep := min(fl.lastN, checkLen-len(data))
	copy(fl.last[:], fl.last[fl.lastN-keep:fl.lastN])
	copy(fl.last[keep:], data)
	fl.lastN = keep + len(data)
}

// tail returns the bytes kept by remember, the newest last.
func (fl *file) tail() []byte { return fl.last[:fl.lastN] }
