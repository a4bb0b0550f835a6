package xrayaccess

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// accepted is an accepted line of Xray's for the source and email.
func accepted(src, email string) string {
	return fmt.Sprintf("2026/12/04 10:00:00.123456 from %s accepted tcp:example.com:443 [vless-in >> direct] email: %s\n", src, email)
}

// rejected is a rejected line of Xray's whose reason can hold a client's
// bytes, and probed one whose reason cannot.
const (
	rejected = "2026/12/04 10:00:00.123456 from 192.0.2.9:999 rejected  proxy/trojan: failed to read address and port > common/protocol: invalid domain name: x\n"
	probed   = "2026/12/04 10:00:00.123456 from 192.0.2.9:999 rejected  proxy/trojan: not a valid user\n"
)

// logFile is an access log in a temp dir, written as Xray writes it: each
// write appends to the file at the path as it was opened (O_APPEND).
type logFile struct {
	t    *testing.T
	path string
	f    *os.File
}

func newLog(t *testing.T) *logFile {
	t.Helper()
	l := &logFile{t: t, path: filepath.Join(t.TempDir(), "access.log")}
	l.reopen()
	t.Cleanup(func() { l.f.Close() })
	return l
}

// reopen opens (creates) the file at the path again, as Xray does after a
// minute without lines.
func (l *logFile) reopen() {
	l.t.Helper()
	if l.f != nil {
		l.f.Close()
	}
	f, err := os.OpenFile(l.path, os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		l.t.Fatal(err)
	}
	l.f = f
}

func (l *logFile) write(s ...string) {
	l.t.Helper()
	if _, err := l.f.WriteString(strings.Join(s, "")); err != nil {
		l.t.Fatal(err)
	}
}

func follow(t *testing.T, path string, opts Options) *Follower {
	t.Helper()
	f, err := Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// poll polls f and returns the sources of its entries.
func poll(t *testing.T, f *Follower) []string {
	t.Helper()
	es, err := f.Poll()
	if err != nil {
		t.Fatal(err)
	}
	return sources(es)
}

func sources(es []Entry) []string {
	var s []string
	for _, e := range es {
		s = append(s, e.Source.String()+"="+e.Email)
	}
	return s
}

func want(t *testing.T, got []string, want ...string) {
	t.Helper()
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("got %q, want %q", got, want)
	}
}

// TestFollow: from the end of the file; partial lines wait for their end;
// every kind of line is counted.
func TestFollow(t *testing.T) {
	l := newLog(t)
	l.write(accepted("10.0.0.1:1", "old"))
	f := follow(t, l.path, Options{})
	want(t, poll(t, f))
	l.write(accepted("10.0.0.1:2", "alice"), accepted("10.0.0.1:3", "bob"))
	want(t, poll(t, f), "10.0.0.1:2=alice", "10.0.0.1:3=bob")
	line := accepted("10.0.0.1:4", "carol")
	l.write(line[:40])
	want(t, poll(t, f))
	l.write(line[40:])
	want(t, poll(t, f), "10.0.0.1:4=carol")
	// A line without email, one with a bad email, a DNS line, garbage; far
	// enough apart that none makes the next one suspect.
	pad := accepted("10.0.0.1:9", "pad")
	l.write(accepted("10.0.0.1:5", "../x"),
		strings.Replace(accepted("10.0.0.1:6", ""), " email: \n", "\n", 1),
		"2026/12/04 10:00:00.123456 localhost got answer: example.com. TypeA -> [1.2.3.4] 1ms\n", pad, pad, pad,
		"garbage\n", pad, pad, pad,
		accepted("10.0.0.1:7", "dave"))
	want(t, poll(t, f), "10.0.0.1:7=dave")
	got := f.Stats()
	if wantStats := (Stats{Lines: 14, Attributions: 4, NoEmail: 1, BadEmail: 1, DNS: 1, Malformed: 1, Suspect: 6}); got != wantStats {
		t.Errorf("stats %+v, want %+v", got, wantStats)
	}
}

