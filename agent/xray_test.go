package agent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/sockkill"
	"github.com/myvpn/bwagent/store"
	"github.com/myvpn/bwagent/xrayaccess"
	"github.com/myvpn/bwagent/xrayconf"
	"github.com/myvpn/bwagent/xraystats"
)

// fakeXray is Xray's API in miniature: inbounds with users, per-user
// counters that only count users present in an inbound, an uptime, online
// IPs, and a switch to make it unreachable.
type fakeXray struct {
	mu       sync.Mutex
	started  time.Time
	now      func() time.Time
	inbounds map[string]map[string]xraystats.Account // tag → email → account
	traffic  map[string]xraystats.Traffic
	online   map[string]map[string]int64
	bulk     bool             // has the bulk OnlineUsers call
	failIPs  map[string]error // OnlineIPs of these users fails
	failBulk error            // OnlineUsers fails
	down     bool
	calls    []string
}

const xrayConfigJSON = `{
  "api": {"tag": "api", "listen": "127.0.0.1:10085", "services": ["HandlerService", "StatsService"]},
  "stats": {},
  "policy": {"levels": {"0": {"statsUserUplink": true, "statsUserDownlink": true, "statsUserOnline": true}}},
  "inbounds": [
    {"tag": "vless-in", "port": 10001, "protocol": "vless", "settings": {"decryption": "none", "clients": [
      {"id": "2033d348-ecb9-4486-a427-7dafdd8435c2", "email": "alice", "flow": "xtls-rprx-vision"},
      {"id": "b8f38a0e-bae7-492b-aab9-9be965fbb455", "email": "bob"}]}},
    {"tag": "vmess-in", "port": 10002, "protocol": "vmess", "settings": {"clients": [
      {"id": "0d5e1ab2-7c55-4b0a-9a7e-3f4c2a1b9e88", "email": "carol"},
      {"id": "5f0c9a3e-1b2d-4c6e-8f7a-9b0c1d2e3f40", "email": "alice"}]}}
  ],
  "outbounds": [{"protocol": "freedom"}]
}`

func newFakeXray(now func() time.Time) *fakeXray {
	f := &fakeXray{now: now, traffic: map[string]xraystats.Traffic{}, online: map[string]map[string]int64{}}
	f.restart()
	return f
}

// restart is Xray starting again from its config: counters at zero, every
// configured user in its inbounds.
func (f *fakeXray) restart() {
	// Off the second, so estimates of the start from whole-second uptimes
	// fall on either side of a second boundary.
	f.started = f.now().Add(-300 * time.Millisecond)
	f.traffic = map[string]xraystats.Traffic{}
	f.inbounds = map[string]map[string]xraystats.Account{
		"vless-in": {"alice": xraystats.VLESS{ID: "2033d348-ecb9-4486-a427-7dafdd8435c2", Flow: "xtls-rprx-vision"},
			"bob": xraystats.VLESS{ID: "b8f38a0e-bae7-492b-aab9-9be965fbb455"}},
		"vmess-in": {"carol": xraystats.VMess{ID: "0d5e1ab2-7c55-4b0a-9a7e-3f4c2a1b9e88"},
			"alice": xraystats.VMess{ID: "5f0c9a3e-1b2d-4c6e-8f7a-9b0c1d2e3f40"}},
	}
}

// use moves bytes for email if some inbound still has them (Xray refuses a
// removed user's new connections).
func (f *fakeXray) use(email string, up, down int64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, users := range f.inbounds {
		if _, ok := users[email]; ok {
			t := f.traffic[email]
			t.Uplink += up
			t.Downlink += down
			f.traffic[email] = t
			return true
		}
	}
	return false
}

func (f *fakeXray) has(tag, email string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.inbounds[tag][email]
	return ok
}

func (f *fakeXray) check(call string) error {
	f.calls = append(f.calls, call)
	if f.down {
		return xraystats.ErrUnavailable
	}
	return nil
}

func (f *fakeXray) SysStats(context.Context) (xraystats.SysStats, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check("sys"); err != nil {
		return xraystats.SysStats{}, err
	}
	return xraystats.SysStats{Uptime: f.now().Sub(f.started).Truncate(time.Second)}, nil
}

func (f *fakeXray) ScanUserTraffic(_ context.Context, fn func(email []byte, downlink bool, value int64)) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check("traffic"); err != nil {
		return err
	}
	for email, t := range f.traffic {
		fn([]byte(email), false, t.Uplink)
		fn([]byte(email), true, t.Downlink)
	}
	return nil
}

func (f *fakeXray) AddUser(_ context.Context, tag, email string, acct xraystats.Account) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check("add " + tag + " " + email); err != nil {
		return err
	}
	if _, ok := f.inbounds[tag][email]; ok {
		return xraystats.ErrExists
	}
	f.inbounds[tag][email] = acct
	return nil
}

func (f *fakeXray) RemoveUser(_ context.Context, tag, email string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check("remove " + tag + " " + email); err != nil {
		return err
	}
	if _, ok := f.inbounds[tag][email]; !ok {
		return xraystats.ErrNotFound
	}
	delete(f.inbounds[tag], email)
	return nil
}

func (f *fakeXray) OnlineIPs(_ context.Context, email string) (map[string]int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check("online " + email); err != nil {
		return nil, err
	}
	if err := f.failIPs[email]; err != nil {
		return nil, err
	}
	return f.online[email], nil
}

func (f *fakeXray) OnlineUsers(context.Context) (map[string]map[string]int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.bulk {
		return nil, fmt.Errorf("GetAllOnlineUsers: %w", xraystats.ErrUnsupported)
	}
	if err := f.check("online-all"); err != nil {
		return nil, err
	}
	if f.failBulk != nil {
		return nil, f.failBulk
	}
	out := make(map[string]map[string]int64, len(f.online))
	for email, ips := range f.online {
		if len(ips) > 0 {
			out[email] = maps.Clone(ips)
		}
	}
	return out, nil
}

func (f *fakeXray) InboundUsers(_ context.Context, tag string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check("list " + tag); err != nil {
		return nil, err
	}
	var out []string
	for email := range f.inbounds[tag] {
		out = append(out, email)
	}
	slices.Sort(out)
	return out, nil
}

func (f *fakeXray) Close() error { return nil }

type cutCall struct {
	remotes []netip.Addr
	ports   []uint16
}

