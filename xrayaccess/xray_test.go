package xrayaccess_test

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/xraytest"
	"github.com/myvpn/bwagent/xrayaccess"
	"github.com/myvpn/bwagent/xrayconf"
	"github.com/myvpn/bwagent/xraystats"
)

// startFollower starts an Xray server with an access log file and a
// follower of it, found through xrayconf as the agent would, and waits
// until the follower returns lines: until the lines Xray wrote before (the
// harness's own connections, which Shadowsocks inbounds log as rejected)
// are 256 bytes behind.
func startFollower(t *testing.T, users []xraytest.User) (*xraytest.Server, *xrayaccess.Follower) {
	t.Helper()
	srv := xraytest.StartServer(t, users, xraytest.AccessLog())
	cfg, err := xrayconf.Load([]string{srv.ConfigPath}, "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.AccessLog != srv.AccessLogPath {
		t.Fatalf("xrayconf: AccessLog %q, want %q", cfg.AccessLog, srv.AccessLogPath)
	}
	f, err := xrayaccess.Open(cfg.AccessLog, xrayaccess.Options{Interval: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	c := srv.Client(t, users[0])
	for try := 0; ; try++ {
		if try == 10 {
			t.Fatalf("no line returned after %d connections: %+v", try, f.Stats())
		}
		if _, _, err := c.Transfer(1, 1); err != nil {
			t.Fatal(err)
		}
		if es := next(t, f, time.Second); len(es) > 0 {
			break
		}
	}
	return srv, f
}

// next returns the next entries of f, nil if none comes within d.
func next(t *testing.T, f *xrayaccess.Follower, d time.Duration) []xrayaccess.Entry {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), d)
	defer cancel()
	es, err := f.Next(ctx)
	if err != nil && ctx.Err() == nil {
		t.Fatal(err)
	}
	return es
}

// TestXray: against real Xray, the follower returns one attribution per
// connection of every protocol (XTLS Vision included), with the user's
// email, the inbound's tag and, as source, the local address of the client
// Xray's socket to the server.
func TestXray(t *testing.T) {
	users := append(xraytest.DefaultUsers(), xraytest.NewVisionUser("vis"))
	srv, f := startFollower(t, users)
	before := f.Stats()

	// Two connections of each user, open together.
	type conn struct {
		user  xraytest.User
		local netip.AddrPort
	}
	bySource := map[netip.AddrPort]conn{}
	for _, u := range users {
		c := srv.Client(t, u)
		// The warm-up's connections may not be closed yet.
		old := map[netip.AddrPort]bool{}
		for _, k := range c.ClientSockets(t) {
			old[k.Local] = true
		}
		for range 2 {
			e, err := c.Echo()
			if err != nil {
				t.Fatalf("%s: %v", u.Email, err)
			}
			t.Cleanup(func() { e.Close() })
		}
		n := 0
		for _, k := range c.ClientSockets(t) {
			if k.State == 1 && !old[k.Local] { // ESTABLISHED
				bySource[k.Local] = conn{u, k.Local}
				n++
			}
		}
		if n != 2 {
			t.Fatalf("%s: %d established sockets to the server, want 2", u.Email, n)
		}
	}

	var got []xrayaccess.Entry
	for deadline := time.Now().Add(5 * time.Second); len(got) < len(bySource) && time.Now().Before(deadline); {
		got = append(got, next(t, f, time.Until(deadline))...)
	}
	got = append(got, next(t, f, 300*time.Millisecond)...) // nothing more
	if len(got) != len(bySource) {
		t.Errorf("%d entries for %d connections", len(got), len(bySource))
	}
	seen := map[netip.AddrPort]bool{}
	for _, e := range got {
		c, ok := bySource[e.Source]
		switch {
		case !ok:
			t.Errorf("entry %+v: from no client socket", e)
			continue
		case seen[e.Source]:
			t.Errorf("entry %+v: a second one for the socket", e)
		}
		seen[e.Source] = true
		wantNet := "tcp"
		if c.user.Protocol == xraytest.Shadowsocks2022 {
			wantNet = "" // Xray writes no network for them
		}
		if e.Email != c.user.Email || e.InboundTag != c.user.Inbound || e.OutboundTag != "direct" ||
			e.Status != xrayaccess.Accepted || e.Network != wantNet || e.Dest != srv.Sink {
			t.Errorf("entry %+v for %s of %s: want its email, inbound, outbound direct, %q:%s", e, c.local, c.user.Email, wantNet, srv.Sink)
		}
		if d := time.Since(e.Time); d < 0 || d > 10*time.Second {
			t.Errorf("entry %+v: time %v ago", e, d)
		}
	}
	s := f.Stats()
	if s.Attributions-before.Attributions != uint64(len(bySource)) || s.Suspect != before.Suspect || s.Rejected != before.Rejected || s.Malformed != 0 {
		t.Errorf("stats %+v, before %+v", s, before)
	}
	t.Logf("%d connections of %d users attributed; stats %+v", len(got), len(users), s)
}