// TestForged: the bytes a Trojan user got Xray 26.3.27 to write (see
// TestXrayForged): the forged accepted line is not returned, nor any line
// that starts within 256 bytes after a line that is not an accepted one.
func TestForged(t *testing.T) {
	l := newLog(t)
	f := follow(t, l.path, Options{})
	l.write(accepted("10.0.0.1:1", "alice"),
		"2026/12/04 22:48:34.061586 from 127.0.0.1:35410 rejected  proxy/trojan: failed to read address and port > common/protocol: invalid domain name: x\n"+
			"2026/12/04 22:47:14.000000 from 127.0.0.99:4242 accepted tcp:example.com:443 [vision-in >> direct] email: alice\n"+
			"2026/12/04 22:47:14.000001 from 127.0.0.98:1 rejected  y\n")
	want(t, poll(t, f), "10.0.0.1:1=alice")
	// Lines that start within 256 bytes after the last rejected line
	// (these are 104 bytes long): suspect too.
	l.write(accepted("10.0.0.1:2", "bob"), accepted("10.0.0.1:3", "bob"))
	want(t, poll(t, f))
	l.write(accepted("10.0.0.1:4", "bob"), accepted("10.0.0.1:5", "bob"))
	want(t, poll(t, f), "10.0.0.1:5=bob")
	if s := f.Stats(); s.Suspect != 4 || s.Rejected != 2 || s.Attributions != 2 {
		t.Errorf("stats %+v: want 4 suspect, 2 rejected, 2 attributions", s)
	}

	// Opened at the end of a file that ends with a rejected line: the
	// lines before the start count.
	l.write(rejected)
	f2 := follow(t, l.path, Options{})
	l.write(accepted("10.0.0.1:6", "eve"), accepted("10.0.0.1:7", "eve"), accepted("10.0.0.1:8", "eve"), accepted("10.0.0.1:9", "eve"))
	want(t, poll(t, f2), "10.0.0.1:9=eve")
	if s := f2.Stats(); s.Suspect != 3 || s.Lines != 4 {
		t.Errorf("stats %+v: want 4 lines, 3 suspect (the lines before the start are not counted)", s)
	}

	// A probe's rejected line, whose reason holds none of the client's
	// bytes, makes no line suspect.
	l.write(probed, accepted("10.0.0.1:10", "eve"), probed, probed, accepted("10.0.0.1:11", "eve"))
	want(t, poll(t, f2), "10.0.0.1:10=eve", "10.0.0.1:11=eve")
	if s := f2.Stats(); s.Suspect != 3 || s.Rejected != 3 {
		t.Errorf("stats %+v: want 3 rejected, no more suspect", s)
	}
}

// TestLongLine: a line longer than MaxLine is skipped as it streams in,
// never buffered; the lines after it are read (once 256 bytes past it).
func TestLongLine(t *testing.T) {
	l := newLog(t)
	f := follow(t, l.path, Options{MaxLine: 1024})
	chunk := strings.Repeat("A", 64<<10)
	for range 64 { // 4 MiB without a line break
		l.write(chunk)
		want(t, poll(t, f))
		if c := cap(f.cur.line); c > 1024 {
			t.Fatalf("line buffer of %d bytes", c)
		}
	}
	l.write("\n", accepted("10.0.0.1:1", "a"), accepted("10.0.0.1:2", "a"), accepted("10.0.0.1:3", "a"), accepted("10.0.0.1:4", "a"))
	want(t, poll(t, f), "10.0.0.1:4=a")
	// A line of exactly MaxLine bytes is read; one more byte is too long.
	tagged := func(src string, n int) string {
		line := fmt.Sprintf("2026/12/04 10:00:00.123456 from %s accepted tcp:example.com:443 [%%s >> direct] email: b\n", src)
		return fmt.Sprintf(line, strings.Repeat("t", n-(len(line)-len("%s")-1)))
	}
	l.write(tagged("10.0.0.1:5", 1024), tagged("10.0.0.1:6", 1025))
	want(t, poll(t, f), "10.0.0.1:5=b")
	if s := f.Stats(); s.TooLong != 2 || s.Attributions != 2 {
		t.Errorf("stats %+v: want 2 too long, 2 attributions", s)
	}
	if _, err := Open(l.path, Options{MaxLine: 100}); err == nil {
		t.Error("MaxLine 100 accepted")
	}
}

