package fleet

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/pgtest"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
)

func requireRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run PostgreSQL as postgres: run `make test`")
	}
}

// db starts (once per test) a cluster and returns a new database's DSN.
func db(t *testing.T) (*pgtest.Cluster, string, string) {
	t.Helper()
	requireRoot(t)
	c := pgtest.Start(t, pgtest.Options{})
	name := "fleet"
	return c, name, c.CreateDB(t, name)
}

func connect(t *testing.T, dsn, node string) *Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := Connect(ctx, Options{DSN: dsn, Node: node, Metric: quota.Total, Version: "test"})
	if err != nil {
		t.Fatalf("connect %s: %v", node, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func syncT(t *testing.T, c *Client, r *Report) *Result {
	t.Helper()
	res, err := c.Sync(context.Background(), r)
	if err != nil {
		t.Fatalf("sync %s: %v", c.Node(), err)
	}
	return res
}

func userOf(res *Result, name string) (User, bool) {
	for _, u := range res.Users {
		if u.Name == name {
			return u, true
		}
	}
	return User{}, false
}

// TestSchemaAndNames: a database of a newer schema is refused and left as
// it is; a second running node of the same name is refused, naming the
// first, and the name is free again once the first is gone.
func TestSchemaAndNames(t *testing.T) {
	c, dbName, dsn := db(t)
	a := connect(t, dsn, "a")
	_, err := Connect(context.Background(), Options{DSN: dsn, Node: "a", Metric: quota.Total})
	if !errors.Is(err, ErrNodeTaken) || !strings.Contains(err.Error(), `node "a" is already run by another agent`) {
		t.Errorf("second node a: %v", err)
	}
	_, err = Connect(context.Background(), Options{DSN: dsn, Node: "b", Metric: quota.Download})
	if !errors.Is(err, ErrMetric) {
		t.Errorf("node with another metric: %v", err)
	}
	a.Close()
	connect(t, dsn, "a") // free again

	c.SQL(t, dbName, "UPDATE schema_version SET version = 99")
	_, err = Connect(context.Background(), Options{DSN: dsn, Node: "c", Metric: quota.Total})
	if !errors.Is(err, ErrSchemaVersion) || !strings.Contains(err.Error(), "version 99") {
		t.Errorf("newer schema: %v", err)
	}
	if v := c.SQL(t, dbName, "SELECT version FROM schema_version"); v != "99" {
		t.Errorf("schema version after the refusal: %s", v)
	}
	_, err = Connect(context.Background(), Options{DSN: "host=/nonexistent dbname=x connect_timeout=1", Node: "d", Metric: quota.Total})
	if err == nil {
		t.Error("unreachable database accepted")
	}
}

// TestUsageIdempotent: reports are absolute, so a repeated or stale
// report changes nothing; the others' usage is every other node's sum in
// the current period; a reset starts a new period.
func TestUsageIdempotent(t *testing.T) {
	cl, dbName, dsn := db(t)
	a, b := connect(t, dsn, "a"), connect(t, dsn, "b")
	syncT(t, a, &Report{Usage: []Usage{{Name: "john", Period: 1, Up: 100, Down: 1000}}})
	syncT(t, a, &Report{Usage: []Usage{{Name: "john", Period: 1, Up: 100, Down: 1000}}})
	syncT(t, a, &Report{Usage: []Usage{{Name: "john", Period: 1, Up: 50, Down: 500}}}) // a stale report
	res := syncT(t, b, &Report{Usage: []Usage{{Name: "john", Period: 1, Up: 7, Down: 70}}})
	u, ok := userOf(res, "john")
	if !ok || u.Used != (quota.Usage{Up: 107, Down: 1070}) || u.Period != 1 {
		t.Fatalf("john seen by b: %+v", u)
	}
	res = syncT(t, a, &Report{})
	if u, _ := userOf(res, "john"); u.Used != (quota.Usage{Up: 107, Down: 1070}) {
		t.Errorf("john seen by a: %+v", u)
	}
	// Nothing changed: nothing comes back.
	syncT(t, b, &Report{})
	if res := syncT(t, b, &Report{}); len(res.Users) != 0 {
		t.Errorf("unchanged users read again: %+v", res.Users)
	}
	r, err := a.Reset(context.Background(), "john", time.Now())
	if err != nil || r.Period != 2 {
		t.Fatalf("reset: %+v %v", r, err)
	}
	res = syncT(t, b, &Report{Usage: []Usage{{Name: "john", Period: 1, Up: 8, Down: 80}}})
	if u, _ := userOf(res, "john"); u.Period != 2 || u.Used != (quota.Usage{}) {
		t.Errorf("john after the reset: %+v", u)
	}
	if _, err := a.Reset(context.Background(), "nobody", time.Now()); !errors.Is(err, ErrUnknownUser) {
		t.Errorf("reset of an unknown user: %v", err)
	}
	// A scheduled reset both nodes saw due moves the period once.
	at := time.Now()
	syncT(t, a, &Report{Rollovers: []Rollover{{Name: "john", From: 2, At: at}}})
	res = syncT(t, b, &Report{Rollovers: []Rollover{{Name: "john", From: 2, At: at}}})
	if u, _ := userOf(res, "john"); u.Period != 3 {
		t.Errorf("john after a scheduled reset seen by two nodes: period %d", u.Period)
	}
	// A reset of every user: each starts a new period from zero, with
	// the reset's event, as Reset does for one.
	syncT(t, a, &Report{Usage: []Usage{{Name: "mary", Period: 1, Up: 5, Down: 50}, {Name: "john", Period: 3, Up: 1, Down: 2}}})
	n, err := b.ResetAll(context.Background(), time.Now())
	if err != nil || n != 2 {
		t.Fatalf("reset all: %d, %v; want 2 users", n, err)
	}
	res = syncT(t, a, &Report{})
	for name, period := range map[string]uint64{"john": 4, "mary": 2} {
		if u, _ := userOf(res, name); u.Period != period || u.Used != (quota.Usage{}) {
			t.Errorf("%s after a reset of every user: %+v, want period %d from zero", name, u, period)
		}
	}
	if got := cl.SQL(t, dbName, "SELECT name || ' ' || period || ' ' || node || ' ' || reason FROM events WHERE kind = 'reset' AND node = 'b' ORDER BY name"); got != "john 4 b Usage reset\nmary 2 b Usage reset" {
		t.Errorf("the reset's events:\n%s", got)
	}
}

// TestImports: a hand edit of a limits file is applied unless the fleet's
// plan changed after the file.
func TestImports(t *testing.T) {
	_, _, dsn := db(t)
	a := connect(t, dsn, "a")
	old := time.Now().Add(-time.Hour)
	e := opsfiles.Entry{User: "john", Limit: 5 << 30}
	res := syncT(t, a, &Report{Imports: []Import{{Entry: e, Line: true, At: old}}})
	if len(res.Refused) != 0 {
		t.Fatalf("first import refused: %+v", res.Refused)
	}
	if u, _ := userOf(res, "john"); !u.Line || u.Entry.Limit != 5<<30 {
		t.Fatalf("john after the import: %+v", u)
	}
	if _, err := a.EditPlan(context.Background(), "john", time.Now(), func(e *opsfiles.Entry, line *bool) error {
		e.Limit = 7 << 30
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// An older file's line is refused; a newer one applies.
	e.Limit = 6 << 30
	res = syncT(t, a, &Report{Imports: []Import{{Entry: e, Line: true, At: old.Add(time.Minute)}}})
	if len(res.Refused) != 1 {
		t.Errorf("stale import applied: %+v", res)
	}
	res = syncT(t, a, &Report{Imports: []Import{{Entry: opsfiles.Entry{User: "john"}, Line: false, At: time.Now().Add(time.Minute)}}})
	if u, _ := userOf(res, "john"); len(res.Refused) != 0 || u.Line {
		t.Errorf("newer removal: %+v", res)
	}
}

// TestSpeedInPlans: a line's speed caps (speed=, throttle=) are part of the
// fleet's plan, from a node's limits file and from a command.
func TestSpeedInPlans(t *testing.T) {
	_, _, dsn := db(t)
	a := connect(t, dsn, "a")
	sp, err := quota.ParseSpeed("10mbit/2mbit")
	if err != nil {
		t.Fatal(err)
	}
	e := opsfiles.Entry{User: "mary", Limit: 500 << 20, Speed: sp}
	res := syncT(t, a, &Report{Imports: []Import{{Entry: e, Line: true, At: time.Now().Add(-time.Hour)}}})
	if u, _ := userOf(res, "mary"); u.Entry.Speed != sp || !u.Entry.Throttle.IsZero() {
		t.Fatalf("mary after the import: %+v", u.Entry)
	}
	th, err := quota.ParseSpeed("1mbit")
	if err != nil {
		t.Fatal(err)
	}
	u, err := a.EditPlan(context.Background(), "mary", time.Now(), func(e *opsfiles.Entry, line *bool) error {
		e.Speed, e.Throttle = quota.Speed{}, th
		return nil
	})
	if err != nil || !u.Entry.Speed.IsZero() || u.Entry.Throttle != th {
		t.Errorf("mary after a command: %+v, %v", u.Entry, err)
	}
}

// TestLeasesNeverExceed: three nodes take leases and spend them at random
// rates, one cut off for a while (it keeps spending its lease); at every
// step the sum over nodes of max(lease, used) stays within the limit, so
// the total never passes it, and the total ends at the limit within a few
// bytes. One active node gets nearly all the remainder.
func TestLeasesNeverExceed(t *testing.T) {
	_, _, dsn := db(t)
	const limit = 100 << 20
	nodes := []*Client{connect(t, dsn, "a"), connect(t, dsn, "b"), connect(t, dsn, "c")}
	ctx := context.Background()
	if _, err := nodes[0].EditPlan(ctx, "john", time.Now(), func(e *opsfiles.Entry, line *bool) error { return nil }); !errors.Is(err, ErrUnknownUser) {
		t.Fatalf("edit of an unseen user: %v", err)
	}
	syncT(t, nodes[0], &Report{Usage: []Usage{{Name: "john", Period: 1}}})
	if _, err := nodes[0].EditPlan(ctx, "john", time.Now(), func(e *opsfiles.Entry, line *bool) error {
		e.Limit, *line = limit, true
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// Only a is active at first: it gets nearly all.
	res := syncT(t, nodes[0], &Report{Leases: []LeaseReq{{Name: "john", Period: 1, Rate: 1 << 20}}})
	if len(res.Grants) != 1 || res.Grants[0].Ceiling < limit*9/10 {
		t.Fatalf("grant of the only active node: %+v", res.Grants)
	}
	type node struct {
		used, lease uint64
		cut         bool
	}
	st := make([]node, 3)
	st[0].lease = res.Grants[0].Ceiling
	rng := rand.New(rand.NewPCG(1, 2))
	for step := range 300 {
		i := rng.IntN(3)
		n := &st[i]
		// Spend part of the lease, at a node-dependent rate.
		if n.lease > n.used {
			n.used += uint64(rng.Int64N(int64(n.lease-n.used)+1)) * uint64(i+1) / 3
		}
		if step == 50 {
			st[2].cut = true
		}
		if step == 150 {
			st[2].cut = false
		}
		if n.cut {
			continue
		}
		res := syncT(t, nodes[i], &Report{
			Usage:  []Usage{{Name: "john", Period: 1, Up: 0, Down: n.used}},
			Leases: []LeaseReq{{Name: "john", Period: 1, Held: n.lease, Rate: uint64(i+1) << 20}},
		})
		if len(res.Grants) == 1 {
			n.lease = res.Grants[0].Ceiling
		}
		var hold, total uint64
		for _, m := range st {
			hold += max(m.lease, m.used)
			total += m.used
		}
		if hold > limit || total > limit {
			t.Fatalf("step %d: leases hold %d, used %d, limit %d: %+v", step, hold, total, limit, st)
		}
	}
	var total uint64
	for _, m := range st {
		total += m.used
	}
	if total < limit-1<<20 {
		t.Errorf("the nodes used %d of %d", total, limit)
	}
	t.Logf("used %d of %d: %+v", total, limit, st)
}

func BenchmarkGrant(b *testing.B) {
	hs := []holder{{node: "a", ceiling: 10, used: 5, rate: 3, fresh: true}, {node: "b", ceiling: 20, used: 10, rate: 1, fresh: true}}
	for range b.N {
		grant(100, "a", 10, 3, hs)
	}
}

func TestGrantShares(t *testing.T) {
	// Nobody moves: a little room, 1/32 of the rest among the idle nodes.
	if c, _, _ := grant(6400, "a", 0, 0, []holder{{node: "a"}, {node: "b", fresh: true}}); c != 100 {
		t.Errorf("idle grant: %d", c)
	}
	// Two equally active nodes share what remains.
	c, _, _ := grant(1000, "a", 0, 100, []holder{{node: "a"}, {node: "b", rate: 100, fresh: true}})
	if c < 450 || c > 500 {
		t.Errorf("share of two equal nodes: %d", c)
	}
	// An idle node keeps little and gives back what it held.
	c, rec, _ := grant(1000, "b", 900, 0, []holder{{node: "a", rate: 1000, fresh: true, used: 50, ceiling: 60}, {node: "b", ceiling: 900, used: 10}})
	if c > 10+60 || rec != 900 {
		t.Errorf("idle node: ceiling %d, record %d", c, rec)
	}
}
