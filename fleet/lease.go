package fleet

// The lease rule. A node may count a user, in the configured metric, up to
// an absolute ceiling on its own cumulative count in the usage period: its
// lease. The database keeps, for every node, the most it may be enforcing
// (leases.ceiling), and grants so that
//
//	Σ over nodes of max(ceiling, used) ≤ limit
//
// holds at every commit: whatever every node does with its lease, cut off
// or not, the sum of the counts stays within the limit. A grant only hands
// out what no node holds (free), plus the granting node's own room; a node
// gives room back by lowering its own kernel budget first and saying so in
// its next report (held), never the other way round, so the database never
// records less than a node may be enforcing. Held is the ceiling the node's
// kernel enforces, which may be above its lease: a lease lowered below what
// the node's kernel let through under the lease before holds that count.
//
// How the remainder is shared follows demand: the nodes that moved the
// user recently share it by their rates (one active node gets all of it
// that no other node holds, two share it by rate); a node where the user
// is idle gets a little room for a new connection to start before the
// next tick, the idle nodes together 1/32 of the remainder however many
// they are, so that an active node never waits for a crowd of idle ones.

// holder is what the database knows of one node's lease on a user in the
// current period.
type holder struct {
	node    string
	ceiling uint64 // the lease recorded (0: none)
	used    uint64 // the node's reported count, in the metric
	rate    uint64 // bytes a second at its last grant
	fresh   bool   // renewed recently: its rate counts
}

// grant returns the new lease of node me on a user with limit, given every
// node's row (me included, after this report's usage), the ceiling me
// enforces now (held) and its rate. The returned ceiling is what me should
// enforce from now on; record is what the database must keep for me
// (max(ceiling, held): me enforces held until it applies the grant);
// starved says that other nodes hold room me's share calls for.
func grant(limit uint64, me string, held, rate uint64, nodes []holder) (ceiling, record uint64, starved bool) {
	var used, holdOthers, myUsed, sumRate uint64
	for _, h := range nodes {
		used += h.used
		if h.node == me {
			myUsed = h.used
			continue
		}
		holdOthers += max(h.ceiling, h.used)
		if h.fresh {
			sumRate += h.rate
		}
	}
	sumRate += rate
	myHold := max(held, myUsed)
	var free uint64
	if limit > holdOthers+myHold {
		free = limit - holdOthers - myHold
	}
	var remaining uint64
	if limit > used {
		remaining = limit - used
	}
	var target uint64
	if rate == 0 {
		// Idle here: a little room for a connection to start, the idle
		// nodes together 1/32 of the remainder however many they are.
		target = remaining / (32 * uint64(max(len(nodes), 1)))
	} else {
		target = uint64(float64(remaining) * float64(rate) / float64(sumRate))
	}
	room := min(target, myHold-myUsed+free)
	ceiling = myUsed + room
	return ceiling, max(ceiling, held), room < target/2
}
