package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/fleet"
	"github.com/myvpn/bwagent/internal/pgtest"
)

// fleetEnv is one node of a test fleet: an agent over a fake kernel whose
// fleet client syncs only when the test says, so that a test decides what
// the kernel moves between a report and the reply.
type fleetEnv struct {
	*env
	name string
}

// newFleetEnvs starts a throwaway PostgreSQL cluster and one agent per
// name, the first with limits as its limits file (the fleet imports it).
func newFleetEnvs(t *testing.T, limits string, names ...string) (*pgtest.Cluster, string, []*fleetEnv) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to run PostgreSQL as postgres: run `make test`")
	}
	pg := pgtest.Start(t, pgtest.Options{})
	dsn := pg.CreateDB(t, "fleet")
	var out []*fleetEnv
	for i, name := range names {
		e := newEnvFiles(t)
		if i == 0 {
			e.write("bw-limit.conf", limits)
		}
		e.cfg.Fleet.Database, e.cfg.Fleet.Node = dsn, name
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := fleet.Connect(ctx, fleet.Options{DSN: dsn, Node: name, Metric: e.cfg.Rules().Metric, Version: "test"})
		cancel()
		if err != nil {
			t.Fatalf("connect %s: %v", name, err)
		}
		t.Cleanup(func() { c.Close() })
		e.fleet = c
		e.start()
		out = append(out, &fleetEnv{env: e, name: name})
	}
	return pg, "fleet", out
}

// sync sends the report the agent handed over, if any, and applies the
// reply as the loop would; it reports whether there was one. A reply that
// lowers a lease makes the agent hand over its next report at once: it
// waits for the next sync.
func (n *fleetEnv) sync(t *testing.T) bool {
	t.Helper()
	select {
	case r := <-n.a.fl.in:
		res, err := n.a.fl.c.Sync(context.Background(), r)
		if err != nil {
			t.Fatalf("node %s: sync: %v", n.name, err)
		}
		n.a.fleetApply(fleetReply{report: r, res: res}, n.clock)
		n.a.commits.flush()
		return true
	default:
		return false
	}
}

// moved is what the node's kernel let through for UID 1001, both ways.
func (n *fleetEnv) moved() uint64 {
	c, _ := n.dp.CountersOf(1001)
	return c.TxBytes + c.RxBytes
}

// leaseFleet is two nodes, a and b, sharing john's 4 MiB: a took nearly
// all of it, then b started, faster than a goes on, so that a's next
// renewal lowers a's lease.
type leaseFleet struct {
	t     *testing.T
	pg    *pgtest.Cluster
	db    string
	a, b  *fleetEnv
	nodes []*fleetEnv
}

const leaseLimit = 4 << 20

func newLeaseFleet(t *testing.T) *leaseFleet {
	t.Helper()
	pg, db, nodes := newFleetEnvs(t, "john 4M\n", "a", "b")
	f := &leaseFleet{t: t, pg: pg, db: db, a: nodes[0], b: nodes[1], nodes: nodes}
	// The limits file imported, every node's limit from the fleet, an idle
	// lease each.
	for range 4 {
		f.round(f.a, f.b)
	}
	for _, n := range nodes {
		if u := n.a.users["john"]; u == nil || u.r.plan().Limit != leaseLimit {
			t.Fatalf("node %s: john's plan not the fleet's", n.name)
		}
	}
	// a is busy: it takes nearly all the remainder.
	for range 3 {
		f.a.dp.blast(1001, 1<<20, 1000, false)
		f.round(f.a)
	}
	f.hold("a busy")
	// b starts, faster than a goes on.
	f.b.dp.blast(1001, 1<<20, 1000, false)
	f.round(f.b)
	f.hold("b starts")
	return f
}

// round runs a tick on each node and syncs what it hands over.
func (f *leaseFleet) round(ns ...*fleetEnv) {
	f.t.Helper()
	for _, n := range ns {
		n.step(time.Second)
		for n.sync(f.t) {
		}
	}
}

// hold checks the lease rule against what the kernels let through: the
// sum over nodes of max(the lease the database records, the bytes the
// node's kernel moved) within the limit.
func (f *leaseFleet) hold(when string) {
	f.t.Helper()
	var sum uint64
	var parts []string
	for _, n := range f.nodes {
		rec, _ := strconv.ParseUint(strings.TrimSpace(f.pg.SQL(f.t, f.db, "SELECT ceiling FROM leases WHERE name = 'john' AND node = '"+n.name+"'")), 10, 64)
		sum += max(rec, n.moved())
		parts = append(parts, fmt.Sprintf("%s: lease %d, moved %d", n.name, rec, n.moved()))
	}
	if sum > leaseLimit {
		f.t.Errorf("%s: the database's leases and the kernels hold %d of a limit of %d (%s)", when, sum, leaseLimit, strings.Join(parts, "; "))
	}
}

// lowerA runs a's tick and syncs its report, whose reply lowers a's lease;
// it returns the report, the reply and the lease before and after.
func (f *leaseFleet) lowerA() (*fleet.Report, *fleet.Result, uint64, uint64) {
	f.t.Helper()
	a := f.a
	a.dp.blast(1001, 1000, 1000, false)
	a.step(time.Second)
	r := <-a.a.fl.in
	res, err := a.a.fl.c.Sync(context.Background(), r)
	if err != nil {
		f.t.Fatal(err)
	}
	old := a.a.fl.users["john"].lease
	var lowered uint64
	for _, g := range res.Grants {
		if g.Name == "john" {
			lowered = g.Ceiling
		}
	}
	if lowered >= old {
		f.t.Fatalf("a's lease not lowered: %d, was %d", lowered, old)
	}
	return r, res, old, lowered
}

