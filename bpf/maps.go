package bpf

import (
	"errors"
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
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

// Protected reports whether uid can never be blocked or budgeted.
func (d *Datapath) Protected(uid uint32) bool { return d.protected[uid] }

// policyBitsUIDs must match POLICY_BITS_UIDS in bwacct.c: UIDs below it
// have a bit in bw_policy_bits.
const policyBitsUIDs = 1 << 20

// SetPolicy makes the kernel enforce p for uid; the zero Policy removes
// the UID's entry (and its quota accounting).
func (d *Datapath) SetPolicy(uid uint32, p Policy) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.setPolicy(uid, p)
}

func (d *Datapath) setPolicy(uid uint32, p Policy) error {
	if p.isZero() {
		if err := d.deletePolicy(uid); err != nil {
			return err
		}
		return d.setBit(uid, false)
	}
	if d.protected[uid] {
		return fmt.Errorf("%w: %d", ErrProtectedUID, uid)
	}
	// The bit first: a policy whose bit is clear is not enforced.
	if err := d.setBit(uid, true); err != nil {
		return err
	}
	v := p.encode()
	if err := d.objs.BwPolicy.Put(uid, &v); err != nil {
		return fmt.Errorf("set policy of UID %d: %w", uid, err)
	}
	return nil
}

// setBit sets or clears uid's bit in bw_policy_bits.
func (d *Datapath) setBit(uid uint32, on bool) error {
	if uid >= policyBitsUIDs {
		return nil
	}
	word := uid / 64
	var bits uint64
	if err := d.objs.BwPolicyBits.Lookup(word, &bits); err != nil {
		return fmt.Errorf("read policy bits of UID %d: %w", uid, err)
	}
	next := bits &^ (1 << (uid % 64))
	if on {
		next = bits | 1<<(uid%64)
	}
	if next == bits {
		return nil
	}
	if err := d.objs.BwPolicyBits.Put(word, next); err != nil {
		return fmt.Errorf("write policy bits of UID %d: %w", uid, err)
	}
	return nil
}

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

// writeBits writes the words of want that differ from have.
func (d *Datapath) writeBits(have, want []uint64) error {
	var keys []uint32
	var vals []uint64
	for i := range want {
		if want[i] != have[i] {
			keys = append(keys, uint32(i))
			vals = append(vals, want[i])
		}
	}
	if len(keys) == 0 {
		return nil
	}
	if _, err := d.objs.BwPolicyBits.BatchUpdate(keys, vals, nil); err != nil {
		return fmt.Errorf("write policy bits: %w", err)
	}
	return nil
}

func (d *Datapath) deletePolicy(uid uint32) error {
	if err := d.objs.BwPolicy.Delete(uid); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete policy of UID %d: %w", uid, err)
	}
	if err := d.objs.BwQuotaUsed.Delete(uid); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete quota of UID %d: %w", uid, err)
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
	return decodePolicy(v), nil
}

// Policies returns every UID's policy as the kernel has it.
func (d *Datapath) Policies() (map[uint32]Policy, error) {
	out := make(map[uint32]Policy)
	return out, d.readPolicies(out)
}

