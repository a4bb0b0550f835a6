package bpf_test

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
)

// xrayUID is the UID the tests' Xray stand-in (a tcp-serve helper) runs
// as; xrayClient the UID of its clients' processes, whose own counters are
// not looked at.
const xrayUID, xrayClient = 2601, 2602

// newXrayEnv is a data plane whose Xray stand-in's UID is tagged, as the
// agent tags Xray's.
func newXrayEnv(t *testing.T) *env {
	t.Helper()
	e := newEnv(t)
	if !e.dp.SupportsServerTagging() {
		t.Skip("needs Linux 6.0")
	}
	if err := e.dp.Tag(xrayUID); err != nil {
		t.Fatal(err)
	}
	return e
}

// xrayServer starts an Xray stand-in in namespace B listening on listen
// and makes its port an Xray port (hold or claim-only). It returns the
// helper and the port.
func (e *env) xrayServer(t *testing.T, listen string, hold bool) (*nettest.Proc, uint16) {
	t.Helper()
	srv := e.start(t, true, xrayUID, "tcp-serve", listen)
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	port := netip.MustParseAddrPort(addr).Port()
	var err error
	if hold {
		err = e.dp.SetXrayPorts([]uint16{port}, nil)
	} else {
		err = e.dp.SetXrayPorts(nil, []uint16{port})
	}
	if err != nil {
		t.Fatal(err)
	}
	return srv, port
}

// peerOf returns the peer of socket fd as Xray's log names it: an IPv4
// client unmapped.
func peerOf(t *testing.T, fd int) netip.AddrPort {
	t.Helper()
	sa, err := unix.Getpeername(fd)
	if err != nil {
		t.Fatal(err)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), uint16(sa.Port))
	}
	t.Fatalf("peer of socket %d: %T", fd, sa)
	return netip.AddrPort{}
}

// received waits for a traffic helper to end and returns what it received,
// 0 if it never connected.
func received(t *testing.T, p *nettest.Proc) uint64 {
	t.Helper()
	p.Wait(10 * time.Second)
	if strings.HasPrefix(p.Last(), "ERR") {
		t.Logf("the helper failed: %s", p.Last())
		return 0
	}
	_, recv, err := nettest.ParseDone(p.Last())
	if err != nil {
		t.Fatal(err)
	}
	return recv
}

