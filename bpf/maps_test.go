package bpf_test

import (
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
