package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/control/agentbackend"
	"github.com/myvpn/bwagent/quota"
	"golang.org/x/sys/unix"
)

// live is the fake backend with users whose counters the test changes;
// each change is published.
type live struct {
	*fake
	mu      sync.Mutex
	users   []control.User
	version uint64
	changed chan struct{} // closed by add
}

func (l *live) Updates() (uint64, <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.version, l.changed
}

func (l *live) Users(context.Context) ([]control.User, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.users), nil
}

// add adds traffic to the named user.
func (l *live) add(name string, up, down uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := range l.users {
		if u := &l.users[i]; u.Name == name {
			u.Upload += up
			u.Download += down
			u.Used += up + down
		}
	}
	l.version++
	close(l.changed)
	l.changed = make(chan struct{})
}

// serveLive serves a live backend whose Watch streams send at most every
// 20ms.
func serveLive(t *testing.T) (*live, string) {
	t.Helper()
	f := newFake()
	l := &live{fake: f, users: slices.Clone(f.users), changed: make(chan struct{})}
	sock := filepath.Join(t.TempDir(), "bw.sock")
	srv := control.NewServer(l, control.Options{ErrorCodes: agentbackend.ErrorCodes, WatchSpacing: 20 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, sock) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if i > 200 {
			t.Fatalf("socket %s did not appear", sock)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return l, sock
}

// openPTY opens a pseudo-terminal of 80x24 and returns its master and slave.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals: %v", err)
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		unix.Close(fd)
		t.Fatalf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetUint32(fd, unix.TIOCGPTN)
	if err != nil {
		unix.Close(fd)
		t.Fatalf("ptsname: %v", err)
	}
	if err := unix.IoctlSetWinsize(fd, unix.TIOCSWINSZ, &unix.Winsize{Row: 24, Col: 80}); err != nil {
		unix.Close(fd)
		t.Fatalf("TIOCSWINSZ: %v", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	master = os.NewFile(uintptr(fd), "/dev/ptmx")
	slave, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		master.Close()
		t.Fatalf("open slave: %v", err)
	}
	t.Cleanup(func() { master.Close(); slave.Close() })
	return master, slave
}

// screen collects what the monitor writes to the terminal.
type screen struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *screen) read(master *os.File) {
	b := make([]byte, 4096)
	for {
		n, err := master.Read(b)
		s.mu.Lock()
		s.buf.Write(b[:n])
		s.mu.Unlock()
		if err != nil {
			return
		}
	}
}

func (s *screen) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

var ansiRE = regexp.MustCompile(`\x1b\[[0-9;?]*[A-Za-z]`)

// frames returns the screens drawn, without escape sequences, as lines.
func frames(out string) [][]string {
	var fs [][]string
	parts := strings.Split(out, ansiHome)
	for _, p := range parts[1:] {
		fs = append(fs, strings.Split(strings.ReplaceAll(ansiRE.ReplaceAllString(p, ""), "\r", ""), "\n"))
	}
	return fs
}

// waitFor waits until ok holds for the last complete frame.
func waitFor(t *testing.T, s *screen, what string, ok func(frame []string) bool) []string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		fs := frames(s.String())
		for i := len(fs) - 1; i >= 0 && i >= len(fs)-3; i-- {
			if ok(fs[i]) {
				return fs[i]
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s; screen:\n%q", what, s.String())
	return nil
}

func lineOf(frame []string, name string) (int, string) {
	for i, l := range frame {
		if strings.HasPrefix(l, name+" ") {
			return i, l
		}
	}
	return -1, ""
}

func TestMonitorPTY(t *testing.T) {
	for _, key := range []string{"q", "\x03"} {
		t.Run(fmt.Sprintf("quit_%q", key), func(t *testing.T) {
			l, sock := serveLive(t)
			master, slave := openPTY(t)
			before, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS)
			if err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(os.Args[0], "--socket", sock, "monitor")
			cmd.Env = append(slices.DeleteFunc(os.Environ(), func(s string) bool {
				return strings.HasPrefix(s, "NO_COLOR=")
			}), "BWCTL_TEST_AS_BWCTL=1", "TERM=xterm")
			cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
			cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
			var s screen
			go s.read(master)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			t.Cleanup(func() {
				if cmd.ProcessState == nil {
					cmd.Process.Kill()
					<-exited
				}
			})

			waitFor(t, &s, "the users", func(f []string) bool {
				a, _ := lineOf(f, "bob")
				b, _ := lineOf(f, "john")
				c, _ := lineOf(f, "mary")
				return strings.HasPrefix(f[0], "bwctl monitor") && strings.Contains(f[0], "4 users") &&
					strings.HasPrefix(f[1], "USER") && a > 0 && b > 0 && c > 0
			})
			if raw, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS); err != nil {
				t.Fatal(err)
			} else if raw.Lflag&(unix.ICANON|unix.ECHO) != 0 {
				t.Errorf("terminal not in raw mode while monitoring: lflag %#x", raw.Lflag)
			}
			if out := s.String(); !strings.Contains(out, red+"BLOCKED") || !strings.Contains(out, yellow+"WARNING") {
				t.Errorf("STATUS not coloured:\n%q", out)
			}

			// Traffic: mary's rate puts her first; john's usage grows.
			stop := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					l.add("mary", quota.MiB, 4*quota.MiB)
					l.add("john", 0, 2*quota.MiB)
					select {
					case <-stop:
						return
					case <-time.After(50 * time.Millisecond):
					}
				}
			}()
			rateRE := regexp.MustCompile(`[0-9.]+ MiB/s`)
			frame := waitFor(t, &s, "mary's rate first", func(f []string) bool {
				i, ml := lineOf(f, "mary")
				j, _ := lineOf(f, "john")
				k, _ := lineOf(f, "bob")
				return i == 2 && j == 3 && k == 4 && len(rateRE.FindAllString(ml, -1)) == 2 &&
					strings.Contains(f[0], "MiB/s")
			})
			close(stop)
			wg.Wait()
			if _, jl := lineOf(frame, "john"); !regexp.MustCompile(`\[#+-*\]\s+9\d%$`).MatchString(jl) {
				t.Errorf("john's usage bar: %q", jl)
			}
			if _, bl := lineOf(frame, "bob"); !strings.HasSuffix(bl, "unlimited") || !strings.Contains(bl, " 0 B/s") {
				t.Errorf("bob's line: %q", bl)
			}

			if _, err := master.Write([]byte(key)); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-exited:
				if err != nil {
					t.Fatalf("monitor exited with %v; screen:\n%q", err, s.String())
				}
			case <-time.After(2 * time.Second):
				t.Fatalf("monitor did not quit on %q", key)
			}
			time.Sleep(50 * time.Millisecond) // the last output
			out := s.String()
			if !strings.HasSuffix(strings.TrimRight(out, "\r\n"), ansiShowCursor) || !strings.HasSuffix(out, "\n") {
				t.Errorf("screen not restored (show cursor, newline): ends %q", out[max(len(out)-40, 0):])
			}
			fs := frames(out)
			for _, f := range fs {
				if len(f) > 24 {
					t.Errorf("frame of %d lines", len(f))
				}
				for _, l := range f {
					if n := len([]rune(l)); n > 80 {
						t.Errorf("line of %d columns: %q", n, l)
					}
				}
			}
			after, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS)
			if err != nil {
				t.Fatal(err)
			}
			if *after != *before {
				t.Errorf("terminal settings not restored:\n got %+v\nwant %+v", after, before)
			}
		})
	}
}