// newXrayEnv is newEnv with an Xray config file, a fake Xray and a
// recording connection cutter.
func newXrayEnv(t *testing.T, limits string) (*env, *fakeXray, *[]cutCall) {
	t.Helper()
	e := newEnv(t)
	e.write("xray.json", xrayConfigJSON)
	e.write("bw-limit.conf", limits)
	fx := newFakeXray(func() time.Time { return e.clock })
	var cuts []cutCall
	e.xray = Xray{
		Dial: func(_ context.Context, addr string) (XrayAPI, error) {
			if addr != "127.0.0.1:10085" {
				t.Errorf("dialled %q, want the config's api.listen", addr)
			}
			return fx, nil
		},
		Cut: func(remotes []netip.Addr, ports []uint16) (int, error) {
			cuts = append(cuts, cutCall{slices.Clone(remotes), slices.Clone(ports)})
			return len(remotes), nil
		},
	}
	e.start()
	return e, fx, &cuts
}

// TestXrayUsersAccountedAndBlocked: users from the Xray config are counted
// from Xray's counters, blocked within one tick of passing the limit
// (removed from every inbound, connections from their own addresses cut,
// marker, JSON and log), let back by a reset with the config's accounts,
// and nobody else is touched.
func TestXrayUsersAccountedAndBlocked(t *testing.T) {
	e, fx, cuts := newXrayEnv(t, "alice 1\nbob 100\n")
	e.step(0)
	if v := e.user("alice"); v.Protocol != quota.VLESS || v.Limit != quota.MiB || !v.Present {
		t.Fatalf("alice: %+v", v)
	}
	if v := e.user("carol"); v.Protocol != quota.VMess || v.Status != quota.Unlimited {
		t.Fatalf("carol: %+v", v)
	}
	fx.use("alice", 300_000, 400_000)
	fx.use("carol", 5_000_000, 0)
	e.step(2 * time.Second)
	if v := e.user("alice"); v.Upload != 300_000 || v.Download != 400_000 || v.Status != quota.Active {
		t.Errorf("alice counted: %+v", v)
	}
	fx.mu.Lock()
	fx.online["alice"] = map[string]int64{"203.0.113.7": 1, "198.51.100.9": 1}
	fx.online["bob"] = map[string]int64{"198.51.100.9": 1} // shares one address with alice
	fx.mu.Unlock()
	fx.use("bob", 10, 10)
	fx.use("alice", 400_000, 0)
	e.step(2 * time.Second)
	v := e.user("alice")
	if v.Status != quota.Blocked || v.Reason != quota.ReasonLimit {
		t.Fatalf("alice over the limit: %+v", v)
	}
	if fx.has("vless-in", "alice") || fx.has("vmess-in", "alice") {
		t.Error("alice still in an inbound")
	}
	if !fx.has("vless-in", "bob") || !fx.has("vmess-in", "carol") {
		t.Error("another user was removed")
	}
	if fx.use("alice", 1, 1) {
		t.Error("a removed user moved bytes")
	}
	if len(*cuts) != 1 || !slices.Equal((*cuts)[0].remotes, []netip.Addr{netip.MustParseAddr("203.0.113.7")}) {
		t.Errorf("cut %+v, want only alice's own address", *cuts)
	} else if p := (*cuts)[0].ports; !slices.Contains(p, 10001) || !slices.Contains(p, 10002) {
		t.Errorf("cut ports %v", p)
	}
	marker, err := os.ReadFile(filepath.Join(e.cfg.Paths.MarkerDir, "alice"))
	if err != nil || !strings.Contains(string(marker), quota.ReasonLimit) {
		t.Errorf("marker: %q, %v", marker, err)
	}
	if j := e.usage("alice"); !j.Blocked || j.Protocol != "vless" {
		t.Errorf("alice.json: %+v", j)
	}
	if lines := e.logLines(); len(lines) != 1 || !strings.HasSuffix(lines[0], "| vless | alice | Bandwidth Limit Reached") {
		t.Errorf("log: %q", lines)
	}

	if err := e.a.Reset(context.Background(), "alice"); err != nil {
		t.Fatal(err)
	}
	e.step(time.Second)
	if !fx.has("vless-in", "alice") || !fx.has("vmess-in", "alice") {
		t.Error("reset did not add alice back to both inbounds")
	}
	fx.mu.Lock()
	acct := fx.inbounds["vless-in"]["alice"]
	fx.mu.Unlock()
	if acct != (xraystats.VLESS{ID: "2033d348-ecb9-4486-a427-7dafdd8435c2", Flow: "xtls-rprx-vision"}) {
		t.Errorf("alice re-added with %+v, not the config's account", acct)
	}
	if _, err := os.Stat(filepath.Join(e.cfg.Paths.MarkerDir, "alice")); !os.IsNotExist(err) {
		t.Errorf("marker left after reset: %v", err)
	}
}

// TestXrayRestart: Xray restarting mid-transfer counts nothing twice, and a
// blocked user it reloaded from its config is removed again within a tick.
func TestXrayRestart(t *testing.T) {
	e, fx, _ := newXrayEnv(t, "alice 1\n")
	e.step(0)
	fx.use("alice", 2*int64(quota.MiB), 0)
	fx.use("carol", 1000, 2000)
	e.step(2 * time.Second)
	if !e.user("alice").Override.Active && e.user("alice").Status != quota.Blocked {
		t.Fatal("alice not blocked")
	}
	e.clock = e.clock.Add(30 * time.Second)
	fx.mu.Lock()
	fx.restart() // alice is back in its inbounds, counters at zero
	fx.mu.Unlock()
	fx.use("carol", 10, 20)
	e.step(time.Second)
	if fx.has("vless-in", "alice") {
		t.Error("alice not removed again after the restart")
	}
	if v := e.user("carol"); v.Upload != 1010 || v.Download != 2020 {
		t.Errorf("carol across the restart: %+v (want 1010/2020)", v)
	}
	// An agent restart alone is no Xray restart: nothing counted again,
	// although Xray's start now reads a second later (whole-second uptime).
	e.clock = e.clock.Add(800 * time.Millisecond)
	e.start()
	e.step(time.Second)
	if v := e.user("carol"); v.Upload != 1010 || v.Download != 2020 {
		t.Errorf("carol across an agent restart: %+v", v)
	}
}