// TestXrayForged: a Trojan user can write lines of their choice into
// Xray's access log (a destination domain with line breaks, which Xray
// refuses and logs raw in a rejected line), among them an accepted line
// that names another user; the follower does not return it, and returns
// the lines that come later.
func TestXrayForged(t *testing.T) {
	mallory := xraytest.NewUser("mallory", xraytest.Trojan)
	alice := xraytest.NewUser("alice", xraytest.VLESS)
	srv, f := startFollower(t, []xraytest.User{alice, mallory})

	now := time.Now().Format("2006/01/02 15:04:05.000000")
	forged := fmt.Sprintf("%s from 127.0.0.99:4242 accepted tcp:example.com:443 [vless-in >> direct] email: alice", now)
	domain := "x\n" + forged + "\n" + now + " from 127.0.0.98:1 accepted tcp:[::1"
	pw := mallory.Account.(xraystats.Trojan).Password
	sum := sha256.Sum224([]byte(pw))
	req := []byte(hex.EncodeToString(sum[:]))
	req = append(req, '\r', '\n', 1, 3, byte(len(domain))) // CONNECT, a domain
	req = append(req, domain...)
	req = binary.BigEndian.AppendUint16(req, 443)
	req = append(req, '\r', '\n')
	c, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(srv.InboundPort(mallory.Inbound))))
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	c.Read(make([]byte, 1)) // Xray closes it
	c.Close()

	// Xray wrote the forged line as a line of its own.
	deadline := time.Now().Add(5 * time.Second)
	for {
		b, err := os.ReadFile(srv.AccessLogPath)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), "\n"+forged+"\n") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no forged line in the access log:\n%s", b)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// The follower returns neither it nor the next legitimate lines within
	// 256 bytes; then alice's connections again.
	ac := srv.Client(t, alice)
	var got []xrayaccess.Entry
	for try := 0; try < 10 && len(got) == 0; try++ {
		if _, _, err := ac.Transfer(1, 1); err != nil {
			t.Fatal(err)
		}
		got = next(t, f, 500*time.Millisecond)
	}
	if len(got) != 1 || got[0].Email != "alice" || got[0].Source.Addr() != netip.MustParseAddr(ac.Source) {
		t.Errorf("got %+v, want one of alice's connections from %s", got, ac.Source)
	}
	s := f.Stats()
	if s.Suspect < 2 || s.Rejected < 1 {
		t.Errorf("stats %+v: want the forged line and the one after it suspect, and the rejected line", s)
	}
	t.Logf("stats %+v", s)
}

// TestXrayProbes: the lines Xray writes for the usual probes of its inbounds
// (connect and close, an HTTP request, random bytes, a reset) hold none of
// the client's bytes, so the connections accepted right after them are
// returned, none suspect.
func TestXrayProbes(t *testing.T) {
	users := append(xraytest.DefaultUsers(), xraytest.NewVisionUser("vis"))
	srv, f := startFollower(t, users)
	before := f.Stats()
	random := func(n int) []byte {
		b := make([]byte, n)
		rand.Read(b)
		return b
	}
	probe := func(addr string, msg []byte, reset bool) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Error(err)
			return
		}
		c.Write(msg)
		if reset {
			c.(*net.TCPConn).SetLinger(0)
		} else {
			c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			c.Read(make([]byte, 100))
		}
		c.Close()
	}
	n := 0
	for _, tag := range []string{"vless-in", "vmess-in", "trojan-in", "ss-in", "ss22-in", xraytest.VisionInbound} {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(srv.InboundPort(tag)))
		var wg sync.WaitGroup
		for _, msg := range [][]byte{nil, []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), random(16), random(100), random(2000), append([]byte{0}, random(60)...)} {
			wg.Go(func() { probe(addr, msg, false) })
		}
		wg.Go(func() { probe(addr, random(10), true) })
		wg.Wait()
		for _, u := range users {
			if u.Inbound == tag {
				if _, _, err := srv.Client(t, u).Transfer(1, 1); err != nil {
					t.Fatalf("%s: %v", u.Email, err)
				}
				n++
			}
		}
	}
	var got []xrayaccess.Entry
	for deadline := time.Now().Add(5 * time.Second); len(got) < n && time.Now().Before(deadline); {
		got = append(got, next(t, f, time.Until(deadline))...)
	}
	next(t, f, 500*time.Millisecond) // the last probes' lines
	s := f.Stats()
	if len(got) != n || s.Suspect != before.Suspect || s.Malformed != 0 || s.Rejected-before.Rejected < 10 {
		t.Errorf("%d entries for %d connections; stats %+v, before %+v: want no suspect line, and the probes rejected", len(got), n, s, before)
	}
	t.Logf("%d connections after probes, all attributed; stats %+v", n, s)
}
