package nettest

import (
	"fmt"
	"strings"
	"testing"
)

// CheckRate fails t unless rates (Mbit/s, one a second) average within tol
// (a fraction) of want and no second falls under half of it: a cap that
// holds.
func CheckRate(t testing.TB, what string, rates []float64, want, tol float64) {
	t.Helper()
	checkRate(t, what, rates, want, tol, true)
}

// CheckAverage is CheckRate without the floor on each second: for a
// direction policed where a drop is a loss (ingress), whose TCP may back off
// for a second.
func CheckAverage(t testing.TB, what string, rates []float64, want, tol float64) {
	t.Helper()
	checkRate(t, what, rates, want, tol, false)
}

func checkRate(t testing.TB, what string, rates []float64, want, tol float64, floor bool) {
	t.Helper()
	avg, low := average(rates), false
	for _, r := range rates {
		low = low || floor && r < want/2
	}
	msg := fmt.Sprintf("%s: %.2f Mbit/s on average for a cap of %.1f (per second: %s)", what, avg, want, FormatRates(rates))
	if avg < want*(1-tol) || avg > want*(1+tol) || low {
		t.Error(msg)
		return
	}
	t.Log(msg)
}

// CheckAtLeast fails t unless rates (Mbit/s, one a second) average at
// least min: a flow nothing slows.
func CheckAtLeast(t testing.TB, what string, rates []float64, min float64) {
	t.Helper()
	avg := average(rates)
	msg := fmt.Sprintf("%s: %.1f Mbit/s on average, want at least %.0f (per second: %s)", what, avg, min, FormatRates(rates))
	if avg < min {
		t.Error(msg)
		return
	}
	t.Log(msg)
}

// FormatRates writes rates (Mbit/s) with one decimal, space separated.
func FormatRates(rs []float64) string {
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = fmt.Sprintf("%.1f", r)
	}
	return strings.Join(s, " ")
}

func average(rs []float64) float64 {
	if len(rs) == 0 {
		return 0
	}
	var sum float64
	for _, r := range rs {
		sum += r
	}
	return sum / float64(len(rs))
}
