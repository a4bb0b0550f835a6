package agent

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/sockkill"
	"github.com/myvpn/bwagent/xrayaccess"
)

// fakeSockets are the kernel's TCP sockets of the servers' ports, in
// miniature: connections open, listed and destroyed by cookie.
type fakeSockets struct {
	mu        sync.Mutex
	conns     map[uint64]sockkill.Conn
	next      uint64
	destroyed []sockkill.Conn
	lists     int
}

func newFakeSockets() *fakeSockets { return &fakeSockets{conns: map[uint64]sockkill.Conn{}, next: 100} }

// open opens a connection from client (IPv4, as a dual-stack listener
// has it: mapped) to port on 127.0.0.1, and returns its client address.
func (f *fakeSockets) open(client string, port uint16) netip.AddrPort {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.next++
	c := netip.MustParseAddrPort(client)
	f.conns[f.next] = sockkill.Conn{
		Local:  netip.AddrPortFrom(netip.AddrFrom16(netip.MustParseAddr("127.0.0.1").As16()), port),
		Remote: netip.AddrPortFrom(netip.AddrFrom16(c.Addr().As16()), c.Port()),
		Cookie: f.next, BytesSent: 1000, BytesReceived: 100,
	}
	return c
}

// close closes the connection from client.
func (f *fakeSockets) close(client netip.AddrPort) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for k, c := range f.conns {
		if c.Remote.Addr().Unmap() == client.Addr() && c.Remote.Port() == client.Port() {
			delete(f.conns, k)
		}
	}
}

// alive reports whether the connection from client is open.
func (f *fakeSockets) alive(client netip.AddrPort) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.conns {
		if c.Remote.Addr().Unmap() == client.Addr() && c.Remote.Port() == client.Port() {
			return true
		}
	}
	return false
}

func (f *fakeSockets) Conns(ports []uint16, bytes bool) ([]sockkill.Conn, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lists++
	var out []sockkill.Conn
	for _, c := range f.conns {
		if slices.Contains(ports, c.Local.Port()) {
			if !bytes {
				c.BytesSent, c.BytesReceived = 0, 0
			}
			out = append(out, c)
		}
	}
	return out, nil
}

func (f *fakeSockets) EachConn(ports []uint16, fn func(sockkill.Conn)) error {
	conns, err := f.Conns(ports, false)
	for _, c := range conns {
		fn(c)
		fn(c) // as a dump taken again may
	}
	return err
}

func (f *fakeSockets) Destroy(conns []sockkill.Conn) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range conns {
		if c.Cookie == 0 {
			return n, errors.New("destroy without a cookie")
		}
		if got, ok := f.conns[c.Cookie]; ok && got.Remote == c.Remote && got.Local == c.Local {
			delete(f.conns, c.Cookie)
			f.destroyed = append(f.destroyed, c)
			n++
		}
	}
	return n, nil
}

// newDevicesEnv is newXrayEnv with fake sockets.
func newDevicesEnv(t *testing.T, limits string, cfg func(*config.Config)) (*env, *fakeSockets) {
	t.Helper()
	e, _, _ := newXrayEnv(t, limits)
	fs := newFakeSockets()
	e.socks = fs
	if cfg != nil {
		cfg(&e.cfg)
	}
	e.start()
	e.step(0)
	return e, fs
}

// connect opens a connection of email to the inbound tag from client and
// hands the agent its access log line, as the follower does.
func (e *env) connect(fs *fakeSockets, email, tag, client string) netip.AddrPort {
	e.t.Helper()
	port := map[string]uint16{"vless-in": 10001, "vmess-in": 10002}[tag]
	c := fs.open(client, port)
	e.a.noteXrayConns([]xrayaccess.Entry{{Time: e.clock, Source: c, Status: xrayaccess.Accepted, Network: "tcp",
		Dest: "example.com:443", InboundTag: tag, OutboundTag: "direct", Email: email}}, e.clock)
	return c
}