// TestXrayUnreachable: SSH users are still counted and enforced, the error
// is logged once, and accounting resumes when Xray is back.
func TestXrayUnreachable(t *testing.T) {
	e, fx, _ := newXrayEnv(t, "john 1\n")
	e.step(0)
	fx.use("carol", 100, 100)
	e.step(time.Second)
	fx.mu.Lock()
	fx.down = true
	fx.mu.Unlock()
	fx.use("carol", 50, 50)
	e.dp.blast(1001, 2*quota.MiB, 1500, true)
	for i := 0; i < 3; i++ {
		e.step(2 * time.Second)
	}
	if v := e.user("john"); v.Status != quota.Blocked || !e.fw.has(1001) {
		t.Errorf("ssh enforcement stopped with xray down: %+v", v)
	}
	if h := e.a.Health(); !strings.Contains(h.Errors["xray api"], "unavailable") ||
		!strings.HasPrefix(h.Components["xray"], "xray api: ") || !strings.HasPrefix(h.Components["kernel"], "ok") {
		t.Errorf("health: %+v %+v", h.Errors, h.Components)
	}
	if n := strings.Count(e.logs.String(), "xray api failed"); n != 1 {
		t.Errorf("xray error logged %d times", n)
	}
	fx.mu.Lock()
	fx.down = false
	fx.mu.Unlock()
	e.step(time.Second)
	if v := e.user("carol"); v.Upload != 150 {
		t.Errorf("carol after xray came back: %+v", v)
	}
	if c := e.a.Health().Components["xray"]; c != "ok: API 127.0.0.1:10085, 3 users" {
		t.Errorf("xray component after it came back: %q", c)
	}
}

// TestXrayBadConfig: a broken Xray config is reported naming the file, the
// last good one stays in use, and the SSH side goes on.
func TestXrayBadConfig(t *testing.T) {
	e, fx, _ := newXrayEnv(t, "john 1\n")
	e.step(0)
	e.write("xray.json", `{"inbounds": [ {"tag": "vless-in",, } ]}`)
	fx.use("carol", 100, 0)
	e.dp.blast(1001, 2*quota.MiB, 1500, true)
	e.step(2 * time.Second)
	h := e.a.Health()
	if msg := h.Errors["xray config"]; !strings.Contains(msg, filepath.Join(e.dir, "xray.json")) || !strings.Contains(msg, ":1:") {
		t.Errorf("xray config error does not name the file and line: %q", msg)
	}
	if v := e.user("carol"); v.Upload != 100 || !v.Present {
		t.Errorf("carol with the last good config: %+v", v)
	}
	if v := e.user("john"); v.Status != quota.Blocked {
		t.Errorf("ssh side stopped: %+v", v)
	}
}

// TestXrayBlockedUserAddedBack: a blocked user that someone adds back to an
// inbound (a panel, a manual API call) is removed again within a few ticks.
func TestXrayBlockedUserAddedBack(t *testing.T) {
	e, fx, _ := newXrayEnv(t, "alice 1\n")
	e.step(0)
	fx.use("alice", 2*int64(quota.MiB), 0)
	e.step(2 * time.Second)
	if fx.has("vless-in", "alice") {
		t.Fatal("alice not removed")
	}
	fx.AddUser(context.Background(), "vless-in", "alice", xraystats.VLESS{ID: "2033d348-ecb9-4486-a427-7dafdd8435c2"})
	for i := 0; i < xrayVerifyTicks && fx.has("vless-in", "alice"); i++ {
		e.step(2 * time.Second)
	}
	if fx.has("vless-in", "alice") {
		t.Errorf("alice added back by someone else is still in after %d ticks", xrayVerifyTicks)
	}
}

// TestXrayCutFailsClosed: when who else is online cannot be learnt in full
// (one user's lookup fails, or the bulk call does), a blocked user's
// connections are not cut at all, so a bystander behind the same address
// keeps theirs; the blocked user is still removed from Xray. With the bulk
// call working, only the blocked user's own address is cut.
func TestXrayCutFailsClosed(t *testing.T) {
	for _, tc := range []struct {
		name    string
		bulk    bool
		failIPs map[string]error
		bulkErr error
		want    []netip.Addr
	}{
		{name: "per-user lookup of the bystander fails", failIPs: map[string]error{"bob": xraystats.ErrUnavailable}},
		{name: "bulk call fails", bulk: true, bulkErr: fmt.Errorf("GetAllOnlineUsers: %w", context.DeadlineExceeded)},
		{name: "bulk call", bulk: true, want: []netip.Addr{netip.MustParseAddr("203.0.113.7")}},
		{name: "per-user lookups", want: []netip.Addr{netip.MustParseAddr("203.0.113.7")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, fx, cuts := newXrayEnv(t, "alice 1\nbob 100\n")
			e.step(0)
			fx.mu.Lock()
			fx.bulk, fx.failIPs, fx.failBulk = tc.bulk, tc.failIPs, tc.bulkErr
			fx.online["alice"] = map[string]int64{"203.0.113.7": 1, "198.51.100.9": 1}
			fx.online["bob"] = map[string]int64{"198.51.100.9": 1} // behind the same NAT as alice
			fx.mu.Unlock()
			fx.use("bob", 10, 10)
			fx.use("alice", 2_000_000, 0)
			e.step(2 * time.Second)
			if v := e.user("alice"); v.Status != quota.Blocked {
				t.Fatalf("alice: %+v", v)
			}
			if fx.has("vless-in", "alice") {
				t.Error("alice still in her inbound: the block must not wait for the cut")
			}
			var got []netip.Addr
			for _, c := range *cuts {
				got = append(got, c.remotes...)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("cut %v, want %v", got, tc.want)
			}
			for _, a := range got {
				if a == netip.MustParseAddr("198.51.100.9") {
					t.Error("the shared address was cut")
				}
			}
		})
	}
}

