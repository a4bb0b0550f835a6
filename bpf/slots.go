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
// live. From then on the programs count the ID in bw_slot_counts[slot], an
// array they index without a call and the Datapath reads through its memory
// mapping, and its counters are the sum of its entry in bw_hash_counts
// (what it moved before) and its slot. An ID that found every slot taken
// counts in bw_hash_counts alone, as every ID did before.
//
// bw_hash_counts, bw_slots and bw_slot_counts are one epoch's counters:
// Load reuses the three pins together or none of them (migrateCounterPins),
// so that no slot adds another epoch's bytes to this one's, and no count
// goes down within an epoch. An agent before shared slots left a per-CPU
// bw_slot_counts: its counts are kept, frozen, as a fourth pin of the epoch
// (frozenSlotPin).
const (
	// slotIDs is the number of IDs bw_slots has a slot for: UIDs below
	// policyBitsUIDs, then the accounts. It must match SLOT_IDS in
	// bwacct.c.
	slotIDs = 2 * policyBitsUIDs
	// maxSlots is the number of slots bw_slot_counts has room for (two
	// entries each, one a direction; Config.MaxUIDs bounds those given
	// out): a slot is 16 bits in bw_slots. It must match MAX_SLOTS in
	// bwacct.c.
	maxSlots = 1 << 16
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

// slotCount is the number of slots given out under cfg, slot 0 (none)
// included.
func slotCount(cfg Config) uint32 { return min(cfg.MaxUIDs, maxSlots) }

// slotTable is the Datapath's side of the slots.
type slotTable struct {
	size uint32 // the slots given out, slot 0 (none) included

	mu sync.Mutex // protects the following
	// win are the parts of bw_slots (the ID -> slot table) that the
	// Datapath maps, for UIDs and for accounts (see slotWindow). A slot
	// is written with one atomic 64-bit store of its word, so that a
	// program never reads half of one. The Datapath is the only writer;
	// the programs only read. slotsFD is bw_slots'; loaded is set once
	// loadSlots read the table, until unmap.
	win     [2]slotWindow
	slotsFD int
	loaded  bool
	ids     []uint32 // slot -> ID or noID; len(ids) is the next free slot
	// hash holds, by slot, the entry in bw_hash_counts of the slot's ID as
	// it was last read, summed over CPUs (see bw_slot_moved): an ID whose
	// slot alone is marked as moved has that entry still. hashRead says
	// whether it was read since the slot was given (not for the slots an
	// earlier agent gave). Both are as long as ids: slices by slot, not
	// maps by ID, so that 50,000 slots take 1.8 MB.
	hash     []Counters
	hashRead []bool

	// The following are set by loadSlots and loadFrozen and left alone
	// until unmap, so they are read without mu: Datapath.Close, which
	// unmaps them, must not run beside a read of the counters.

	// counts is bw_slot_counts, memory-mapped read-only: slot i's received
	// bytes and packets are the two words from 2*i, its sent ones the two
	// from 2*(maxSlots+i) (struct half_counters), which the programs add to
	// atomically.
	counts    []uint64
	countsMem []byte
	// frozen holds, by slot, the non-zero counts of an earlier agent's
	// per-CPU bw_slot_counts (frozenSlotPin), summed over CPUs; frozenMap
	// is that map, kept for EnsureAttached to pin again. No program adds
	// to them since this agent's replaced the earlier one's. Both are nil
	// without the pin.
	frozen    map[uint32]Counters
	frozenMap *ebpf.Map
}

// countersAt returns slot's counters: bw_slot_counts' and the frozen ones'.
func (s *slotTable) countersAt(slot uint32) Counters {
	c := s.frozen[slot]
	if slot < maxSlots && len(s.counts) == 4*maxSlots {
		rx, tx := s.counts[2*slot:2*slot+2], s.counts[2*(maxSlots+slot):2*(maxSlots+slot)+2]
		c.RxBytes += atomic.LoadUint64(&rx[0])
		c.RxPackets += atomic.LoadUint64(&rx[1])
		c.TxBytes += atomic.LoadUint64(&tx[0])
		c.TxPackets += atomic.LoadUint64(&tx[1])
	}
	return c
}

// slotWindow is the part of bw_slots mapped for one kind of ID, UIDs or
// accounts: from the kind's first word, the pages up to the highest index
// of that kind with a slot (in powers of two). bw_slots has a slot for each
// possible UID and account, 4 MiB; mapped whole, all of it counted in the
// agent's resident set (the kernel maps an array's pages at mmap), where
// the IDs in use take a few pages.
type slotWindow struct {
	first uint32 // the window's first word in bw_slots
	mem   []byte
	words []uint64
}

// kindWords is the number of words of bw_slots for one kind of ID.
const kindWords = slotIDs / 2 / 4

// window returns the window for idx, and idx's word's offset in it.
func (s *slotTable) window(idx uint32) (*slotWindow, uint32) {
	w := &s.win[0]
	if idx >= slotIDs/2 {
		w = &s.win[1]
	}
	return w, idx/4 - w.first
}

// cover maps idx's window far enough to hold idx's word.
func (s *slotTable) cover(idx uint32) error {
	w, rel := s.window(idx)
	if rel < uint32(len(w.words)) {
		return nil
	}
	page := uint32(os.Getpagesize())
	pages := uint32(1)
	for pages*page/8 <= rel {
		pages *= 2
	}
	size := min(pages*page, kindWords*8)
	mem, words, err := mapWords(s.slotsFD, int64(w.first)*8, int(size), unix.PROT_READ|unix.PROT_WRITE)
	if err != nil {
		return fmt.Errorf("map slots: %w", err)
	}
	if w.mem != nil {
		if err := unix.Munmap(w.mem); err != nil {
			unix.Munmap(mem)
			return fmt.Errorf("map slots: %w", err)
		}
	}
	w.mem, w.words = mem, words
	return nil
}

// mapWords maps size bytes of the map with descriptor fd from byte off,
// shared, and returns the mapping and its words.
func mapWords(fd int, off int64, size, prot int) ([]byte, []uint64, error) {
	mem, err := unix.Mmap(fd, off, size, prot, unix.MAP_SHARED)
	if err != nil {
		return nil, nil, err
	}
	return mem, unsafe.Slice((*uint64)(unsafe.Pointer(&mem[0])), size/8), nil
}

// noID marks a slot that is no ID's in slotTable.ids: slot 0, and one that
// loadSlots cleared. (It is no ID's: 0xFFFFFFFF has no slot index.)
const noID = ^uint32(0)

// loadSlots maps bw_slot_counts, reads the slots an earlier agent gave out
// and maps bw_slots' windows over them. A slot past the slots given out
// (bw_slot_moved's end) or given twice (written by hand) is cleared: the
// programs would count it unmarked, or for two IDs.
func (d *Datapath) loadSlots() error {
	s := &d.slots
	s.mu.Lock()
	defer s.mu.Unlock()
	s.size = slotCount(d.cfg)
	if n := d.objs.BwSlots.MaxEntries() * 4; n != slotIDs {
		return fmt.Errorf("map slots: %d slots in bw_slots, want %d", n, slotIDs)
	}
	s.slotsFD = d.objs.BwSlots.FD()
	s.win = [2]slotWindow{{first: 0}, {first: kindWords}}
	if n, vs := d.objs.BwSlotCounts.MaxEntries(), d.objs.BwSlotCounts.ValueSize(); n != 2*maxSlots || vs != 2*8 {
		return fmt.Errorf("map slot counters: %d values of %d bytes, want %d of 16", n, vs, 2*maxSlots)
	}
	csize := 2 * maxSlots * 2 * 8
	var err error
	if s.countsMem, s.counts, err = mapWords(d.objs.BwSlotCounts.FD(), 0, csize, unix.PROT_READ); err != nil {
		return fmt.Errorf("map slot counters: %w", err)
	}
	s.ids = []uint32{noID}
	given := make([]bool, s.size)
	var highest [2]uint32 // by kind, the highest word with a slot, plus one
	// The whole table is read a chunk at a time, each mapped for the read
	// alone: the windows then cover what it holds.
	const chunk = 256 << 10
	for off := 0; off < slotIDs/4*8; off += chunk {
		mem, words, err := mapWords(s.slotsFD, int64(off), chunk, unix.PROT_READ|unix.PROT_WRITE)
		if err != nil {
			return fmt.Errorf("map slots: %w", err)
		}
		for i := range words {
			w := atomic.LoadUint64(&words[i])
			for j := range uint32(4) {
				slot := uint32(w>>(16*j)) & 0xffff
				if slot == 0 {
					continue
				}
				idx := uint32(off/8+i)*4 + j
				if slot >= s.size || given[slot] {
					w &^= 0xffff << (16 * j)
					atomic.StoreUint64(&words[i], w)
					continue
				}
				given[slot] = true
				highest[idx/(slotIDs/2)] = idx/4 + 1
				// Slots are given in order: the next free one follows
				// the highest.
				for uint32(len(s.ids)) <= slot {
					s.ids = append(s.ids, noID)
				}
				id := idx
				if idx >= policyBitsUIDs {
					id = AccountBase + (idx - policyBitsUIDs)
				}
				s.ids[slot] = id
			}
		}
		if err := unix.Munmap(mem); err != nil {
			return fmt.Errorf("map slots: %w", err)
		}
	}
	for _, h := range highest {
		if h > 0 {
			if err := s.cover((h - 1) * 4); err != nil {
				return err
			}
		}
	}
	s.loaded = true
	s.hash = make([]Counters, len(s.ids))
	s.hashRead = make([]bool, len(s.ids))
	return nil
}

// store writes slot as idx's slot with one atomic store of its word,
// mapped already (see cover).
func (s *slotTable) store(idx, slot uint32) {
	win, rel := s.window(idx)
	w := &win.words[rel]
	shift := 16 * (idx % 4)
	atomic.StoreUint64(w, *w&^(0xffff<<shift)|uint64(slot)<<shift)
}

// slotOf returns id's slot, 0 if it has none.
func (s *slotTable) slotOf(id uint32) uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.slotOfLocked(id)
}

