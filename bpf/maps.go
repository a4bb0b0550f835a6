package bpf

import (
	"errors"
	"fmt"
	"math"
	"unsafe"

	"github.com/cilium/ebpf"
)

// batchSize is the number of entries read per map syscall. A hash map batch
// must hold a whole bucket; 4096 is far above any bucket's length.
const batchSize = 4096

// Counters reads every UID's counters, summed over CPUs, into dst, which it
// clears first. It reads in batches of thousands of UIDs per syscall.
func (d *Datapath) Counters(dst map[uint32]Counters) error {
	clear(dst)
	return d.EachCounter(func(uid uint32, c Counters) { dst[uid] = c })
}

// Protected reports whether uid can never be blocked or budgeted: one of
// uidguard.Always or Config.ProtectedUIDs.
func (d *Datapath) Protected(uid uint32) bool { return d.protected.Has(uid) }

// policyBitsUIDs must match POLICY_BITS_UIDS in bwacct.c: UIDs below it
// have a bit in bw_policy_bits.
const policyBitsUIDs = 1 << 20

// readBits returns every word of bw_policy_bits, through its memory
// mapping when it has one (one copy; a batch lookup of 16,384 words costs
// milliseconds).
func (d *Datapath) readBits() ([]uint64, error) {
	bits := make([]uint64, policyBitsUIDs/64)
	if mem, err := d.objs.BwPolicyBits.Memory(); err == nil {
		buf := unsafe.Slice((*byte)(unsafe.Pointer(&bits[0])), len(bits)*8)
		if _, err := mem.ReadAt(buf, 0); err != nil {
			return nil, fmt.Errorf("read policy bits: %w", err)
		}
		return bits, nil
	}
	keys := make([]uint32, len(bits))
	var cursor ebpf.MapBatchCursor
	n, err := d.objs.BwPolicyBits.BatchLookup(&cursor, keys, bits, nil)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, fmt.Errorf("read policy bits: %w", err)
	}
	if n != len(bits) {
		return nil, fmt.Errorf("read policy bits: got %d of %d words", n, len(bits))
	}
	return bits, nil
}

// wordEdit is one word of bw_policy_bits: its value in the kernel and the
// value it must end with.
type wordEdit struct{ have, want uint64 }

// policyBatch is one call of writePolicies.
type policyBatch struct {
	putKeys  []uint32
	putVals  []bwacctPolicy
	putRates []Rate   // the caps of putKeys' policies
	dels     []uint32 // UIDs whose policy and quota accounting go
	// words are bitmap words the caller has read, by index, with the
	// value each must end with (ReconcilePolicies' repairs). The bits of
	// puts and deletes are added by writePolicies.
	words map[uint32]*wordEdit
	// read returns a word of the bitmap that words lacks; nil means a map
	// lookup.
	read func(word uint32) (uint64, error)
}

// set queues p for uid; the zero Policy deletes uid's policy.
func (b *policyBatch) set(uid uint32, p Policy) {
	if p.isZero() {
		b.dels = append(b.dels, uid)
		return
	}
	b.putKeys = append(b.putKeys, uid)
	b.putVals = append(b.putVals, p.encode())
	b.putRates = append(b.putRates, p.Rate)
}