// TestSSHAndXrayOneUser: a name that is both an SSH account and an Xray
// client is one user with one limit: counted from both, the kernel budget
// of the account shrinks as the Xray client uses data, and when the sum
// reaches the limit the user is blocked on both (the UID in the kernel and
// nft, the client removed from Xray); the JSON says both protocols; a reset
// lets both back.
func TestSSHAndXrayOneUser(t *testing.T) {
	e, fx, _ := newXrayEnv(t, "alice 1\n")
	e.write("passwd", passwd+"alice:x:1005:1005::/:/bin/false\n")
	e.step(0)
	v := e.user("alice")
	if v.Protocol != quota.SSH || !slices.Equal(v.Protocols, []quota.Protocol{quota.SSH, quota.VLESS}) || v.UID != 1005 {
		t.Fatalf("alice: %+v", v)
	}
	if l := e.logs.String(); strings.Contains(l, "the Xray user is not accounted") || strings.Contains(l, "the SSH account is not accounted") {
		t.Errorf("a source left unaccounted:\n%s", e.logs)
	}
	fx.use("alice", 200_000, 300_000)
	e.dp.blast(1005, 100_000, 1400, false)
	e.step(2 * time.Second)
	if v := e.user("alice"); v.Used != 600_000 || v.Status != quota.Active {
		t.Fatalf("alice counted from both: %+v", v)
	}
	// The kernel lets the account use only what the limit leaves after the
	// Xray client's bytes.
	passed := e.dp.blast(1005, quota.MiB, 1400, false)
	if left := quota.MiB - 600_000; passed > left || passed < left-1400 {
		t.Errorf("the account passed %d bytes, want the %d the limit leaves", passed, left)
	}
	e.step(2 * time.Second)
	v = e.user("alice")
	if v.Status != quota.Blocked {
		t.Fatalf("alice at the limit: %+v", v)
	}
	if !e.fw.has(1005) || e.dp.policies[1005] != (bpf.Policy{Blocked: true}) {
		t.Errorf("the account is not blocked in the kernel: nft %v policy %+v", e.fw.set, e.dp.policies[1005])
	}
	if fx.has("vless-in", "alice") || fx.has("vmess-in", "alice") {
		t.Error("the Xray client is still in an inbound")
	}
	if _, err := os.Stat(filepath.Join(e.cfg.Paths.MarkerDir, "alice")); err != nil {
		t.Errorf("marker: %v", err)
	}
	if j := e.usage("alice"); !slices.Equal(j.Protocols, []string{"ssh", "vless"}) || !j.Blocked || j.Protocol != "ssh" {
		t.Errorf("alice.json: %+v", j)
	}
	if lines := e.logLines(); len(lines) != 1 || !strings.HasSuffix(lines[0], "| ssh | alice | Bandwidth Limit Reached") {
		t.Errorf("log: %q", lines)
	}
	if err := e.a.Reset(context.Background(), "alice"); err != nil {
		t.Fatal(err)
	}
	e.step(time.Second)
	if !fx.has("vless-in", "alice") || e.fw.has(1005) || e.dp.policies[1005].Blocked {
		t.Errorf("reset did not let both back: xray %v nft %v policy %+v", fx.has("vless-in", "alice"), e.fw.set, e.dp.policies[1005])
	}
	// The account leaves: the Xray client stays accounted.
	e.write("passwd", passwd)
	e.step(2 * time.Second)
	if v := e.user("alice"); !v.Present || v.Protocol != quota.VLESS || !slices.Equal(v.Protocols, []quota.Protocol{quota.VLESS}) {
		t.Errorf("alice without her account: %+v", v)
	}
}

// fakeXrayKernel hands out kernel accounts and records claims and ports.
type fakeXrayKernel struct {
	accounts map[string]uint32
	claims   map[netip.AddrPort]uint32
	hold     []uint16
	tagged   []uint32
	refuse   netip.AddrPort // ClaimAll fails this client's claim
	calls    int            // ClaimAll calls
}

func newFakeXrayKernel() *fakeXrayKernel {
	return &fakeXrayKernel{accounts: map[string]uint32{}, claims: map[netip.AddrPort]uint32{}}
}

func (f *fakeXrayKernel) Account(name string) (uint32, error) {
	if id, ok := f.accounts[name]; ok {
		return id, nil
	}
	id := bpf.AccountBase + uint32(len(f.accounts))
	f.accounts[name] = id
	return id, nil
}

func (f *fakeXrayKernel) AccountOf(name string) (uint32, bool) {
	id, ok := f.accounts[name]
	return id, ok
}

func (f *fakeXrayKernel) AccountName(id uint32) (string, bool) {
	for name, a := range f.accounts {
		if a == id {
			return name, true
		}
	}
	return "", false
}

func (f *fakeXrayKernel) ClaimAll(cs []bpf.Claim) (int, error) {
	f.calls++
	for i, c := range cs {
		if c.Client == f.refuse {
			return i, fmt.Errorf("claim %v: %w", c.Client, errors.ErrUnsupported)
		}
		f.claims[c.Client] = c.Account
	}
	return len(cs), nil
}

func (f *fakeXrayKernel) Unclaim(cs []bpf.Claim) (int, error) {
	n := 0
	for _, c := range cs {
		if acct, ok := f.claims[c.Client]; ok && acct == c.Account {
			delete(f.claims, c.Client)
			n++
		}
	}
	return n, nil
}

func (f *fakeXrayKernel) SetXrayPorts(hold, _ []uint16) error {
	f.hold = hold
	return nil
}

func (f *fakeXrayKernel) Tag(uid uint32) error {
	f.tagged = append(f.tagged, uid)
	return nil
}

func (f *fakeXrayKernel) SocketAttribution(int) (bpf.Attribution, bool, error) {
	return bpf.Attribution{}, false, nil
}

// newXrayKernelEnv is an agent's environment with Xray (fx) whose users'
// connections a fake kernel (fk) counts, not started: a test can prepare
// the store first.
func newXrayKernelEnv(t *testing.T, limits string) (*env, *fakeXray, *fakeXrayKernel) {
	t.Helper()
	e := newEnv(t)
	e.write("xray.json", xrayConfigJSON)
	e.write("bw-limit.conf", limits)
	fx := newFakeXray(func() time.Time { return e.clock })
	e.xray = Xray{Dial: func(context.Context, string) (XrayAPI, error) { return fx, nil },
		Cut: func([]netip.Addr, []uint16) (int, error) { return 0, nil }}
	fk := newFakeXrayKernel()
	e.xk = fk
	return e, fx, fk
}

// newClaimEnv is an agent whose kernel is fake, started, with the access
// log followed as far as claimXray can tell.
func newClaimEnv(t *testing.T) (*env, *fakeXrayKernel, *xconns) {
	e, _, fk := newXrayKernelEnv(t, "")
	e.start()
	e.step(0)
	x := &e.a.xr.conns
	x.kernel, x.fol = true, &follower{} // as if the access log were followed
	t.Cleanup(func() { x.fol = nil })   // no goroutine to stop (Close)
	return e, fk, x
}

