package quota

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Rate is a speed cap in bits per second, as tc writes rates: "20mbit" is
// 20,000,000 bits per second (powers of 1000). The zero Rate is no cap.
type Rate uint64

// Bounds of a Rate: a cap below MinRate would stall any TCP connection, one
// above MaxRate caps nothing a server can move (and the kernel's bucket
// arithmetic is exact up to it).
const (
	MinRate Rate = 1000           // 1kbit
	MaxRate Rate = 10_000_000_000 // 10gbit
)

// ErrBadRate is returned by ParseRate and ParseSpeed.
var ErrBadRate = errors.New("invalid rate")

// rateUnits are the accepted units, as tc's: bits per second.
var rateUnits = []struct {
	name string
	mult float64
}{{"kbit", 1e3}, {"mbit", 1e6}, {"gbit", 1e9}}

// ParseRate parses one rate: a positive number (a fraction is allowed)
// followed by kbit, mbit or gbit (any case), from MinRate to MaxRate.
// Anything else ("20mb", "20M", "fast", "0kbit", "-5mbit") is an error
// naming the value and the accepted units.
func ParseRate(s string) (Rate, error) {
	bad := func(why string) (Rate, error) {
		return 0, fmt.Errorf("%w %q: %s (want a positive number with kbit, mbit or gbit, as tc writes rates: 512kbit, 20mbit, 1gbit)", ErrBadRate, s, why)
	}
	in := strings.ToLower(strings.TrimSpace(s))
	var num string
	var mult float64
	for _, u := range rateUnits {
		if n, ok := strings.CutSuffix(in, u.name); ok {
			num, mult = n, u.mult
			break
		}
	}
	if mult == 0 {
		return bad("no unit")
	}
	if num == "" {
		return bad("no number")
	}
	for _, r := range num {
		if (r < '0' || r > '9') && r != '.' {
			return bad("not a positive number")
		}
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || math.IsInf(f, 0) || math.IsNaN(f) {
		return bad("not a number")
	}
	bits := math.Round(f * mult)
	switch {
	case bits <= 0:
		return bad("zero")
	case bits < float64(MinRate):
		return bad("below 1kbit")
	case bits > float64(MaxRate):
		return bad("above 10gbit")
	}
	return Rate(bits), nil
}

// String formats r as ParseRate reads it, in the largest unit that keeps it
// whole ("20mbit", "1500kbit" is "1.5mbit"), or "" for no cap.
func (r Rate) String() string {
	if r == 0 {
		return ""
	}
	for i := len(rateUnits) - 1; i >= 0; i-- {
		u := rateUnits[i]
		if m := uint64(u.mult); uint64(r)%m == 0 {
			return strconv.FormatUint(uint64(r)/m, 10) + u.name
		}
	}
	return strconv.FormatFloat(float64(r)/1e3, 'f', -1, 64) + "kbit"
}

// BytesPerSecond returns r in bytes per second, what the kernel's buckets
// count (whole bytes: a rate is a whole number of bits, rounded up).
func (r Rate) BytesPerSecond() uint64 { return (uint64(r) + 7) / 8 }

// Speed is a pair of caps: the user's download (what they receive) and
// upload (what they send). The zero Speed is no cap either way.
type Speed struct{ Down, Up Rate }

// ParseSpeed parses a speed: one rate for both directions ("20mbit") or
// DOWN/UP ("10mbit/2mbit"), each as ParseRate reads it.
func ParseSpeed(s string) (Speed, error) {
	down, up, pair := strings.Cut(s, "/")
	d, err := ParseRate(down)
	if err != nil {
		return Speed{}, err
	}
	if !pair {
		return Speed{d, d}, nil
	}
	u, err := ParseRate(up)
	if err != nil {
		return Speed{}, err
	}
	return Speed{d, u}, nil
}

// String formats s as ParseSpeed reads it: "20mbit", "10mbit/2mbit", or ""
// for no cap.
func (s Speed) String() string {
	if s.Down == s.Up {
		return s.Down.String()
	}
	return s.Down.String() + "/" + s.Up.String()
}

// IsZero reports whether s caps nothing.
func (s Speed) IsZero() bool { return s == Speed{} }

// Valid reports whether each of s's rates is none or within MinRate and
// MaxRate, and s caps both directions or neither (ParseSpeed's results).
func (s Speed) Valid() bool {
	ok := func(r Rate) bool { return r >= MinRate && r <= MaxRate }
	return s.IsZero() || ok(s.Down) && ok(s.Up)
}

// Check returns nil if s is Valid, else an error wrapping ErrBadRate that
// names s and the accepted rates.
func (s Speed) Check() error {
	if s.Valid() {
		return nil
	}
	return fmt.Errorf("%w: %d/%d bit/s: want no cap, or both rates from %s to %s", ErrBadRate, s.Down, s.Up, MinRate, MaxRate)
}

// Or returns s, or def when s is zero (a user without their own caps gets
// the configured ones).
func (s Speed) Or(def Speed) Speed {
	if s.IsZero() {
		return def
	}
	return s
}
