package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/fleet"
	"github.com/myvpn/bwagent/internal/pgtest"
	"github.com/myvpn/bwagent/quota"
)

// Parameters of BenchmarkFleet.
const (
	fleetUsers    = 10_000
	fleetMoving   = 10              // 1 user in 10 moves each tick
	fleetSecond   = 10              // 1 moving user in 10 moves on a second node too
	fleetTick     = 2 * time.Second // the interval the fleet must sustain
	fleetWarmup   = 3
	fleetMeasured = 10
)

// fleetSizes are the fleets measured; then BenchmarkFleet doubles the
// size from the last one while a tick's database time stays under
// fleetTick, to find the largest fleet this machine's PostgreSQL
// sustains.
var fleetSizes = []int{1, 10, 50, 100}

// BenchmarkFleet: one PostgreSQL cluster (Debian's, a throwaway cluster
// on a Unix socket, fsync on) and N simulated nodes, each a real
// fleet.Client in this process with its own connection, 10,000 users with
// a limit, of whom 10% move each tick (on their home node, 1 in 10 of them
// on a second node too). At each tick every node syncs at once, as the
// nodes of a fleet would within a tick: its report (the counts of its
// moving users and their lease requests) and the changes of every user
// any node moved. Reported per size: the database time of a tick (from
// the tick's start until the last node's sync returned; median and the
// slowest), a node's sync latency (median and the slowest), the CPU the
// simulated nodes themselves used (they share the machine's two cores with
// PostgreSQL), and the round trips per node per tick.
func BenchmarkFleet(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root to run PostgreSQL as postgres: run `make bench`")
	}
	if _, err := pgtest.Bin(); err != nil {
		b.Skip(err)
	}
	pg := pgtest.Start(b, pgtest.Options{MaxConnections: 1100, Settings: []string{"shared_buffers = 256MB"}})
	largest, over := 0, 0
	run := func(n int) {
		var tick time.Duration
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			for range b.N {
				tick = runFleet(b, pg, n)
			}
		})
		if tick > 0 && tick <= fleetTick {
			largest = max(largest, n)
		} else if over == 0 || n < over {
			over = n
		}
	}
	for _, n := range fleetSizes {
		run(n)
	}
	// Double while it holds, then halve the gap once.
	for over == 0 && largest < 1000 {
		run(min(2*largest, 1000))
	}
	if over > 0 && over-largest > largest/4 {
		run((largest + over) / 2)
	}
	fmt.Printf("BenchmarkFleet: the largest fleet sustained at a %v tick: %d nodes (%d did not hold)\n", fleetTick, largest, over)
}

// runFleet measures one size and returns the database time of its slowest
// tick: a fleet is sustained when every tick fits in the interval.
func runFleet(b *testing.B, pg *pgtest.Cluster, n int) time.Duration {
	db := fmt.Sprintf("bench%d", n)
	dsn := pg.CreateDB(b, db)
	ctx := context.Background()
	nodes := make([]*fleet.Client, n)
	for i := range nodes {
		c, err := fleet.Connect(ctx, fleet.Options{DSN: dsn, Node: fmt.Sprintf("node%03d", i), Metric: quota.Total})
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		nodes[i] = c
	}
	// Every user has a plan with a limit, and a row from its home node.
	pg.SQL(b, db, fmt.Sprintf(`INSERT INTO plans (name, has_line, limit_bytes, plan_at)
		SELECT 'u' || lpad(i::text, 5, '0'), true, 10737418240, now() FROM generate_series(0, %d) i`, fleetUsers-1))
	name := func(u int) string { return fmt.Sprintf("u%05d", u) }
	// Each node's cumulative counts of its users.
	counts := make([]map[int]uint64, n)
	leases := make([]map[int]uint64, n)
	for i := range counts {
		counts[i], leases[i] = map[int]uint64{}, map[int]uint64{}
	}
	rng := rand.New(rand.NewPCG(uint64(n), 7))
	// The first sync of each node reads every user.
	for i, c := range nodes {
		if _, err := c.Sync(ctx, &fleet.Report{}); err != nil {
			b.Fatalf("node %d: %v", i, err)
		}
	}
	var ticks, lat []time.Duration
	var cpu time.Duration
	trips := 0
	for t := range fleetWarmup + fleetMeasured {
		reports := make([]*fleet.Report, n)
		for i := range reports {
			reports[i] = &fleet.Report{}
		}
		for _, u := range rng.Perm(fleetUsers)[:fleetUsers/fleetMoving] {
			homes := []int{u % n}
			if n > 1 && rng.IntN(fleetSecond) == 0 {
				homes = append(homes, (u+1+rng.IntN(n-1))%n)
			}
			for _, h := range homes {
				counts[h][u] += uint64(1 + rng.IntN(4<<20))
				r := reports[h]
				r.Usage = append(r.Usage, fleet.Usage{Name: name(u), Period: 1, Down: counts[h][u]})
				r.Leases = append(r.Leases, fleet.LeaseReq{Name: name(u), Period: 1, Held: leases[h][u], Rate: 1 << 20})
			}
		}
		before := 0
		for _, c := range nodes {
			before += c.RoundTrips
		}
		var wg sync.WaitGroup
		var mu sync.Mutex
		var tickLat []time.Duration
		cpu0 := cpuTime()
		start := time.Now()
		for i, c := range nodes {
			wg.Go(func() {
				s := time.Now()
				res, err := c.Sync(ctx, reports[i])
				d := time.Since(s)
				if err != nil {
					b.Errorf("node %d: %v", i, err)
					return
				}
				mu.Lock()
				tickLat = append(tickLat, d)
				for _, g := range res.Grants {
					var u int
					fmt.Sscanf(g.Name, "u%05d", &u)
					leases[i][u] = g.Ceiling
				}
				mu.Unlock()
			})
		}
		wg.Wait()
		took := time.Since(start)
		if t >= fleetWarmup {
			cpu += cpuTime() - cpu0
			ticks = append(ticks, took)
			lat = append(lat, tickLat...)
			after := 0
			for _, c := range nodes {
				after += c.RoundTrips
			}
			trips += after - before
		}
	}
	slices.Sort(ticks)
	slices.Sort(lat)
	med := ticks[len(ticks)/2]
	b.ReportMetric(float64(cpu.Microseconds())/1000/fleetMeasured, "ms-client-cpu/tick")
	b.ReportMetric(float64(med.Microseconds())/1000, "ms-db/tick")
	b.ReportMetric(float64(ticks[len(ticks)-1].Microseconds())/1000, "ms-db/slowest-tick")
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "ms/node-sync")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "ms/slowest-node-sync")
	b.ReportMetric(float64(trips)/float64(n*fleetMeasured), "roundtrips/node/tick")
	return ticks[len(ticks)-1]
}

// cpuTime is the CPU time this process (the simulated nodes) used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
