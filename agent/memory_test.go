package agent

import (
	"runtime/debug"
	"testing"
	"time"
	"unsafe"
)

// TestMemoryLimit: the room above the memory in use is a second of the
// agent's allocation, at least a sixteenth of it plus 4 MiB and at most
// half of it plus 16 MiB; never under 40 MiB. The limiter takes the lower
// of the rates over the last two ten-second windows, and sets the runtime's
// limit.
func TestMemoryLimit(t *testing.T) {
	const mib = 1 << 20
	for _, tc := range []struct {
		inUse, rate uint64
		want        int64
	}{
		{0, 0, 40 * mib},
		{80 * mib, 0, 80*mib + 5*mib + 4*mib},           // idle: the floor
		{80 * mib, 20 * mib, 80*mib + 20*mib},           // a second of 20 MiB/s
		{80 * mib, 100 * mib, 80*mib + 40*mib + 16*mib}, // a burst: the bound
		{400 * mib, 1 * mib, 400*mib + 25*mib + 4*mib},  // big and quiet
		{16 * mib, 4 * mib, 40 * mib},                   // small: the least
		{64 * mib, 8 * mib, 64*mib + 8*mib},             // a second of 8 MiB/s: the floor
	} {
		if got := MemoryLimit(tc.inUse, tc.rate); got != tc.want {
			t.Errorf("MemoryLimit(%d MiB, %d MiB/s) = %.1f MiB, want %.1f", tc.inUse/mib, tc.rate/mib, float64(got)/mib, float64(tc.want)/mib)
		}
	}

	defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
	var m MemoryLimiter
	now := time.Now()
	first := m.Update(now)
	if got := debug.SetMemoryLimit(-1); got != first || first < 40*mib {
		t.Errorf("Update set %d, returned %d", got, first)
	}
	if m.rate != 0 {
		t.Errorf("a rate of %d after one update", m.rate)
	}
	sink := make([][]byte, 0, 64)
	for range 64 {
		sink = append(sink, make([]byte, 1<<20)) // 64 MiB allocated
	}
	m.Update(now.Add(5 * time.Second))
	if m.rate != 0 {
		t.Errorf("a rate of %d before ten seconds", m.rate)
	}
	m.Update(now.Add(10 * time.Second))
	if m.rate != 0 || m.last < 6*mib { // at least 64 MiB over 10 s: a burst so far
		t.Errorf("rate %d B/s (last window %d) after 64 MiB in the first 10 s", m.rate, m.last)
	}
	for range 64 {
		sink = append(sink, make([]byte, 1<<20))
	}
	m.Update(now.Add(20 * time.Second))
	if m.rate < 6*mib { // 64 MiB in each of two windows: steady
		t.Errorf("rate %d B/s after 64 MiB in each of two windows", m.rate)
	}
	_ = sink
}

// TestSizes: what the agent keeps for every user and every open Xray
// connection stays the size its docs give (on 64-bit machines): each is
// counted 50,000 times at 50,000 Xray users, and a field added takes a
// larger size class.
func TestSizes(t *testing.T) {
	if unsafe.Sizeof(uintptr(0)) != 8 {
		t.Skip("sizes are for 64-bit machines")
	}
	for _, tc := range []struct {
		what      string
		got, want uintptr
	}{
		{"xbase", unsafe.Sizeof(xbase{}), 96},
		{"kbase", unsafe.Sizeof(kbase{}), 24},
		{"xconn", unsafe.Sizeof(xconn{}), 144},
		{"record", unsafe.Sizeof(record{}), 104},
		{"user", unsafe.Sizeof(user{}), 56},
	} {
		if tc.got > tc.want {
			t.Errorf("%s takes %d bytes, more than %d", tc.what, tc.got, tc.want)
		}
	}
}
