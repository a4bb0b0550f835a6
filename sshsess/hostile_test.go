package sshsess_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/sshtest"
)

func init() {
	// fake-sshd SINK BYTES: names itself "sshd", waits a second (for the
	// test to scan), then downloads BYTES from an sshtest sink.
	nettest.Register("fake-sshd", func(args []string) error {
		if len(args) != 2 {
			return errors.New("usage: fake-sshd SINK BYTES")
		}
		n, err := strconv.ParseInt(args[1], 10, 64)
		if err != nil {
			return err
		}
		name := []byte("sshd\x00")
		if err := unix.Prctl(unix.PR_SET_NAME, uintptr(unsafe.Pointer(&name[0])), 0, 0, 0); err != nil {
			return err
		}
		fmt.Println("RENAMED")
		time.Sleep(time.Second)
		c, err := net.Dial("tcp", args[0])
		if err != nil {
			return err
		}
		defer c.Close()
		var req [17]byte
		req[0] = 'T'
		binary.BigEndian.PutUint64(req[9:], uint64(n))
		if _, err := c.Write(req[:]); err != nil {
			return err
		}
		got, err := io.Copy(io.Discard, io.LimitReader(c, n+1))
		fmt.Println("DONE 0", got)
		return err
	})
}

// A user's own process that names itself sshd is no server process: it is
// not registered (its sockets are not tagged as a session's forwarded
// connections, which would go uncounted), and what it downloads counts for
// the user's UID.
func TestNameIsNotAServer(t *testing.T) {
	f := newFixture(t, sshtest.OpenSSH, netip.MustParseAddr("127.0.0.1"))
	a := f.account(t)
	// One real session, so the kernel has a registered server process.
	f.srv.Tunnel(t, a, sshtest.ClientOptions{})
	f.waitSessions(t, a.UID, 1)
	f.scan(t)
	before := f.tr.ServerCount()

	const down = 8 << 20
	p := nettest.Start(t, nettest.Spec{Cgroup: f.cg, UID: a.UID}, "fake-sshd", f.srv.Sink.Addr, strconv.Itoa(down))
	p.Expect(t, "RENAMED", 5*time.Second)
	f.scan(t)
	if n := f.tr.ServerCount(); n != before {
		t.Errorf("a process named sshd made %d server processes, want %d", n, before)
	}
	registered, err := f.dp.Servers()
	if err != nil {
		t.Fatal(err)
	}
	for _, pid := range registered {
		if int(pid) == p.Cmd.Process.Pid {
			t.Fatalf("the fake sshd (PID %d) is registered with the kernel", pid)
		}
	}
	counted := f.total(t, a.UID)
	if _, got := p.Done(t); got < down {
		t.Fatalf("fake sshd downloaded %d bytes", got)
	}
	within(t, "the fake sshd's download", f.total(t, a.UID)-counted, down)
}