// src is the client address of a claim test's i-th connection.
func src(i int) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("192.0.2.9"), uint16(40000+i))
}

// TestClaimXrayBatch: the claims of an access log batch go to the kernel
// together, and one the kernel refuses costs that claim alone.
func TestClaimXrayBatch(t *testing.T) {
	e, fk, x := newClaimEnv(t)
	var es []xrayaccess.Entry
	for i, who := range []string{"alice", "bob", "carol", "nobody", "alice"} {
		tag := "vless-in"
		if who == "carol" {
			tag = "vmess-in"
		}
		es = append(es, xrayaccess.Entry{Time: e.clock, Source: src(i), Status: xrayaccess.Accepted, Network: "tcp", Email: who, InboundTag: tag})
	}
	fk.refuse = src(1) // bob's
	e.a.claimXray(es, e.clock)
	want := map[netip.AddrPort]uint32{src(0): fk.accounts["alice"], src(2): fk.accounts["carol"], src(4): fk.accounts["alice"]}
	if !maps.Equal(fk.claims, want) || fk.calls != 2 {
		t.Errorf("claims %v in %d calls, want %v in 2 (one batch, then the rest after the refused one)", fk.claims, fk.calls, want)
	}
	if len(x.claims) != 3 || x.claimed != 3 || x.strays != 1 {
		t.Errorf("%d claims kept, %d claimed, %d strays; want 3, 3 and 1 (nobody)", len(x.claims), x.claimed, x.strays)
	}
	if n, _ := e.a.xr.base["alice"].claimsSince(e.a.xr.reads); n != 2 {
		t.Errorf("alice's claims since the read: %d, want 2", n)
	}
	if b := e.a.xr.base["bob"]; b != nil && b.claims != 0 {
		t.Errorf("bob's refused claim counted: %+v", b)
	}
}

// TestExpireClaims: the tick takes back the claims older than claimTTL
// that no connection took, and none younger; a claim taken, or written
// again since for another account, stays as the kernel has it.
func TestExpireClaims(t *testing.T) {
	e, fk, x := newClaimEnv(t)
	claim := func(who string, ids ...int) {
		var es []xrayaccess.Entry
		for _, i := range ids {
			es = append(es, xrayaccess.Entry{Time: e.clock, Source: src(i), Status: xrayaccess.Accepted, Network: "tcp", Email: who, InboundTag: "vless-in"})
		}
		e.a.claimXray(es, e.clock)
	}
	claim("alice", 0, 1, 2)
	delete(fk.claims, src(1)) // taken by its connection
	e.clock = e.clock.Add(claimTTL / 2)
	claim("bob", 2, 3) // src(2) again, for bob now
	e.clock = e.clock.Add(claimTTL / 2)
	e.a.expireClaims(e.clock)
	want := map[netip.AddrPort]uint32{src(2): fk.accounts["bob"], src(3): fk.accounts["bob"]}
	if !maps.Equal(fk.claims, want) {
		t.Errorf("after claimTTL: claims %v, want %v (alice's untaken one gone, bob's kept)", fk.claims, want)
	}
	if len(x.claims) != 2 || len(x.claimRuns) != 1 || x.claimRuns[0].n != 2 {
		t.Errorf("%d claims kept (runs %v), want bob's 2 in one run", len(x.claims), x.claimRuns)
	}
	e.clock = e.clock.Add(claimTTL / 2)
	e.a.expireClaims(e.clock)
	if len(fk.claims) != 0 || len(x.claims) != 0 || len(x.claimRuns) != 0 {
		t.Errorf("after bob's claimTTL: claims %v, %d kept", fk.claims, len(x.claims))
	}
}

// TestXrayOwed: what the kernel counts of an Xray user's connections is
// charged at once and owed by Xray's counters: Xray reporting the same
// bytes later (Vision, at the close) adds nothing, what Xray counts beyond
// the debt (connections the kernel did not see) is added, and the debt
// survives a restart of the agent.
func TestXrayOwed(t *testing.T) {
	e, fx, fk := newXrayKernelEnv(t, "alice 100\n")
	acct, _ := fk.Account("alice")
	e.start()
	e.step(0)
	kernel := func(up, down uint64) { e.dp.count(acct, up, down) }
	want := func(what string, up, down uint64) { t.Helper(); e.wantTotals("alice", what, up, down) }

	kernel(100_000, 10_000_000)
	e.step(2 * time.Second)
	want("the kernel's count", 100_000, 10_000_000)
	if p := e.dp.policies[acct]; p.Quota == 0 || p.Blocked {
		t.Errorf("alice's account has policy %+v, want a budget", p)
	}

	fx.use("alice", 97_000, 9_700_000) // the same bytes, as payload, at the close
	e.step(2 * time.Second)
	want("Xray reporting the same bytes", 100_000, 10_000_000)

	fx.use("alice", 0, 1_000_000) // and UDP the kernel never saw
	e.step(2 * time.Second)
	want("Xray beyond what it owed", 100_000, 10_700_000)

	kernel(0, 5_000_000)
	// Only the kernel moved: the commit writes the account's baseline,
	// and neither alice's counters' row (they did not move) nor her debt's
	// (a point on the account's counters that the kernel's bytes leave
	// where it was).
	var rows []quota.Source
	for _, bl := range e.stepRows(2*time.Second, func(bl store.Baseline) bool { return bl.Source.Name == "alice" || bl.Source.UID == acct }) {
		rows = append(rows, bl.Source)
	}
	if !slices.Equal(rows, []quota.Source{quota.UIDSource(acct)}) {
		t.Errorf("alice's rows in the commit of a tick where only the kernel moved: %v, want her account's baseline alone", rows)
	}
	e.start() // a restart of the agent: the debt is in the store
	fx.use("alice", 0, 5_000_000)
	e.step(2 * time.Second)
	want("after a restart", 100_000, 15_700_000)

	// A debt the counts left standing for longer than Xray keeps an idle
	// connection (the headers the kernel counts and Xray never will) is
	// forgiven: later bytes only Xray saw are charged again, also after a
	// restart.
	kernel(0, 1_000_000)
	e.step(2 * time.Second)
	fx.use("alice", 0, 990_000)
	e.step(2 * time.Second)
	want("the headers owed", 100_000, 16_700_000)
	e.step(7 * time.Minute)
	e.start() // which takes itself as alice's last move
	e.step(7 * time.Minute)
	fx.use("alice", 0, 500_000)
	e.step(2 * time.Second)
	want("a debt forgiven after Xray's connIdle", 100_000, 17_200_000)

	// A held connection's first bytes, reported by Xray before the kernel
	// folded them into the account at the claim: credit, which the fold
	// pays off, also across a restart of the agent. Credit is bounded by
	// the connections claimed: Xray's bytes beyond it are charged.
	e.a.xr.claimed("alice", false)
	fx.use("alice", 20_000, 40_000)
	e.step(2 * time.Second)
	want("Xray's report before the fold", 120_000, 17_240_000)
	e.start()
	e.step(2 * time.Second)
	kernel(20_500, 40_800) // the fold, as wire bytes
	e.step(2 * time.Second)
	want("the fold paying off the credit", 120_500, 17_240_800)
	e.a.xr.claimed("alice", false)
	fx.use("alice", 0, 100_000)
	e.step(2 * time.Second)
	kernel(0, 100_000)
	e.step(2 * time.Second)
	// (Xray's 100,000 pay off the 800 bytes of wire the fold left owed.)
	want("credit of one connection's first bytes at most", 120_500, 17_240_800+99_200+(100_000-xrayPendingMax))
	// A loopback peer's connection (a proxy on the host) is never held:
	// all Xray reports of it before the fold is credit.
	lb := e.user("alice")
	e.a.xr.claimed("alice", true)
	fx.use("alice", 0, 300_000)
	e.step(2 * time.Second)
	kernel(0, 300_000)
	e.step(2 * time.Second)
	want("a loopback peer's first bytes", lb.Upload, lb.Download+300_000)

	// Over the limit: blocked in the kernel too.
	kernel(0, 90<<20)
	e.step(2 * time.Second)
	if v := e.user("alice"); v.Status != quota.Blocked {
		t.Errorf("alice over the limit: %+v", v)
	}
	if p := e.dp.policies[acct]; !p.Blocked {
		t.Errorf("blocked alice's account has policy %+v", p)
	}
	// What Xray then reports beyond the debt sat in the buffers of
	// connections the kernel stopped: not charged.
	before := e.user("alice")
	fx.mu.Lock()
	tr := fx.traffic["alice"]
	tr.Downlink += 100<<20 + 2_000_000
	fx.traffic["alice"] = tr
	fx.mu.Unlock()
	e.step(2 * time.Second)
	if v := e.user("alice"); v.Used != before.Used {
		t.Errorf("blocked alice: used %d after Xray reported buffered bytes, %d before", v.Used, before.Used)
	}
}

