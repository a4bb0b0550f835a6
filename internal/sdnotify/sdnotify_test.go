package sdnotify_test

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/sdnotify"
)

// listen opens a datagram socket as the service manager does, closed in
// t.Cleanup.
func listen(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func receive(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return string(buf[:n])
}

// TestSend: messages reach a path socket and an abstract one whole, one
// datagram each, lines joined by newlines.
func TestSend(t *testing.T) {
	for _, name := range []string{
		filepath.Join(t.TempDir(), "notify"),
		"@" + nettest.Name("bwtest-notify-"),
	} {
		c := listen(t, name)
		n, err := sdnotify.New(name)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { n.Close() })
		if err := n.Send("READY=1", "STATUS=3 users"); err != nil {
			t.Fatal(err)
		}
		if err := n.Send("WATCHDOG=1"); err != nil {
			t.Fatal(err)
		}
		if got := receive(t, c); got != "READY=1\nSTATUS=3 users" {
			t.Errorf("%s: first message %q", name, got)
		}
		if got := receive(t, c); got != "WATCHDOG=1" {
			t.Errorf("%s: second message %q", name, got)
		}
	}
}

// TestSendConcurrently: goroutines share a Notifier (run with -race).
func TestSendConcurrently(t *testing.T) {
	name := "@" + nettest.Name("bwtest-notify-")
	c := listen(t, name)
	n, err := sdnotify.New(name)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Go(func() {
			if err := n.Send("WATCHDOG=1"); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	for i := 0; i < 4; i++ {
		if got := receive(t, c); got != "WATCHDOG=1" {
			t.Errorf("message %d: %q", i, got)
		}
	}
}

// TestSendNeverBlocks: a manager that stops reading makes Send fail with
// EAGAIN instead of blocking the caller.
func TestSendNeverBlocks(t *testing.T) {
	name := filepath.Join(t.TempDir(), "notify")
	listen(t, name) // never read
	n, err := sdnotify.New(name)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	done := make(chan error, 1)
	go func() {
		for i := 0; i < 100000; i++ {
			if err := n.Send("WATCHDOG=1"); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if !errors.Is(err, unix.EAGAIN) {
			t.Errorf("send to a full socket: %v, want EAGAIN", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Send blocked on a full socket")
	}
}

func TestErrors(t *testing.T) {
	var none *sdnotify.Notifier
	if err := none.Send("READY=1"); err != nil {
		t.Errorf("nil Notifier: %v", err)
	}
	if _, err := sdnotify.New("vsock:2:1234"); err == nil {
		t.Error("vsock address accepted")
	}
	n, err := sdnotify.New(filepath.Join(t.TempDir(), "nobody-listens"))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if err := n.Send("READY=1"); !errors.Is(err, unix.ENOENT) {
		t.Errorf("send to a missing socket: %v", err)
	}
}

func TestWatchdog(t *testing.T) {
	self := strconv.Itoa(os.Getpid())
	for _, c := range []struct {
		usec, pid string
		want      time.Duration
		err       bool
	}{
		{"", "", 0, false},
		{"30000000", "", 30 * time.Second, false},
		{"30000000", self, 30 * time.Second, false},
		{"30000000", "1", 0, false}, // for another process
		{"0", "", 0, true},
		{"-5", "", 0, true},
		{"30s", "", 0, true},
		{"99999999999999999999", "", 0, true},
	} {
		t.Setenv("WATCHDOG_USEC", c.usec)
		t.Setenv("WATCHDOG_PID", c.pid)
		got, err := sdnotify.Watchdog()
		if got != c.want || (err != nil) != c.err {
			t.Errorf("WATCHDOG_USEC=%q WATCHDOG_PID=%q: %v, %v", c.usec, c.pid, got, err)
		}
	}
}
