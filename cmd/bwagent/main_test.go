package main

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/store"
)

func TestMain(m *testing.M) {
	// The agent itself, run as a helper process so it can be killed.
	nettest.Register("bwagent", func(args []string) error {
		noTime := func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}
		return run(args, slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{ReplaceAttr: noTime})))
	})
	// A control client, run as any UID: prints one line per call, "OK
	// detail" or "ERR code".
	nettest.Register("ctl", func(args []string) error {
		ctx := context.Background()
		c, err := control.Dial(ctx, args[0])
		if err != nil {
			return err
		}
		defer c.Close()
		say := func(err error, ok string) {
			if err != nil {
				fmt.Println("ERR", control.Code(err))
				return
			}
			fmt.Println("OK", ok)
		}
		u, err := c.User(ctx, "")
		say(err, u.Name)
		u, err = c.User(ctx, "mary")
		say(err, u.Name)
		_, err = c.History(ctx, "john", "", "")
		say(err, "history")
		say(c.SetLimit(ctx, "john", 1<<40), "set")
		say(c.Reset(ctx, "john"), "reset")
		_, err = c.ListUsers(ctx, "")
		say(err, "list")
		return nil
	})
	nettest.Main(m)
}

// agentEnv is one test's bwagent installation: config, files, cgroup, pins,
// and a pair of network namespaces; the agent runs in namespace A, so its
// nftables table lives and dies with it.
type agentEnv struct {
	dir, conf, pin, cg string
	pair               *nettest.Pair
}

