package main

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/view"
)

// sdNotifySocket is a service manager's notify socket in a temporary
// directory: each datagram received arrives on the channel.
type sdNotifySocket struct {
	path string
	msgs chan string
}

func newSdNotifySocket(t *testing.T) *sdNotifySocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	s := &sdNotifySocket{path: path, msgs: make(chan string, 1024)}
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := c.Read(buf)
			if err != nil {
				close(s.msgs)
				return
			}
			s.msgs <- string(buf[:n])
		}
	}()
	t.Cleanup(func() { c.Close() })
	return s
}

// next returns the next message, or "" after timeout.
func (s *sdNotifySocket) next(timeout time.Duration) string {
	select {
	case m := <-s.msgs:
		return m
	case <-time.After(timeout):
		return ""
	}
}

// expect returns the first message that starts with prefix within timeout,
// and the messages before it.
func (s *sdNotifySocket) expect(t *testing.T, prefix string, timeout time.Duration) (msg string, before []string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m := s.next(time.Until(deadline))
		if m == "" {
			t.Fatalf("no message %q within %v; got %q", prefix, timeout, before)
		}
		if strings.HasPrefix(m, prefix) {
			return m, before
		}
		before = append(before, m)
	}
}

// TestServiceManager: watchdog pings come only from ticks, once READY=1 is
// sent and at most one per gap; STATUS lines follow ticks only when the
// summary changes; STOPPING=1 ends both.
func TestServiceManager(t *testing.T) {
	sock := newSdNotifySocket(t)
	t.Setenv("NOTIFY_SOCKET", sock.path)
	t.Setenv("WATCHDOG_USEC", "400000") // pings at most every 100 ms
	t.Setenv("WATCHDOG_PID", "")
	var logs bytes.Buffer
	s := newServiceManager(slog.New(slog.NewTextHandler(&logs, nil)), time.Second)
	t.Cleanup(s.close)
	if os.Getenv("NOTIFY_SOCKET") != "" || os.Getenv("WATCHDOG_USEC") != "" {
		t.Error("the notify variables are left for child processes")
	}
	if !strings.Contains(logs.String(), "watchdog period is under two tick intervals") {
		t.Errorf("a 400 ms watchdog with a 1 s interval is not warned about: %s", logs.String())
	}

	users := []view.User{{Name: "a", Status: quota.Blocked}, {Name: "b", Status: quota.Active}}
	list := func(context.Context) ([]view.User, error) { return users, nil }
	h := view.Health{Users: 2, TickDuration: 3 * time.Millisecond}
	s.Tick(h) // the first tick, before READY: no ping
	if m := sock.next(200 * time.Millisecond); m != "" {
		t.Fatalf("message before READY: %q", m)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	control := filepath.Join(t.TempDir(), "control.sock")
	l, err := net.Listen("unix", control)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	s.ready(ctx, list, control)
	if m := sock.next(time.Second); m != "READY=1\nSTATUS=2 users, 1 blocked, last tick 3 ms" {
		t.Fatalf("ready: %q", m)
	}

	s.Tick(h)
	s.Tick(h) // within the gap: no second ping; the same summary: no STATUS
	if m := sock.next(time.Second); m != "WATCHDOG=1" {
		t.Fatalf("after a tick: %q", m)
	}
	if m := sock.next(300 * time.Millisecond); m != "" {
		t.Fatalf("a second ping within the gap, or an unchanged STATUS: %q", m)
	}
	// No tick, no ping: a hung loop stops them.
	if m := sock.next(time.Second); m != "" {
		t.Fatalf("message without a tick: %q", m)
	}

	users = append(users, view.User{Name: "c", Status: quota.Disabled})
	s.Event(quota.SSH, "disable", "Disabled by administrator")
	time.Sleep(150 * time.Millisecond)
	s.Tick(view.Health{Users: 3, TickDuration: 1500 * time.Millisecond, Errors: map[string]string{"xray api": "down", "nftables": "x"}})
	got := []string{sock.next(time.Second), sock.next(time.Second)}
	want := []string{"WATCHDOG=1", "STATUS=3 users, 2 blocked, last tick 1,500 ms; failing: nftables, xray api (bwctl status)"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("after a changed tick: %q, want %q", got, want)
	}

	cancel() // SIGTERM
	if m := sock.next(time.Second); m != "STOPPING=1\nSTATUS=stopping: committing the last counts" {
		t.Fatalf("stopping: %q", m)
	}
	time.Sleep(150 * time.Millisecond)
	s.Tick(h) // the last tick at shutdown
	if m := sock.next(300 * time.Millisecond); m != "" {
		t.Fatalf("message after STOPPING=1: %q", m)
	}
}

// TestServiceManagerOff: without $NOTIFY_SOCKET nothing is sent and
// nothing waits.
func TestServiceManagerOff(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "1000000")
	s := newServiceManager(slog.New(slog.DiscardHandler), time.Second)
	defer s.close()
	s.Tick(view.Health{})
	start := time.Now()
	s.ready(context.Background(), nil, "/nonexistent") // would panic on nil if it rendered
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Errorf("ready waited %v without a notify socket", d)
	}
}