func (e *env) devices(name string) []string {
	e.t.Helper()
	ds, err := e.a.Devices(context.Background(), name)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []string
	for _, d := range ds {
		out = append(out, d.Address)
	}
	return out
}

// TestDeviceLimitXrayFake: an Xray user with devices=2 keeps the connections
// of their first two addresses; a third address's connection is cut at its
// access log line, by its socket's cookie, and so are its next ones while
// the two stay, with one block log line; another user's connection from
// the same address is never touched; once one of the two leaves, the third
// address is let in. The user's status never changes.
func TestDeviceLimitXrayFake(t *testing.T) {
	e, fs := newDevicesEnv(t, "alice 100 devices=2\n", nil)
	start := e.clock
	a1 := e.connect(fs, "alice", "vless-in", "192.0.2.1:40000")
	e.step(time.Second)
	a2 := e.connect(fs, "alice", "vmess-in", "192.0.2.2:40001")
	a1b := e.connect(fs, "alice", "vless-in", "192.0.2.1:40002") // a second connection: the same device
	bob := e.connect(fs, "bob", "vless-in", "192.0.2.3:50000")
	for range jsonLazyRounds { // the usage files with their devices: a count alone is written lazily
		e.step(5 * time.Second)
	}
	if got := e.devices("alice"); !slices.Equal(got, []string{"192.0.2.1", "192.0.2.2"}) {
		t.Fatalf("alice's devices %v", got)
	}
	if v := e.user("alice"); v.Devices != 2 || v.DevicesLimit != 2 || v.Status != quota.Active {
		t.Errorf("alice: %d/%d devices, %s", v.Devices, v.DevicesLimit, v.Status)
	}
	if j := e.usage("alice"); j.Devices != 2 || j.DevicesLimit == nil || *j.DevicesLimit != 2 {
		t.Errorf("alice.json: devices %d/%v", j.Devices, j.DevicesLimit)
	}
	if j := e.usage("bob"); j.Devices != 1 || j.DevicesLimit != nil {
		t.Errorf("bob.json: devices %d/%v", j.Devices, j.DevicesLimit)
	}

	// A third address: cut at its line, before any tick.
	a3 := e.connect(fs, "alice", "vless-in", "192.0.2.3:40003")
	if fs.alive(a3) {
		t.Fatal("the third device's connection was not cut at its line")
	}
	for _, c := range []netip.AddrPort{a1, a1b, a2, bob} {
		if !fs.alive(c) {
			t.Errorf("%v cut", c)
		}
	}
	e.step(time.Second)
	if lines := e.logLines(); len(lines) != 1 || !strings.HasSuffix(lines[0], "| vless | alice | Device Limit Exceeded (192.0.2.3)") {
		t.Errorf("block log %q", lines)
	}
	if ev := e.lastEvent(quota.ActDevice); ev.Name != "alice" || ev.Reason != "Device Limit Exceeded (192.0.2.3)" || ev.Status != "ACTIVE" || ev.Limit != 100*quota.MiB {
		t.Errorf("event %+v", ev)
	}
	// Again: cut, without a second line.
	a3b := e.connect(fs, "alice", "vmess-in", "192.0.2.3:40004")
	e.step(time.Second)
	if fs.alive(a3b) || !fs.alive(bob) || !fs.alive(a1) || !fs.alive(a2) {
		t.Error("the refused device's next connection was not cut, or another was")
	}
	if lines := e.logLines(); len(lines) != 1 {
		t.Errorf("block log %q", lines)
	}
	if v := e.user("alice"); v.Status != quota.Active || v.Devices != 2 {
		t.Errorf("alice: %+v", v)
	}
	for _, d := range fs.destroyed {
		if d.Remote.Addr().Unmap() != netip.MustParseAddr("192.0.2.3") || d.Remote.Port() == bob.Port() {
			t.Errorf("destroyed %v", d)
		}
	}

	// The second device leaves: the third is let in, and stays.
	fs.close(a2)
	e.step(time.Second)
	a3c := e.connect(fs, "alice", "vless-in", "192.0.2.3:40005")
	e.step(time.Second)
	e.step(time.Second)
	if !fs.alive(a3c) {
		t.Error("the third device was cut with room for it")
	}
	if got := e.devices("alice"); !slices.Equal(got, []string{"192.0.2.1", "192.0.2.3"}) {
		t.Errorf("alice's devices %v", got)
	}
	if ds, _ := e.a.Devices(context.Background(), "alice"); len(ds) != 2 || ds[0].Connections != 2 || ds[0].Bytes != 2200 ||
		!slices.Equal(ds[0].Protocols, []quota.Protocol{quota.VLESS}) || !ds[0].Since.Equal(start) {
		t.Errorf("devices %+v", ds)
	}
	if lines := e.logLines(); len(lines) != 1 {
		t.Errorf("block log %q", lines)
	}
}

