package bpf_test

import (
	"errors"
	"math"
	"testing"

	"github.com/myvpn/bwagent/bpf"
)

func TestCeiling(t *testing.T) {
	for _, c := range []struct{ used, remaining, want uint64 }{
		{0, 0, 0},
		{0, 1 << 20, 1 << 20},
		{5000, 1 << 20, 5000 + 1<<20},
		{7, 0, 7}, // nothing left: the ceiling is where the charge stands
		{math.MaxUint64 - 10, 10, math.MaxUint64},
		{math.MaxUint64 - 10, 11, math.MaxUint64}, // saturates instead of wrapping to 0
		{1, math.MaxUint64, math.MaxUint64},
		{math.MaxUint64, math.MaxUint64, math.MaxUint64},
	} {
		if got := bpf.Ceiling(c.used, c.remaining); got != c.want {
			t.Errorf("Ceiling(%d, %d) = %d, want %d", c.used, c.remaining, got, c.want)
		}
	}
}

func TestEpochString(t *testing.T) {
	// The stored form, as the agent's databases hold it.
	const stored = "0b6f5d3e-6b1c-4a36-9d55-2d0cf2b9e0a7/42"
	e, err := bpf.ParseEpoch(stored)
	if err != nil {
		t.Fatal(err)
	}
	if want := (bpf.Epoch{Boot: "0b6f5d3e-6b1c-4a36-9d55-2d0cf2b9e0a7", CounterMap: 42}); e != want {
		t.Fatalf("ParseEpoch(%q) = %+v, want %+v", stored, e, want)
	}
	for _, e := range []bpf.Epoch{
		e,
		{Boot: "boot1", CounterMap: 7},
		{Boot: "b", CounterMap: 0},
		{Boot: "b", CounterMap: math.MaxUint32},
	} {
		s := e.String()
		if got, err := bpf.ParseEpoch(s); err != nil || got != e {
			t.Errorf("ParseEpoch(%q) = %+v, %v; want %+v", s, got, err, e)
		}
	}
	if s := (bpf.Epoch{Boot: "boot1", CounterMap: 7}).String(); s != "boot1/7" {
		t.Errorf("String() = %q, want boot1/7", s)
	}
	for _, bad := range []string{
		"", "/", "boot", "boot/", "/7", "boot/x", "boot/-1", "boot/+7", "boot/007",
		"boot/4294967296", "a/b/7", "boot /7", "boot/7 ", "boot/7\n", "xray@1700000000.5",
	} {
		if e, err := bpf.ParseEpoch(bad); !errors.Is(err, bpf.ErrInvalidEpoch) {
			t.Errorf("ParseEpoch(%q) = %+v, %v; want ErrInvalidEpoch", bad, e, err)
		}
	}
}