// slotOfLocked is slotOf for a caller that holds mu: it reads id's slot
// from bw_slots, of which the Datapath is the only writer.
func (s *slotTable) slotOfLocked(id uint32) uint32 {
	idx, ok := slotIndex(id)
	if !ok {
		return 0
	}
	w, rel := s.window(idx)
	if rel >= uint32(len(w.words)) {
		return 0 // beyond every slot given
	}
	// The table is shared memory: a slot this agent did not give (written
	// by hand) is none.
	slot := uint32(w.words[rel]>>(16*(idx%4))) & 0xffff
	if slot >= uint32(len(s.ids)) || s.ids[slot] != id {
		return 0
	}
	return slot
}

// entry returns id's slot (0 if none) and its entry in bw_hash_counts as
// it was last read (see read); ok is false if it has no slot or was not
// read since it got it.
func (s *slotTable) entry(id uint32) (slot uint32, hash Counters, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	slot = s.slotOfLocked(id)
	if slot == 0 || !s.hashRead[slot] {
		return slot, Counters{}, false
	}
	return slot, s.hash[slot], true
}

// read records c, just read, as id's entry in bw_hash_counts if id has a
// slot, and returns the slot (0 if none).
func (s *slotTable) read(id uint32, c Counters) uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	slot := s.slotOfLocked(id)
	if slot != 0 {
		s.hash[slot], s.hashRead[slot] = c, true
	}
	return slot
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
	if !s.loaded || s.slotOfLocked(id) != 0 || uint32(len(s.ids)) >= s.size {
		return
	}
	if err := s.cover(idx); err != nil {
		return // counted in the hash, as beyond the slots
	}
	s.store(idx, uint32(len(s.ids)))
	s.ids = append(s.ids, id)
	// The entry may still grow by packets that read no slot yet: they
	// mark the ID, which makes the next EachMoved read it again.
	s.hash = append(s.hash, hash)
	s.hashRead = append(s.hashRead, true)
}