// account registers a new account for a test.
func account(t *testing.T, dp *bpf.Datapath, name string) uint32 {
	t.Helper()
	id, err := dp.Account(name)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// claimOf claims the connection that process srv accepted on port for
// acct, and returns its socket.
func claimOf(t *testing.T, dp *bpf.Datapath, srv *nettest.Proc, port uint16, acct uint32) int {
	t.Helper()
	fd := acceptedSocket(t, srv.Cmd.Process.Pid, port)
	if err := dp.Claim(peerOf(t, fd), port, acct); err != nil {
		t.Fatal(err)
	}
	return fd
}

// A connection accepted on an Xray hold port passes its first 64 KiB and
// is then held until its claim comes; from then on it goes on at once as
// the account's server socket: every byte from the claim on is counted for
// the account, what the server sent as the account's download, what it
// moved while it waited (at most 64 KiB) included: folded into the
// account at the claim, so the account's budget holds to the packet. Over
// a dual-stack listener (IPv4 clients seen IPv4-mapped), an IPv4 one and
// IPv6.
func TestClaimHeldConnection(t *testing.T) {
	e := newXrayEnv(t)
	for _, c := range []struct{ name, listen, dial string }{
		{"dual-stack-ipv4", "[::]:0", e.net.B4.String()},
		{"ipv4", listenAddr(e.net.B4), e.net.B4.String()},
		{"ipv6", listenAddr(e.net.B6), e.net.B6.String()},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv, port := e.xrayServer(t, c.listen, true)
			acct := account(t, e.dp, "held-"+c.name)
			before := stats(t, e.dp)
			xrayBefore := e.counters(t, xrayUID)
			const down = 4 << 20
			cli := e.start(t, false, xrayClient, "tcp-client", net.JoinHostPort(c.dial, strconv.Itoa(int(port))), "0", strconv.Itoa(down))
			if _, recv := cli.Progress(t, time.Second); recv > 64<<10 {
				t.Errorf("an unclaimed connection received %d bytes in its first second, want at most 64 KiB", recv)
			}
			if st := stats(t, e.dp); st.XrayHeld == before.XrayHeld {
				t.Errorf("no packet held: %+v", st)
			}
			fd := acceptedSocket(t, srv.Cmd.Process.Pid, port)
			if a, ok, err := e.dp.SocketAttribution(fd); err != nil || !ok || !a.Pending || a.Moved.TxBytes == 0 {
				t.Fatalf("the waiting connection's attribution: %+v, %v, %v; want pending with bytes sent", a, ok, err)
			}
			waited, _, _ := e.dp.SocketAttribution(fd) // held: nothing moves now
			if err := e.dp.Claim(peerOf(t, fd), port, acct); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			if _, got := cli.Done(t); got != down {
				t.Fatalf("received %d bytes, want %d", got, down)
			}
			if took := time.Since(start); took > 6*time.Second { // the next retransmission after a 1 s hold can take 1.6 s
				t.Errorf("claimed, the download still took %v", took)
			}
			if a, ok, err := e.dp.SocketAttribution(fd); err != nil || !ok || a.UID != acct || !a.Server || a.Pending {
				t.Errorf("the claimed connection's attribution: %+v, %v, %v; want server socket of %d", a, ok, err, acct)
			}
			got := e.counters(t, acct)
			t.Logf("account counted %+v", got)
			within(t, "the account's download", got.RxBytes, down)
			if got.RxBytes < down || waited.Moved.TxBytes == 0 {
				t.Errorf("the account counted %d of a %d-byte download, %d of it sent before the claim: want all of it", got.RxBytes, down, waited.Moved.TxBytes)
			}
			if a, _, _ := e.dp.SocketAttribution(fd); a.Moved != (bpf.Counters{}) {
				t.Errorf("the claimed connection's entry kept %+v: want what it moved while it waited folded", a.Moved)
			}
			if got.TxBytes == 0 || got.TxBytes > got.RxBytes/10 {
				t.Errorf("the account's upload (the client's request and ACKs) is %d bytes, for a download of %d", got.TxBytes, got.RxBytes)
			}
			if x := e.counters(t, xrayUID); x.RxBytes+x.TxBytes > xrayBefore.RxBytes+xrayBefore.TxBytes+1024 {
				t.Errorf("Xray's UID counted %+v (before %+v): the connection's bytes are the account's", x, xrayBefore)
			}
			moved := map[uint32]bpf.Counters{}
			if err := e.dp.EachMoved(func(uid uint32, c bpf.Counters) { moved[uid] = c }); err != nil {
				t.Fatal(err)
			}
			// The connection's last ACKs and FIN may still pass between the
			// two reads: a few packets more, never fewer.
			if m := moved[acct]; m.RxBytes < got.RxBytes || m.RxBytes > got.RxBytes+1024 || m.TxBytes < got.TxBytes || m.TxBytes > got.TxBytes+1024 {
				t.Errorf("EachMoved reported %+v for the account, want %+v or a few packets more", m, got)
			}
			first := moved[acct]
			clear(moved)
			if err := e.dp.EachMoved(func(uid uint32, c bpf.Counters) { moved[uid] = c }); err != nil {
				t.Fatal(err)
			}
			// Reported again only if it moved since: those last packets
			// (the test's copy of the socket keeps it open).
			if m, again := moved[acct]; again && m == first {
				t.Errorf("EachMoved reported the account twice without traffic: %+v", m)
			}
			if st := stats(t, e.dp); st.XrayClaimed != before.XrayClaimed+1 || st.XrayUnclaimed != before.XrayUnclaimed {
				t.Errorf("stats %+v after %+v: want one more claimed connection, none unclaimed", st, before)
			}
		})
	}
}

