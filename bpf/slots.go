package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Slots take the common packet off the counter hash (see bw_slots in
// bwacct.c). The Datapath gives each UID below 2^20 and each account whose
// counters it reads a slot, once: a slot is never reused while the maps
// live. From then on the programs count the ID in bw_slot_counts[slot], a
// per-CPU array they index without a call, and its counters are the sum of
// its entry in bw_hash_counts (what it moved before) and its slot. An ID
// that found every slot taken counts in bw_hash_counts alone, as every ID
// did before.
//
// bw_hash_counts, bw_slots and bw_slot_counts are one epoch's counters:
// Load reuses the three pins together or none of them (migrateCounterPins),
// so that no slot adds another epoch's bytes to this one's, and no count
// goes down within an epoch.
const (
	// slotIDs is the number of IDs bw_slots has a slot for: UIDs below
	// policyBitsUIDs, then the accounts. It must match SLOT_IDS in
	// bwacct.c.
	slotIDs = 2 * policyBitsUIDs
	// maxSlots bounds bw_slot_counts (Config.MaxUIDs below it): 8,192
	// slots of 32 bytes are 256 KiB per possible CPU.
	maxSlots = 8192
)

// slotIndex returns id's index in bw_slots; ok is false for an ID without
// one (a UID from 2^20 on that is no account).
func slotIndex(id uint32) (idx uint32, ok bool) {
	switch {
	case id < policyBitsUIDs:
		return id, true
	case id-AccountBase < MaxAccounts:
		return policyBitsUIDs + (id - AccountBase), true
	}
	return 0, false
}

// slotCount is the size of bw_slot_counts for cfg, slot 0 (none)
// included.
func slotCount(cfg Config) uint32 { return min(cfg.MaxUIDs, maxSlots) }

// slotTable is the Datapath's side of the slots.
type slotTable struct {
	size uint32 // bw_slot_counts' entries; slot 0 is none

	mu sync.Mutex // protects the following
	// mem is bw_slots, memory-mapped by the Datapath itself (not through
	// ebpf.Map.Memory): a slot is written with one atomic 64-bit store of
	// its word, so that a program never reads half of one. The Datapath
	// is the only writer; the programs only read.
	mem   []byte
	words []uint64          // mem as words
	of    map[uint32]uint32 // ID -> slot
	ids   []uint32          // slot -> ID or noID; len(ids) is the next free slot
	// hash holds the entry in bw_hash_counts of each ID with a slot as it
	// was last read, summed over CPUs (see bw_slot_moved): an ID whose
	// slot alone is marked as moved has that entry still.
	hash map[uint32]Counters
}

// noID marks a slot that is no ID's in slotTable.ids: slot 0, and one that
// loadSlots cleared. (It is no ID's: 0xFFFFFFFF has no slot index.)
const noID = ^uint32(0)

// loadSlots maps bw_slots and reads the slots an earlier agent gave out.
// A slot past bw_slot_counts' end or given twice (written by hand) is
// cleared: the programs would count it nowhere or for two IDs.
func (d *Datapath) loadSlots() error {
	s := &d.slots
	s.mu.Lock()
	defer s.mu.Unlock()
	s.size = d.objs.BwSlotCounts.MaxEntries()
	if n := d.objs.BwSlots.MaxEntries() * 4; n != slotIDs {
		return fmt.Errorf("map slots: %d slots in bw_slots, want %d", n, slotIDs)
	}
	size := slotIDs / 4 * 8
	mem, err := unix.Mmap(d.objs.BwSlots.FD(), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("map slots: %w", err)
	}
	s.mem = mem
	s.words = unsafe.Slice((*uint64)(unsafe.Pointer(&mem[0])), size/8)
	s.of = make(map[uint32]uint32)
	s.ids = []uint32{noID}
	s.hash = make(map[uint32]Counters)
	given := make(map[uint32]bool)
	for i, w := range s.words {
		for j := range uint32(4) {
			slot := uint32(w>>(16*j)) & 0xffff
			if slot == 0 {
				continue
			}
			idx := uint32(i)*4 + j
			if slot >= s.size || given[slot] {
				s.store(idx, 0)
				continue
			}
			given[slot] = true
			// Slots are given in order: the next free one follows the
			// highest.
			for uint32(len(s.ids)) <= slot {
				s.ids = append(s.ids, noID)
			}
			id := idx
			if idx >= policyBitsUIDs {
				id = AccountBase + (idx - policyBitsUIDs)
			}
			s.ids[slot] = id
			s.of[id] = slot
		}
	}
	return nil
}

// store writes slot as idx's slot with one atomic store of its word.
func (s *slotTable) store(idx, slot uint32) {
	w := &s.words[idx/4]
	shift := 16 * (idx % 4)
	atomic.StoreUint64(w, *w&^(0xffff<<shift)|uint64(slot)<<shift)
}

// slotOf returns id's slot, 0 if it has none.
func (s *slotTable) slotOf(id uint32) uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.of[id]
}

// lastHash returns id's entry in bw_hash_counts as it was last read (see
// read); ok is false if it has no slot or was not read since it got it.
func (s *slotTable) lastHash(id uint32) (c Counters, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok = s.hash[id]
	return c, ok
}

// read records c, just read, as id's entry in bw_hash_counts if id has a
// slot.
func (s *slotTable) read(id uint32, c Counters) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.of[id] != 0 {
		s.hash[id] = c
	}
}