func TestMonitorNotTerminal(t *testing.T) {
	code, out, errs := runCmd(filepath.Join(t.TempDir(), "none.sock"), "monitor")
	if code != exitUsage || out != "" || !strings.Contains(errs, "monitor needs a terminal; use `bwctl -o json list`") {
		t.Errorf("got %d, %q, %q", code, out, errs)
	}
	// Also as a process whose stdin and stdout are not terminals.
	cmd := exec.Command(os.Args[0], "--socket", "/nonexistent", "monitor")
	cmd.Env = append(os.Environ(), "BWCTL_TEST_AS_BWCTL=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != exitUsage || !strings.Contains(stderr.String(), "needs a terminal") {
		t.Errorf("got %v, %q", err, stderr.String())
	}
}

func TestMonitorRender(t *testing.T) {
	var m monitor
	t1 := time.Date(2026, 11, 1, 10, 0, 0, 0, time.UTC)
	var rows []control.UserRow
	for i := range 40 {
		rows = append(rows, control.UserRow{Name: fmt.Sprintf("user%02d-with-a-very-long-name", i), Status: quota.Active,
			Used: uint64(i) * quota.GiB, Limit: 20 * quota.GiB, Upload: 0, Download: 0})
	}
	rows[30].Status, rows[30].Speed = quota.Throttled, quota.Speed{Down: 4e6, Up: 1e6}
	rows[7].Speed = quota.Speed{Down: 20e6, Up: 20e6}
	m.update(rows, t1)
	rows = slices.Clone(rows)
	rows[7].Download += 10 * quota.MiB // 5 MiB/s over 2s
	rows[30].Upload += quota.MiB
	m.update(rows, t1.Add(2*time.Second))
	for _, size := range [][2]int{{80, 24}, {40, 10}, {132, 50}, {20, 3}, {10, 1}} {
		w, h := size[0], size[1]
		var b bytes.Buffer
		e := &env{o: &opts{}}
		m.render(&b, e, t1.Add(2*time.Second), w, h)
		lines := strings.Split(ansiRE.ReplaceAllString(b.String(), ""), "\r\n")
		if len(lines) > h {
			t.Errorf("%dx%d: %d lines", w, h, len(lines))
		}
		for _, l := range lines {
			if len([]rune(l)) > w {
				t.Errorf("%dx%d: line of %d columns: %q", w, h, len([]rune(l)), l)
			}
		}
		if w == 80 {
			want := []string{
				"bwctl monitor  10:00:02  40 users  up 512.0 KiB/s  down 5.0 MiB/s  (q quits)",
				"USER        STATUS            UP/s       DOWN/s SPEED         USAGE",
				"user07-wit~ ACTIVE           0 B/s    5.0 MiB/s 20mbit        [###--------]  35%",
				"user30-wit~ THROTTLED  512.0 KiB/s        0 B/s 4mbit/1mbit   [###########] 150%",
				"user00-wit~ ACTIVE           0 B/s        0 B/s -             [-----------]   0%",
			}
			if !slices.Equal(lines[:5], want) {
				t.Errorf("80x24:\n%s", strings.Join(lines, "\n"))
			}
			if lines[23] != "+19 more" {
				t.Errorf("last line %q, want +19 more", lines[23])
			}
		}
	}
	// Without new snapshots the rates decay: 10 MiB over 6s.
	var b bytes.Buffer
	m.render(&b, &env{o: &opts{}}, t1.Add(6*time.Second), 80, 24)
	if !strings.Contains(b.String(), "down 1.7 MiB/s") {
		t.Errorf("rates after 4s without a snapshot:\n%s", b.String())
	}
}
