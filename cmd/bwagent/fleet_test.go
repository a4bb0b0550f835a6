package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/fleet"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/pgtest"
	"github.com/myvpn/bwagent/quota"
)

// The fleet tests: one throwaway PostgreSQL cluster and three real agents
// on this machine, each with its own cgroup, pins, nftables table (in its
// own network namespace), files and socket, each counting only the traffic
// of the processes in its cgroup, and each reaching the database through a
// proxy of its own that a test can cut.

func init() {
	// slow-down ADDR RATE: download from a tcp-serve at RATE bytes a
	// second (reading that fast: TCP's window holds the sender back),
	// printing "P sent received" every 50 ms, until killed or cut.
	nettest.Register("slow-down", func(args []string) error {
		rate, err := strconv.ParseUint(args[1], 10, 64)
		if err != nil {
			return err
		}
		c, err := net.DialTimeout("tcp", args[0], 3*time.Second)
		if err != nil {
			return err
		}
		tc := c.(*net.TCPConn)
		tc.SetReadBuffer(64 << 10)
		var hdr [16]byte
		binary.BigEndian.PutUint64(hdr[8:], math.MaxUint64)
		if _, err := c.Write(hdr[:]); err != nil {
			return err
		}
		fmt.Println("CONNECTED")
		buf := make([]byte, 16<<10)
		var got uint64
		start := time.Now()
		last := start
		for {
			if want := uint64(time.Since(start).Seconds() * float64(rate)); got > want {
				time.Sleep(time.Duration(float64(got-want) / float64(rate) * float64(time.Second)))
			}
			c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			n, err := c.Read(buf)
			got += uint64(n)
			if time.Since(last) > 50*time.Millisecond {
				fmt.Printf("P 0 %d\n", got)
				last = time.Now()
			}
			var ne net.Error
			if err != nil && !(errors.As(err, &ne) && ne.Timeout()) {
				fmt.Printf("DONE 0 %d\n", got)
				if err == io.EOF {
					return nil
				}
				return nil
			}
		}
	})
}

// fleetNode is one agent of a test fleet.
type fleetNode struct {
	*agentEnv
	name  string
	proxy *pgtest.Proxy
	proc  *nettest.Proc
}

type testFleet struct {
	pg    *pgtest.Cluster
	db    string
	nodes []*fleetNode
}

const fleetUser = 2750

// newFleet starts a cluster and configures n nodes with john (UID 2750)
// and srv (2751); limits is the first node's limits file, the others'
// start empty.
func newFleet(t *testing.T, n int, limits string) *testFleet {
	t.Helper()
	nettest.RequireRoot(t)
	f := &testFleet{pg: pgtest.Start(t, pgtest.Options{}), db: "bwfleet"}
	f.pg.CreateDB(t, f.db)
	t.Cleanup(func() {
		if t.Failed() && os.Getenv("BWTEST_FLEET_LOGS") != "" {
			t.Logf("plans:\n%s\nusage:\n%s\nleases:\n%s\nevents:\n%s", f.pg.SQL(t, f.db, "SELECT * FROM plans"), f.pg.SQL(t, f.db, "SELECT * FROM usage"),
				f.pg.SQL(t, f.db, "SELECT * FROM leases"), f.pg.SQL(t, f.db, "SELECT * FROM events"))
		}
	})
	for i := range n {
		l := ""
		if i == 0 {
			l = limits
		}
		e := newAgentEnv(t, fmt.Sprintf("john:x:%d:%d::/:/bin/false\nsrv:x:%d:%d::/:/bin/false\n", fleetUser, fleetUser, fleetUser+1, fleetUser+1), l)
		nd := &fleetNode{agentEnv: e, name: string(rune('a' + i)), proxy: f.pg.NewProxy(t)}
		nd.setFleet(t, nd.proxy.DSN(f.db), nd.name)
		f.nodes = append(f.nodes, nd)
	}
	return f
}

// setFleet appends the [fleet] section to the node's configuration.
func (e *agentEnv) setFleet(t *testing.T, dsn, node string) {
	t.Helper()
	conf, err := os.ReadFile(e.conf)
	if err != nil {
		t.Fatal(err)
	}
	if i := strings.Index(string(conf), "\n[fleet]"); i >= 0 {
		conf = conf[:i+1]
	}
	conf = fmt.Appendf(conf, "\n[fleet]\ndatabase = %q\nnode = %q\n", dsn, node)
	if err := os.WriteFile(e.conf, conf, 0o644); err != nil {
		t.Fatal(err)
	}
}

