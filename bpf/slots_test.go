package bpf_test

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
)

// hashCounts reads id's entry in the pinned counter hash alone, summed over
// CPUs: what it moved before its slot.
func hashCounts(t *testing.T, pin string, id uint32) bpf.Counters {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(pin, "bw_hash_counts"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var per []bpf.Counters
	var c bpf.Counters
	if err := m.Lookup(id, &per); err != nil {
		return c
	}
	for _, v := range per {
		c.RxBytes += v.RxBytes
		c.RxPackets += v.RxPackets
		c.TxBytes += v.TxBytes
		c.TxPackets += v.TxPackets
	}
	return c
}

// putPinned writes v at key in the map pinned at path, as the agent or
// the programs would.
func putPinned(t *testing.T, path string, key uint32, v any) {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Put(key, v); err != nil {
		t.Fatal(err)
	}
}

// allReads checks that every way of reading id's counters agrees with
// want: CountersOf, Counters (EachCounter) and the pins.
func allReads(t *testing.T, e *env, id uint32, want bpf.Counters) {
	t.Helper()
	if c, err := e.dp.CountersOf(id); err != nil || c != want {
		t.Errorf("CountersOf(%d) = %+v, %v; want %+v", id, c, err, want)
	}
	if c := e.counters(t, id); c != want {
		t.Errorf("Counters[%d] = %+v, want %+v", id, c, want)
	}
	if c, err := bpf.PinnedCounters(e.pin, id); err != nil || c != want {
		t.Errorf("PinnedCounters(%d) = %+v, %v; want %+v", id, c, err, want)
	}
}

// An ID's first read gives it a slot: its later packets count there, not
// in the counter hash, and every read adds the two, to the byte and the
// packet, across a reload of the pins. When the slots run out, the IDs
// left count in the hash alone, exactly too.
func TestSlots(t *testing.T) {
	const maxUIDs = 3 // slots 1 and 2: for the first two IDs read
	e := newEnvWith(t, bpf.Config{MaxUIDs: maxUIDs})
	const user, server, late = 2801, 2802, 2803
	const count, size = 200, 500
	const wire = size + 20 + 8 // a datagram over IPv4
	// send sends count datagrams as uid to an echo server.
	sent := map[uint32]uint64{} // datagrams, by UID
	send := func(uid uint32) {
		t.Helper()
		srv := e.start(t, true, server, "udp-echo", listenAddr(e.net.B4))
		addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
		s, _ := e.start(t, false, uid, "udp-client", addr, strconv.Itoa(count), strconv.Itoa(size)).Done(t)
		srv.Done(t)
		if s != count*size {
			t.Fatalf("UID %d sent %d bytes, want %d", uid, s, count*size)
		}
		sent[uid] += count
	}
	moved := func() map[uint32]bpf.Counters {
		t.Helper()
		m := map[uint32]bpf.Counters{}
		if err := e.dp.EachMoved(func(uid uint32, c bpf.Counters) { m[uid] = c }); err != nil {
			t.Fatal(err)
		}
		return m
	}
	check := func(uid uint32, what string) bpf.Counters {
		t.Helper()
		c, err := e.dp.CountersOf(uid)
		if err != nil {
			t.Fatal(err)
		}
		if c.TxBytes != sent[uid]*wire || c.TxPackets != sent[uid] {
			t.Errorf("%s: UID %d sent %d datagrams = %d bytes, counted %+v", what, uid, sent[uid], sent[uid]*wire, c)
		}
		allReads(t, e, uid, c)
		return c
	}

	send(user)
	before := moved()[user] // the first read: user and server get their slots
	if c := check(user, "before its slot"); c != before {
		t.Errorf("EachMoved reported %+v, CountersOf %+v", before, c)
	}
	hash := hashCounts(t, e.pin, user)
	if hash != before {
		t.Fatalf("before its slot, the hash has %+v of %+v", hash, before)
	}
	for round := range 3 { // the first read of its entry since the slot, then the slot alone
		send(user)
		if c := moved()[user]; c != check(user, fmt.Sprintf("in its slot, round %d", round)) {
			t.Errorf("round %d: EachMoved reported %+v", round, c)
		}
		if h := hashCounts(t, e.pin, user); h != hash {
			t.Errorf("the hash entry of a UID with a slot grew: %+v -> %+v", hash, h)
		}
	}

	// A packet that read no slot yet when the slot was given counts in the
	// hash entry and marks the ID: EachMoved reads the entry again. (Written
	// here as such a packet would.) Without the mark, EachMoved keeps the
	// entry it read last, and the next full read finds the change.
	straggler := bpf.Counters{TxBytes: wire, TxPackets: 1}
	grow := func(mark bool) {
		t.Helper()
		h, err := ebpf.LoadPinnedMap(filepath.Join(e.pin, "bw_hash_counts"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer h.Close()
		var per []bpf.Counters
		if err := h.Lookup(uint32(user), &per); err != nil {
			t.Fatal(err)
		}
		per[0].TxBytes += straggler.TxBytes
		per[0].TxPackets += straggler.TxPackets
		if err := h.Put(uint32(user), per); err != nil {
			t.Fatal(err)
		}
		sent[user]++
		if mark {
			m, err := ebpf.LoadPinnedMap(filepath.Join(e.pin, "bw_moved"), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			if err := m.Put(uint32(user/8), uint64(1)<<(8*(user%8))); err != nil {
				t.Fatal(err)
			}
		}
	}
	grow(true)
	if c := moved()[user]; c != check(user, "a straggler") {
		t.Errorf("EachMoved after a straggler reported %+v", c)
	}
	grow(false)
	send(user) // marks the slot alone
	if c := moved()[user]; c.TxBytes != (sent[user]-1)*wire {
		t.Errorf("EachMoved reported %+v, want %d bytes sent: the slot's counters and the entry as last read", c, (sent[user]-1)*wire)
	}
	check(user, "an unmarked change, at a full read")
	hash = hashCounts(t, e.pin, user)

	// The slots are kept with the pins.
	if err := e.dp.Close(); err != nil {
		t.Fatal(err)
	}
	send(user)
	e.dp = e.load(t)
	check(user, "after a reload")
	if h := hashCounts(t, e.pin, user); h != hash {
		t.Errorf("after a reload, the hash entry of a UID with a slot grew: %+v -> %+v", hash, h)
	}

	// No slot left for a third ID (2 of maxUIDs-1 given): its hash entry
	// goes on growing, and it is counted just as exactly.
	send(late)
	moved()
	send(late)
	if c := check(late, "without a slot"); hashCounts(t, e.pin, late) != c {
		t.Errorf("a UID without a slot is counted outside the hash: %+v of %+v", hashCounts(t, e.pin, late), c)
	}
}

// An account's slot is counted as a UID's: a claimed connection after the
// account's first read counts in the slot, and the reads add both.
func TestAccountSlot(t *testing.T) {
	e := newXrayEnv(t)
	srv, port := e.xrayServer(t, listenAddr(e.net.B4), false)
	acct := account(t, e.dp, "slotted")
	download := func() {
		t.Helper()
		const down = 1 << 20
		cli := e.start(t, false, xrayClient, "tcp-client", net.JoinHostPort(e.net.B4.String(), strconv.Itoa(int(port))), "0", "inf")
		cli.Progress(t, 100*time.Millisecond)
		claimOf(t, e.dp, srv, port, acct)
		_, recv := cli.Progress(t, 300*time.Millisecond)
		cli.Cmd.Process.Kill()
		if recv < down {
			t.Fatalf("the client received %d bytes, want at least %d", recv, down)
		}
	}
	download()
	first := map[uint32]bpf.Counters{}
	if err := e.dp.EachMoved(func(id uint32, c bpf.Counters) { first[id] = c }); err != nil {
		t.Fatal(err)
	}
	if first[acct].RxBytes == 0 {
		t.Fatalf("the claimed connection was not counted for the account: %+v", first)
	}
	hash := hashCounts(t, e.pin, acct)
	download()
	time.Sleep(200 * time.Millisecond) // the last packets of the killed client settle
	c, err := e.dp.CountersOf(acct)
	if err != nil {
		t.Fatal(err)
	}
	if c.RxBytes < first[acct].RxBytes+1<<20 {
		t.Errorf("the second download was not counted for the account: %+v after %+v", c, first[acct])
	}
	if h := hashCounts(t, e.pin, acct); h != hash {
		t.Errorf("the account's hash entry grew after its slot: %+v -> %+v", hash, h)
	}
	allReads(t, e, acct, c)
}

// The counter pins are one epoch: a bw_counters pin (an agent without
// slots: an earlier version, or one downgraded to) is renamed and keeps its
// counts and its epoch, and replaces any slot maps beside it; the three pins
// are reused together, or all made anew when one is missing.
func TestCounterPins(t *testing.T) {
	nettest.RequireRoot(t)
	root, err := bpf.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	cfg := bpf.Config{CgroupPath: nettest.NewCgroup(t, root), PinPath: filepath.Join("/sys/fs/bpf", nettest.Name("bwtest-"))}
	t.Cleanup(func() { bpf.Uninstall(cfg.PinPath) })
	const uid = 2804
	pin := func(name string) string { return filepath.Join(cfg.PinPath, name) }
	load := func() (*bpf.Datapath, bpf.Epoch, bpf.Counters) {
		t.Helper()
		dp, err := bpf.Load(cfg)
		if err != nil {
			t.Fatal(err)
		}
		epoch, err := dp.Epoch()
		if err != nil {
			t.Fatal(err)
		}
		c, err := dp.CountersOf(uid)
		if err != nil {
			t.Fatal(err)
		}
		if err := dp.Close(); err != nil {
			t.Fatal(err)
		}
		return dp, epoch, c
	}
	put := func(name string, key uint32, v any) {
		t.Helper()
		putPinned(t, pin(name), key, v)
	}
	// putSlot writes c as slot's counters: received at slot, sent at
	// 65,536 + slot (see bw_slot_counts).
	putSlot := func(slot uint32, c bpf.Counters) {
		t.Helper()
		put("bw_slot_counts", slot, [2]uint64{c.RxBytes, c.RxPackets})
		put("bw_slot_counts", 1<<16+slot, [2]uint64{c.TxBytes, c.TxPackets})
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	perCPU := func(c bpf.Counters) []bpf.Counters {
		v := make([]bpf.Counters, ncpu)
		v[0] = c
		return v
	}
	// legacy pins a counter hash as an agent without slots made it, with
	// c for uid.
	legacy := func(c bpf.Counters) uint32 {
		t.Helper()
		m, err := ebpf.NewMap(&ebpf.MapSpec{
			Name: "bw_counters", Type: ebpf.PerCPUHash, KeySize: 4, ValueSize: 32,
			MaxEntries: bpf.DefaultMaxUIDs, Flags: 1, // BPF_F_NO_PREALLOC
		})
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if err := m.Put(uint32(uid), perCPU(c)); err != nil {
			t.Fatal(err)
		}
		if err := m.Pin(pin("bw_counters")); err != nil {
			t.Fatal(err)
		}
		info, err := m.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		return uint32(id)
	}
	if err := os.MkdirAll(cfg.PinPath, 0o700); err != nil {
		t.Fatal(err)
	}

	// An upgrade: the earlier version's counts and epoch go on.
	old := bpf.Counters{RxBytes: 1000, RxPackets: 10, TxBytes: 2000, TxPackets: 20}
	oldMap := legacy(old)
	_, epoch, c := load()
	if c != old || epoch.CounterMap != oldMap {
		t.Fatalf("after an upgrade: counters %+v, epoch %+v; want %+v, map %d", c, epoch, old, oldMap)
	}
	if _, err := os.Stat(pin("bw_counters")); !os.IsNotExist(err) {
		t.Errorf("the bw_counters pin is still there: %v", err)
	}

	// Slots are reused with the hash: a slot with counts (written here as
	// the agent and the programs would) is read after a reload.
	inSlot := bpf.Counters{RxBytes: 300, RxPackets: 3, TxBytes: 400, TxPackets: 4}
	put("bw_slots", uid/4, uint64(1)<<(16*(uid%4)))
	putSlot(1, inSlot)
	if _, again, c := load(); again != epoch || c != (bpf.Counters{RxBytes: 1300, RxPackets: 13, TxBytes: 2400, TxPackets: 24}) {
		t.Errorf("after a reload: counters %+v, epoch %+v; want the hash and the slot, epoch %+v", c, again, epoch)
	}

	// A downgrade and an upgrade again: the agent without slots made a new
	// bw_counters (its own epoch); its counts alone are this one's.
	newer := bpf.Counters{RxBytes: 5, RxPackets: 1, TxBytes: 7, TxPackets: 1}
	newerMap := legacy(newer)
	if _, again, c := load(); c != newer || again.CounterMap != newerMap {
		t.Errorf("after a downgrade: counters %+v, epoch %+v; want %+v, map %d", c, again, newer, newerMap)
	}

	// A slot pin removed by hand: the three are made anew, a new epoch.
	put("bw_slots", uid/4, uint64(1)<<(16*(uid%4)))
	putSlot(1, inSlot)
	if err := os.Remove(pin("bw_slot_counts")); err != nil {
		t.Fatal(err)
	}
	if _, again, c := load(); c != (bpf.Counters{}) || again.CounterMap == newerMap {
		t.Errorf("a slot pin removed: counters %+v, epoch %+v; want new, empty counters", c, again)
	}
	for _, name := range []string{"bw_hash_counts", "bw_slots", "bw_slot_counts"} {
		if _, err := os.Stat(pin(name)); err != nil {
			t.Errorf("pin %s: %v", name, err)
		}
	}
}

// TestSlotCountsMigrated: the per-CPU bw_slot_counts of an earlier agent
// (made here as that agent made it, with a UID's counts in its slot on two
// CPUs, and what the UID moved before in its hash entry) is kept, frozen,
// as bw_slot_counts_percpu: the UID's counters are the same after the
// upgrade, in the same epoch; its new packets count in the new, shared
// slot; a reload counts nothing twice; and a migration stopped between its
// two renames is completed by the next load.
func TestSlotCountsMigrated(t *testing.T) {
	e := newEnv(t)
	const user, server = 2806, 2807
	const count, size = 100, 500
	const wire = size + 20 + 8 // a datagram over IPv4
	pin := func(name string) string { return filepath.Join(e.pin, name) }
	epoch, err := e.dp.Epoch()
	if err != nil {
		t.Fatal(err)
	}
	if err := e.dp.Close(); err != nil {
		t.Fatal(err)
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	put := func(name string, key uint32, v any) {
		t.Helper()
		putPinned(t, pin(name), key, v)
	}
	hashed := bpf.Counters{RxBytes: 1000, RxPackets: 10, TxBytes: 2000, TxPackets: 20}
	perCPU := make([]bpf.Counters, ncpu)
	perCPU[0] = hashed
	put("bw_hash_counts", user, perCPU)
	put("bw_slots", user/4, uint64(1)<<(16*(user%4)))
	inSlot := bpf.Counters{RxBytes: 300, RxPackets: 3, TxBytes: 400, TxPackets: 4}
	perCPU = make([]bpf.Counters, ncpu)
	perCPU[0] = inSlot
	perCPU[ncpu-1].TxBytes += 50 // on a second CPU if there is one
	inSlot.TxBytes += 50
	if err := os.Remove(pin("bw_slot_counts")); err != nil {
		t.Fatal(err)
	}
	old, err := ebpf.NewMap(&ebpf.MapSpec{
		Name: "bw_slot_counts", Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 32, MaxEntries: 8192,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := old.Put(uint32(1), perCPU); err != nil {
		t.Fatal(err)
	}
	// An account in slot 2, its counts all in the old slot.
	acct := bpf.AccountBase + 5
	acctIdx := uint32(1<<20 + 5) // its index in bw_slots
	acctWant := bpf.Counters{RxBytes: 70, RxPackets: 1, TxBytes: 90, TxPackets: 2}
	perCPU = make([]bpf.Counters, ncpu)
	perCPU[0] = acctWant
	if err := old.Put(uint32(2), perCPU); err != nil {
		t.Fatal(err)
	}
	put("bw_slots", acctIdx/4, uint64(2)<<(16*(acctIdx%4)))
	// A UID far up, given slot 9,000 (past the old map's 8,192) by hand:
	// its hash entry alone, in a window of bw_slots beyond its first page.
	const high = 700001
	highWant := bpf.Counters{RxBytes: 11, RxPackets: 1, TxBytes: 13, TxPackets: 1}
	perCPU = make([]bpf.Counters, ncpu)
	perCPU[0] = highWant
	put("bw_hash_counts", high, perCPU)
	put("bw_slots", high/4, uint64(9000)<<(16*(high%4)))
	if err := old.Pin(pin("bw_slot_counts")); err != nil {
		t.Fatal(err)
	}
	old.Close()
	// The earlier agent's bw_slot_moved, sized for its 8,192 slots.
	if err := os.Remove(pin("bw_slot_moved")); err != nil {
		t.Fatal(err)
	}
	oldMoved, err := ebpf.NewMap(&ebpf.MapSpec{
		Name: "bw_slot_moved", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 8192 / 8,
		Flags: 0x400, // BPF_F_MMAPABLE
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := oldMoved.Pin(pin("bw_slot_moved")); err != nil {
		t.Fatal(err)
	}
	oldMoved.Close()
	want := hashed
	want.RxBytes += inSlot.RxBytes
	want.RxPackets += inSlot.RxPackets
	want.TxBytes += inSlot.TxBytes
	want.TxPackets += inSlot.TxPackets
	check := func(what string) {
		t.Helper()
		allReads(t, e, acct, acctWant)
		allReads(t, e, high, highWant)
		if c, err := e.dp.CountersOf(user); err != nil || c != want {
			t.Errorf("%s: CountersOf = %+v, %v; want %+v", what, c, err, want)
		}
		allReads(t, e, user, want)
		if got, err := e.dp.Epoch(); err != nil || got != epoch {
			t.Errorf("%s: epoch %+v, %v; want %+v", what, got, err, epoch)
		}
		for name, typ := range map[string]ebpf.MapType{"bw_slot_counts": ebpf.Array, "bw_slot_counts_percpu": ebpf.PerCPUArray} {
			m, err := ebpf.LoadPinnedMap(pin(name), nil)
			if err != nil {
				t.Errorf("%s: pin %s: %v", what, name, err)
				continue
			}
			if m.Type() != typ {
				t.Errorf("%s: pin %s is a %v, want a %v", what, name, m.Type(), typ)
			}
			m.Close()
		}
		if _, err := os.Stat(pin("bw_slot_counts_new")); !os.IsNotExist(err) {
			t.Errorf("%s: bw_slot_counts_new left: %v", what, err)
		}
	}

	e.dp = e.load(t)
	check("after the upgrade")

	// New packets count in the shared slot; the hash entry stays.
	srv := e.start(t, true, server, "udp-echo", listenAddr(e.net.B4))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	s, r := e.start(t, false, user, "udp-client", addr, strconv.Itoa(count), strconv.Itoa(size)).Done(t)
	if s != count*size || r%size != 0 {
		t.Fatalf("sent %d bytes, want %d; received %d", s, count*size, r)
	}
	srv.Done(t)
	want.TxBytes += count * wire
	want.TxPackets += count
	want.RxBytes += uint64(r/size) * wire // the echoes
	want.RxPackets += uint64(r / size)
	moved := map[uint32]bpf.Counters{}
	if err := e.dp.EachMoved(func(uid uint32, c bpf.Counters) { moved[uid] = c }); err != nil {
		t.Fatal(err)
	}
	if moved[user] != want {
		t.Errorf("EachMoved: %+v, want %+v", moved[user], want)
	}
	check("after new packets")
	if h := hashCounts(t, e.pin, user); h != hashed {
		t.Errorf("the hash entry grew: %+v, want %+v", h, hashed)
	}

	if err := e.dp.Close(); err != nil {
		t.Fatal(err)
	}
	e.dp = e.load(t)
	check("after a reload")

	// Stopped after the first rename: the new map is still under its
	// temporary name.
	if err := e.dp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(pin("bw_slot_counts"), pin("bw_slot_counts_new")); err != nil {
		t.Fatal(err)
	}
	e.dp = e.load(t)
	check("after a migration stopped between its renames")
}