// count adds to id's counters and marks it moved, as the kernel's packets
// would.
func (f *fakeDP) count(id uint32, up, down uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.counters[id]
	c.TxBytes += up
	c.RxBytes += down
	f.counters[id] = c
	if f.moved == nil {
		f.moved = map[uint32]bool{}
	}
	f.moved[id] = true
}

// TestXrayDebtRows: an Xray user's debt is kept as a point on the counters
// of their kernel account and Xray's, written again only when it moves:
// neither the kernel's bytes nor Xray's report of them move it, Xray's
// bytes beyond the debt do. A debt an earlier agent wrote as the debt
// itself is read as it was; a restart of the kernel's counters or of Xray
// moves the point, which the commit of that tick writes, and the debt
// survives a restart of the agent after it; and a restarted agent, which
// takes itself as the last move, never forgives a debt before Xray's idle
// time has passed since the last move.
func TestXrayDebtRows(t *testing.T) {
	e, fx, fk := newXrayKernelEnv(t, "alice 100\n")
	acct, _ := fk.Account("alice")
	// An earlier agent's state: alice owes 1,000,000 bytes down.
	st, err := store.Open(e.cfg.Paths.StateDB)
	if err != nil {
		t.Fatal(err)
	}
	old := store.Baseline{Source: quota.OwedSource("alice"), Epoch: quota.Epoch{Origin: owedOrigin, Start: e.clock.Unix()}, Rx: 1_000_000}
	if err := st.Commit(&store.Batch{Baselines: []store.Baseline{old}}); err != nil {
		t.Fatal(err)
	}
	st.Close()
	want := func(what string, up, down uint64) { t.Helper(); e.wantTotals("alice", what, up, down) }
	tick := func(d time.Duration) []store.Baseline {
		t.Helper()
		return e.stepRows(d, func(bl store.Baseline) bool { return bl.Source == quota.OwedSource("alice") })
	}
	e.start()
	tick(0)
	fx.use("alice", 0, 1_000_000)
	tick(2 * time.Second)
	want("Xray paying the earlier agent's debt", 0, 0)

	e.dp.count(acct, 0, 2_000_000)
	tick(2 * time.Second)
	want("the kernel's count", 0, 2_000_000)
	e.dp.count(acct, 0, 100_000)
	if rows := tick(2 * time.Second); len(rows) != 0 {
		t.Errorf("the kernel alone moved: debt rows %+v, want none", rows)
	}
	fx.use("alice", 0, 1_000_000) // the same bytes, reported by Xray
	if rows := tick(2 * time.Second); len(rows) != 0 {
		t.Errorf("Xray paid off part of the debt: debt rows %+v, want none", rows)
	}
	fx.use("alice", 0, 1_200_000) // 100,000 more than the debt left
	if rows := tick(2 * time.Second); len(rows) != 1 {
		t.Errorf("Xray reported more than the debt: debt rows %+v, want one", rows)
	}
	want("the debt paid off, and bytes only Xray counted", 0, 2_200_000)

	// The kernel's counters restart (a new map): alice's next 300,000
	// bytes are counted from zero, and the point moves with them.
	e.dp.mu.Lock()
	e.dp.epoch.CounterMap++
	e.dp.counters[acct] = bpf.Counters{RxBytes: 300_000}
	e.dp.moved[acct] = true
	e.dp.mu.Unlock()
	if rows := tick(2 * time.Second); len(rows) != 1 || rows[0].Epoch.Origin != paidOrigin {
		t.Errorf("the kernel's counters restarted: debt rows %+v, want one, of the new point", rows)
	}
	e.start()
	fx.use("alice", 0, 300_000) // the same bytes, reported by Xray
	tick(2 * time.Second)
	want("Xray paying after the counters' and the agent's restarts", 0, 2_500_000)

	// Xray restarts with 500,000 of the kernel's bytes unreported: its
	// counters start from zero, which moves the point, and what it reports
	// after the restart (and the agent's) still pays the debt off.
	e.dp.count(acct, 0, 500_000)
	tick(2 * time.Second)
	fx.mu.Lock()
	fx.restart()
	fx.mu.Unlock()
	fx.use("alice", 0, 200_000)
	if rows := tick(2 * time.Second); len(rows) != 1 {
		t.Errorf("Xray restarted: debt rows %+v, want one", rows)
	}
	e.start()
	fx.use("alice", 0, 300_000)
	tick(2 * time.Second)
	want("Xray paying after its restart and the agent's", 0, 3_000_000)

	// Moves every 2 s for a minute write one row, at the first (a debt
	// where there was none): the row's time is when it was written, not
	// the last move.
	var written int
	for range 30 {
		e.dp.count(acct, 0, 1_000)
		written += len(tick(2 * time.Second))
	}
	if written != 1 {
		t.Errorf("30 moves in a minute wrote %d debt rows, want 1", written)
	}
	// A restart 355 s after the last move, inside Xray's idle time (300 s
	// and a minute), and 413 s after the row was written: the restart
	// takes itself as the last move, and Xray's report still pays the
	// debt, then and until its idle time after the restart.
	e.clock = e.clock.Add(355 * time.Second)
	e.start()
	fx.use("alice", 0, 10_000)
	tick(2 * time.Second)
	e.clock = e.clock.Add(350 * time.Second)
	fx.use("alice", 0, 10_000) // 10,000 left owed: the headers, say
	tick(2 * time.Second)
	want("Xray paying after a restart within its idle time", 0, 3_000_000+30_000)
	// Xray's idle time after the last move, what is left is forgiven:
	// what only Xray saw is charged.
	e.clock = e.clock.Add(361 * time.Second)
	fx.use("alice", 0, 7_000)
	tick(2 * time.Second)
	want("a debt forgiven Xray's idle time after the last move", 0, 3_000_000+30_000+7_000)
}