func (n *fleetNode) start(t *testing.T) {
	t.Helper()
	n.proc = n.agentEnv.start(t)
	n.drain(t)
}

// drain copies the agent's log lines to agent.log in its directory, shown
// when the test fails.
func (n *fleetNode) drain(t *testing.T) {
	logf, err := os.OpenFile(filepath.Join(n.dir, "agent.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	p := n.proc
	go func() {
		for line := range p.Lines {
			fmt.Fprintln(logf, line)
		}
		logf.Close()
	}()
	t.Cleanup(func() {
		if t.Failed() && os.Getenv("BWTEST_FLEET_LOGS") != "" {
			data, _ := os.ReadFile(filepath.Join(n.dir, "agent.log"))
			t.Logf("node %s's log:\n%s", n.name, data)
		}
	})
}

func (f *testFleet) startAll(t *testing.T) {
	t.Helper()
	for _, n := range f.nodes {
		n.start(t)
	}
}

// stream starts john's download in node n's cgroup from a server in its
// namespace B: as fast as it goes (rate 0) or at rate bytes a second.
func (n *fleetNode) stream(t *testing.T, rate uint64) *nettest.Proc {
	t.Helper()
	srv := nettest.Start(t, nettest.Spec{NS: n.pair.B, Cgroup: n.cg, UID: fleetUser + 1}, "tcp-serve",
		net.JoinHostPort(n.pair.B4.String(), "0"))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	var c *nettest.Proc
	if rate == 0 {
		c = nettest.Start(t, nettest.Spec{NS: n.pair.A, Cgroup: n.cg, UID: fleetUser}, "tcp-client", addr, "0", "inf")
	} else {
		c = nettest.Start(t, nettest.Spec{NS: n.pair.A, Cgroup: n.cg, UID: fleetUser}, "slow-down", addr, strconv.FormatUint(rate, 10))
	}
	c.Expect(t, "CONNECTED", 5*time.Second)
	return c
}

// client dials the node's control socket, which comes up beside its first
// tick.
func (n *fleetNode) client(t *testing.T) *control.Client {
	t.Helper()
	return dialSocket(t, n.dir)
}

func (n *fleetNode) user(t *testing.T) control.User {
	t.Helper()
	c := n.client(t)
	defer c.Close()
	u, err := c.User(context.Background(), "john")
	if err != nil {
		t.Fatalf("node %s: john: %v", n.name, err)
	}
	return u
}

func (n *fleetNode) ctl(t *testing.T, fn func(c *control.Client) error) error {
	t.Helper()
	c := n.client(t)
	defer c.Close()
	return fn(c)
}

// kernel returns the bytes john moved through node n, by its kernel.
func (n *fleetNode) kernel(t *testing.T) uint64 {
	c := n.counters(t, fleetUser)
	return c.TxBytes + c.RxBytes
}

// shares reads each node's usage of john in his current period from the
// database.
func (f *testFleet) shares(t *testing.T) map[string]uint64 {
	t.Helper()
	out := f.pg.SQL(t, f.db, "SELECT u.node, u.up + u.down FROM usage u JOIN plans p ON p.name = u.name AND p.period = u.period WHERE u.name = 'john'")
	m := map[string]uint64{}
	for _, line := range strings.Split(out, "\n") {
		if node, n, ok := strings.Cut(line, "|"); ok {
			m[node], _ = strconv.ParseUint(n, 10, 64)
		}
	}
	return m
}

// settled waits until the kernels' counts of john stand still and the
// database's shares equal them (the nodes report within a tick), and
// returns both.
func (f *testFleet) settled(t *testing.T) (kernels, shares map[string]uint64) {
	t.Helper()
	read := func() map[string]uint64 {
		m := map[string]uint64{}
		for _, n := range f.nodes {
			if k := n.kernel(t); k > 0 {
				m[n.name] = k
			}
		}
		return m
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		k1 := read()
		time.Sleep(2500 * time.Millisecond)
		k2, sh := read(), f.shares(t)
		for name, v := range sh {
			if v == 0 {
				delete(sh, name)
			}
		}
		if maps.Equal(k1, k2) && maps.Equal(k2, sh) || time.Now().After(deadline) {
			return k2, sh
		}
	}
}

func sum(m map[string]uint64) (s uint64) {
	for _, v := range m {
		s += v
	}
	return s
}

// waitStatus waits until every node shows john with status st, and
// returns when each did.
func (f *testFleet) waitStatus(t *testing.T, st quota.Status, within time.Duration) []time.Time {
	t.Helper()
	at := make([]time.Time, len(f.nodes))
	deadline := time.Now().Add(within)
	for {
		done := true
		for i, n := range f.nodes {
			if at[i].IsZero() {
				if n.user(t).Status == st {
					at[i] = time.Now()
				} else {
					done = false
				}
			}
		}
		if done {
			return at
		}
		if time.Now().After(deadline) {
			var got []string
			for _, n := range f.nodes {
				u := n.user(t)
				got = append(got, fmt.Sprintf("%s: %s used %d", n.name, u.Status, u.Used))
			}
			t.Fatalf("john not %s on every node within %v: %v", st, within, got)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func spread(at []time.Time) time.Duration {
	lo, hi := at[0], at[0]
	for _, t := range at {
		if t.Before(lo) {
			lo = t
		}
		if t.After(hi) {
			hi = t
		}
	}
	return hi.Sub(lo)
}

// TestFleetOneLimitTwoNodes (point 1): john downloads through nodes a and
// b at once, 4 MiB/s on each, with a 24 MiB limit: the global
// total stops at the limit or below (the leases: the kernel of each node
// refuses the packet that would pass its lease), john is BLOCKED on all
// three nodes within a tick of each other, and the per-node shares in the
// database add up to the total each node shows, which equals what the
// kernels counted.
func TestFleetOneLimitTwoNodes(t *testing.T) {
	const limit = 24 << 20
	f := newFleet(t, 3, "john 24M\n")
	f.startAll(t)
	time.Sleep(2500 * time.Millisecond) // the limits file imported, rewritten on every node
	for _, n := range f.nodes {
		if u := n.user(t); u.Limit != limit {
			t.Fatalf("node %s: john's limit %d", n.name, u.Limit)
		}
	}
	a, b := f.nodes[0].stream(t, 4<<20), f.nodes[1].stream(t, 4<<20)
	at := f.waitStatus(t, quota.Blocked, 30*time.Second)
	if d := spread(at); d > 1500*time.Millisecond {
		t.Errorf("john blocked on the nodes %v apart (tick 1 s)", d)
	}
	a.Cmd.Process.Kill()
	b.Cmd.Process.Kill()
	k, sh := f.settled(t)
	ka, kb := k["a"], k["b"]
	total := sum(k)
	if total > limit {
		t.Errorf("the nodes' kernels let %d bytes through, limit %d (a %d, b %d)", total, limit, ka, kb)
	}
	if total < limit-2*64<<10 {
		t.Errorf("only %d of %d bytes used", total, limit)
	}
	if !maps.Equal(sh, k) {
		t.Errorf("shares in the database %v (sum %d), kernels %v", sh, sum(sh), k)
	}
	for _, n := range f.nodes {
		if u := n.user(t); u.Used != total {
			t.Errorf("node %s shows john used %d, the kernels counted %d", n.name, u.Used, total)
		}
	}
	// bwctl usage: the global figure and each node's share; bwctl status:
	// the fleet's nodes and their last reports.
	u := f.nodes[2].user(t)
	var fromShares uint64
	for _, s := range u.Fleet {
		fromShares += s.Used
		if s.Used != k[s.Node] {
			t.Errorf("node %s's share %d, its kernel counted %d", s.Node, s.Used, k[s.Node])
		}
	}
	if fromShares != u.Used || len(u.Fleet) != 3 {
		t.Errorf("usage on c: used %d, shares %+v", u.Used, u.Fleet)
	}
	var h control.Health
	f.nodes[2].ctl(t, func(c *control.Client) (err error) { h, err = c.Status(context.Background()); return err })
	fc := h.Components["fleet"]
	if !strings.HasPrefix(fc, "ok: node c, database ") || !strings.Contains(fc, "nodes: a (last report ") || !strings.Contains(fc, "c (last report ") {
		t.Errorf("fleet component on c: %q", fc)
	}
	t.Logf("a %d + b %d = %d of %d; blocked %v apart; %s", ka, kb, total, limit, spread(at), fc)
}

// TestFleetCutOff (point 2): john streams through a and b at 2 MiB/s each;
// a is cut off from the database (its proxy goes silent): it keeps
// enforcing its lease, b goes on; when a is back, the global total equals
// what the kernels counted, to the byte. The same after a kill -9 of b and
// of PostgreSQL in the middle of reports.
func TestFleetCutOff(t *testing.T) {
	const limit = 40 << 20
	f := newFleet(t, 3, "john 40M\n")
	f.startAll(t)
	time.Sleep(2500 * time.Millisecond)
	a, b := f.nodes[0], f.nodes[1]
	sa, sb := a.stream(t, 2<<20), b.stream(t, 2<<20)
	time.Sleep(2 * time.Second)
	a.proxy.Cut()
	time.Sleep(6 * time.Second)
	// Cut off, a enforces its lease: it stops once it spent it.
	leaseA, _ := strconv.ParseUint(f.pg.SQL(t, f.db, "SELECT ceiling FROM leases WHERE name = 'john' AND node = 'a'"), 10, 64)
	if ka := a.kernel(t); ka > leaseA {
		t.Errorf("cut off, a counted %d bytes past its lease of %d", ka, leaseA)
	}
	var h control.Health
	a.ctl(t, func(c *control.Client) (err error) { h, err = c.Status(context.Background()); return err })
	if !strings.Contains(h.Components["fleet"], "unreachable") {
		t.Errorf("a's fleet component while cut off: %q", h.Components["fleet"])
	}
	a.proxy.Restore()
	time.Sleep(3 * time.Second)

	// kill -9 of b, then of PostgreSQL, in the middle of reports.
	b.proc.Cmd.Process.Signal(syscall.SIGKILL)
	b.proc.Wait(5 * time.Second)
	b.start(t)
	time.Sleep(1300 * time.Millisecond)
	f.pg.Kill(t)
	time.Sleep(2 * time.Second)
	f.pg.Restart(t)
	time.Sleep(4 * time.Second)
	sa.Cmd.Process.Kill()
	sb.Cmd.Process.Kill()
	k, sh := f.settled(t)
	ka, kb := k["a"], k["b"]
	if !maps.Equal(sh, k) {
		t.Errorf("database %v, kernels %v", sh, k)
	}
	if ka+kb > limit {
		t.Errorf("%d bytes passed a limit of %d", ka+kb, limit)
	}
	for _, n := range f.nodes {
		if u := n.user(t); u.Used != ka+kb {
			t.Errorf("node %s shows john used %d, the kernels counted %d", n.name, u.Used, ka+kb)
		}
	}
	t.Logf("a %d (lease when cut %d), b %d, total %d of %d", ka, leaseA, kb, ka+kb, limit)
}

// TestFleetCommands (point 3): a reset on a lets john back on b and c
// within a tick; a limit set on b is enforced on a; a disable on c
// survives a reset on a.
func TestFleetCommands(t *testing.T) {
	f := newFleet(t, 3, "john 4M\n")
	f.startAll(t)
	time.Sleep(2500 * time.Millisecond)
	a, b, c := f.nodes[0], f.nodes[1], f.nodes[2]
	s := b.stream(t, 4<<20)
	f.waitStatus(t, quota.Blocked, 20*time.Second)
	s.Cmd.Process.Kill()

	if err := a.ctl(t, func(cl *control.Client) error { return cl.Reset(context.Background(), "john") }); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	f.waitStatus(t, quota.Active, 5*time.Second)
	if d := time.Since(start); d > 1500*time.Millisecond {
		t.Errorf("john back on every node %v after the reset (tick 1 s)", d)
	}

	// A limit set on b is enforced on a.
	if err := b.ctl(t, func(cl *control.Client) error { return cl.SetLimit(context.Background(), "john", 2<<20) }); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	if u := a.user(t); u.Limit != 2<<20 {
		t.Fatalf("a's limit of john after a set on b: %d", u.Limit)
	}
	limits, _ := os.ReadFile(filepath.Join(a.dir, "bw-limit.conf"))
	if !strings.Contains(string(limits), "john 2\n") {
		t.Errorf("a's limits file: %q", limits)
	}
	ka0 := a.kernel(t)
	sa := a.stream(t, 4<<20)
	f.waitStatus(t, quota.Blocked, 20*time.Second)
	sa.Cmd.Process.Kill()
	time.Sleep(1500 * time.Millisecond)
	if got := a.kernel(t) - ka0; got > 2<<20 {
		t.Errorf("a let %d bytes through a limit of 2 MiB set on b", got)
	}

	// A disable on c survives a reset on a.
	if err := c.ctl(t, func(cl *control.Client) error { return cl.Disable(context.Background(), "john") }); err != nil {
		t.Fatal(err)
	}
	f.waitStatus(t, quota.Disabled, 3*time.Second)
	if err := a.ctl(t, func(cl *control.Client) error { return cl.Reset(context.Background(), "john") }); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond)
	for _, n := range f.nodes {
		if u := n.user(t); u.Status != quota.Disabled || u.Used != 0 {
			t.Errorf("node %s after a disable on c and a reset on a: %s, used %d", n.name, u.Status, u.Used)
		}
	}
	if got := f.pg.SQL(t, f.db, "SELECT count(*) FROM events WHERE name = 'john' AND kind = 'block'"); got != "2" {
		t.Errorf("block events in the database: %s, want 2 (one per block, not one per node)", got)
	}
	// A hand edit of c's limits file is the fleet's new plan; an edit of
	// b's older than the fleet's plan is undone.
	if err := os.WriteFile(filepath.Join(c.dir, "bw-limit.conf"), []byte("# by hand\njohn 8\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(2500 * time.Millisecond)
	for _, n := range f.nodes {
		if u := n.user(t); u.Limit != 8<<20 {
			t.Errorf("node %s: john's limit after a hand edit on c: %d", n.name, u.Limit)
		}
	}
	stale := filepath.Join(b.dir, "bw-limit.conf")
	os.WriteFile(stale, []byte("john 1\n"), 0o644)
	os.Chtimes(stale, time.Now().Add(-time.Hour), time.Now().Add(-time.Hour))
	time.Sleep(2500 * time.Millisecond)
	if data, _ := os.ReadFile(stale); string(data) != "john 8\n" {
		t.Errorf("b's limits file after a stale edit: %q", data)
	}
	if u := b.user(t); u.Limit != 8<<20 {
		t.Errorf("b: john's limit after a stale edit: %d", u.Limit)
	}
	for _, n := range f.nodes {
		log, _ := os.ReadFile(filepath.Join(n.dir, "blocked.log"))
		if strings.Count(string(log), "| john | Bandwidth Limit Reached") != 2 {
			t.Errorf("node %s's block log:\n%s", n.name, log)
		}
	}
}

// TestFleetBadInput (point 4): an unreachable database at start (the node
// starts, enforces locally and says so), a database of a newer schema and
// a second node of the same name are refused with a clear error.
func TestFleetBadInput(t *testing.T) {
	f := newFleet(t, 2, "john 4M\n")
	a, b := f.nodes[0], f.nodes[1]

	// Unreachable: the node starts and says it enforces locally.
	a.proxy.Cut()
	a.proc = nettest.Start(t, nettest.Spec{NS: a.pair.A}, "bwagent", "--config", a.conf)
	a.proc.Expect(t, `level=WARN msg="fleet database unreachable at start: enforcing each limit locally`, 20*time.Second)
	a.proc.Expect(t, `level=INFO msg="bwagent running"`, 20*time.Second)
	if u := a.user(t); u.Limit != 4<<20 || u.Status != quota.Active {
		t.Errorf("john on a node without its database: %+v", u)
	}
	a.proxy.Restore()
	a.proc.Expect(t, `level=INFO msg="fleet database reachable again"`, 20*time.Second)

	// The same name twice.
	b.setFleet(t, b.proxy.DSN(f.db), "a")
	err := run([]string{"--config", b.conf}, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), `node "a" is already run by another agent`) {
		t.Errorf("a second node a: %v", err)
	}

	// A newer schema.
	f.pg.SQL(t, f.db, "UPDATE schema_version SET version = version + 1")
	b.setFleet(t, b.proxy.DSN(f.db), "b")
	err = run([]string{"--config", b.conf}, slog.New(slog.DiscardHandler))
	newer := fmt.Sprintf("fleet database has a newer schema: version %d, this bwagent knows versions up to %d", fleet.SchemaVersion+1, fleet.SchemaVersion)
	if err == nil || !strings.Contains(err.Error(), newer) {
		t.Errorf("a newer schema: %v", err)
	}
}