// spend lets both nodes use what they are granted, a few ticks, then
// checks that the kernels let through no more than the limit, and most
// of it.
func (f *leaseFleet) spend() {
	f.t.Helper()
	a, b := f.a, f.b
	for range 3 {
		b.dp.blast(1001, 1<<30, 1000, false)
		f.round(b)
		f.hold("b renews")
	}
	for range 3 {
		a.dp.blast(1001, 1<<30, 1000, false)
		b.dp.blast(1001, 1<<30, 1000, false)
		f.round(a, b)
		f.hold("both spend")
	}
	total := a.moved() + b.moved()
	if total > leaseLimit {
		f.t.Errorf("the kernels let %d bytes through (a %d, b %d), limit %d", total, a.moved(), b.moved(), leaseLimit)
	}
	if total < leaseLimit-2*kernelSlack(leaseLimit) {
		f.t.Errorf("only %d of %d bytes used", total, leaseLimit)
	}
	// Within a kernel slack of the limit per node that moved john: each
	// kernel may have refused a packet a batch short of its lease.
	for _, n := range f.nodes {
		if u := n.a.users["john"]; !u.r.state().Blocked || n.a.fleetSlack("john", leaseLimit, kernelSlack(leaseLimit)) != 2*kernelSlack(leaseLimit) {
			f.t.Errorf("node %s: john not blocked at %d of %d, or not with a slack per node", n.name, total, leaseLimit)
		}
	}
}

// TestFleetLoweredLeaseHoldsCount: a node whose lease the database lowers
// below what its kernel let through since its report (under the lease
// before, while the reply was on its way) holds that count, not the lower
// lease, in the report that gives the room back: the database never
// records less than a node's kernel may have let through, so no other
// node is granted those bytes again.
func TestFleetLoweredLeaseHoldsCount(t *testing.T) {
	f := newLeaseFleet(t)
	a := f.a
	r, res, old, lowered := f.lowerA()
	a.dp.blast(1001, 1<<30, 1000, false) // before the reply is applied
	if a.moved() <= lowered {
		t.Fatalf("a moved %d, no more than its lowered lease %d", a.moved(), lowered)
	}
	f.applyToA(r, res)
	f.hold("a's lease lowered")
	f.spend()
	f.logMoved(old, lowered)
}

// applyToA applies the reply that lowered a's lease, commits, and sends
// a's reports until none is due: the lower lease is reported at once.
func (f *leaseFleet) applyToA(r *fleet.Report, res *fleet.Result) {
	a := f.a
	a.a.fleetApply(fleetReply{report: r, res: res}, a.clock)
	a.a.commits.flush()
	for a.sync(f.t) {
	}
}

// logMoved logs what a and b moved, a's lease lowered from old to lowered.
func (f *leaseFleet) logMoved(old, lowered uint64) {
	a, b := f.a.moved(), f.b.moved()
	f.t.Logf("a %d (lease lowered from %d to %d) + b %d = %d of %d", a, old, lowered, b, a+b, leaseLimit)
}

// TestFleetLoweredLeaseUnwritten: a lowered lease whose kernel budget could
// not be written holds the lease before: the kernel enforces the budget
// before until the write is retried, and what it let through meanwhile is
// held once it is written.
func TestFleetLoweredLeaseUnwritten(t *testing.T) {
	f := newLeaseFleet(t)
	a := f.a
	r, res, old, lowered := f.lowerA()
	a.dp.failWrites(errors.New("map write refused"))
	f.applyToA(r, res)
	// b renews from what the database says is free; a's kernel, under the
	// budget before, lets through what it allows.
	f.b.dp.blast(1001, 1<<30, 1000, false)
	f.round(f.b)
	a.dp.blast(1001, 1<<30, 1000, false)
	if a.moved() <= lowered {
		t.Fatalf("a moved %d, no more than its lowered lease %d", a.moved(), lowered)
	}
	f.hold("a's lease lowered, not written")
	f.round(a)
	f.hold("a's write failed again")
	a.dp.failWrites(nil)
	f.spend()
	f.logMoved(old, lowered)
}

// TestFleetLoweredLeaseSavedFirst: a node that gives room back has its
// lower lease in its state database before it says so: a node killed
// right after the report comes back enforcing the lower lease, not the
// one before, which the database may have granted to another node.
func TestFleetLoweredLeaseSavedFirst(t *testing.T) {
	f := newLeaseFleet(t)
	a := f.a
	r, res, old, lowered := f.lowerA()
	// The reply and the report that gives the room back, and no commit of
	// the loop's own (the committer has not run yet).
	a.a.fleetApply(fleetReply{report: r, res: res}, a.clock)
	r = <-a.a.fl.in
	res, err := a.a.fl.c.Sync(context.Background(), r)
	if err != nil {
		t.Fatal(err)
	}
	a.a.fleetApply(fleetReply{report: r, res: res}, a.clock)
	// b takes the room; a is killed (what the committer had not committed
	// is lost) and starts again.
	f.b.dp.blast(1001, 1<<30, 1000, false)
	f.round(f.b)
	f.hold("b renews")
	a.fleet.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	c, err := fleet.Connect(ctx, fleet.Options{DSN: a.cfg.Fleet.Database, Node: a.name, Metric: a.cfg.Rules().Metric, Version: "test"})
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	a.fleet = c
	a.start()
	a.step(time.Second) // the budget from the state database, before the first sync
	a.dp.blast(1001, 1<<30, 1000, false)
	f.hold("a restarted")
	for a.sync(t) {
	}
	f.spend()
	t.Logf("a %d (lease lowered from %d to %d) + b %d = %d of %d", a.moved(), old, lowered, f.b.moved(), a.moved()+f.b.moved(), leaseLimit)
}