// A connection on a claim-only port is never held: what it moves before
// its claim is folded into the account at the claim, with what follows. A
// connection from a loopback address (a local proxy in front of Xray) is
// never held either, even on a hold port, and can still be claimed.
func TestClaimWithoutHold(t *testing.T) {
	e := newXrayEnv(t)
	for _, c := range []struct {
		name       string
		hold       bool
		inB        bool // the client runs in the server's namespace
		listen     string
		dial       string
		beforeMore uint64 // what must have moved before the claim
	}{
		{"claim-only", false, false, "[::]:0", e.net.B4.String(), 1 << 20},
		{"loopback-ipv4", true, true, "[::]:0", "127.0.0.1", 1 << 20},
		{"loopback-ipv6", true, true, "[::]:0", "::1", 1 << 20},
		{"loopback-ipv4-listener", true, true, "127.0.0.1:0", "127.0.0.1", 1 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			srv, port := e.xrayServer(t, c.listen, c.hold)
			acct := account(t, e.dp, "nohold-"+c.name)
			before := stats(t, e.dp)
			cli := e.start(t, c.inB, xrayClient, "tcp-client", net.JoinHostPort(c.dial, strconv.Itoa(int(port))), "0", "inf", "1500ms")
			_, early := cli.Progress(t, 300*time.Millisecond)
			if early < c.beforeMore {
				t.Errorf("received %d bytes in 300 ms: held", early)
			}
			fd := claimOf(t, e.dp, srv, port, acct)
			_, recv := cli.Done(t)
			srv.Expect(t, "DONE", 5*time.Second) // the server's end is closed: all it sent is counted
			got := e.counters(t, acct)
			waited, _, err := e.dp.SocketAttribution(fd)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("received %d (%d before the claim), account counted %+v, the entry kept %+v", recv, early, got, waited.Moved)
			// The claim is taken at the first packet after it, which
			// folds what the connection moved before it into the
			// account: the account counted the whole.
			within(t, "the account's download", got.RxBytes, recv)
			if waited.Moved != (bpf.Counters{}) || got.RxBytes < early {
				t.Errorf("the entry kept %+v, %d bytes were received before the claim; the account counted %d", waited.Moved, early, got.RxBytes)
			}
			if st := stats(t, e.dp); st.XrayHeld != before.XrayHeld || st.XrayClaimed != before.XrayClaimed+1 {
				t.Errorf("stats %+v after %+v: want no packet held, one more claimed connection", st, before)
			}
		})
	}
}

// A connection whose claim never comes is released after 5 s: it flows
// again, and counts for its owner, Xray's UID, what it moved while it
// waited included.
func TestClaimNeverComes(t *testing.T) {
	e := newXrayEnv(t)
	_, port := e.xrayServer(t, "[::]:0", true)
	before := stats(t, e.dp)
	xrayBefore := e.counters(t, xrayUID)
	const down = 1 << 20
	start := time.Now()
	cli := e.start(t, false, xrayClient, "tcp-client", net.JoinHostPort(e.net.B4.String(), strconv.Itoa(int(port))), "0", strconv.Itoa(down))
	if _, got := cli.Done(t); got != down {
		t.Fatalf("received %d bytes, want %d", got, down)
	}
	if took := time.Since(start); took < 4*time.Second {
		t.Errorf("the download ended after %v: not held", took)
	}
	st := stats(t, e.dp)
	if st.XrayHeld == before.XrayHeld || st.XrayUnclaimed != before.XrayUnclaimed+1 || st.XrayClaimed != before.XrayClaimed {
		t.Errorf("stats %+v after %+v: want held packets and one more unclaimed connection", st, before)
	}
	x := e.counters(t, xrayUID)
	within(t, "Xray's UID's sent bytes", x.TxBytes-xrayBefore.TxBytes, down)
}