// unmap releases the mappings of bw_slots and bw_slot_counts and the frozen
// counts' map.
func (s *slotTable) unmap() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for i := range s.win {
		if w := &s.win[i]; w.mem != nil {
			errs = append(errs, unix.Munmap(w.mem))
			w.mem, w.words = nil, nil
		}
	}
	s.loaded = false
	if s.countsMem != nil {
		errs = append(errs, unix.Munmap(s.countsMem))
		s.countsMem, s.counts = nil, nil
	}
	if s.frozenMap != nil {
		errs = append(errs, s.frozenMap.Close())
		s.frozenMap, s.frozen = nil, nil
	}
	return errors.Join(errs...)
}

// loadFrozen reads the counts of the pinned frozenSlotPin, if there is one,
// once the programs that added to it are gone: Load calls it after
// attaching its own programs, which replace an earlier agent's, and waits
// for any run of those still going.
func (d *Datapath) loadFrozen() error {
	path := filepath.Join(d.cfg.PinPath, frozenSlotPin)
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return permission(fmt.Errorf("frozen slot counters: %w", err))
	}
	frozen, err := readFrozen(m)
	if err != nil {
		m.Close()
		return err
	}
	d.slots.frozen, d.slots.frozenMap = frozen, m
	return nil
}

// readFrozen waits for running programs (waitForPrograms) and returns the
// non-zero counts of m, an earlier agent's per-CPU bw_slot_counts, summed
// over CPUs by slot.
func readFrozen(m *ebpf.Map) (map[uint32]Counters, error) {
	if m.Type() != ebpf.PerCPUArray || m.KeySize() != 4 || m.ValueSize() != 4*8 {
		return nil, fmt.Errorf("%w: %s is a %v of %d-byte values, want a per-CPU array of counters "+
			"(made by hand?); run `bwagent uninstall` to remove the pins (kernel counters restart from zero, "+
			"the agent's saved totals are kept)", ErrIncompatiblePin, frozenSlotPin, m.Type(), m.ValueSize())
	}
	if err := waitForPrograms(); err != nil {
		return nil, err
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, err
	}
	frozen := make(map[uint32]Counters)
	keys := make([]uint32, batchSize)
	vals := make([]bwacctCounters, len(keys)*ncpu)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			var c Counters
			for _, v := range vals[i*ncpu : (i+1)*ncpu] {
				c.add(v)
			}
			if c != (Counters{}) {
				frozen[keys[i]] = c
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return frozen, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read frozen slot counters: %w", err)
		}
	}
}