// TestStatusLine: the blocked users are counted again after an event or
// when the count is older than recount, not at every tick.
func TestStatusLine(t *testing.T) {
	calls := 0
	users := []view.User{{Status: quota.Blocked}}
	st := &statusLine{recount: time.Hour, users: func(context.Context) ([]view.User, error) {
		calls++
		return users, nil
	}}
	h := view.Health{Users: 2345, TickDuration: 400 * time.Microsecond}
	if got := st.render(h, false); got != "2,345 users, 1 blocked, last tick <1 ms" || calls != 1 {
		t.Errorf("first: %q, %d counts", got, calls)
	}
	users = nil
	if got := st.render(h, false); got != "2,345 users, 1 blocked, last tick <1 ms" || calls != 1 {
		t.Errorf("no event: %q, %d counts", got, calls)
	}
	if got := st.render(h, true); got != "2,345 users, 0 blocked, last tick <1 ms" || calls != 2 {
		t.Errorf("after an event: %q, %d counts", got, calls)
	}
	st.recount = 0
	st.render(h, false)
	if calls != 3 {
		t.Errorf("an old count is not redone: %d counts", calls)
	}
	for n, want := range map[int]string{0: "0", 999: "999", 1000: "1,000", 100000: "100,000", 1234567: "1,234,567", -1234: "-1,234"} {
		if got := thousands(n); got != want {
			t.Errorf("thousands(%d) = %q", n, got)
		}
	}
}

// TestJournalLogger: with stderr the journal's stream, lines carry their
// syslog priority and no time; otherwise slog's usual text.
func TestJournalLogger(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	t.Setenv("JOURNAL_STREAM", fmt.Sprintf("%d:%d", st.Dev, st.Ino))
	log := newLogger(f)
	log.Info("bwagent running", "users", 2)
	log.With("component", "xray").WithGroup("api").Warn("unreachable", "addr", "127.0.0.1:10085")
	log.Error("failed", "err", "boom")
	log.Debug("hidden")
	data, _ := os.ReadFile(f.Name())
	want := "<6>level=INFO msg=\"bwagent running\" users=2\n" +
		"<4>level=WARN msg=unreachable component=xray api.addr=127.0.0.1:10085\n" +
		"<3>level=ERROR msg=failed err=boom\n"
	if string(data) != want {
		t.Errorf("journal lines:\n%s\nwant:\n%s", data, want)
	}

	other, err := os.Create(filepath.Join(t.TempDir(), "other"))
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	newLogger(other).Info("hello") // JOURNAL_STREAM names f, not other
	data, _ = os.ReadFile(other.Name())
	if !strings.HasPrefix(string(data), "time=") || !strings.Contains(string(data), "level=INFO msg=hello") {
		t.Errorf("not the journal: %q", data)
	}
	for _, bad := range []string{"", "12", "x:y", fmt.Sprintf("%d:%d", st.Dev, st.Ino+1)} {
		if isJournal(f, bad) {
			t.Errorf("JOURNAL_STREAM=%q taken for the journal", bad)
		}
	}
}