// An account whose policy charges a UID's budget (QuotaKey) shares it: a
// claimed connection stops when the UID's and the account's charged bytes
// together reach the ceiling, and then the UID's own traffic is stopped
// too. A blocked account's claimed connection carries nothing more, and
// what it moved while it waited (it passed) is counted.
func TestClaimedPolicies(t *testing.T) {
	e := newXrayEnv(t)
	t.Run("shared budget", func(t *testing.T) {
		const user, other = 2610, 2611
		acct := account(t, e.dp, "shared")
		const budget = 2 << 20
		ceiling := bpf.Ceiling(0, budget)
		setPolicy(t, e.dp, user, bpf.Policy{Quota: bpf.Both, Ceiling: ceiling})
		setPolicy(t, e.dp, acct, bpf.Policy{Quota: bpf.Both, Ceiling: ceiling, QuotaKey: user})
		if p, err := e.dp.Policy(acct); err != nil || p.QuotaKey != user {
			t.Fatalf("the account's policy reads back as %+v, %v", p, err)
		}
		// The UID's own download first: 512 KiB of the budget.
		plain := e.start(t, true, other, "tcp-serve", listenAddr(e.net.B4))
		plainAddr := strings.Fields(plain.Expect(t, "ADDR", 5*time.Second))[1]
		if _, got := e.start(t, false, user, "tcp-client", plainAddr, "0", strconv.Itoa(512<<10)).Done(t); got != 512<<10 {
			t.Fatalf("the UID's own download: %d bytes", got)
		}
		usedBefore, err := e.dp.QuotaUsed(user)
		if err != nil || usedBefore < 512<<10 {
			t.Fatalf("the UID's download charged %d, %v", usedBefore, err)
		}

		srv, port := e.xrayServer(t, "[::]:0", true)
		cli := e.start(t, false, xrayClient, "tcp-client", net.JoinHostPort(e.net.B4.String(), strconv.Itoa(int(port))), "0", "inf", "4s")
		cli.Progress(t, 500*time.Millisecond) // held by now
		claimOf(t, e.dp, srv, port, acct)
		_, recv := cli.Done(t)
		used, err := e.dp.QuotaUsed(user)
		if err != nil {
			t.Fatal(err)
		}
		u, a := e.counters(t, user), e.counters(t, acct)
		t.Logf("Xray's client received %d; UID counted %+v, account %+v; charged %d of %d", recv, u, a, used, ceiling)
		if used > ceiling {
			t.Errorf("charged %d, over the ceiling %d", used, ceiling)
		}
		if used < ceiling-64<<10 {
			t.Errorf("the transfer stopped at %d charged bytes, more than a packet under the ceiling %d", used, ceiling)
		}
		if sum := u.RxBytes + u.TxBytes + a.RxBytes + a.TxBytes; sum != used {
			t.Errorf("the UID and the account counted %d bytes together, %d were charged", sum, used)
		}
		if own, err := e.dp.QuotaUsed(acct); err != nil || own != 0 {
			t.Errorf("the account's own quota entry was charged %d, %v", own, err)
		}
		if recv > budget {
			t.Errorf("Xray's client received %d bytes through a budget of %d", recv, budget)
		}
		// The budget is spent for the UID's own traffic too (its SYN may
		// not even pass).
		if got := received(t, e.start(t, false, user, "tcp-client", plainAddr, "0", strconv.Itoa(1<<20), "2s")); got >= 64<<10 {
			t.Errorf("the UID downloaded %d bytes past the shared budget", got)
		}
	})
	t.Run("blocked", func(t *testing.T) {
		acct := account(t, e.dp, "blocked")
		setPolicy(t, e.dp, acct, bpf.Policy{Blocked: true})
		srv, port := e.xrayServer(t, "[::]:0", true)
		before := stats(t, e.dp)
		cli := e.start(t, false, xrayClient, "tcp-client", net.JoinHostPort(e.net.B4.String(), strconv.Itoa(int(port))), "0", "inf", "3s")
		_, early := cli.Progress(t, 500*time.Millisecond)
		fd := acceptedSocket(t, srv.Cmd.Process.Pid, port)
		waiting, _, err := e.dp.SocketAttribution(fd)
		if err != nil || !waiting.Pending {
			t.Fatalf("the waiting connection's attribution: %+v, %v", waiting, err)
		}
		if err := e.dp.Claim(peerOf(t, fd), port, acct); err != nil {
			t.Fatal(err)
		}
		_, recv := cli.Done(t)
		if recv > early+2<<10 || recv > 64<<10 {
			t.Errorf("a blocked account's connection received %d bytes (%d before its claim)", recv, early)
		}
		a := e.counters(t, acct)
		// What it moved while it waited is folded into the account at
		// the claim (those bytes passed); after the claim every packet
		// is dropped, uncounted.
		if a.RxBytes < waiting.Moved.TxBytes || a.RxBytes > waiting.Moved.TxBytes+2<<10 {
			t.Errorf("the blocked account counted %+v; it sent %d bytes while it waited", a, waiting.Moved.TxBytes)
		}
		st := stats(t, e.dp)
		if st.XrayClaimed != before.XrayClaimed+1 || st.DroppedBlocked == before.DroppedBlocked {
			t.Errorf("stats %+v after %+v: want one more claimed connection and dropped packets", st, before)
		}
	})
}