// give gives id the next free slot if it has none and one is left, hash
// being its entry in bw_hash_counts as just read. The slot's counters are
// zero: no ID had it, and the programs count in a slot only for the ID
// bw_slots gives it to.
func (s *slotTable) give(id uint32, hash Counters) {
	idx, ok := slotIndex(id)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mem == nil || s.of[id] != 0 || uint32(len(s.ids)) >= s.size {
		return
	}
	slot := uint32(len(s.ids))
	s.store(idx, slot)
	s.ids = append(s.ids, id)
	s.of[id] = slot
	// The entry may still grow by packets that read no slot yet: they
	// mark the ID, which makes the next EachMoved read it again.
	s.hash[id] = hash
}

// unmap releases the mapping of bw_slots.
func (s *slotTable) unmap() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mem == nil {
		return nil
	}
	err := unix.Munmap(s.mem)
	s.mem, s.words = nil, nil
	return err
}

// slotCounters adds slot's counters, summed over CPUs, to c.
func (d *Datapath) slotCounters(slot uint32, c *Counters) error {
	var vals []bwacctCounters
	if err := d.objs.BwSlotCounts.Lookup(slot, &vals); err != nil {
		return fmt.Errorf("read counters of slot %d: %w", slot, err)
	}
	for _, v := range vals {
		c.add(v)
	}
	return nil
}

// allSlotCounters reads the counters of every slot given out, summed over
// CPUs, indexed by slot, with their IDs (noID for none); many slots per
// syscall.
func (d *Datapath) allSlotCounters() (counters []Counters, ids []uint32, err error) {
	d.slots.mu.Lock()
	ids = append([]uint32(nil), d.slots.ids...)
	d.slots.mu.Unlock()
	counters = make([]Counters, len(ids))
	if len(ids) <= 1 {
		return counters, ids, nil
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, nil, err
	}
	keys := make([]uint32, min(batchSize, len(ids)))
	vals := make([]bwacctCounters, len(keys)*ncpu)
	var cursor ebpf.MapBatchCursor
	for read := 0; read < len(ids); {
		n, err := d.objs.BwSlotCounts.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			if slot := int(keys[i]); slot < len(ids) {
				for _, v := range vals[i*ncpu : (i+1)*ncpu] {
					counters[slot].add(v)
				}
			}
		}
		read += n
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return nil, nil, fmt.Errorf("read slot counters: %w", err)
		}
	}
	return counters, ids, nil
}

// legacyCounterPin is the name agents before slots pinned the counter hash
// under, when it held every count.
const legacyCounterPin = "bw_counters"

// migrateCounterPins prepares the counter pins under pinPath for Load, which
// holds the pin directory's lock:
//
//   - a bw_counters pin is the counter hash of an agent without slots (one of
//     an earlier version, or one it was downgraded to, which then made it
//     anew): it holds every count, so the slot maps beside it, if any, are
//     stale, and it is renamed to bw_hash_counts, replacing a stale one.
//     Renamed, it keeps its map, its counts and its epoch; and a downgraded
//     agent later finds no bw_counters and starts a new epoch (its counters
//     restart from zero, the saved totals are kept) instead of reading the
//     hash alone, a part of the counts, as if they had gone down.
//   - otherwise the three counter pins are kept if all are there, and removed
//     if some are missing (removed by hand): Load makes new ones, a new epoch.
func migrateCounterPins(pinPath string) error {
	path := func(name string) string { return filepath.Join(pinPath, name) }
	exists := func(name string) bool {
		_, err := os.Stat(path(name))
		return err == nil
	}
	remove := func(names ...string) error {
		for _, name := range names {
			if err := os.Remove(path(name)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return permission(fmt.Errorf("remove pin %s: %w", name, err))
			}
		}
		return nil
	}
	epoch := []string{bwacctMapBwHashCounts, bwacctMapBwSlots, bwacctMapBwSlotCounts}
	if exists(legacyCounterPin) {
		if err := remove(epoch...); err != nil {
			return err
		}
		if err := os.Rename(path(legacyCounterPin), path(bwacctMapBwHashCounts)); err != nil {
			return permission(fmt.Errorf("rename pin %s: %w", legacyCounterPin, err))
		}
		return nil
	}
	for _, name := range epoch {
		if !exists(name) {
			return remove(epoch...)
		}
	}
	return nil
}

// PinnedCounters reads id's counters from the maps pinned under pinPath,
// without loading the data plane (so beside a running agent): its entry in
// bw_hash_counts plus its slot's, summed over CPUs, credits left out. It is
// for tests and tools that check the kernel's figures against the agent's.
func PinnedCounters(pinPath string, id uint32) (Counters, error) {
	var c Counters
	load := func(name string) (*ebpf.Map, error) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil, fmt.Errorf("counters of %d: %w", id, err)
		}
		return m, nil
	}
	hash, err := load(bwacctMapBwHashCounts)
	if err != nil {
		return c, err
	}
	defer hash.Close()
	var vals []bwacctCounters
	if err := hash.Lookup(id, &vals); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return c, fmt.Errorf("counters of %d: %w", id, err)
	}
	for _, v := range vals {
		c.add(v)
	}
	idx, ok := slotIndex(id)
	if !ok {
		return c, nil
	}
	slots, err := load(bwacctMapBwSlots)
	if err != nil {
		return c, err
	}
	defer slots.Close()
	var word uint64
	if err := slots.Lookup(idx/4, &word); err != nil {
		return c, fmt.Errorf("slot of %d: %w", id, err)
	}
	slot := uint32(word>>(16*(idx%4))) & 0xffff
	if slot == 0 {
		return c, nil
	}
	counts, err := load(bwacctMapBwSlotCounts)
	if err != nil {
		return c, err
	}
	defer counts.Close()
	if err := counts.Lookup(slot, &vals); err != nil {
		return c, fmt.Errorf("counters of %d in slot %d: %w", id, slot, err)
	}
	for _, v := range vals {
		c.add(v)
	}
	return c, nil
}