// TestSdNotifyProtocol runs the real bwagent binary as systemd would run it
// with Type=notify and WatchdogSec=3s, its stderr the "journal": READY=1
// comes after the first tick has enforced (pins in place, control socket
// answering) with nothing before it, WATCHDOG=1 at least twice per period,
// a STATUS line when a user is disabled, STOPPING=1 at SIGTERM; the log
// lines carry their priority and no time.
func TestSdNotifyProtocol(t *testing.T) {
	e := newAgentEnv(t, "john:x:2751:2751::/:/bin/false\n", "")
	bin := buildRealAgent(t)
	sock := newSdNotifySocket(t)
	journal, err := os.Create(filepath.Join(t.TempDir(), "journal"))
	if err != nil {
		t.Fatal(err)
	}
	defer journal.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(journal.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	const period = 3 * time.Second
	p := startRealAgent(t, e.pair.A, []string{"NOTIFY_SOCKET=" + sock.path,
		fmt.Sprintf("WATCHDOG_USEC=%d", period.Microseconds()), fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino)},
		journal, bin, "--config", e.conf)

	ready, before := sock.expect(t, "READY=1", 20*time.Second)
	readyAt := time.Now()
	if len(before) > 0 {
		t.Errorf("messages before READY=1: %q", before)
	}
	if !regexp.MustCompile(`^READY=1\nSTATUS=1 user, 0 blocked, last tick (<1|\d+) ms$`).MatchString(ready) {
		t.Errorf("READY message %q", ready)
	}
	if _, err := os.Stat(filepath.Join(e.pin, "bw_hash_counts")); err != nil {
		t.Errorf("READY=1 before the data plane is pinned: %v", err)
	}
	c, err := control.Dial(context.Background(), filepath.Join(e.dir, "bwagent.sock"))
	if err != nil {
		t.Fatalf("READY=1 before the control socket answers: %v", err)
	}
	defer c.Close()
	if _, err := c.ListUsers(context.Background(), ""); err != nil {
		t.Fatalf("READY=1 before the control socket answers: %v", err)
	}

	// Pings for two periods: never more than half a period apart.
	last, pings := readyAt, 0
	for time.Since(readyAt) < 2*period {
		m := sock.next(period)
		if m == "" {
			t.Fatalf("no message for %v after %d pings", period, pings)
		}
		if m == "WATCHDOG=1" {
			if gap := time.Since(last); gap > period/2 {
				t.Errorf("WATCHDOG=1 %v after the last one; period %v", gap, period)
			}
			last = time.Now()
			pings++
		}
	}
	if pings < 4 {
		t.Errorf("%d pings in two watchdog periods", pings)
	}

	if err := c.Disable(context.Background(), "john"); err != nil {
		t.Fatal(err)
	}
	// At once, not at the next periodic count (10 s).
	sock.expect(t, "STATUS=1 user, 1 blocked, last tick ", 2*time.Second)

	p.signal(t, bin, syscall.SIGTERM)
	stopping, _ := sock.expect(t, "STOPPING=1", 5*time.Second)
	if stopping != "STOPPING=1\nSTATUS=stopping: committing the last counts" {
		t.Errorf("stopping message %q", stopping)
	}
	if err := p.wait(10 * time.Second); err != nil {
		t.Errorf("exit after SIGTERM: %v", err)
	}

	data, _ := os.ReadFile(journal.Name())
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if !slices.ContainsFunc(lines, func(l string) bool { return strings.HasPrefix(l, `<6>level=INFO msg="bwagent running"`) }) {
		t.Errorf("no running line in the journal:\n%s", data)
	}
	for _, l := range lines {
		if !regexp.MustCompile(`^<[3467]>level=`).MatchString(l) || strings.Contains(l, "time=") {
			t.Errorf("journal line %q: want a priority prefix and no time", l)
		}
	}
}

// TestSdNotifyNoReadyOnFailure: a start-up that fails (an invalid
// configuration; a pin directory not on bpffs) exits with status 1 and
// sends systemd nothing, so the start fails instead of looking ready.
func TestSdNotifyNoReadyOnFailure(t *testing.T) {
	e := newAgentEnv(t, "john:x:2752:2752::/:/bin/false\n", "")
	bin := buildRealAgent(t)
	conf, err := os.ReadFile(e.conf)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, conf, says string
	}{
		{"invalid config", "interval = \"10s\"\n", "interval: must be from 1s to 5s"},
		{"pins not on bpffs", strings.Replace(string(conf), e.pin, filepath.Join(e.dir, "pins"), 1), "bpf"},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "bwagent.toml")
			if err := os.WriteFile(path, []byte(c.conf), 0o644); err != nil {
				t.Fatal(err)
			}
			sock := newSdNotifySocket(t)
			var stderr bytes.Buffer
			p := startRealAgent(t, e.pair.A, []string{"NOTIFY_SOCKET=" + sock.path, "WATCHDOG_USEC=3000000"}, &stderr,
				bin, "--config", path)
			err := p.wait(20 * time.Second)
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 {
				t.Errorf("exit: %v, want status 1", err)
			}
			if !strings.Contains(stderr.String(), c.says) {
				t.Errorf("stderr does not say %q: %s", c.says, stderr.String())
			}
			if m := sock.next(200 * time.Millisecond); m != "" {
				t.Errorf("sent %q", m)
			}
		})
	}
}