// TestRotation: logrotate's rename and create: the renamed file is read on
// while Xray writes to it, then dropped after the grace; the new file is
// read from its start.
func TestRotation(t *testing.T) {
	l := newLog(t)
	f := follow(t, l.path, Options{Grace: 300 * time.Millisecond})
	l.write(accepted("10.0.0.1:1", "a"))
	want(t, poll(t, f), "10.0.0.1:1=a")
	if err := os.Rename(l.path, l.path+".1"); err != nil {
		t.Fatal(err)
	}
	// No file at the path yet: Xray writes on to the renamed one.
	l.write(accepted("10.0.0.1:2", "a"))
	want(t, poll(t, f), "10.0.0.1:2=a")
	// logrotate's "create": a new empty file; Xray still has the old one.
	if err := os.WriteFile(l.path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	l.write(accepted("10.0.0.1:3", "a"))
	want(t, poll(t, f), "10.0.0.1:3=a")
	// Xray opens the path again.
	old := l.f
	l.f = nil
	l.reopen()
	l.write(accepted("10.0.0.1:4", "b"))
	want(t, poll(t, f), "10.0.0.1:4=b")
	// A late line in the old file is still read, the old first.
	old.WriteString(accepted("10.0.0.1:5", "a"))
	l.write(accepted("10.0.0.1:6", "b"))
	want(t, poll(t, f), "10.0.0.1:5=a", "10.0.0.1:6=b")
	old.Close()
	time.Sleep(400 * time.Millisecond)
	poll(t, f)
	if len(f.old) != 0 {
		t.Errorf("%d rotated files still open after the grace", len(f.old))
	}
	if s := f.Stats(); s.Rotations != 1 || s.Truncations != 0 {
		t.Errorf("stats %+v: want 1 rotation", s)
	}
	// Rotated by a copy: the path's file is deleted and a new one made
	// (another inode) between two polls.
	os.Remove(l.path)
	l.reopen()
	l.write(accepted("10.0.0.1:7", "c"))
	want(t, poll(t, f), "10.0.0.1:7=c")
}

// TestTruncation: copytruncate; also when the file grew past the
// follower's offset again before it looked.
func TestTruncation(t *testing.T) {
	l := newLog(t)
	f := follow(t, l.path, Options{})
	l.write(accepted("10.0.0.1:1", "a"), accepted("10.0.0.1:2", "a"))
	want(t, poll(t, f), "10.0.0.1:1=a", "10.0.0.1:2=a")
	if err := os.Truncate(l.path, 0); err != nil {
		t.Fatal(err)
	}
	want(t, poll(t, f))
	l.write(accepted("10.0.0.1:3", "b"))
	want(t, poll(t, f), "10.0.0.1:3=b")
	// Truncated and written past the offset again, unseen.
	if err := os.Truncate(l.path, 0); err != nil {
		t.Fatal(err)
	}
	l.write(accepted("10.0.0.1:4", "c"), accepted("10.0.0.1:5", "c"))
	want(t, poll(t, f), "10.0.0.1:4=c", "10.0.0.1:5=c")
	if s := f.Stats(); s.Truncations != 2 || s.Rotations != 0 {
		t.Errorf("stats %+v: want 2 truncations", s)
	}
}

// TestUnsafe: a symbolic link or a FIFO at the path is never opened; one
// that replaces the file is an error, and the open file is read on.
func TestUnsafe(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	os.WriteFile(target, []byte(accepted("10.0.0.1:1", "a")), 0o600)
	link := filepath.Join(dir, "link.log")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(link, Options{}); !errors.Is(err, ErrUnsafeFile) {
		t.Errorf("symlink: %v, want ErrUnsafeFile", err)
	}
	fifo := filepath.Join(dir, "fifo.log")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(fifo, Options{}); !errors.Is(err, ErrUnsafeFile) { // and does not hang
		t.Errorf("fifo: %v, want ErrUnsafeFile", err)
	}
	if _, err := Open(dir, Options{}); !errors.Is(err, ErrUnsafeFile) {
		t.Errorf("directory: %v, want ErrUnsafeFile", err)
	}

	l := newLog(t)
	f := follow(t, l.path, Options{})
	os.Rename(l.path, l.path+".1")
	os.Symlink(target, l.path)
	l.write(accepted("10.0.0.1:2", "b"))
	es, err := f.Poll()
	if !errors.Is(err, ErrUnsafeFile) {
		t.Errorf("Poll with a symlink at the path: %v, want ErrUnsafeFile", err)
	}
	want(t, sources(es), "10.0.0.1:2=b")
	// Next reports it once, then waits for lines.
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	if _, err := f.Next(ctx); !errors.Is(err, ErrUnsafeFile) {
		t.Errorf("Next: %v, want ErrUnsafeFile", err)
	}
	if _, err := f.Next(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Next again: %v, want the deadline", err)
	}
	if f.Stats().Rotations != 0 {
		t.Error("followed the symlink")
	}
}

// TestMissing: a file that does not exist yet is read from its start
// once it does.
func TestMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "access.log")
	f := follow(t, path, Options{})
	want(t, poll(t, f))
	if p := f.Position(); p != (Position{}) {
		t.Errorf("Position %+v without a file", p)
	}
	os.WriteFile(path, []byte(accepted("10.0.0.1:1", "a")), 0o600)
	want(t, poll(t, f), "10.0.0.1:1=a")
}

