package bpf_test

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/sockkill"
)

// acceptedSocket returns a duplicate (pidfd_getfd) of process pid's
// connected TCP socket on local port port, waiting up to 5 s for it.
func acceptedSocket(t *testing.T, pid int, port uint16) int {
	t.Helper()
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pidfd)
	deadline := time.Now().Add(5 * time.Second)
	for {
		dir := filepath.Join("/proc", strconv.Itoa(pid), "fd")
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			target, _ := os.Readlink(filepath.Join(dir, e.Name()))
			n, err := strconv.Atoi(e.Name())
			if err != nil || !strings.HasPrefix(target, "socket:") {
				continue
			}
			fd, err := unix.PidfdGetfd(pidfd, n, 0)
			if err != nil {
				continue
			}
			local, err1 := unix.Getsockname(fd)
			_, err2 := unix.Getpeername(fd)
			if err1 == nil && err2 == nil {
				var p int
				switch sa := local.(type) {
				case *unix.SockaddrInet4:
					p = sa.Port
				case *unix.SockaddrInet6:
					p = sa.Port
				}
				if p == int(port) {
					t.Cleanup(func() { unix.Close(fd) })
					return fd
				}
			}
			unix.Close(fd)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no connected socket on port %d in process %d", port, pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A connection accepted on an SSH port (SetSSHPorts) by a root process is
// pending: its first 64 KiB pass, then it is held until it is attributed,
// which credits what it moved and lets it go on at once as the user's; one
// never attributed flows again after 5 s, unattributed. A blocked user's
// reset passes.
func TestPendingConnections(t *testing.T) {
	e := newEnv(t)
	if !e.dp.SupportsServerTagging() {
		t.Skip("needs Linux 6.0")
	}
	const client, user = 2231, 2232
	srv := e.start(t, true, 0, "tcp-serve", listenAddr(e.net.B4))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	port := netip.MustParseAddrPort(addr).Port()
	if err := e.dp.SetSSHPorts([]uint16{port}); err != nil {
		t.Fatal(err)
	}
	const down = 1 << 20

	t.Run("never attributed", func(t *testing.T) {
		start := time.Now()
		c := e.start(t, false, client, "tcp-client", addr, "0", strconv.Itoa(down))
		_, recv := c.Progress(t, time.Second)
		if recv > 64<<10 {
			t.Errorf("a pending connection received %d bytes in its first second, want at most 64 KiB", recv)
		}
		if _, got := c.Done(t); got != down {
			t.Fatalf("received %d bytes, want %d", got, down)
		}
		if took := time.Since(start); took < 4*time.Second {
			t.Errorf("the download ended after %v: not held", took)
		}
		st, err := e.dp.Stats()
		if err != nil {
			t.Fatal(err)
		}
		if st.SSHHeld == 0 || st.SSHUnattributed == 0 || st.SSHReleased != 1 {
			t.Errorf("stats %+v: want held and unattributed packets, one connection released", st)
		}
	})

	t.Run("attributed", func(t *testing.T) {
		c := e.start(t, false, client, "tcp-client", addr, "0", strconv.Itoa(down))
		c.Progress(t, 500*time.Millisecond) // held by now
		fd := acceptedSocket(t, srv.Cmd.Process.Pid, port)
		a, ok, err := e.dp.SocketAttribution(fd)
		if err != nil || !ok || !a.Pending {
			t.Fatalf("the accepted connection's attribution: %+v, %v, %v; want pending", a, ok, err)
		}
		start := time.Now()
		moved, err := e.dp.Attribute(fd, 0, bpf.Attribution{UID: user})
		if err != nil {
			t.Fatal(err)
		}
		if moved.TxBytes == 0 || moved.TxBytes > 80<<10 {
			t.Errorf("moved while pending: %+v, want some bytes sent, at most the 64 KiB allowance and a packet", moved)
		}
		if err := e.dp.Credit(user, moved); err != nil {
			t.Fatal(err)
		}
		if _, got := c.Done(t); got != down {
			t.Fatalf("received %d bytes, want %d", got, down)
		}
		if took := time.Since(start); took > 3*time.Second {
			t.Errorf("attributed, the download still took %v", took)
		}
		within(t, "attributed connection", e.counters(t, user).TxBytes, down)
		if _, err := e.dp.Attribute(fd, 0, bpf.Attribution{UID: client}); !errors.Is(err, bpf.ErrAttributed) {
			t.Errorf("second attribution: %v, want ErrAttributed", err)
		}
	})

	t.Run("blocked", func(t *testing.T) {
		c := e.start(t, false, client, "tcp-client", addr, "0", "inf", "20s")
		c.Progress(t, 300*time.Millisecond)
		fd := acceptedSocket(t, srv.Cmd.Process.Pid, port)
		block(t, e.dp, user, true)
		defer block(t, e.dp, user, false)
		if _, err := e.dp.Attribute(fd, 0, bpf.Attribution{UID: user}); err != nil {
			t.Fatal(err)
		}
		before := e.counters(t, user)
		time.Sleep(500 * time.Millisecond)
		if after := e.counters(t, user); after != before {
			t.Errorf("a blocked user's attributed connection moved %+v after %+v", after, before)
		}
		// The connection is destroyed (as a cut does): its reset passes
		// the block, so the client learns at once.
		cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		if err != nil {
			t.Fatal(err)
		}
		dup, err := unix.Dup(fd)
		if err != nil {
			t.Fatal(err)
		}
		conn, err := net.FileConn(os.NewFile(uintptr(dup), "accepted"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		l := conn.LocalAddr().(*net.TCPAddr).AddrPort()
		r := conn.RemoteAddr().(*net.TCPAddr).AddrPort()
		h, err := sockkill.NewHandleAt(e.net.B)
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		start := time.Now()
		if n, err := h.Destroy([]sockkill.Conn{{Local: l, Remote: r, Cookie: cookie}}); n != 1 || err != nil {
			t.Fatalf("destroy: %d, %v", n, err)
		}
		c.Wait(5 * time.Second)
		if took := time.Since(start); took > 2*time.Second {
			t.Errorf("the client learned of the cut after %v", took)
		}
	})
}