// TestDeviceLimitOldest: with devices.cut = "oldest" the newest login wins,
// and the device it replaced stays out while the others are there.
func TestDeviceLimitOldest(t *testing.T) {
	e, fs := newDevicesEnv(t, "", func(c *config.Config) { c.Devices.Default, c.Devices.Cut = 2, config.CutOldest })
	a1 := e.connect(fs, "carol", "vmess-in", "192.0.2.1:1")
	e.step(time.Second)
	a2 := e.connect(fs, "carol", "vmess-in", "192.0.2.2:2")
	e.step(time.Second)
	a3 := e.connect(fs, "carol", "vmess-in", "192.0.2.3:3")
	if fs.alive(a1) || !fs.alive(a2) || !fs.alive(a3) {
		t.Fatalf("oldest device not cut: %v %v %v", fs.alive(a1), fs.alive(a2), fs.alive(a3))
	}
	a1b := e.connect(fs, "carol", "vmess-in", "192.0.2.1:4")
	e.step(time.Second)
	if fs.alive(a1b) || !fs.alive(a2) || !fs.alive(a3) {
		t.Error("the replaced device came back and replaced another")
	}
	if v := e.user("carol"); v.DevicesLimit != 2 || v.Devices != 2 {
		t.Errorf("carol %d/%d", v.Devices, v.DevicesLimit)
	}
	if lines := e.logLines(); len(lines) != 1 || !strings.HasSuffix(lines[0], "| vmess | carol | Device Limit Exceeded (192.0.2.1)") {
		t.Errorf("block log %q", lines)
	}
	// A minute after its last try, it is a new device, and wins again.
	e.step(2 * time.Minute)
	a1c := e.connect(fs, "carol", "vmess-in", "192.0.2.1:5")
	if !fs.alive(a1c) || fs.alive(a2) || !fs.alive(a3) {
		t.Error("a returning device did not win")
	}
}

// TestDeviceLimitUncuttable: a connection whose socket is not the client's
// (a proxy in front of Xray) counts for a minute after its line and cannot
// be cut: it is said so once, and nothing else is cut in its place.
func TestDeviceLimitUncuttable(t *testing.T) {
	e, fs := newDevicesEnv(t, "bob 1G devices=1\n", nil)
	b1 := e.connect(fs, "bob", "vless-in", "192.0.2.1:1")
	e.step(time.Second)
	// The line of a connection through a proxy: no socket from its address.
	e.a.noteXrayConns([]xrayaccess.Entry{{Time: e.clock, Source: netip.MustParseAddrPort("198.51.100.7:9"), Status: xrayaccess.Accepted,
		InboundTag: "vless-in", Email: "bob"}}, e.clock)
	e.step(time.Second)
	if !fs.alive(b1) {
		t.Error("the allowed device was cut")
	}
	if ds, _ := e.a.Devices(context.Background(), "bob"); len(ds) != 2 || !ds[1].Refused || ds[1].Address != "198.51.100.7" || ds[1].Bytes != 0 {
		t.Errorf("devices %+v", ds)
	}
	if !strings.Contains(e.logs.String(), "cannot be cut") {
		t.Error("not said")
	}
	if lines := e.logLines(); len(lines) != 1 || lines[0] != "" {
		t.Errorf("block log %q for a device nothing was cut of", lines)
	}
	e.step(90 * time.Second)
	if got := e.devices("bob"); !slices.Equal(got, []string{"192.0.2.1"}) {
		t.Errorf("bob's devices a minute later %v", got)
	}
}

