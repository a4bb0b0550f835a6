package bpf_test

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
)

func stats(t *testing.T, dp *bpf.Datapath) bpf.Stats {
	t.Helper()
	st, err := dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// Stats sums every CPU's slot of every counter, each into its own field.
func TestStatsSumsEveryCPU(t *testing.T) {
	e := newEnv(t)
	if st := stats(t, e.dp); st != (bpf.Stats{}) {
		t.Fatalf("stats of a new data plane: %+v", st)
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(e.pin, "bw_stats"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	// Slot k of CPU i holds (k+1)*1000 + i + 1: a field that reads one CPU,
	// or another field's slot, gets a different sum.
	want := [4]uint64{}
	for k := range want {
		per := make([]uint64, ncpu)
		for i := range per {
			per[i] = uint64(k+1)*1000 + uint64(i) + 1
			want[k] += per[i]
		}
		if err := m.Put(uint32(k), per); err != nil {
			t.Fatal(err)
		}
	}
	// The indexes of bw_stats in bwacct.c.
	got := stats(t, e.dp)
	if got != (bpf.Stats{CountersFull: want[0], DroppedBlocked: want[1], DroppedQuota: want[2], QuotaFull: want[3]}) {
		t.Errorf("Stats = %+v over %d CPUs, want %v", got, ncpu, want)
	}
}

// The kernel counts each event in its own field: packets of UIDs the
// counter map has no room for, packets dropped for a block, for a spent
// budget, and for a full quota map.
func TestStatsCountKernelEvents(t *testing.T) {
	const maxUIDs = 4
	e := newEnvWith(t, bpf.Config{MaxUIDs: maxUIDs})
	const size = 100                      // payload bytes per datagram
	const wire = size + 20 + 8            // over IPv4
	packets := func(line string) uint64 { // datagrams a helper's DONE line moved
		t.Helper()
		s, r, err := nettest.ParseDone(line)
		if err != nil {
			t.Fatal(err)
		}
		return s/size + r/size
	}
	eperm := func(p *nettest.Proc, what string) {
		t.Helper()
		if err := p.Wait(10 * time.Second); err == nil || !strings.Contains(p.Last(), "operation not permitted") {
			t.Errorf("%s: sender was not refused: %v %q", what, err, p.Last())
		}
	}

	// More UIDs than the counter map holds: the first maxUIDs to send or
	// receive get a slot, every packet of the others passes uncounted.
	const server = 2900
	srv := e.start(t, true, server, "udp-echo", listenAddr(e.net.B4))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	moved := map[uint32]uint64{}
	var clients []*nettest.Proc
	for uid := uint32(2901); uid <= 2906; uid++ {
		clients = append(clients, e.start(t, false, uid, "udp-client", addr, "10", fmt.Sprint(size)))
	}
	for i, c := range clients {
		moved[2901+uint32(i)] = packets(c.Expect(t, "DONE", 30*time.Second))
	}
	moved[server] = packets(srv.Expect(t, "DONE", 30*time.Second))
	counted := map[uint32]bpf.Counters{}
	if err := e.dp.Counters(counted); err != nil {
		t.Fatal(err)
	}
	var uncounted uint64
	for uid, n := range moved {
		if _, ok := counted[uid]; !ok {
			uncounted += n
		}
	}
	st := stats(t, e.dp)
	t.Logf("counted UIDs %v; stats %+v", counted, st)
	if len(counted) != maxUIDs {
		t.Errorf("%d UIDs counted in a map of %d", len(counted), maxUIDs)
	}
	if st.CountersFull != uncounted || uncounted < 3*20 {
		t.Errorf("CountersFull = %d, want %d: the packets of the %d UIDs without a slot", st.CountersFull, uncounted, len(moved)-len(counted))
	}
	if st.DroppedBlocked != 0 || st.DroppedQuota != 0 || st.QuotaFull != 0 {
		t.Errorf("drops without a policy: %+v", st)
	}

	// A blocked UID: its connect() (the UDP client connects its socket) is
	// refused by the connect hook before any packet, and what others send
	// to it is dropped at ingress.
	const blocked, peer = 2910, 2901
	setPolicy(t, e.dp, blocked, bpf.Policy{Blocked: true})
	before := st
	eperm(e.start(t, false, blocked, "udp-client", addr, "10", fmt.Sprint(size)), "blocked UID")
	ln := e.start(t, false, blocked, "udp-echo", listenAddr(e.net.A4))
	laddr := strings.Fields(ln.Expect(t, "ADDR", 5*time.Second))[1]
	if got := packets(e.start(t, true, peer, "udp-client", laddr, "10", fmt.Sprint(size)).Expect(t, "DONE", 30*time.Second)); got != 10 {
		t.Errorf("a blocked UID's listener echoed: %d datagrams moved, want the 10 sent", got)
	}
	st = stats(t, e.dp)
	if d := st.DroppedBlocked - before.DroppedBlocked; d != 10 {
		t.Errorf("DroppedBlocked grew by %d, want 10 (ten refused deliveries; the refused connect sends nothing): %+v", d, st)
	}
	if st.DroppedQuota != before.DroppedQuota || st.QuotaFull != before.QuotaFull {
		t.Errorf("a block counted as a budget drop: %+v", st)
	}

	// A budget of one datagram and a bit: the second is dropped.
	const budgeted = 2911
	setPolicy(t, e.dp, budgeted, bpf.Policy{Quota: bpf.Tx, Ceiling: wire + wire/2})
	before = st
	srv = e.start(t, true, server, "udp-echo", listenAddr(e.net.B4)) // the first one is done
	addr = strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	eperm(e.start(t, false, budgeted, "udp-client", addr, "10", fmt.Sprint(size)), "spent budget")
	st = stats(t, e.dp)
	if d := st.DroppedQuota - before.DroppedQuota; d != 1 || st.QuotaFull != before.QuotaFull {
		t.Errorf("DroppedQuota grew by %d, want 1 (the second datagram); %+v", d, st)
	}
	if used, err := e.dp.QuotaUsed(budgeted); err != nil || used != wire {
		t.Errorf("QuotaUsed = %d, %v; want %d", used, err, wire)
	}

	// A full quota map: the write path never leaves a quota entry without
	// a policy, and both maps hold maxUIDs, so only entries left behind by
	// someone deleting policies directly (bpftool) can fill it. Plant them.
	// A budgeted UID that then finds no room is refused: a budget that
	// cannot be tracked counts as spent.
	q, err := ebpf.LoadPinnedMap(filepath.Join(e.pin, "bw_quota_used"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	for uid := uint32(90001); uid < 90001+maxUIDs-1; uid++ { // the budgeted UID has the other
		if err := q.Put(uid, uint64(0)); err != nil {
			t.Fatal(err)
		}
	}
	const homeless = 2912
	setPolicy(t, e.dp, homeless, bpf.Policy{Quota: bpf.Tx, Ceiling: 1 << 30})
	before = st
	eperm(e.start(t, false, homeless, "udp-client", addr, "10", fmt.Sprint(size)), "full quota map")
	st = stats(t, e.dp)
	if d := st.QuotaFull - before.QuotaFull; d != 1 {
		t.Errorf("QuotaFull grew by %d, want 1: %+v", d, st)
	}
	// The kernel counts the drop as a budget drop too.
	if d := st.DroppedQuota - before.DroppedQuota; d != 1 {
		t.Errorf("DroppedQuota grew by %d with a full quota map, want 1: %+v", d, st)
	}
}