// writePolicies is the only writer of bw_policy, bw_policy_bits and
// bw_rates, and the only deleter of bw_quota_used entries. It puts b's policies and
// deletes b's UIDs' policies with their quota accounting, in the order the
// programs rely on: a policy whose bit is clear is never looked at, so the
// bits of new policies are set before the policies are written, and the
// bits of deleted ones are cleared only after the policies are gone. Words
// in b.words move to their want value in the same two steps. It returns the
// number of policies written or deleted. d.mu must be held.
func (d *Datapath) writePolicies(b *policyBatch) (int, error) {
	if b.words == nil {
		b.words = make(map[uint32]*wordEdit)
	}
	mark := func(uids []uint32, on bool) error {
		for _, uid := range uids {
			if uid >= policyBitsUIDs {
				continue // no bit: the programs always look these up
			}
			i := uid / 64
			w := b.words[i]
			if w == nil {
				var v uint64
				var err error
				if b.read != nil {
					v, err = b.read(i)
				} else {
					err = d.objs.BwPolicyBits.Lookup(i, &v)
				}
				if err != nil {
					return fmt.Errorf("read policy bits of UID %d: %w", uid, err)
				}
				w = &wordEdit{have: v, want: v}
				b.words[i] = w
			}
			if on {
				w.want |= 1 << (uid % 64)
			} else {
				w.want &^= 1 << (uid % 64)
			}
		}
		return nil
	}
	if err := mark(b.putKeys, true); err != nil {
		return 0, err
	}
	if err := mark(b.dels, false); err != nil {
		return 0, err
	}
	// Set bits first: have | want holds every bit of the old and the new
	// policies.
	if err := d.writeWords(b.words, func(w *wordEdit) uint64 { return w.have | w.want }); err != nil {
		return 0, err
	}
	// Buckets before the policies that name them: a policy whose bucket
	// is missing caps nothing for a moment, never something wrong.
	for i, uid := range b.putKeys {
		if err := d.writeRates(uid, decodePolicy(b.putVals[i]), b.putRates[i]); err != nil {
			return 0, err
		}
	}
	if len(b.putKeys) > 0 {
		if _, err := d.objs.BwPolicy.BatchUpdate(b.putKeys, b.putVals, nil); err != nil {
			return 0, fmt.Errorf("write policies: %w", err)
		}
	}
	n := len(b.putKeys)
	for _, uid := range b.dels {
		if err := d.writeRates(uid, Policy{}, Rate{}); err != nil {
			return n, err
		}
		if err := d.objs.BwPolicy.Delete(uid); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return n, fmt.Errorf("delete policy of UID %d: %w", uid, err)
		}
		if err := d.objs.BwQuotaUsed.Delete(uid); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return n, fmt.Errorf("delete quota of UID %d: %w", uid, err)
		}
		n++
	}
	// Then clear the bits whose policies are gone.
	if err := d.writeWords(b.words, func(w *wordEdit) uint64 { return w.want }); err != nil {
		return n, err
	}
	return n, nil
}

// nanobytes is a byte in the buckets' unit (struct bucket in bwacct.c).
const nanobytes = 1_000_000_000

// rateKeys returns the keys of an ID's two buckets in bw_rates, download
// (Rx) first.
func rateKeys(id uint32) [2]bwacctRateKey {
	return [2]bwacctRateKey{{Id: id, Tx: 0}, {Id: id, Tx: 1}}
}

// writeRates makes the buckets that uid's policy p (its other fields, as
// the kernel will read them) uses hold the caps of r: each capped direction
// a bucket of its rate under p's rate key, written only if its rate or
// depth differ (a rewrite refills it), and uid's own buckets removed in
// the directions it does not cap under its own ID (no cap, or its caps
// under another ID's key). d.mu must be held.
func (d *Datapath) writeRates(uid uint32, p Policy, r Rate) error {
	key := p.rateKey(uid)
	own := rateKeys(uid)
	for dir, rate := range [2]uint64{r.Rx, r.Tx} {
		if rate == 0 || key != uid {
			if err := d.objs.BwRates.Delete(own[dir]); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("delete speed cap of ID %d: %w", uid, err)
			}
		}
		if rate == 0 {
			continue
		}
		rate = min(rate, MaxRate)
		want := bwacctBucket{Rate: rate, Depth: Burst(rate) * nanobytes}
		k := rateKeys(key)[dir]
		var have bwacctBucket
		if err := d.objs.BwRates.Lookup(k, &have); err == nil && have.Rate == want.Rate && have.Depth == want.Depth {
			continue
		}
		if err := d.objs.BwRates.Update(k, want, ebpf.UpdateLock); err != nil {
			return fmt.Errorf("write speed cap of ID %d: %w", key, err)
		}
	}
	return nil
}

// bucketRate is the rate a bucket is given: 0 for one whose depth is not
// its rate's (someone changed it: the next write repairs it).
func bucketRate(b bwacctBucket) uint64 {
	if b.Depth != Burst(b.Rate)*nanobytes {
		return 0
	}
	return b.Rate
}

// readRates reads every bucket of bw_rates: its rate by key, 0 for a
// bucket whose depth is not the one its rate is given (someone changed
// it: the next write repairs it).
func (d *Datapath) readRates() (map[bwacctRateKey]uint64, error) {
	out := make(map[bwacctRateKey]uint64)
	var k bwacctRateKey
	var v bwacctBucket
	it := d.objs.BwRates.Iterate()
	for it.Next(&k, &v) {
		out[k] = bucketRate(v)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read speed caps: %w", err)
	}
	return out, nil
}