// An SSH session's socket attributed as a server socket counts what it
// sends as the user's download, and so does what Attribute returns of its
// pending bytes.
func TestServerAttribution(t *testing.T) {
	e := newEnv(t)
	if !e.dp.SupportsServerTagging() {
		t.Skip("needs Linux 6.0")
	}
	const client, user = 2621, 2622
	srv := e.start(t, true, 0, "tcp-serve", listenAddr(e.net.B4))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	port := netip.MustParseAddrPort(addr).Port()
	if err := e.dp.SetSSHPorts([]uint16{port}); err != nil {
		t.Fatal(err)
	}
	const down = 1 << 20
	c := e.start(t, false, client, "tcp-client", addr, "0", strconv.Itoa(down))
	c.Progress(t, 500*time.Millisecond) // held by now
	fd := acceptedSocket(t, srv.Cmd.Process.Pid, port)
	moved, err := e.dp.Attribute(fd, 0, bpf.Attribution{UID: user, Server: true})
	if err != nil {
		t.Fatal(err)
	}
	if moved.RxBytes == 0 || moved.RxBytes > 80<<10 || moved.TxBytes >= moved.RxBytes {
		t.Errorf("moved while pending: %+v, want the bytes sent as RxBytes (at most 64 KiB and a packet), fewer received", moved)
	}
	if a, ok, err := e.dp.SocketAttribution(fd); err != nil || !ok || !a.Server || a.UID != user || a.Pending {
		t.Errorf("attribution read back: %+v, %v, %v", a, ok, err)
	}
	if err := e.dp.Credit(user, moved); err != nil {
		t.Fatal(err)
	}
	if _, got := c.Done(t); got != down {
		t.Fatalf("received %d bytes, want %d", got, down)
	}
	got := e.counters(t, user)
	within(t, "the user's download", got.RxBytes, down)
	if got.TxBytes == 0 || got.TxBytes > got.RxBytes/10 {
		t.Errorf("the user's upload is %d bytes, for a download of %d", got.TxBytes, got.RxBytes)
	}
}