// TestXrayDebtAfterReboot: the kernel's counters and account IDs start
// anew (a reboot): alice, who owes and does not move, has her debt written
// again without her old account, whose ID carol is given, so carol's bytes
// on it do not change what alice owes, across a restart of the agent too.
// A debt paid off leaves a row of zero, and Xray's bytes of a user who owes
// nothing write no row.
func TestXrayDebtAfterReboot(t *testing.T) {
	e, fx, fk := newXrayKernelEnv(t, "alice 100\ncarol 100\n")
	acct, _ := fk.Account("alice")
	e.start()
	e.step(0)
	e.dp.count(acct, 0, 1_000_000)
	e.step(2 * time.Second)
	fx.use("alice", 0, 400_000) // alice owes 600,000 now
	e.step(2 * time.Second)

	// The reboot: new counters, a new registry; the agent starts again.
	e.dp.mu.Lock()
	e.dp.epoch.Boot = "another-boot"
	e.dp.counters = map[uint32]bpf.Counters{}
	e.dp.mu.Unlock()
	clear(fk.accounts)
	fx.mu.Lock()
	fx.restart() // Xray too, its counters at zero
	fx.mu.Unlock()
	e.start()
	e.step(2 * time.Second)
	if got, _ := fk.Account("carol"); got != acct {
		t.Fatalf("carol has account %d, want alice's old %d", got, acct)
	}
	e.dp.count(acct, 0, 5_000_000) // carol's
	e.step(2 * time.Second)
	e.start()
	fx.use("alice", 0, 600_000) // alice's bytes, reported late
	e.step(2 * time.Second)
	if v := e.user("alice"); v.Download != 1_000_000 {
		t.Errorf("alice downloaded %d after the reboot and carol's bytes on her old account, want 1,000,000", v.Download)
	}
	rows := func() (n int) {
		t.Helper()
		bs, err := e.a.store.Baselines()
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range bs {
			if b.Source == quota.OwedSource("alice") && (b.Rx != 0 || b.Tx != 0 || b.Epoch.Origin != owedOrigin) {
				n++
			}
		}
		return n
	}
	if n := rows(); n != 0 {
		t.Errorf("alice paid off her debt: %d rows of a debt left", n)
	}
	fx.use("alice", 0, 70_000) // bytes only Xray saw: no debt, no row
	e.step(2 * time.Second)
	if v, n := e.user("alice"), rows(); v.Download != 1_070_000 || n != 0 || e.a.xr.base["alice"].saved != (savedDebt{}) {
		t.Errorf("Xray's bytes of alice, who owes nothing: downloaded %d, %d rows of a debt, saved %+v", v.Download, n, e.a.xr.base["alice"].saved)
	}
}