// withRate returns p, decoded from the kernel's policy of id, with the caps
// of its buckets in rates.
func withRate(id uint32, v bwacctPolicy, rates map[bwacctRateKey]uint64) Policy {
	p := decodePolicy(v)
	keys := rateKeys(p.rateKey(id))
	if v.Flags&flagRateRx != 0 {
		p.Rate.Rx = rates[keys[0]]
	}
	if v.Flags&flagRateTx != 0 {
		p.Rate.Tx = rates[keys[1]]
	}
	return p
}

// writeWords writes to bw_policy_bits every word whose value to(w)
// differs from what the kernel has, in one batch.
func (d *Datapath) writeWords(words map[uint32]*wordEdit, to func(*wordEdit) uint64) error {
	var keys []uint32
	var vals []uint64
	for i, w := range words {
		if v := to(w); v != w.have {
			keys, vals = append(keys, i), append(vals, v)
		}
	}
	if len(keys) == 0 {
		return nil
	}
	if _, err := d.objs.BwPolicyBits.BatchUpdate(keys, vals, nil); err != nil {
		return fmt.Errorf("write policy bits: %w", err)
	}
	for k, i := range keys {
		words[i].have = vals[k]
	}
	return nil
}

// refuseProtected returns an error wrapping ErrProtectedUID if policies
// gives a protected UID a non-zero policy.
func (d *Datapath) refuseProtected(policies map[uint32]Policy) error {
	for uid, p := range policies {
		if !p.isZero() && d.protected.Has(uid) {
			return fmt.Errorf("%w: %d", ErrProtectedUID, uid)
		}
	}
	return nil
}

// Policy returns the policy the kernel enforces for uid.
func (d *Datapath) Policy(uid uint32) (Policy, error) {
	var v bwacctPolicy
	err := d.objs.BwPolicy.Lookup(uid, &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Policy{}, nil
	}
	if err != nil {
		return Policy{}, fmt.Errorf("read policy of UID %d: %w", uid, err)
	}
	rates := make(map[bwacctRateKey]uint64)
	for _, k := range rateKeys(decodePolicy(v).rateKey(uid)) {
		var b bwacctBucket
		if err := d.objs.BwRates.Lookup(k, &b); err == nil {
			rates[k] = bucketRate(b)
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return Policy{}, fmt.Errorf("read speed cap of UID %d: %w", uid, err)
		}
	}
	return withRate(uid, v, rates), nil
}

// Policies returns every UID's policy as the kernel has it.
func (d *Datapath) Policies() (map[uint32]Policy, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[uint32]Policy)
	err := d.eachPolicy(func(id uint32, p Policy) { out[id] = p })
	return out, err
}

// eachPolicy calls fn with every policy the kernel has, with its caps, a
// batch at a time into buffers it keeps (d.mu held): nothing of the size
// of the map is kept.
func (d *Datapath) eachPolicy(fn func(id uint32, p Policy)) error {
	rates, err := d.readRates()
	if err != nil {
		return err
	}
	if d.policyKeys == nil {
		d.policyKeys = make([]uint32, batchSize)
		d.policyVals = make([]bwacctPolicy, batchSize)
	}
	keys, vals := d.policyKeys, d.policyVals
	var cursor ebpf.MapBatchCursor
	for {
		n, err := d.objs.BwPolicy.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			fn(keys[i], withRate(keys[i], vals[i], rates))
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read policies: %w", err)
		}
	}
}