// waitForPrograms returns once every run of a BPF program that began before
// the call has ended. An update of a map of maps waits for an RCU grace
// period before it returns, so that user space knows that no program still
// uses the old value (maybe_wait_bpf_programs, kernel/bpf/syscall.c), and
// our programs run under RCU (bpf_prog_run_array_cg takes rcu_read_lock).
func waitForPrograms() error {
	inner := &ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1}
	outer, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.ArrayOfMaps, KeySize: 4, ValueSize: 4, MaxEntries: 1, InnerMap: inner})
	if err != nil {
		return fmt.Errorf("wait for running programs: %w", err)
	}
	defer outer.Close()
	m, err := ebpf.NewMap(inner)
	if err != nil {
		return fmt.Errorf("wait for running programs: %w", err)
	}
	defer m.Close()
	if err := outer.Put(uint32(0), m); err != nil {
		return fmt.Errorf("wait for running programs: %w", err)
	}
	return nil
}

const (
	// legacyCounterPin is the name agents before slots pinned the counter
	// hash under, when it held every count.
	legacyCounterPin = "bw_counters"
	// frozenSlotPin is where Load keeps the per-CPU bw_slot_counts of an
	// agent before shared slots: its counts stay part of the IDs' counters
	// for the rest of the epoch, and no program adds to them.
	frozenSlotPin = "bw_slot_counts_percpu"
	// newSlotPin is the shared bw_slot_counts while migrateCounterPins
	// puts it in place of a per-CPU one (bpffs refuses a dot in a name).
	newSlotPin = "bw_slot_counts_new"
)