// TestResume: a Position resumes where the follower was; a file rotated
// or truncated since is read from its start.
func TestResume(t *testing.T) {
	l := newLog(t)
	f := follow(t, l.path, Options{})
	l.write(accepted("10.0.0.1:1", "a"), accepted("10.0.0.1:2", "a")[:30])
	want(t, poll(t, f), "10.0.0.1:1=a")
	pos := f.Position()
	f.Close()
	l.write(accepted("10.0.0.1:2", "a")[30:], accepted("10.0.0.1:3", "a"))
	f = follow(t, l.path, Options{Resume: &pos})
	want(t, poll(t, f), "10.0.0.1:2=a", "10.0.0.1:3=a")

	// Resumed right after a rejected line: the next line is suspect.
	l.write(rejected)
	pos = f.Position()
	f.Close()
	l.write(accepted("10.0.0.1:4", "a"), accepted("10.0.0.1:5", "a"), accepted("10.0.0.1:6", "a"), accepted("10.0.0.1:7", "a"))
	f = follow(t, l.path, Options{Resume: &pos})
	want(t, poll(t, f), "10.0.0.1:7=a")

	// Truncated and grown again past the position.
	pos = f.Position()
	f.Close()
	os.Truncate(l.path, 0)
	l.write(strings.Repeat(accepted("10.0.0.1:7", "b"), 20))
	f = follow(t, l.path, Options{Resume: &pos})
	if got := poll(t, f); len(got) != 20 {
		t.Errorf("after a truncation: %d entries, want all 20", len(got))
	}
	// Rotated.
	pos = f.Position()
	f.Close()
	os.Rename(l.path, l.path+".1")
	l.reopen()
	l.write(accepted("10.0.0.1:8", "c"))
	f = follow(t, l.path, Options{Resume: &pos})
	want(t, poll(t, f), "10.0.0.1:8=c")
}

// TestNext: Next waits for lines, and ends with the context or Close.
func TestNext(t *testing.T) {
	l := newLog(t)
	f := follow(t, l.path, Options{Interval: 10 * time.Millisecond})
	go func() {
		time.Sleep(50 * time.Millisecond)
		l.f.WriteString(accepted("10.0.0.1:1", "a"))
	}()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	es, err := f.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want(t, sources(es), "10.0.0.1:1=a")
	if f.wake == nil || f.wake.file() == nil {
		t.Error("Next polls without a watch of the log's directory")
	}
	short, cancel2 := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel2()
	if _, err := f.Next(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Next: %v, want the deadline", err)
	}

	// AppendNext fills the room of the slice handed back.
	l.f.WriteString(accepted("10.0.0.1:2", "b"))
	buf := es[:0]
	if es, err = f.AppendNext(ctx, buf); err != nil {
		t.Fatal(err)
	}
	want(t, sources(es), "10.0.0.1:2=b")
	if &es[0] != &buf[:1][0] {
		t.Errorf("AppendNext made a new slice instead of filling the one it was given")
	}
	f.Close()
	if _, err := f.Next(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("Next after Close: %v", err)
	}
	if _, err := f.Poll(); !errors.Is(err, ErrClosed) {
		t.Errorf("Poll after Close: %v", err)
	}
}

// TestNextPace: while lines keep coming, Next polls an Interval apart;
// once they stop, the next line is read as soon as the watch reports it.
func TestNextPace(t *testing.T) {
	const interval = 200 * time.Millisecond
	l := newLog(t)
	f := follow(t, l.path, Options{Interval: interval})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	next := func(src string) time.Time {
		t.Helper()
		es, err := f.Next(ctx)
		if err != nil {
			t.Fatal(err)
		}
		want(t, sources(es), src+"=a")
		return time.Now()
	}
	l.f.WriteString(accepted("10.0.0.1:1", "a"))
	first := next("10.0.0.1:1")
	l.f.WriteString(accepted("10.0.0.1:2", "a"))
	if d := next("10.0.0.1:2").Sub(first); d < interval*3/4 {
		t.Errorf("a line written at once read %v after the last, want an Interval (%v) apart", d, interval)
	}
	// The lines stop: Next polls once more an Interval on and then waits
	// for the watch, which reports the next line as it is written.
	written := make(chan time.Time, 1)
	time.AfterFunc(3*interval, func() {
		l.f.WriteString(accepted("10.0.0.1:3", "a"))
		written <- time.Now()
	})
	got := next("10.0.0.1:3")
	if d := got.Sub(<-written); d >= interval/2 {
		t.Errorf("a line after a quiet while read %v after it was written, want at once", d)
	}
}

// TestBacklog: a large backlog is returned in parts of at most 1 MiB per
// Poll; Next returns them without waiting.
func TestBacklog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "access.log")
	line := accepted("10.0.0.1:1", "a")
	n := (3<<20)/len(line) + 1
	os.WriteFile(path, []byte(strings.Repeat(line, n)), 0o600)
	f := follow(t, path, Options{Resume: &Position{}, Interval: time.Hour})
	first := poll(t, f)
	if len(first) == 0 || len(first) >= n {
		t.Errorf("first Poll: %d entries of %d", len(first), n)
	}
	total := len(first)
	for total < n {
		es, err := f.Next(t.Context()) // would wait an hour between polls
		if err != nil {
			t.Fatal(err)
		}
		total += len(es)
	}
	if total != n {
		t.Errorf("%d entries, want %d", total, n)
	}
}