// ReconcilePolicies makes the kernel's policy map equal to desired: it
// writes only the entries that differ and deletes the UIDs desired lacks,
// and repairs the policy bits. It returns the number of policies written or
// deleted. A protected UID in desired is an error and nothing is changed.
//
// It reads the kernel's policies a batch at a time and compares each with
// desired as it goes, keeping no copy of the map (a map of 50,000 policies
// is 4 MB); only if fewer of desired's policies were found than it holds
// does it look up which are missing.
func (d *Datapath) ReconcilePolicies(desired map[uint32]Policy) (int, error) {
	if err := d.refuseProtected(desired); err != nil {
		return 0, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	haveBits, err := d.readBits()
	if err != nil {
		return 0, err
	}
	wantBits := make([]uint64, len(haveBits))
	for uid, p := range desired {
		if !p.isZero() && uid < policyBitsUIDs {
			wantBits[uid/64] |= 1 << (uid % 64)
		}
	}
	b := policyBatch{
		words: make(map[uint32]*wordEdit),
		read:  func(i uint32) (uint64, error) { return haveBits[i], nil },
	}
	for i := range wantBits {
		if wantBits[i] != haveBits[i] {
			b.words[uint32(i)] = &wordEdit{have: haveBits[i], want: wantBits[i]}
		}
	}
	want, found := 0, 0 // desired's policies, and those the kernel has
	for _, p := range desired {
		if !p.isZero() {
			want++
		}
	}
	err = d.eachPolicy(func(uid uint32, cur Policy) {
		switch p, ok := desired[uid]; {
		case !ok || p.isZero():
			b.set(uid, Policy{})
		case cur != canonical(p):
			found++
			b.set(uid, p)
		default:
			found++
		}
	})
	if err != nil {
		return 0, err
	}
	if found < want { // some are missing (a repair): which?
		present := make(map[uint32]bool, found)
		if err := d.eachPolicy(func(uid uint32, _ Policy) { present[uid] = true }); err != nil {
			return 0, err
		}
		for uid, p := range desired {
			if !p.isZero() && !present[uid] {
				b.set(uid, p)
			}
		}
	}
	return d.writePolicies(&b)
}

// canonical returns p as the kernel keeps it (and readPolicies reads it
// back).
func canonical(p Policy) Policy {
	q := decodePolicy(p.encode())
	q.Rate = Rate{Rx: min(p.Rate.Rx, MaxRate), Tx: min(p.Rate.Tx, MaxRate)}
	return q
}

// QuotaUsed returns the bytes charged to uid's budget since its quota entry
// was created. It only grows while the UID has a budget.
func (d *Datapath) QuotaUsed(uid uint32) (uint64, error) {
	var used uint64
	err := d.objs.BwQuotaUsed.Lookup(uid, &used)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read quota of UID %d: %w", uid, err)
	}
	return used, nil
}

// Ceiling returns the Policy.Ceiling that lets a UID move remaining more
// bytes from the moment its charged total was quotaUsed (QuotaUsed), or
// math.MaxUint64, no practical limit, when the sum does not fit.
//
// The read order decides whether the budget can be overshot: read
// QuotaUsed first, then the counters that remaining is computed from. Bytes
// that pass between the two reads are then both charged (in QuotaUsed after
// the read) and subtracted (in the counters), so they count against the
// user twice, never not at all. In the other order they are charged in
// neither and pass on top of the limit.
func Ceiling(quotaUsed, remaining uint64) uint64 {
	if ceiling := quotaUsed + remaining; ceiling >= quotaUsed {
		return ceiling
	}
	return math.MaxUint64
}

// Stats returns the data plane's event counters, summed over CPUs.
func (d *Datapath) Stats() (Stats, error) {
	var vals [statMax]uint64
	var ssh, xray [3]uint64
	var rate [1]uint64
	for _, m := range []struct {
		m   *ebpf.Map
		dst []uint64
	}{{d.objs.BwStats, vals[:]}, {d.objs.BwSstats, ssh[:]}, {d.objs.BwXstats, xray[:]}, {d.objs.BwRstats, rate[:]}} {
		if err := sumPerCPU(m.m, m.dst); err != nil {
			return Stats{}, err
		}
	}
	return Stats{
		CountersFull:    vals[statCountersFull],
		DroppedBlocked:  vals[statDropBlocked],
		DroppedQuota:    vals[statDropQuota],
		QuotaFull:       vals[statQuotaFull],
		SSHHeld:         ssh[0],
		SSHUnattributed: ssh[1],
		SSHReleased:     ssh[2],
		XrayClaimed:     xray[0],
		XrayHeld:        xray[1],
		XrayUnclaimed:   xray[2],
		RateDropped:     rate[0],
	}, nil
}

// sumPerCPU sets each dst[i] to the sum over CPUs of entry i of the per-CPU
// array m.
func sumPerCPU(m *ebpf.Map, dst []uint64) error {
	for i := range dst {
		var per []uint64
		if err := m.Lookup(uint32(i), &per); err != nil {
			return fmt.Errorf("read stats: %w", err)
		}
		dst[i] = 0
		for _, v := range per {
			dst[i] += v
		}
	}
	return nil
}

// RunStats returns the attached packet programs' combined run time in
// nanoseconds and run count. They grow only while kernel.bpf_stats_enabled
// is 1 (see ebpf.EnableStats).
func (d *Datapath) RunStats() (ns, runs uint64, err error) {
	ingress, egress := d.objs.packet()
	for _, p := range []*ebpf.Program{ingress, egress} {
		s, err := p.Stats()
		if err != nil {
			return 0, 0, fmt.Errorf("program stats: %w", err)
		}
		ns += uint64(s.Runtime.Nanoseconds())
		runs += s.RunCount
	}
	return ns, runs, nil
}