// The account registry: a name keeps its ID, IDs follow each other and are
// found again by the next Load of the same pins; bad names and a full
// registry are refused.
func TestAccounts(t *testing.T) {
	e := newEnv(t)
	long := strings.Repeat("x", 128)
	want := map[string]uint32{}
	for i, name := range []string{"alice@example.com", "bob", long} {
		id, err := e.dp.Account(name)
		if err != nil {
			t.Fatal(err)
		}
		if id != bpf.AccountBase+uint32(i) {
			t.Errorf("Account(%q) = %#x, want %#x", name, id, bpf.AccountBase+uint32(i))
		}
		want[name] = id
	}
	if id, err := e.dp.Account("bob"); err != nil || id != want["bob"] {
		t.Errorf("Account(bob) again = %#x, %v; want %#x", id, err, want["bob"])
	}
	if name, ok := e.dp.AccountName(want["alice@example.com"]); !ok || name != "alice@example.com" {
		t.Errorf("AccountName = %q, %v", name, ok)
	}
	if _, ok := e.dp.AccountName(bpf.AccountBase + 100); ok {
		t.Errorf("AccountName of an ID never given out: found")
	}
	all := e.dp.Accounts()
	if fmt.Sprint(all) != fmt.Sprint(want) {
		t.Errorf("Accounts() = %v, want %v", all, want)
	}
	all["mallory"] = 1
	if _, ok := e.dp.Accounts()["mallory"]; ok {
		t.Errorf("Accounts() is no copy")
	}
	for _, bad := range []string{"", long + "y", "nul\x00byte"} {
		if _, err := e.dp.Account(bad); !errors.Is(err, bpf.ErrAccountName) {
			t.Errorf("Account(%q): %v, want ErrAccountName", bad, err)
		}
	}

	// The next agent finds the same accounts and goes on after them.
	if err := e.dp.Close(); err != nil {
		t.Fatal(err)
	}
	e.dp = e.load(t)
	if got := e.dp.Accounts(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("after a reload Accounts() = %v, want %v", got, want)
	}
	if id, err := e.dp.Account("carol"); err != nil || id != bpf.AccountBase+3 {
		t.Errorf("Account(carol) after a reload = %#x, %v; want %#x", id, err, bpf.AccountBase+3)
	}

	// The last ID given out: the registry is full.
	m, err := ebpf.LoadPinnedMap(filepath.Join(e.pin, "bw_accounts"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var name [128]byte
	copy(name[:], "last")
	if err := m.Put(bpf.AccountBase+bpf.MaxAccounts-1, name); err != nil {
		t.Fatal(err)
	}
	if err := e.dp.Close(); err != nil {
		t.Fatal(err)
	}
	e.dp = e.load(t)
	if id, ok := e.dp.Accounts()["last"]; !ok || id != bpf.AccountBase+bpf.MaxAccounts-1 {
		t.Errorf("the last account read back as %#x, %v", id, ok)
	}
	if _, err := e.dp.Account("dave"); !errors.Is(err, bpf.ErrAccountsFull) {
		t.Errorf("Account in a full registry: %v, want ErrAccountsFull", err)
	}
	if id, err := e.dp.Account("carol"); err != nil || id != bpf.AccountBase+3 {
		t.Errorf("an existing account in a full registry: %#x, %v", id, err)
	}
}

// A claim names a client and a local port; anything else is refused.
func TestClaimErrors(t *testing.T) {
	e := newEnv(t)
	for _, c := range []struct {
		client netip.AddrPort
		port   uint16
	}{
		{netip.AddrPort{}, 443},
		{netip.MustParseAddrPort("0.0.0.0:5000"), 443},
		{netip.MustParseAddrPort("[::]:5000"), 443},
		{netip.MustParseAddrPort("192.0.2.1:0"), 443},
		{netip.MustParseAddrPort("192.0.2.1:5000"), 0},
	} {
		if err := e.dp.Claim(c.client, c.port, bpf.AccountBase); !errors.Is(err, bpf.ErrInvalidClaim) {
			t.Errorf("Claim(%v, %d): %v, want ErrInvalidClaim", c.client, c.port, err)
		}
	}
	if err := e.dp.Claim(netip.MustParseAddrPort("192.0.2.1:5000"), 443, bpf.AccountBase); err != nil {
		t.Errorf("a valid claim: %v", err)
	}
}

// ClaimAll writes claims in order, in one call, up to the first invalid
// one, and says how many it wrote: the kernel's table holds exactly those.
func TestClaimAll(t *testing.T) {
	e := newEnv(t)
	cs := []bpf.Claim{
		{Client: netip.MustParseAddrPort("192.0.2.1:5000"), LocalPort: 443, Account: bpf.AccountBase},
		{Client: netip.MustParseAddrPort("[2001:db8::1]:5001"), LocalPort: 8443, Account: bpf.AccountBase + 1},
		{Client: netip.MustParseAddrPort("192.0.2.2:0"), LocalPort: 443, Account: bpf.AccountBase},
		{Client: netip.MustParseAddrPort("192.0.2.3:5002"), LocalPort: 443, Account: bpf.AccountBase},
	}
	n, err := e.dp.ClaimAll(cs)
	if n != 2 || !errors.Is(err, bpf.ErrInvalidClaim) {
		t.Fatalf("ClaimAll: %d written, %v; want 2 and ErrInvalidClaim", n, err)
	}
	if n, err := e.dp.ClaimAll(cs[3:]); n != 1 || err != nil {
		t.Fatalf("ClaimAll of the rest: %d written, %v", n, err)
	}
	if n, err := e.dp.ClaimAll(nil); n != 0 || err != nil {
		t.Fatalf("ClaimAll of none: %d written, %v", n, err)
	}
	got := claimsIn(t, e.pin)
	want := map[claimKey]uint32{}
	for _, c := range []bpf.Claim{cs[0], cs[1], cs[3]} {
		want[claimKey{c.Client.Addr().As16(), c.Client.Port(), c.LocalPort}] = c.Account
	}
	if !maps.Equal(got, want) {
		t.Errorf("bw_claims holds %v, want %v", got, want)
	}
}

// claimKey is a key of bw_claims, as the kernel lays it out.
type claimKey struct {
	Addr       [16]byte
	ClientPort uint16
	LocalPort  uint16
}

// claimsIn returns what the pinned bw_claims under pin holds.
func claimsIn(t *testing.T, pin string) map[claimKey]uint32 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(pin, "bw_claims"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	got := map[claimKey]uint32{}
	var k claimKey
	var v uint32
	for it := m.Iterate(); it.Next(&k, &v); {
		got[k] = v
	}
	return got
}

// Unclaim removes the claims still in the kernel's table for the same
// account, and no other: not one taken (gone), not one written again for
// another account, not an invalid one (never written).
func TestUnclaim(t *testing.T) {
	e := newEnv(t)
	c := func(addr string, acct uint32) bpf.Claim {
		return bpf.Claim{Client: netip.MustParseAddrPort(addr), LocalPort: 443, Account: bpf.AccountBase + acct}
	}
	cs := []bpf.Claim{c("192.0.2.1:5000", 0), c("[2001:db8::1]:5001", 1), c("192.0.2.2:5002", 0), c("192.0.2.3:5003", 2)}
	if n, err := e.dp.ClaimAll(cs); n != len(cs) || err != nil {
		t.Fatalf("ClaimAll: %d, %v", n, err)
	}
	// cs[2]'s address claimed again for another account.
	if err := e.dp.Claim(cs[2].Client, 443, bpf.AccountBase+3); err != nil {
		t.Fatal(err)
	}
	n, err := e.dp.Unclaim([]bpf.Claim{cs[0], cs[1], cs[2], c("192.0.2.4:5004", 0), c("192.0.2.5:0", 0), cs[0]})
	if n != 2 || err != nil {
		t.Fatalf("Unclaim: %d removed, %v; want 2 (cs[0] and cs[1])", n, err)
	}
	got := claimsIn(t, e.pin)
	want := map[claimKey]uint32{
		{cs[2].Client.Addr().As16(), cs[2].Client.Port(), 443}: bpf.AccountBase + 3,
		{cs[3].Client.Addr().As16(), cs[3].Client.Port(), 443}: cs[3].Account,
	}
	if !maps.Equal(got, want) {
		t.Errorf("bw_claims holds %v, want %v", got, want)
	}
	if n, err := e.dp.Unclaim(nil); n != 0 || err != nil {
		t.Errorf("Unclaim of none: %d, %v", n, err)
	}

	// More claims than one read of the table takes.
	many := make([]bpf.Claim, 10000)
	for i := range many {
		many[i] = bpf.Claim{Client: netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, byte(i >> 8), byte(i)}), 6000), LocalPort: 443, Account: bpf.AccountBase}
	}
	if n, err := e.dp.ClaimAll(many); n != len(many) || err != nil {
		t.Fatalf("ClaimAll of %d: %d, %v", len(many), n, err)
	}
	if n, err := e.dp.Unclaim(many); n != len(many) || err != nil {
		t.Errorf("Unclaim of %d: %d removed, %v", len(many), n, err)
	}
}