// TestXrayReadsWhenNeeded: where the kernel counts every connection Xray's
// users can make, every user's counters are read every xrayReadTicks
// ticks, and at once after a connection went unclaimed, while a read finds
// bytes the kernel did not count, and after a new config; with an inbound
// whose traffic the kernel cannot count, every tick. Nothing is lost: what
// Xray alone counted is charged at the next read.
func TestXrayReadsWhenNeeded(t *testing.T) {
	e := newEnv(t)
	held := strings.Replace(xrayConfigJSON, `"api":`, `"log": {"access": "/var/log/xray/access.log"}, "api":`, 1)
	e.write("xray.json", held)
	e.write("bw-limit.conf", "bob 100\n")
	fx := newFakeXray(func() time.Time { return e.clock })
	e.xray = Xray{Dial: func(context.Context, string) (XrayAPI, error) { return fx, nil },
		Cut:       func([]netip.Addr, []uint16) (int, error) { return 0, nil },
		Listeners: func([]uint16) ([]sockkill.Conn, error) { return nil, nil }}
	fk := newFakeXrayKernel()
	e.xk = fk
	e.start()
	// The access log followed, Xray's sockets found: as Run makes them.
	done := make(chan struct{})
	close(done)
	e.a.xr.conns.fol = &follower{path: "/var/log/xray/access.log", cancel: func() {}, done: done}
	e.a.xr.conns.tagged = map[uint32]bool{0: true}

	reads := func() int { return strings.Count(strings.Join(fx.calls, " "), "traffic") }
	ticks := func(n int) (read []int) {
		t.Helper()
		for i := range n {
			before := reads()
			e.step(2 * time.Second)
			if reads() > before {
				read = append(read, i)
			}
		}
		return read
	}
	if got := ticks(11); !slices.Equal(got, []int{0, 5, 10}) {
		t.Fatalf("counters read at ticks %v, want every 5th: [0 5 10]", got)
	}

	// The same bytes from the kernel and from Xray: no need to read more.
	acct, _ := fk.Account("bob")
	e.dp.mu.Lock()
	e.dp.counters[acct] = bpf.Counters{TxBytes: 10_000, RxBytes: 2_000_000}
	e.dp.moved = map[uint32]bool{acct: true}
	e.dp.mu.Unlock()
	fx.use("bob", 9_000, 1_990_000)
	if got := ticks(5); !slices.Equal(got, []int{4}) {
		t.Errorf("after bytes both counted: read at ticks %v, want [4]", got)
	}
	if v := e.user("bob"); v.Upload != 10_000 || v.Download != 2_000_000 {
		t.Errorf("bob: %d up, %d down; want the kernel's 10000, 2000000", v.Upload, v.Download)
	}

	// Bytes only Xray saw (UDP, a connection the kernel never claimed):
	// charged at the next read, and read every tick while they flow.
	fx.use("bob", 0, 1<<20)
	got := ticks(5)
	if !slices.Equal(got, []int{4}) {
		t.Errorf("Xray's bytes read at ticks %v, want [4]", got)
	}
	// (What Xray reports pays off the 10,000 bytes of wire the kernel
	// counted beyond its count first.)
	if v, want := e.user("bob"), uint64(2_000_000+1<<20-10_000); v.Download != want {
		t.Errorf("bob's download %d, want %d", v.Download, want)
	}
	fx.use("bob", 0, 1<<20)
	if got := ticks(3); !slices.Equal(got, []int{0, 1}) {
		t.Errorf("while Xray's bytes flow: read at ticks %v, want [0 1] (the second finds none)", got)
	}

	// A connection the kernel let go unclaimed: read at once.
	ticks(5)
	e.dp.mu.Lock()
	e.dp.stats.XrayUnclaimed++
	e.dp.mu.Unlock()
	if got := ticks(2); !slices.Equal(got, []int{0}) {
		t.Errorf("after an unclaimed connection: read at ticks %v, want [0]", got)
	}

	// An inbound behind a proxy (WebSocket): every tick.
	e.write("xray.json", strings.Replace(held, `"port": 10002, "protocol": "vmess",`, `"port": 10002, "protocol": "vmess", "streamSettings": {"network": "ws"},`, 1))
	if got := ticks(3); !slices.Equal(got, []int{0, 1, 2}) {
		t.Errorf("with a WebSocket inbound: read at ticks %v, want every tick", got)
	}
}

// TestXrayThrottledWithoutKernel: a throttle rate the kernel cannot
// enforce (it does not count Xray's connections here) is no way around
// the limit: the throttled client is removed from Xray, as a blocked one
// is, shows no rate (nothing carries it), which a warning says once, and
// is added back by the reset that lifts it.
func TestXrayThrottledWithoutKernel(t *testing.T) {
	e, fx, _ := newXrayEnv(t, "alice 1 throttle=1mbit\n")
	e.step(0)
	fx.use("alice", 2*int64(quota.MiB), 0)
	e.step(2 * time.Second)
	if v := e.user("alice"); v.Status != quota.Throttled || !v.Speed.IsZero() {
		t.Fatalf("alice over the limit: %+v", v)
	}
	if u := e.usage("alice"); u.Status != "THROTTLED" || u.SpeedDown != nil || u.SpeedUp != nil {
		t.Errorf("alice's usage file: %+v", u)
	}
	if fx.has("vless-in", "alice") {
		t.Error("throttled alice left in Xray, which nothing slows")
	}
	e.step(2 * time.Second)
	if n := strings.Count(e.logs.String(), `msg="throttle rate not enforced: the user is removed from Xray as a blocked one is" user=alice caps=1mbit`); n != 1 {
		t.Errorf("alice's throttle rate not enforced: warned %d times, want once:\n%s", n, e.logs)
	}
	if err := e.a.Reset(context.Background(), "alice"); err != nil {
		t.Fatal(err)
	}
	e.step(2 * time.Second)
	if !fx.has("vless-in", "alice") || e.user("alice").Status != quota.Active {
		t.Errorf("after a reset: in Xray %v, %s", fx.has("vless-in", "alice"), e.user("alice").Status)
	}
}

// TestXclients: each client of the config is found by its email with its
// entries in config order, a client of several inbounds with each of them,
// and all yields each client once.
func TestXclients(t *testing.T) {
	conf, err := xrayconf.Parse("config.json", []byte(`{"inbounds": [
		{"tag": "a", "port": 1, "protocol": "trojan", "settings": {"clients": [{"email": "one", "password": "p1"}, {"email": "two", "password": "p2"}, {"email": "three", "password": "p3"}]}},
		{"tag": "b", "port": 2, "protocol": "trojan", "settings": {"clients": [{"email": "three", "password": "q3"}, {"email": "four", "password": "q4"}]}},
		{"tag": "c", "port": 3, "protocol": "trojan", "settings": {"clients": [{"email": "three", "password": "r3"}, {"email": "two", "password": "r2"}]}}]}`))
	if err != nil {
		t.Fatal(err)
	}
	c := newXclients(conf)
	want := map[string][]string{"one": {"a"}, "two": {"a", "c"}, "three": {"a", "b", "c"}, "four": {"b"}}
	got := map[string][]string{}
	for email, us := range c.all() {
		if _, dup := got[email]; dup {
			t.Errorf("all yields %s twice", email)
		}
		var tags []string
		for _, u := range us {
			if u.Email != email {
				t.Errorf("%s's entries hold %s", email, u.Email)
			}
			tags = append(tags, u.Inbound)
		}
		got[email] = tags
		if of := c.of(email); !slices.Equal(of, us) {
			t.Errorf("of(%s) = %v, all gave %v", email, of, us)
		}
	}
	if !maps.EqualFunc(got, want, slices.Equal) {
		t.Errorf("clients %v, want %v", got, want)
	}
	if c.len() != len(want) || c.of("five") != nil {
		t.Errorf("len %d, of(five) %v", c.len(), c.of("five"))
	}
	if u := c.of("three")[1]; u.Account() != (xraystats.Trojan{Password: "q3"}) {
		t.Errorf("three in b: %+v", u.Account())
	}
	var zero xclients
	if zero.of("one") != nil || zero.len() != 0 {
		t.Error("the zero xclients has clients")
	}
}