// CountersOf reads one UID's counters, summed over CPUs; a UID the kernel
// has not seen has zero counters.
func (d *Datapath) CountersOf(uid uint32) (Counters, error) {
	c, _, err := d.countersOf(uid, true)
	return c, err
}

// countersOf is CountersOf, which also returns uid's entry in
// bw_hash_counts. Unless readHash, it takes that entry as last read if
// there is one (see bw_slot_moved).
func (d *Datapath) countersOf(uid uint32, readHash bool) (c, hash Counters, err error) {
	c = d.credits[uid]
	slot, hash, ok := d.slots.entry(uid)
	if readHash || !ok {
		var vals []bwacctCounters
		err := d.objs.BwHashCounts.Lookup(uid, &vals)
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return c, hash, fmt.Errorf("read counters of UID %d: %w", uid, err)
		}
		hash = Counters{}
		for _, v := range vals {
			hash.add(v)
		}
		slot = d.slots.read(uid, hash)
	}
	c.plus(hash)
	if slot != 0 {
		c.plus(d.slots.countersAt(slot))
	}
	return c, hash, nil
}

func (c *Counters) add(v bwacctCounters) {
	c.RxBytes += v.RxBytes
	c.RxPackets += v.RxPackets
	c.TxBytes += v.TxBytes
	c.TxPackets += v.TxPackets
}

func (c *Counters) plus(o Counters) {
	c.RxBytes += o.RxBytes
	c.RxPackets += o.RxPackets
	c.TxBytes += o.TxBytes
	c.TxPackets += o.TxPackets
}