// readPolicies reads every policy into dst, which it clears first.
func (d *Datapath) readPolicies(dst map[uint32]Policy) error {
	clear(dst)
	keys := make([]uint32, batchSize)
	vals := make([]bwacctPolicy, batchSize)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := d.objs.BwPolicy.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			dst[keys[i]] = decodePolicy(vals[i])
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
func (d *Datapath) ReconcilePolicies(desired map[uint32]Policy) (int, error) {
	for uid, p := range desired {
		if !p.isZero() && d.protected[uid] {
			return 0, fmt.Errorf("%w: %d", ErrProtectedUID, uid)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.have == nil {
		d.have = make(map[uint32]Policy)
	}
	have := d.have // reused: no map of every policy left for the collector
	if err := d.readPolicies(have); err != nil {
		return 0, err
	}
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
	// Bits of new policies go in before the policies, stale bits come out
	// after the policies are gone: the kernel never misses a policy.
	union := slices.Clone(haveBits)
	for i := range union {
		union[i] |= wantBits[i]
	}
	if err := d.writeBits(haveBits, union); err != nil {
		return 0, err
	}
	var putKeys, delKeys []uint32
	var putVals []bwacctPolicy
	for uid, p := range desired {
		if p.isZero() {
			continue
		}
		if cur, ok := have[uid]; !ok || cur != decodePolicy(p.encode()) {
			putKeys = append(putKeys, uid)
			putVals = append(putVals, p.encode())
		}
	}
	for uid := range have {
		if p, ok := desired[uid]; !ok || p.isZero() {
			delKeys = append(delKeys, uid)
		}
	}
	if len(putKeys) > 0 {
		if _, err := d.objs.BwPolicy.BatchUpdate(putKeys, putVals, nil); err != nil {
			return 0, fmt.Errorf("write policies: %w", err)
		}
	}
	for _, uid := range delKeys {
		if err := d.deletePolicy(uid); err != nil {
			return len(putKeys), err
		}
	}
	if err := d.writeBits(union, wantBits); err != nil {
		return len(putKeys) + len(delKeys), err
	}
	return len(putKeys) + len(delKeys), nil
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

// Budget returns the Policy that lets uid move at most remaining more bytes
// in the directions dirs, counted from now, keeping its Blocked state.
//
// To never grant more than the true remainder, read QuotaUsed (this method
// does) before the counters that remaining was computed from: bytes that pass
// in between are then charged twice, never missed.
func (d *Datapath) Budget(uid uint32, remaining uint64, dirs Direction) (Policy, error) {
	cur, err := d.Policy(uid)
	if err != nil {
		return Policy{}, err
	}
	used, err := d.QuotaUsed(uid)
	if err != nil {
		return Policy{}, err
	}
	return Policy{Blocked: cur.Blocked, Quota: dirs, Ceiling: Ceiling(used, remaining)}, nil
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

// SetBudget gives uid a budget of remaining bytes in the directions dirs.
func (d *Datapath) SetBudget(uid uint32, remaining uint64, dirs Direction) error {
	if dirs == 0 {
		return fmt.Errorf("budget of UID %d: no direction", uid)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	p, err := d.Budget(uid, remaining, dirs)
	if err != nil {
		return err
	}
	return d.setPolicy(uid, p)
}

// Block drops all of uid's traffic, keeping its budget.
func (d *Datapath) Block(uid uint32) error { return d.setBlocked(uid, true) }

// Unblock lets uid's traffic through again, within its budget if it has
// one.
func (d *Datapath) Unblock(uid uint32) error { return d.setBlocked(uid, false) }

func (d *Datapath) setBlocked(uid uint32, blocked bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	p, err := d.Policy(uid)
	if err != nil {
		return err
	}
	p.Blocked = blocked
	return d.setPolicy(uid, p)
}

// Stats returns the data plane's event counters, summed over CPUs.
func (d *Datapath) Stats() (Stats, error) {
	var vals [statMax]uint64
	for i := range vals {
		var per []uint64
		if err := d.objs.BwStats.Lookup(uint32(i), &per); err != nil {
			return Stats{}, fmt.Errorf("read stats: %w", err)
		}
		for _, v := range per {
			vals[i] += v
		}
	}
	return Stats{
		CountersFull:   vals[statCountersFull],
		DroppedBlocked: vals[statDropBlocked],
		DroppedQuota:   vals[statDropQuota],
		QuotaFull:      vals[statQuotaFull],
	}, nil
}

// RunStats returns the programs' combined run time in nanoseconds and run
// count. They grow only while kernel.bpf_stats_enabled is 1 (see
// ebpf.EnableStats).
func (d *Datapath) RunStats() (ns, runs uint64, err error) {
	for _, p := range []*ebpf.Program{d.objs.BwIngress, d.objs.BwEgress} {
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
	var vals []bwacctCounters
	err := d.objs.BwCounters.Lookup(uid, &vals)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Counters{}, nil
	}
	if err != nil {
		return Counters{}, fmt.Errorf("read counters of UID %d: %w", uid, err)
	}
	var c Counters
	for _, v := range vals {
		c.RxBytes += v.RxBytes
		c.RxPackets += v.RxPackets
		c.TxBytes += v.TxBytes
		c.TxPackets += v.TxPackets
	}
	return c, nil
}

// Epoch names the lifetime of the counters: the boot and the counter map's
// ID. Counters never go down within one epoch; a new epoch (a reboot, or the
// maps removed and created anew) means they restarted from zero.
func (d *Datapath) Epoch() (string, error) {
	if d.epoch != "" {
		return d.epoch, nil
	}
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", fmt.Errorf("read boot id: %w", err)
	}
	info, err := d.objs.BwCounters.Info()
	if err != nil {
		return "", fmt.Errorf("counter map info: %w", err)
	}
	id, ok := info.ID()
	if !ok {
		return "", fmt.Errorf("counter map info: kernel reports no map ID")
	}
	d.epoch = fmt.Sprintf("%s/%d", strings.TrimSpace(string(boot)), id)
	return d.epoch, nil
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
	for uid, p := range changes {
		if !p.isZero() && d.protected[uid] {
			return fmt.Errorf("%w: %d", ErrProtectedUID, uid)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	// Read the bitmap words the changes touch.
	words := make(map[uint32]uint64)
	for uid := range changes {
		if uid >= policyBitsUIDs {
			continue
		}
		w := uid / 64
		if _, ok := words[w]; ok {
			continue
		}
		var bits uint64
		if err := d.objs.BwPolicyBits.Lookup(w, &bits); err != nil {
			return fmt.Errorf("read policy bits: %w", err)
		}
		words[w] = bits
	}
	setBits := func(on bool) error {
		var keys []uint32
		var vals []uint64
		for w, have := range words {
			next := have
			for i := uint32(0); i < 64; i++ {
				p, ok := changes[w*64+i]
				if !ok || p.isZero() == on {
					continue
				}
				if on {
					next |= 1 << i
				} else {
					next &^= 1 << i
				}
			}
			if next != have {
				keys, vals = append(keys, w), append(vals, next)
				words[w] = next
			}
		}
		if len(keys) == 0 {
			return nil
		}
		if _, err := d.objs.BwPolicyBits.BatchUpdate(keys, vals, nil); err != nil {
			return fmt.Errorf("write policy bits: %w", err)
		}
		return nil
	}
	// New bits before their policies, stale bits after theirs are gone,
	// as in ReconcilePolicies.
	if err := setBits(true); err != nil {
		return err
	}
	var putKeys []uint32
	var putVals []bwacctPolicy
	for uid, p := range changes {
		if p.isZero() {
			if err := d.deletePolicy(uid); err != nil {
				return err
			}
			continue
		}
		putKeys, putVals = append(putKeys, uid), append(putVals, p.encode())
	}
	if len(putKeys) > 0 {
		if _, err := d.objs.BwPolicy.BatchUpdate(putKeys, putVals, nil); err != nil {
			return fmt.Errorf("write policies: %w", err)
		}
	}
	return setBits(false)
}

// EachCounter calls fn with every UID's counters, summed over CPUs, reading
// thousands of UIDs per syscall. It is Counters without building a map.
func (d *Datapath) EachCounter(fn func(uid uint32, c Counters)) error {
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	if len(d.keys) != batchSize {
		d.keys = make([]uint32, batchSize)
		d.values = make([]bwacctCounters, batchSize*ncpu)
	}
	var cursor ebpf.MapBatchCursor
	for {
		n, err := d.objs.BwCounters.BatchLookup(&cursor, d.keys, d.values, nil)
		for i := range n {
			var c Counters
			for _, v := range d.values[i*ncpu : (i+1)*ncpu] {
				c.RxBytes += v.RxBytes
				c.RxPackets += v.RxPackets
				c.TxBytes += v.TxBytes
				c.TxPackets += v.TxPackets
			}
			fn(d.keys[i], c)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read counters: %w", err)
		}
	}
}

// movedBytes is the size of bw_moved: a byte per UID below policyBitsUIDs.
const movedBytes = policyBitsUIDs

// EachMoved calls fn with the counters of every UID whose counters grew
// since the last call (UIDs below 2^20; others are only seen by
// EachCounter). It clears each UID's mark before it reads the UID's
// counters, so a packet counted after the read marks the UID again for the
// next call: nothing is missed, and a tick reads only the UIDs that moved
// instead of every UID on every CPU.
func (d *Datapath) EachMoved(fn func(uid uint32, c Counters)) error {
	mem, err := d.objs.BwMoved.Memory()
	if err != nil {
		return fmt.Errorf("map moved marks: %w", err)
	}
	if len(d.moved) != movedBytes {
		d.moved = make([]byte, movedBytes)
	}
	if _, err := mem.ReadAt(d.moved, 0); err != nil {
		return fmt.Errorf("read moved marks: %w", err)
	}
	words := unsafe.Slice((*uint64)(unsafe.Pointer(&d.moved[0])), movedBytes/8)
	zero := []byte{0}
	for i, w := range words {
		if w == 0 {
			continue
		}
		for j := 0; j < 8; j++ {
			off := i*8 + j
			if d.moved[off] == 0 {
				continue
			}
			if _, err := mem.WriteAt(zero, int64(off)); err != nil {
				return fmt.Errorf("clear moved mark: %w", err)
			}
			c, err := d.CountersOf(uint32(off))
			if err != nil {
				return err
			}
			fn(uint32(off), c)
		}
	}
	return nil
}