// migrateCounterPins prepares the counter pins under pinPath for Load, which
// holds the pin directory's lock; slotCounts and slotMoved are the specs of
// bw_slot_counts and bw_slot_moved as Load will make them:
//
//   - a bw_counters pin is the counter hash of an agent without slots (one of
//     an earlier version, or one it was downgraded to, which then made it
//     anew): it holds every count, so the slot maps beside it, if any, are
//     stale, and it is renamed to bw_hash_counts, replacing a stale one.
//     Renamed, it keeps its map, its counts and its epoch; and a downgraded
//     agent later finds no bw_counters and starts a new epoch (its counters
//     restart from zero, the saved totals are kept) instead of reading the
//     hash alone, a part of the counts, as if they had gone down.
//   - a per-CPU bw_slot_counts (an agent before shared slots) is renamed to
//     frozenSlotPin, and a new, shared one made at zero takes its name, in
//     two renames that a later Load completes if the first was the last:
//     the new map is pinned as newSlotPin first. The earlier agent's
//     programs go on counting in the frozen map until Load attaches its
//     own; Load then reads it (see loadFrozen).
//   - otherwise the three counter pins are kept if all are there, and removed
//     if some are missing (removed by hand): Load makes new ones, a new
//     epoch.
//   - a bw_slot_moved of another size than slotMoved's is removed: an agent
//     before shared slots sized it for at most 8,192 slots. It holds marks
//     alone, no count, and a Datapath's first read after a start is of
//     every counter (the agent's is EachCounter).
func migrateCounterPins(pinPath string, slotCounts, slotMoved *ebpf.MapSpec) error {
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
	rename := func(from, to string) error {
		if err := os.Rename(path(from), path(to)); err != nil {
			return permission(fmt.Errorf("rename pin %s: %w", from, err))
		}
		return nil
	}
	epoch := []string{bwacctMapBwHashCounts, bwacctMapBwSlots, bwacctMapBwSlotCounts, frozenSlotPin, newSlotPin}
	if exists(legacyCounterPin) {
		if err := remove(epoch...); err != nil {
			return err
		}
		return rename(legacyCounterPin, bwacctMapBwHashCounts)
	}
	if exists(newSlotPin) {
		// A migration stopped after its first rename goes on; one stopped
		// before it starts again.
		if exists(frozenSlotPin) && !exists(bwacctMapBwSlotCounts) {
			if err := rename(newSlotPin, bwacctMapBwSlotCounts); err != nil {
				return err
			}
		} else if err := remove(newSlotPin); err != nil {
			return err
		}
	}
	if exists(bwacctMapBwSlotCounts) {
		perCPU, err := pinIsPerCPU(path(bwacctMapBwSlotCounts))
		if err != nil {
			return err
		}
		if perCPU && exists(frozenSlotPin) {
			// Two per-CPU maps: not a state any agent leaves.
			return remove(epoch...)
		}
		if perCPU {
			if err := pinNewMap(slotCounts, path(newSlotPin)); err != nil {
				return err
			}
			if err := rename(bwacctMapBwSlotCounts, frozenSlotPin); err != nil {
				return err
			}
			if err := rename(newSlotPin, bwacctMapBwSlotCounts); err != nil {
				return err
			}
		}
	}
	if exists(bwacctMapBwSlotMoved) {
		n, err := pinnedEntries(path(bwacctMapBwSlotMoved))
		if err != nil {
			return err
		}
		if n != slotMoved.MaxEntries {
			if err := remove(bwacctMapBwSlotMoved); err != nil {
				return err
			}
		}
	}
	for _, name := range epoch[:3] {
		if !exists(name) {
			return remove(epoch...)
		}
	}
	return nil
}

// pinnedEntries returns the size of the map pinned at path.
func pinnedEntries(path string) (uint32, error) {
	m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return 0, permission(fmt.Errorf("open pin %s: %w", filepath.Base(path), err))
	}
	defer m.Close()
	return m.MaxEntries(), nil
}

// pinIsPerCPU reports whether the map pinned at path is a per-CPU array.
func pinIsPerCPU(path string) (bool, error) {
	m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return false, permission(fmt.Errorf("open pin %s: %w", filepath.Base(path), err))
	}
	defer m.Close()
	return m.Type() == ebpf.PerCPUArray, nil
}

// pinNewMap makes a map of spec and pins it at path.
func pinNewMap(spec *ebpf.MapSpec, path string) error {
	spec = spec.Copy()
	spec.Pinning = ebpf.PinNone
	m, err := ebpf.NewMap(spec)
	if err != nil {
		return permission(fmt.Errorf("make map %s: %w", spec.Name, err))
	}
	defer m.Close()
	if err := m.Pin(path); err != nil {
		return permission(fmt.Errorf("pin map %s: %w", filepath.Base(path), err))
	}
	return nil
}

// PinnedCounters reads id's counters from the maps pinned under pinPath,
// without loading the data plane (so beside a running agent): its entry in
// bw_hash_counts, summed over CPUs, plus its slot's (and its slot's frozen
// counts, if any), credits left out. It is for tests and tools that check
// the kernel's figures against the agent's.
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
	var rx, tx [2]uint64 // struct half_counters
	if err := counts.Lookup(slot, &rx); err != nil {
		return c, fmt.Errorf("counters of %d in slot %d: %w", id, slot, err)
	}
	if err := counts.Lookup(maxSlots+slot, &tx); err != nil {
		return c, fmt.Errorf("counters of %d in slot %d: %w", id, slot, err)
	}
	c.plus(Counters{RxBytes: rx[0], RxPackets: rx[1], TxBytes: tx[0], TxPackets: tx[1]})
	frozen, err := load(frozenSlotPin)
	if errors.Is(err, os.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return c, err
	}
	defer frozen.Close()
	var fvals []bwacctCounters // its slots may end before slot
	if err := frozen.Lookup(slot, &fvals); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return c, fmt.Errorf("frozen counters of %d in slot %d: %w", id, slot, err)
	}
	for _, v := range fvals {
		c.add(v)
	}
	return c, nil
}