// ApplyPolicies writes the given policies (the zero Policy deletes the
// UID's entry and its quota accounting) and leaves every other UID alone. It
// is ReconcilePolicies for a known set of changes: its cost is proportional
// to len(changes), not to the size of the map. A protected UID with a
// non-zero policy is an error and nothing is changed.
func (d *Datapath) ApplyPolicies(changes map[uint32]Policy) error {
	if len(changes) == 0 {
		return nil
	}
	if err := d.refuseProtected(changes); err != nil {
		return err
	}
	var b policyBatch
	for uid, p := range changes {
		b.set(uid, p)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	_, err := d.writePolicies(&b)
	return err
}

// EachCounter calls fn with every UID's counters, summed over CPUs, reading
// thousands of UIDs per syscall. It is Counters without building a map.
// Counters include the UID's credits (see Credit).
func (d *Datapath) EachCounter(fn func(uid uint32, c Counters)) error {
	var credited map[uint32]bool
	if len(d.credits) > 0 {
		credited = make(map[uint32]bool, len(d.credits))
	}
	err := d.eachCounter(func(uid uint32, c Counters) {
		if cr, ok := d.credits[uid]; ok {
			credited[uid] = true
			c.plus(cr)
		}
		fn(uid, c)
	})
	if err != nil {
		return err
	}
	for uid, cr := range d.credits {
		if !credited[uid] {
			fn(uid, cr)
		}
	}
	return nil
}

// eachCounter is EachCounter without the credits: the sum of each ID's
// entry in bw_hash_counts and its slot's counters. It gives a slot to each ID
// it finds without one, while slots are left.
func (d *Datapath) eachCounter(fn func(uid uint32, c Counters)) error {
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	d.slots.mu.Lock()
	ids := d.slots.ids // appended to, never changed below its length
	d.slots.mu.Unlock()
	found := make([]bool, len(ids)) // slots whose ID has an entry in bw_hash_counts
	if len(d.keys) != batchSize {
		d.keys = make([]uint32, batchSize)
		d.values = make([]bwacctCounters, batchSize*ncpu)
	}
	var cursor ebpf.MapBatchCursor
	for {
		n, err := d.objs.BwHashCounts.BatchLookup(&cursor, d.keys, d.values, nil)
		for i := range n {
			uid := d.keys[i]
			var c Counters
			for _, v := range d.values[i*ncpu : (i+1)*ncpu] {
				c.add(v)
			}
			hash := c
			if slot := d.slots.read(uid, hash); slot != 0 {
				c.plus(d.slots.countersAt(slot))
				if int(slot) < len(found) {
					found[slot] = true
				}
			}
			fn(uid, c)
			d.slots.give(uid, hash)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return fmt.Errorf("read counters: %w", err)
		}
	}
	// An ID given its slot before a packet of its own was counted (marked
	// for its credits, or bw_hash_counts full) has no entry there: its slot
	// alone.
	for slot, id := range ids {
		if id != noID && !found[slot] {
			fn(id, d.slots.countersAt(uint32(slot)))
		}
	}
	return nil
}

// EachMoved calls fn with the counters of every UID and every account whose
// counters grew since the last call (UIDs below 2^20 and accounts; other
// UIDs are only seen by EachCounter). It clears the marks (bw_moved and
// bw_xmoved by ID, bw_slot_moved by slot) before it reads what they stand
// for, so a packet counted after the read marks again for the next call:
// nothing is missed, and a tick reads only the UIDs and accounts that moved
// instead of every one on every CPU, and of those, only the counters that
// moved: the slot of an ID marked by its slot alone (see bw_slot_moved).
func (d *Datapath) EachMoved(fn func(uid uint32, c Counters)) error {
	d.marked = d.marked[:0]
	if err := d.takeMarks(d.objs.BwMoved, func(off int) (uint32, bool) { return uint32(off), true }); err != nil {
		return err
	}
	if err := d.takeMarks(d.objs.BwXmoved, func(off int) (uint32, bool) { return AccountBase + uint32(off), true }); err != nil {
		return err
	}
	byID := len(d.marked) // marked by ID: their entries in bw_hash_counts grew, or their credits
	d.slots.mu.Lock()
	ids := d.slots.ids
	d.slots.mu.Unlock()
	// A slot whose ID is marked too is read in full already.
	if d.taken == nil {
		d.taken = make([]uint64, maxSlots/64)
	}
	for _, id := range d.marked {
		if slot := d.slots.slotOf(id); slot != 0 {
			d.taken[slot/64] |= 1 << (slot % 64)
		}
	}
	err := d.takeMarks(d.objs.BwSlotMoved, func(slot int) (uint32, bool) {
		if slot >= len(ids) || ids[slot] == noID || d.taken[slot/64]&(1<<(slot%64)) != 0 {
			return 0, false
		}
		return ids[slot], true
	})
	clear(d.taken)
	if err != nil {
		return err
	}
	for i, id := range d.marked {
		c, hash, err := d.countersOf(id, i < byID)
		if err != nil {
			return err
		}
		fn(id, c)
		if i < byID { // the others have their slot
			d.slots.give(id, hash) // its next packets count in a slot
		}
	}
	return nil
}

// takeMarks clears the marks set in marks, a map of a byte per ID or slot,
// and appends to d.marked the IDs that id gives for their offsets. It
// reads the marks markChunk bytes at a time: bw_moved alone is 1 MiB.
func (d *Datapath) takeMarks(marks *ebpf.Map, id func(off int) (uint32, bool)) error {
	mem, err := marks.Memory()
	if err != nil {
		return fmt.Errorf("map moved marks: %w", err)
	}
	if d.moved == nil {
		d.moved = make([]byte, markChunk)
	}
	zero := []byte{0}
	for base, size := 0, int(mem.Size()); base < size; base += markChunk {
		moved := d.moved[:min(markChunk, size-base)]
		if _, err := mem.ReadAt(moved, int64(base)); err != nil {
			return fmt.Errorf("read moved marks: %w", err)
		}
		words := unsafe.Slice((*uint64)(unsafe.Pointer(&moved[0])), len(moved)/8)
		for i, w := range words {
			if w == 0 {
				continue
			}
			for j := range 8 {
				off := base + i*8 + j
				if moved[i*8+j] == 0 {
					continue
				}
				if _, err := mem.WriteAt(zero, int64(off)); err != nil {
					return fmt.Errorf("clear moved mark: %w", err)
				}
				if id, ok := id(off); ok {
					d.marked = append(d.marked, id)
				}
			}
		}
	}
	return nil
}

// markChunk is how many bytes of moved marks takeMarks reads at a time: a
// multiple of 8.
const markChunk = 64 << 10

// markMoved sets uid's mark for the next EachMoved, as the programs do
// after they count: in bw_moved for a UID below 2^20, in bw_xmoved for an
// account. Others have none. A mark that cannot be written is no error:
// the next full read (EachCounter) finds what moved.
func (d *Datapath) markMoved(uid uint32) {
	marks, off := d.objs.BwMoved, int64(uid)
	switch {
	case uid < policyBitsUIDs:
	case uid-AccountBase < MaxAccounts:
		marks, off = d.objs.BwXmoved, int64(uid-AccountBase)
	default:
		return
	}
	if mem, err := marks.Memory(); err == nil {
		mem.WriteAt([]byte{1}, off)
	}
}
