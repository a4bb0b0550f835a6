package main

import (
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/myvpn/bwagent/agent"
	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/control/agentbackend"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/nft"
	"github.com/myvpn/bwagent/store"
)

// realAgent runs a real agent (real BPF data plane on its own cgroup and
// pins, nft table in its own namespace, SQLite store, files in a temp dir)
// with its control socket, and returns the socket and the limits file.
func realAgent(t *testing.T) (sock, limits string) {
	t.Helper()
	sock, limits, _ = realAgentWith(t, nil)
	return sock, limits
}

// realAgentWith is realAgent with a change to its configuration; it also
// returns the cgroup its programs count.
func realAgentWith(t *testing.T, change func(*config.Config)) (sock, limits, cgroup string) {
	t.Helper()
	nettest.RequireRoot(t)
	root, err := bpf.CgroupV2Root()
	if err != nil {
		t.Skip(err)
	}
	dir := t.TempDir()
	cfg := config.Default()
	cfg.Interval = time.Second
	cfg.TimeZone, cfg.TimeZoneName = time.UTC, "UTC"
	cfg.SSH.UIDMin, cfg.SSH.UIDMax = 2800, 2900
	cfg.Xray.Enabled = false
	// SSH sessions would count the servers other tests run on this host.
	cfg.SSH.Sessions = false
	cfg.Kernel.PinPath = filepath.Join("/sys/fs/bpf", nettest.Name("bwctl-"))
	for p, name := range map[*string]string{&cfg.Paths.Limits: "bw-limit.conf", &cfg.Paths.UsageDir: "usage",
		&cfg.Paths.MarkerDir: "blocked_users", &cfg.Paths.BlockLog: "blocked.log", &cfg.Paths.StateDB: "state.db",
		&cfg.Paths.Passwd: "passwd", &cfg.Paths.Socket: "bw.sock"} {
		*p = filepath.Join(dir, name)
	}
	if change != nil {
		change(&cfg)
	}
	os.WriteFile(cfg.Paths.Passwd, []byte("alice:x:2801:2801::/:/bin/false\nbob:x:2802:2802::/:/bin/false\n"), 0o644)
	os.WriteFile(cfg.Paths.Limits, []byte("# limits\nalice 10240\n"), 0o644)

	cgroup = nettest.NewCgroup(t, root)
	dp, err := bpf.Load(bpf.Config{CgroupPath: cgroup, PinPath: cfg.Kernel.PinPath, MaxUIDs: cfg.Kernel.MaxUIDs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Uninstall() })
	fw, err := nft.New(nft.Config{Table: nettest.Name("bwctl"), NetNS: int(nettest.NewNetNS(t))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw.Remove(); fw.Close() })
	st, err := store.Open(cfg.Paths.StateDB)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	a, err := agent.New(agent.Options{Config: cfg, Dataplane: dp, Sessions: dp, Firewall: fw, Store: st, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	srv := control.NewServer(agentbackend.New(a), control.Options{
		ErrorCodes: agentbackend.ErrorCodes,
		LookupUser: func(uint32) (string, error) { return "alice", nil },
	})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { a.Run(ctx) })
	// As bwagent does: the socket opens once the first tick has run, so
	// the first read already sees the accounts.
	select {
	case <-a.Ready():
	case <-time.After(30 * time.Second):
		cancel()
		wg.Wait()
		t.Fatal("the agent's first tick did not end")
	}
	wg.Go(func() { srv.Serve(ctx, cfg.Paths.Socket) })
	t.Cleanup(func() { cancel(); wg.Wait() })
	for i := 0; ; i++ {
		if c, err := control.Dial(ctx, cfg.Paths.Socket); err == nil {
			c.Close()
			break
		}
		if i > 200 {
			t.Fatal("control socket did not come up")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return cfg.Paths.Socket, cfg.Paths.Limits, cgroup
}

// volatile are the parts of real output that change from run to run.
var volatile = []struct {
	re   *regexp.Regexp
	with string
}{
	{regexp.MustCompile(`\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?Z?`), "TIME"},
	{regexp.MustCompile(`"tick_duration_ns": \d+`), `"tick_duration_ns": N`},
	{regexp.MustCompile(`tick duration:\s+\S+`), "tick duration: D"},
	{regexp.MustCompile(`\d{4}-\d\d-\d\d`), "DAY"},
	{regexp.MustCompile(`/tmp/\S+/`), "DIR/"},
}

func normalize(s string) string {
	for _, v := range volatile {
		s = v.re.ReplaceAllString(s, v.with)
	}
	return s
}

// TestRealAgent runs bwctl's commands against a real agent: table and JSON
// outputs against golden files (times normalized), the limits file
// rewritten by `set`, and the errors of a real agent.
func TestRealAgent(t *testing.T) {
	sock, limits := realAgent(t)
	for _, c := range []struct {
		name string
		args []string
		code int
	}{
		{"list", []string{"list"}, 0},
		{"usage-own", []string{"usage"}, 0},
		{"set", []string{"set", "bob", "5G"}, 0},
		{"usage-bob", []string{"usage", "bob"}, 0},
		{"disable", []string{"disable", "bob"}, 0},
		{"blocked", []string{"blocked"}, 0},
		{"unblock-disabled", []string{"unblock", "bob"}, 1},
		{"enable", []string{"enable", "bob"}, 0},
		{"reset", []string{"reset", "alice"}, 0},
		{"unblock-not-blocked", []string{"unblock", "alice"}, 1},
		{"remove-limit", []string{"remove-limit", "bob"}, 0},
		{"remove-limit-none", []string{"remove-limit", "bob"}, 1},
		{"unknown", []string{"reset", "carol"}, 1},
		{"history", []string{"history", "alice"}, 0},
		{"status", []string{"status"}, 0},
		{"check", []string{"check"}, 0},
		{"list-json", []string{"-o", "json", "list"}, 0},
		{"usage-json", []string{"-o", "json", "usage", "alice"}, 0},
		{"speed", []string{"speed", "alice", "10mbit/2mbit"}, 0},
		{"throttle", []string{"throttle", "alice", "1mbit"}, 0},
		{"usage-speed-json", []string{"-o", "json", "usage", "alice"}, 0},
		{"speed-bad", []string{"speed", "alice", "20M"}, 2},
		{"speed-off", []string{"speed", "alice", "off"}, 0},
		{"throttle-off", []string{"throttle", "alice", "off"}, 0},
	} {
		if c.name == "speed-bad" {
			// The line as speed and throttle left it.
			if data, _ := os.ReadFile(limits); string(data) != "# limits\nalice 10240 speed=10mbit/2mbit throttle=1mbit\n" {
				t.Errorf("limits file after speed and throttle: %q", data)
			}
		}
		code, out, errOut := runCmd(sock, c.args...)
		if code != c.code {
			t.Errorf("%v: exit %d, want %d\n%s%s", c.args, code, c.code, out, errOut)
		}
		golden(t, "real-"+c.name, normalize(out+errOut))
	}
	data, _ := os.ReadFile(limits)
	if got := string(data); got != "# limits\nalice 10240\n" {
		t.Errorf("limits file after set and remove-limit: %q", got)
	}
}

// TestStatusKernelCounters: after UDP traffic of more UIDs than a tiny
// counter map holds, bwctl status shows the packets that passed uncounted
// and says what to raise.
func TestStatusKernelCounters(t *testing.T) {
	sock, _, cg := realAgentWith(t, func(c *config.Config) { c.Kernel.MaxUIDs = 3 })
	pair := nettest.NewPair(t)
	echo := nettest.Start(t, nettest.Spec{NS: pair.B, Cgroup: cg}, "udp-echo", net.JoinHostPort(pair.B4.String(), "0"))
	addr := strings.Fields(echo.Expect(t, "ADDR", 5*time.Second))[1]
	for uid := uint32(2801); uid <= 2806; uid++ {
		p := nettest.Start(t, nettest.Spec{NS: pair.A, Cgroup: cg, UID: uid}, "udp-client", addr, "20", "100")
		p.Expect(t, "DONE", 10*time.Second)
	}
	var out string
	for i := 0; i < 50; i++ { // the next tick reads the kernel's counters
		_, out, _ = runCmd(sock, "status")
		if strings.Contains(out, "counter map full") {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	m := regexp.MustCompile(`kernel no room:\s+(\d+) packets uncounted \(counter map full\), \d+ dropped \(quota map full\): raise kernel.max_uids`).FindStringSubmatch(out)
	if m == nil || m[1] == "0" {
		t.Fatalf("status does not show the uncounted packets:\n%s", out)
	}
	if !strings.Contains(out, "kernel.max_uids (now 3)") {
		t.Errorf("status does not name the key and its value:\n%s", out)
	}
	code, js, _ := runCmd(sock, "-o", "json", "status")
	if code != 0 || !regexp.MustCompile(`"counters_full": [1-9]`).MatchString(js) {
		t.Errorf("status -o json (exit %d):\n%s", code, js)
	}
}