func newAgentEnv(t *testing.T, passwd, limits string) *agentEnv {
	t.Helper()
	nettest.RequireRoot(t)
	root, err := bpf.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	e := &agentEnv{dir: t.TempDir(), cg: nettest.NewCgroup(t, root), pair: nettest.NewPair(t),
		pin: filepath.Join("/sys/fs/bpf", nettest.Name("bwtest-"))}
	t.Cleanup(func() {
		if err := bpf.Uninstall(e.pin); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	e.conf = filepath.Join(e.dir, "bwagent.toml")
	conf := fmt.Sprintf(`interval = "1s"
json_interval = "1s"
timezone = "UTC"

[paths]
limits = %[1]q
usage_dir = %[2]q
marker_dir = %[3]q
block_log = %[4]q
state_db = %[5]q
socket = %[6]q
passwd = %[7]q

[ssh]
uid_min = 2700
uid_max = 4400 # sshtest's accounts too

[kernel]
pin_path = %[8]q
cgroup = %[9]q

[nft]
table = %[10]q

[xray]
enabled = false
`, filepath.Join(e.dir, "bw-limit.conf"), filepath.Join(e.dir, "usage"), filepath.Join(e.dir, "blocked_users"),
		filepath.Join(e.dir, "blocked.log"), filepath.Join(e.dir, "state.db"), filepath.Join(e.dir, "bwagent.sock"),
		filepath.Join(e.dir, "passwd"), e.pin, e.cg, nettest.Name("bwtest"))
	for name, data := range map[string]string{"bwagent.toml": conf, "passwd": passwd, "bw-limit.conf": limits} {
		if err := os.WriteFile(filepath.Join(e.dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

// start runs bwagent and waits until it ticks.
func (e *agentEnv) start(t *testing.T) *nettest.Proc {
	t.Helper()
	p := nettest.Start(t, nettest.Spec{NS: e.pair.A}, "bwagent", "--config", e.conf)
	p.Expect(t, "level=INFO msg=\"bwagent running\"", 20*time.Second)
	return p
}

// connect starts a TCP sink as server in the agent's cgroup and a client
// of it as user (sending and receiving as tcp-client's arguments up and
// down say), connected when it returns.
func (e *agentEnv) connect(t *testing.T, user, server uint32, up, down string) *nettest.Proc {
	t.Helper()
	srv := nettest.Start(t, nettest.Spec{NS: e.pair.B, Cgroup: e.cg, UID: server}, "tcp-serve",
		net.JoinHostPort(e.pair.B4.String(), "0"))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	c := nettest.Start(t, nettest.Spec{NS: e.pair.A, Cgroup: e.cg, UID: user}, "tcp-client", addr, up, down)
	c.Expect(t, "CONNECTED", 5*time.Second)
	return c
}

// dial connects to the agent's control socket, which comes up beside the
// first tick; the client is closed in t.Cleanup.
func (e *agentEnv) dial(t *testing.T) *control.Client {
	t.Helper()
	c := dialSocket(t, e.dir)
	t.Cleanup(func() { c.Close() })
	return c
}

// dialSocket connects to the control socket of the agent whose files are
// in dir, waiting up to 5 s for it to come up beside the first tick.
func dialSocket(t *testing.T, dir string) *control.Client {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		c, err := control.Dial(context.Background(), filepath.Join(dir, "bwagent.sock"))
		if err == nil {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("control socket in %s: %v", dir, err)
		}
	}
}

// counters reads a UID's kernel counters straight from the pinned maps.
func (e *agentEnv) counters(t *testing.T, uid uint32) bpf.Counters {
	t.Helper()
	c, err := bpf.PinnedCounters(e.pin, uid)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (e *agentEnv) saved(t *testing.T, name string) store.User {
	t.Helper()
	st, err := store.Open(filepath.Join(e.dir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	users, err := st.Users()
	if err != nil {
		t.Fatal(err)
	}
	for _, u := range users {
		if u.Name == name {
			return u
		}
	}
	t.Fatalf("user %s not in the state database", name)
	return store.User{}
}

// TestKillNineLosesNothing: the agent is killed with SIGKILL at random
// moments while a user moves data, and restarted each time; after the last
// clean stop the saved total equals the kernel's count of the user's
// traffic to the byte: nothing lost, nothing counted twice.
func TestKillNineLosesNothing(t *testing.T) {
	const user, server = 2701, 2702
	e := newAgentEnv(t, fmt.Sprintf("john:x:%d:%d::/:/bin/false\n", user, user), "")
	srv := nettest.Start(t, nettest.Spec{NS: e.pair.B, Cgroup: e.cg, UID: server}, "tcp-serve",
		net.JoinHostPort(e.pair.B4.String(), "0"))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	client := nettest.Start(t, nettest.Spec{NS: e.pair.A, Cgroup: e.cg, UID: user}, "tcp-client", addr, "inf", "inf")
	client.Expect(t, "CONNECTED", 5*time.Second)

	a := e.start(t)
	for i := 0; i < 3; i++ {
		time.Sleep(time.Duration(1500+rand.IntN(1500)) * time.Millisecond)
		if err := a.Cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		a.Wait(5 * time.Second)
		a = e.start(t)
	}
	time.Sleep(1500 * time.Millisecond)
	client.Cmd.Process.Kill()
	client.Wait(5 * time.Second)
	time.Sleep(1500 * time.Millisecond) // the last bytes and FIN settle
	if err := a.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := a.Wait(10 * time.Second); err != nil {
		t.Fatalf("agent exit after SIGTERM: %v", err)
	}

	want := e.counters(t, user)
	got := e.saved(t, "john")
	if got.Up != want.TxBytes || got.Down != want.RxBytes {
		t.Errorf("saved up/down %d/%d, kernel counted %d/%d", got.Up, got.Down, want.TxBytes, want.RxBytes)
	}
	if want.TxBytes+want.RxBytes < 10<<20 {
		t.Errorf("too little traffic to show anything: %+v", want)
	}
	t.Logf("%d bytes up, %d down across 3 SIGKILLs", got.Up, got.Down)
}

// TestBadConfigRefused: an invalid config stops the agent before it
// touches anything, naming the file, line and key.
func TestBadConfigRefused(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "bwagent.toml")
	os.WriteFile(conf, []byte("# comment\ninterval = \"10s\"\n"), 0o644)
	err := run([]string{"--config", conf}, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), conf+":2: interval") {
		t.Errorf("bad config: %v", err)
	}
	err = run([]string{"--config", filepath.Join(dir, "missing.toml")}, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "missing.toml") {
		t.Errorf("missing config: %v", err)
	}
}

// TestSIGHUPReloads: SIGHUP applies a changed configuration (here the
// limits file's path) and refuses a broken one, keeping the agent running.
func TestSIGHUPReloads(t *testing.T) {
	e := newAgentEnv(t, "john:x:2711:2711::/:/bin/false\n", "")
	a := e.start(t)
	usage := filepath.Join(e.dir, "usage", "john.json")
	waitFor := func(what string, ok func(string) bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			data, _ := os.ReadFile(usage)
			if ok(string(data)) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: john.json is %s", what, data)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitFor("first tick", func(s string) bool { return strings.Contains(s, `"status": "UNLIMITED"`) })

	other := filepath.Join(e.dir, "other-limits.conf")
	os.WriteFile(other, []byte("john 1\n"), 0o644)
	conf, _ := os.ReadFile(e.conf)
	newConf := strings.Replace(string(conf), filepath.Join(e.dir, "bw-limit.conf"), other, 1)
	os.WriteFile(e.conf, []byte(newConf), 0o644)
	a.Cmd.Process.Signal(syscall.SIGHUP)
	a.Expect(t, `level=INFO msg="configuration reloaded"`, 10*time.Second)
	waitFor("after SIGHUP", func(s string) bool { return strings.Contains(s, `"total_limit": 1048576`) })

	os.WriteFile(e.conf, []byte(newConf+"\nbogus = 1\n"), 0o644)
	a.Cmd.Process.Signal(syscall.SIGHUP)
	line := a.Expect(t, `level=ERROR msg="reload refused; keeping the running configuration"`, 10*time.Second)
	if !strings.Contains(line, ":28: unknown key xray.bogus") {
		t.Errorf("refusal does not name the key: %s", line)
	}
	a.Cmd.Process.Signal(syscall.SIGTERM)
	if err := a.Wait(10 * time.Second); err != nil {
		t.Errorf("exit: %v", err)
	}
}

// TestControlSocket: the running agent serves the control API on its
// socket; a change made through it rewrites the limits file and takes
// effect like a limit crossing.
func TestControlSocket(t *testing.T) {
	e := newAgentEnv(t, "john:x:2721:2721::/:/bin/false\n", "")
	a := e.start(t)
	ctx := context.Background()
	c := e.dial(t)
	users, err := c.ListUsers(ctx, "")
	if err != nil || len(users) != 1 || users[0].Name != "john" {
		t.Fatalf("users %+v, %v", users, err)
	}
	if err := c.SetLimit(ctx, "john", 1<<20); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(filepath.Join(e.dir, "bw-limit.conf")); string(data) != "john 1\n" {
		t.Errorf("limits file %q", data)
	}
	u, err := c.User(ctx, "john")
	if err != nil || u.Limit != 1<<20 || u.Status != "ACTIVE" {
		t.Errorf("john %+v, %v", u, err)
	}
	if err := c.Reset(ctx, "nosuch"); err == nil || !strings.Contains(err.Error(), "unknown user") {
		t.Errorf("reset of an unknown user: %v", err)
	}
	a.Cmd.Process.Signal(syscall.SIGTERM)
	if err := a.Wait(10 * time.Second); err != nil {
		t.Errorf("exit: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.dir, "bwagent.sock")); !os.IsNotExist(err) {
		t.Errorf("socket left after exit: %v", err)
	}
}

// TestCommandsDuringTicks: commands sent through the control socket while
// the agent ticks (every second) under a user's live traffic are neither
// lost nor overwritten: each limit set is the one in force when the call
// returns, each reset leaves less usage than a tick's worth of traffic, and
// the block log has every reset.
func TestCommandsDuringTicks(t *testing.T) {
	const user, server = 2731, 2732
	e := newAgentEnv(t, fmt.Sprintf("john:x:%d:%d::/:/bin/false\n", user, user), "")
	a := e.start(t)
	client := e.connect(t, user, server, "inf", "inf")

	ctx := context.Background()
	c := e.dial(t)

	// The stream's rate, to bound what a tick can add.
	s1, r1 := client.Progress(t, 10*time.Millisecond)
	s2, r2 := client.Progress(t, time.Second)
	perSecond := (s2 - s1) + (r2 - r1)
	if perSecond < 1<<20 {
		t.Fatalf("stream too slow to show anything: %d B/s", perSecond)
	}

	resets := 0
	for i := 1; i <= 12; i++ {
		limit := uint64(1000+i) << 30 // far above the traffic: never blocks
		if err := c.SetLimit(ctx, "john", limit); err != nil {
			t.Fatal(err)
		}
		u, err := c.User(ctx, "john")
		if err != nil || u.Limit != limit {
			t.Fatalf("limit after SetLimit %d: %+v, %v", limit, u, err)
		}
		if i%3 == 0 {
			if err := c.Reset(ctx, "john"); err != nil {
				t.Fatal(err)
			}
			resets++
			u, err := c.User(ctx, "john")
			// At most what moved since the reset (the call and one tick):
			// a tick never puts older usage back.
			if err != nil || u.Used > 3*perSecond {
				t.Errorf("usage right after reset %d: %d bytes (stream %d B/s), %v", resets, u.Used, perSecond, err)
			}
		}
		time.Sleep(time.Duration(100+i*90) * time.Millisecond) // across tick boundaries
	}
	client.Cmd.Process.Kill()
	a.Cmd.Process.Signal(syscall.SIGTERM)
	if err := a.Wait(10 * time.Second); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
	if data, _ := os.ReadFile(filepath.Join(e.dir, "bw-limit.conf")); string(data) != fmt.Sprintf("john %d\n", (1000+12)<<10) {
		t.Errorf("limits file %q", data)
	}
	logData, _ := os.ReadFile(filepath.Join(e.dir, "blocked.log"))
	if n := strings.Count(string(logData), "| ssh | john | Usage reset"); n != resets {
		t.Errorf("block log has %d resets, want %d:\n%s", n, resets, logData)
	}
}

// TestControlPermissions: through the running agent, an unprivileged SSH
// user reads their own usage and history and nothing else, and cannot
// change anything; the account is the one in the agent's passwd file.
func TestControlPermissions(t *testing.T) {
	const john = 2741
	e := newAgentEnv(t, fmt.Sprintf("john:x:%d:%d::/:/bin/false\nmary:x:2742:2742::/:/bin/false\n", john, john), "")
	a := e.start(t)
	sock := filepath.Join(e.dir, "bwagent.sock")
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil || time.Now().After(deadline) {
			break
		}
	}
	time.Sleep(200 * time.Millisecond)
	// t.TempDir and its parent are 0700: let the user reach the socket.
	os.Chmod(filepath.Dir(e.dir), 0o755)
	os.Chmod(e.dir, 0o755)
	p := nettest.Start(t, nettest.Spec{UID: john}, "ctl", sock)
	want := []string{"OK john", "ERR PermissionDenied", "OK history", "ERR PermissionDenied", "ERR PermissionDenied", "ERR PermissionDenied"}
	for i, w := range want {
		if got := p.Expect(t, "", 10*time.Second); got != w {
			t.Errorf("call %d: %q, want %q", i, got, w)
		}
	}
	if err := p.Wait(5 * time.Second); err != nil {
		t.Errorf("client: %v", err)
	}
	if data, _ := os.ReadFile(filepath.Join(e.dir, "bw-limit.conf")); len(data) != 0 {
		t.Errorf("a refused SetLimit changed the limits file: %q", data)
	}
	a.Cmd.Process.Signal(syscall.SIGTERM)
	a.Wait(10 * time.Second)
}

// TestSpeedCapSurvivesKill (issue 15, point 4): a user's speed cap holds a
// download of their UID while the agent runs, after it is killed with
// SIGKILL (nobody runs: the kernel's pinned buckets do it), and after it
// starts again.
func TestSpeedCapSurvivesKill(t *testing.T) {
	const user, server = 2711, 2712
	e := newAgentEnv(t, fmt.Sprintf("john:x:%d:%d::/:/bin/false\n", user, user), "john unlimited speed=20mbit\n")
	a := e.start(t)
	client := e.connect(t, user, server, "0", "inf")
	// rate returns the download's Mbit/s over n seconds, and each second's.
	rate := func(n int) (float64, []float64) {
		_, last := client.Progress(t, 100*time.Millisecond)
		start, first := time.Now(), last
		var per []float64
		for i := range n {
			_, r := client.Progress(t, time.Until(start.Add(time.Duration(i+1)*time.Second)))
			per = append(per, float64(r-last)*8/1e6)
			last = r
		}
		return float64(last-first) * 8 / 1e6 / time.Since(start).Seconds(), per
	}
	check := func(when string) {
		t.Helper()
		rate(1) // TCP settles after a change
		avg, per := rate(4)
		if avg < 18 || avg > 22 {
			t.Errorf("%s: %.2f Mbit/s for a cap of 20 (per second %.1f)", when, avg, per)
			return
		}
		t.Logf("%s: %.2f Mbit/s for a cap of 20 (per second %.1f)", when, avg, per)
	}
	check("agent running")
	if err := a.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	a.Wait(5 * time.Second)
	check("agent killed")
	a = e.start(t)
	check("agent restarted")
	if err := a.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := a.Wait(10 * time.Second); err != nil {
		t.Fatalf("agent exit after SIGTERM: %v", err)
	}
}
