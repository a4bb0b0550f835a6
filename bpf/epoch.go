package bpf

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"unicode"
)

// Epoch names the lifetime of the kernel counters: the boot and the counter
// map. Counters never go down within one epoch; a new epoch (a reboot, or
// the maps removed and created anew) means they restarted from zero.
type Epoch struct {
	// Boot is the kernel's boot ID (/proc/sys/kernel/random/boot_id).
	Boot string
	// CounterMap is the kernel's ID of the counter hash, bw_hash_counts
	// (pinned as bw_counters before slots; the slot maps live and die
	// with it).
	CounterMap uint32
}

// String returns the epoch as stored in databases: "BOOTID/MAPID", for
// instance "0b6f5d3e-6b1c-4a36-9d55-2d0cf2b9e0a7/42". ParseEpoch reads it
// back.
func (e Epoch) String() string {
	return e.Boot + "/" + strconv.FormatUint(uint64(e.CounterMap), 10)
}

// ParseEpoch parses what Epoch.String returns. Anything else, including a
// map ID with a sign or leading zeros, or a boot ID that is empty or holds
// a slash or white space, is an error wrapping ErrInvalidEpoch.
func ParseEpoch(s string) (Epoch, error) {
	boot, id, ok := strings.Cut(s, "/")
	if !ok || boot == "" || strings.ContainsFunc(boot, unicode.IsSpace) {
		return Epoch{}, fmt.Errorf("%w: %q", ErrInvalidEpoch, s)
	}
	n, err := strconv.ParseUint(id, 10, 32)
	if err != nil {
		return Epoch{}, fmt.Errorf("%w: %q: map ID: %w", ErrInvalidEpoch, s, err)
	}
	e := Epoch{Boot: boot, CounterMap: uint32(n)}
	if e.String() != s {
		return Epoch{}, fmt.Errorf("%w: %q: map ID not in canonical form", ErrInvalidEpoch, s)
	}
	return e, nil
}

// Epoch returns the lifetime of the counters that Counters, EachCounter,
// EachMoved and CountersOf read.
func (d *Datapath) Epoch() (Epoch, error) {
	if d.epoch.Boot != "" {
		return d.epoch, nil
	}
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return Epoch{}, fmt.Errorf("read boot id: %w", err)
	}
	info, err := d.objs.BwHashCounts.Info()
	if err != nil {
		return Epoch{}, fmt.Errorf("counter map info: %w", err)
	}
	id, ok := info.ID()
	if !ok {
		return Epoch{}, fmt.Errorf("counter map info: kernel reports no map ID")
	}
	d.epoch = Epoch{Boot: strings.TrimSpace(string(boot)), CounterMap: uint32(id)}
	return d.epoch, nil
}