// SetSSHPorts and SetXrayPorts share bw_ssh_ports, each owning its kinds:
// neither removes the other's ports, a port both name is an SSH port (and
// the Xray one comes back when SSH lets it go), a hold port beats a
// claim-only one, and the next Load finds them.
func TestXrayPorts(t *testing.T) {
	e := newEnv(t)
	if !e.dp.SupportsServerTagging() {
		t.Skip("needs Linux 6.0")
	}
	read := func() map[uint16]uint8 {
		t.Helper()
		m, err := ebpf.LoadPinnedMap(filepath.Join(e.pin, "bw_ssh_ports"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		got := map[uint16]uint8{}
		var port uint16
		var kind uint8
		it := m.Iterate()
		for it.Next(&port, &kind) {
			got[port] = kind
		}
		if err := it.Err(); err != nil {
			t.Fatal(err)
		}
		return got
	}
	check := func(want map[uint16]uint8) {
		t.Helper()
		if got := read(); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("ports %v, want %v", got, want)
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(e.dp.SetSSHPorts([]uint16{22, 443}))
	must(e.dp.SetXrayPorts([]uint16{443, 8443, 9443}, []uint16{9443, 10443}))
	check(map[uint16]uint8{22: 1, 443: 1, 8443: 2, 9443: 2, 10443: 3})
	must(e.dp.SetSSHPorts([]uint16{22}))
	check(map[uint16]uint8{22: 1, 443: 2, 8443: 2, 9443: 2, 10443: 3})
	must(e.dp.Close())
	e.dp = e.load(t)
	must(e.dp.SetSSHPorts([]uint16{2222}))
	check(map[uint16]uint8{2222: 1, 443: 2, 8443: 2, 9443: 2, 10443: 3})
	must(e.dp.SetXrayPorts(nil, []uint16{443}))
	check(map[uint16]uint8{2222: 1, 443: 3})
	must(e.dp.SetXrayPorts(nil, nil))
	check(map[uint16]uint8{2222: 1})
}

// A pinned link holding another program for its attach type (the other
// variant of the packet programs, an earlier version's) gets this data
// plane's at the next Load: one program per hook, the claim variants where
// the session programs run, and counting goes on.
func TestReloadReplacesOtherVariant(t *testing.T) {
	e := newEnv(t)
	ingress, egress, err := e.dp.ProgramIDs()
	if err != nil {
		t.Fatal(err)
	}
	wantName := map[ebpf.ProgramID]string{ingress: "bw_ingress", egress: "bw_egress"}
	if e.dp.SupportsServerTagging() {
		wantName = map[ebpf.ProgramID]string{ingress: "bw_ingress_attr", egress: "bw_egress_attr"}
	}
	for id, want := range wantName {
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			t.Fatal(err)
		}
		info, err := p.Info()
		p.Close()
		if err != nil {
			t.Fatal(err)
		}
		if info.Name != want {
			t.Errorf("attached program %d is %q, want %q", id, info.Name, want)
		}
	}
	if err := e.dp.Close(); err != nil {
		t.Fatal(err)
	}
	// Someone else's program in both links.
	for _, c := range []struct {
		pin string
		typ ebpf.AttachType
	}{{"link_ingress", ebpf.AttachCGroupInetIngress}, {"link_egress", ebpf.AttachCGroupInetEgress}} {
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type: ebpf.CGroupSKB, AttachType: c.typ, License: "GPL",
			Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 1), asm.Return()},
		})
		if err != nil {
			t.Fatal(err)
		}
		l, err := link.LoadPinnedLink(filepath.Join(e.pin, c.pin), nil)
		if err != nil {
			t.Fatal(err)
		}
		err = l.Update(prog)
		l.Close()
		prog.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	e.dp = e.load(t)
	in, eg, err := e.dp.ProgramIDs()
	if err != nil {
		t.Fatal(err)
	}
	for typ, want := range map[ebpf.AttachType]ebpf.ProgramID{ebpf.AttachCGroupInetIngress: in, ebpf.AttachCGroupInetEgress: eg} {
		ids, err := e.dp.AttachedPrograms(typ)
		if err != nil {
			t.Fatal(err)
		}
		if len(ids) != 1 || ids[0] != want {
			t.Errorf("%v: attached %v, want only our program %d", typ, ids, want)
		}
	}
	const user, server = 2631, 2632
	srv := e.start(t, true, server, "udp-echo", listenAddr(e.net.B4))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	e.start(t, false, user, "udp-client", addr, "10", "500").Done(t)
	if c := e.counters(t, user); c.TxPackets != 10 {
		t.Errorf("after the reload the sender counted %+v, want 10 packets sent", c)
	}
}