// TestSetDevices: bwctl devices through the agent: devices=N on the user's
// line, which keeps its other options; off removes it (a line left with
// nothing is removed); remove-limit keeps it; bad values are refused.
func TestSetDevices(t *testing.T) {
	e, _ := newDevicesEnv(t, "alice 100 reset=daily # a comment\n", nil)
	ctx := context.Background()
	read := func() string {
		b, _ := os.ReadFile(e.cfg.Paths.Limits)
		return string(b)
	}
	if err := e.a.SetDevices(ctx, "alice", 2); err != nil {
		t.Fatal(err)
	}
	if err := e.a.SetDevices(ctx, "bob", quota.DevicesUnlimited); err != nil {
		t.Fatal(err)
	}
	if got := read(); got != "alice 100 reset=daily devices=2 # a comment\nbob unlimited devices=unlimited\n" {
		t.Errorf("limits file %q", got)
	}
	if v := e.user("alice"); v.DevicesLimit != 2 || v.Limit != 100*quota.MiB {
		t.Errorf("alice %+v", v)
	}
	if err := e.a.RemoveLimit(ctx, "alice"); err != nil {
		t.Fatal(err)
	}
	if err := e.a.SetDevices(ctx, "bob", quota.DevicesDefault); err != nil {
		t.Fatal(err)
	}
	if err := e.a.SetDevices(ctx, "carol", quota.DevicesDefault); err != nil {
		t.Fatal(err)
	}
	if got := read(); got != "alice unlimited devices=2 # a comment\n" {
		t.Errorf("limits file %q", got)
	}
	for _, d := range []quota.DeviceLimit{-2, quota.MaxDevices + 1} {
		if err := e.a.SetDevices(ctx, "alice", d); !errors.Is(err, quota.ErrBadDevices) {
			t.Errorf("SetDevices(%d) = %v", d, err)
		}
	}
	if err := e.a.SetDevices(ctx, "nobody", 2); !errors.Is(err, ErrUnknownUser) {
		t.Errorf("unknown user: %v", err)
	}
	// The default, and a user exempt from it.
	e.cfg.Devices.Default = 3
	if err := e.a.Reload(ctx, e.cfg); err != nil {
		t.Fatal(err)
	}
	if err := e.a.SetDevices(ctx, "bob", quota.DevicesUnlimited); err != nil {
		t.Fatal(err)
	}
	if a, b, c := e.user("alice"), e.user("bob"), e.user("carol"); a.DevicesLimit != 2 || b.DevicesLimit != 0 || c.DevicesLimit != 3 {
		t.Errorf("limits %d %d %d", a.DevicesLimit, b.DevicesLimit, c.DevicesLimit)
	}
}

// TestLimitsBadDevices: a bad devices= value is logged once with its line
// number and the rest of its line applies.
func TestLimitsBadDevices(t *testing.T) {
	e, _ := newDevicesEnv(t, "alice 100 devices=two\nbob 1G devices=-1 expires=2020-01-01\n", nil)
	e.step(time.Second)
	if v := e.user("alice"); v.Limit != 100*quota.MiB || v.DevicesLimit != 0 {
		t.Errorf("alice %+v", v)
	}
	if v := e.user("bob"); v.Status != quota.Blocked || v.Reason != quota.ReasonExpired {
		t.Errorf("bob %+v", v)
	}
	logs := e.logs.String()
	for _, want := range []string{`bw-limit.conf:1: devices= ignored, the rest of the line applies: invalid device limit \"two\"`, `bw-limit.conf:2: devices= ignored`} {
		if strings.Count(logs, want) != 1 {
			t.Errorf("%q logged %d times:\n%s", want, strings.Count(logs, want), logs)
		}
	}
}

