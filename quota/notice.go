package quota

import (
	"math/bits"
	"time"
)

// Actions of the events recorded only to be notified. They go to the state
// database with the others, and never to the block log.
const (
	ActThreshold = "threshold" // usage reached a configured share of the limit
	ActExpiring  = "expiring"  // the plan expires within the configured days
	ActFailed    = "failed"    // a part of the agent failed
	ActRecovered = "recovered" // a part of the agent that failed works again
)

// Reached returns the highest of thresholds (percentages of the limit, in
// ascending order) that used reaches, or 0 when it reaches none or limit is
// 0 (unlimited). It is exact for any byte counts.
func Reached(used, limit uint64, thresholds []int) int {
	if limit == 0 {
		return 0
	}
	r := 0
	for _, t := range thresholds {
		if t <= 0 {
			continue
		}
		// used/limit >= t/100, in 128 bits.
		uh, ul := bits.Mul64(used, 100)
		lh, ll := bits.Mul64(limit, uint64(t))
		if uh > lh || (uh == lh && ul >= ll) {
			r = t
		}
	}
	return r
}

// WarnFrom returns the instant from which a plan expiring at expires is
// warned of, days days (of 24 hours) before it; the zero Instant when it
// never expires or days is 0.
func WarnFrom(expires Instant, days uint32) Instant {
	if expires.IsZero() || days == 0 {
		return 0
	}
	return expires - Instant(time.Duration(days)*24*time.Hour)
}
