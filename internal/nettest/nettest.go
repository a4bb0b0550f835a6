// Package nettest builds the throwaway kernel fixtures of the project's
// real-kernel tests: network namespaces joined by veth, cgroup v2 children,
// and processes that run as a chosen UID inside them.
//
// Everything it creates is removed in t.Cleanup, also when the test fails.
// Processes are re-executions of the test binary itself in a helper mode, so
// a test package that uses Start must call Main from its TestMain.
package nettest

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// RequireRoot skips the test unless it runs as root: the fixtures need
// CAP_SYS_ADMIN and CAP_NET_ADMIN.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: run `make test`")
	}
}

// Name returns a short unique name with the given prefix, usable as an nft
// table, interface, cgroup or pin directory name.
func Name(prefix string) string {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return prefix + hex.EncodeToString(b[:])
}

// Do runs fn on a dedicated OS thread that has joined the network namespace
// ns. The thread is never returned to the Go scheduler: it ends with fn, so
// no other goroutine can run in the namespace by accident.
func Do(ns netns.NsHandle, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: the thread exits with this goroutine.
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("join netns: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// NewNetNS returns a new network namespace with lo up. It is closed in
// t.Cleanup; the kernel frees it when its last process is gone.
func NewNetNS(t testing.TB) netns.NsHandle {
	t.Helper()
	type result struct {
		ns  netns.NsHandle
		err error
	}
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		ns, err := netns.New() // unshares this thread only; it dies with the goroutine
		if err == nil {
			var lo netlink.Link
			if lo, err = netlink.LinkByName("lo"); err == nil {
				err = netlink.LinkSetUp(lo)
			}
		}
		res <- result{ns, err}
	}()
	r := <-res
	if r.err != nil {
		t.Fatalf("new netns: %v", r.err)
	}
	t.Cleanup(func() { r.ns.Close() })
	return r.ns
}

// Pair is two network namespaces joined by a veth pair, with IPv4 and IPv6
// addresses from benchmarking and unique-local ranges that exist only
// inside them.
type Pair struct {
	A, B           netns.NsHandle
	A4, B4, A6, B6 netip.Addr
}

// NewPair creates a Pair. Its namespaces and link go away in t.Cleanup.
func NewPair(t testing.TB) *Pair {
	t.Helper()
	p := &Pair{
		A:  NewNetNS(t),
		B:  NewNetNS(t),
		A4: netip.MustParseAddr("198.18.0.1"),
		B4: netip.MustParseAddr("198.18.0.2"),
		A6: netip.MustParseAddr("fd00:b0::1"),
		B6: netip.MustParseAddr("fd00:b0::2"),
	}
	ha, err := netlink.NewHandleAt(p.A)
	if err != nil {
		t.Fatalf("netlink handle: %v", err)
	}
	defer ha.Close()
	hb, err := netlink.NewHandleAt(p.B)
	if err != nil {
		t.Fatalf("netlink handle: %v", err)
	}
	defer hb.Close()

	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: "bwa0", MTU: 1500},
		PeerName:      "bwb0",
		PeerNamespace: netlink.NsFd(int(p.B)),
	}
	if err := ha.LinkAdd(veth); err != nil {
		t.Fatalf("add veth: %v", err)
	}
	setup := func(h *netlink.Handle, name string, v4, v6 netip.Addr) {
		link, err := h.LinkByName(name)
		if err != nil {
			t.Fatalf("veth %s: %v", name, err)
		}
		for _, a := range []string{v4.String() + "/24", v6.String() + "/64"} {
			addr, err := netlink.ParseAddr(a)
			if err != nil {
				t.Fatal(err)
			}
			addr.Flags = unix.IFA_F_NODAD // usable at once, no duplicate detection wait
			if err := h.AddrAdd(link, addr); err != nil {
				t.Fatalf("address %s on %s: %v", a, name, err)
			}
		}
		if err := h.LinkSetUp(link); err != nil {
			t.Fatalf("up %s: %v", name, err)
		}
	}
	setup(ha, "bwa0", p.A4, p.A6)
	setup(hb, "bwb0", p.B4, p.B6)
	return p
}

// NewCgroup creates a child cgroup under root (a cgroup v2 directory) and
// returns its path. In t.Cleanup every process still in it is killed and the
// directory removed.
func NewCgroup(t testing.TB, root string) string {
	t.Helper()
	dir := filepath.Join(root, Name("bwtest-"))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			killAll(dir)
			err := os.Remove(dir)
			if err == nil || os.IsNotExist(err) {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("remove cgroup %s: %v", dir, err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	return dir
}

func killAll(cgroup string) {
	// cgroup.kill (5.14+) kills the whole subtree in one write.
	if os.WriteFile(filepath.Join(cgroup, "cgroup.kill"), []byte("1"), 0) == nil {
		return
	}
	b, _ := os.ReadFile(filepath.Join(cgroup, "cgroup.procs"))
	for _, f := range strings.Fields(string(b)) {
		var pid int
		if _, err := fmt.Sscan(f, &pid); err == nil {
			unix.Kill(pid, unix.SIGKILL)
		}
	}
}

// Listeners counts the TCP sockets that listen on port, on any IPv4 or IPv6
// address, in the network namespace whose /proc net directory is dir
// ("/proc/PID/net", or "/proc/thread-self/net" for the calling thread's).
func Listeners(dir string, port int) (int, error) {
	n := 0
	for _, file := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile(filepath.Join(dir, file))
		if err != nil {
			return 0, err
		}
		for _, line := range bytes.Split(b, []byte("\n"))[1:] {
			// sl local_address rem_address st ...; addresses are HEX:PORT.
			f := bytes.Fields(line)
			if len(f) < 4 || string(f[3]) != "0A" { // TCP_LISTEN
				continue
			}
			_, hexPort, ok := bytes.Cut(f[1], []byte(":"))
			if p, err := strconv.ParseUint(string(hexPort), 16, 16); ok && err == nil && int(p) == port {
				n++
			}
		}
	}
	return n, nil
}

// spawner runs the functions sent to it on one OS thread that never exits.
var spawner struct {
	once sync.Once
	fns  chan func()
}

// Spawn runs fn, which starts child processes with a parent-death signal,
// on an OS thread that lives as long as the test binary. Linux sends that
// signal when the *thread* that forked the child exits, and Go ends a thread
// whenever a goroutine locked to it returns (as Do's, and any library's that
// switches network namespace, do): started from an ordinary goroutine, a
// child could be killed in the middle of a test by some other goroutine's
// thread ending. Started here, it dies with the test binary only.
func Spawn(fn func() error) error {
	spawner.once.Do(func() {
		spawner.fns = make(chan func())
		go func() {
			runtime.LockOSThread() // never unlocked, never returns
			for f := range spawner.fns {
				f()
			}
		}()
	})
	errc := make(chan error, 1)
	spawner.fns <- func() { errc <- fn() }
	return <-errc
}

// AddLoopbackAddrs adds addrs (each ADDRESS/PREFIX) to lo in ns, without
// duplicate address detection, so that IPv6 addresses are usable at once.
func AddLoopbackAddrs(t testing.TB, ns netns.NsHandle, addrs ...string) {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		addr, err := netlink.ParseAddr(a)
		if err != nil {
			t.Fatal(err)
		}
		addr.Flags = unix.IFA_F_NODAD
		if err := h.AddrAdd(lo, addr); err != nil {
			t.Fatalf("add %s: %v", a, err)
		}
	}
}