// TestDevicesWithoutLimits: without any device limit the devices are still
// shown, and the inbounds' connections are listed every 5th tick only, or
// at the next tick once xliveFreshList connections came since the last.
func TestDevicesWithoutLimits(t *testing.T) {
	e, fs := newDevicesEnv(t, "bob 1G\n", nil)
	b := e.connect(fs, "bob", "vless-in", "192.0.2.1:1")
	e.connect(fs, "bob", "vless-in", "192.0.2.2:1")
	fs.mu.Lock()
	fs.lists = 0
	fs.mu.Unlock()
	for range 10 {
		e.step(time.Second)
	}
	fs.mu.Lock()
	lists := fs.lists
	fs.mu.Unlock()
	if lists != 2 {
		t.Errorf("listed %d times in 10 ticks, want 2", lists)
	}
	if v := e.user("bob"); v.Devices != 2 || v.DevicesLimit != 0 {
		t.Errorf("bob %d/%d", v.Devices, v.DevicesLimit)
	}
	fs.close(b)
	for range 5 {
		e.step(time.Second)
	}
	if got := e.devices("bob"); !slices.Equal(got, []string{"192.0.2.2"}) {
		t.Errorf("devices %v", got)
	}

	// Many connections logged since the last listing: the next tick lists
	// them, not the 5th (short connections are forgotten only so).
	listed := func() int {
		fs.mu.Lock()
		defer fs.mu.Unlock()
		return fs.lists
	}
	for n := listed(); listed() == n; {
		e.step(time.Second) // to a listing: the next is 5 ticks away
	}
	many := make([]xrayaccess.Entry, xliveFreshList)
	for i := range many {
		many[i] = xrayaccess.Entry{Time: e.clock, Source: netip.AddrPortFrom(netip.MustParseAddr("192.0.2.3"), uint16(1+i)),
			Status: xrayaccess.Accepted, Network: "tcp", Dest: "example.com:443", InboundTag: "vless-in", OutboundTag: "direct", Email: "bob"}
	}
	e.a.noteXrayConns(many, e.clock)
	before := listed()
	e.step(time.Second)
	if lists := listed() - before; lists != 1 {
		t.Errorf("listed %d times in the tick after %d connections came, want 1", lists, len(many))
	}
}

// TestDevicesClosedBeforeListing: a logged connection that closed before
// the first listing after its line is forgotten at that listing on a port
// the kernel holds (the logged address is the socket's peer there), and
// kept for xconnLinger elsewhere (behind a proxy it may be no socket's).
func TestDevicesClosedBeforeListing(t *testing.T) {
	e, fs := newDevicesEnv(t, "bob 1G devices=5\n", nil)
	e.a.xr.conns.hold = []uint16{10001}
	held := e.connect(fs, "bob", "vless-in", "192.0.2.1:1")
	fs.close(held)
	e.step(time.Second)
	if got := e.devices("bob"); len(got) != 0 {
		t.Errorf("devices after the listing %v, want none: the connection on a held port closed", got)
	}

	// Not held: a line whose address is no socket's (a proxy's client).
	e.a.xr.conns.hold = nil
	e.a.noteXrayConns([]xrayaccess.Entry{{Time: e.clock, Source: netip.MustParseAddrPort("192.0.2.2:1"), Status: xrayaccess.Accepted,
		Network: "tcp", Dest: "example.com:443", InboundTag: "vless-in", OutboundTag: "direct", Email: "bob"}}, e.clock)
	e.step(time.Second)
	if got := e.devices("bob"); !slices.Equal(got, []string{"192.0.2.2"}) {
		t.Errorf("devices after the listing %v, want the proxied line's", got)
	}
	e.step(2 * time.Minute)
	if got := e.devices("bob"); len(got) != 0 {
		t.Errorf("devices after xconnLinger %v, want none", got)
	}
}
