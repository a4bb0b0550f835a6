package quota

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Binary units. The guide's "MB" is a MiB: `set john 10240` is 10 GiB.
const (
	KiB uint64 = 1 << (10 * (iota + 1))
	MiB
	GiB
	TiB
)

// MaxLimit is the largest limit accepted: 1 EiB, far beyond any quota and
// far from overflowing a uint64 byte count.
const MaxLimit = 1 << 60

// ErrBadLimit is returned by ParseLimit.
var ErrBadLimit = errors.New("invalid limit")

// ParseLimit parses a data limit. A bare number is MiB, as the bash tool's
// `set john 10240`; a suffix K, M, G or T (optionally followed by "B" or
// "iB", any case) selects the binary unit; fractions are allowed with a
// suffix ("1.5T"). "unlimited" and "0" mean no limit and return 0.
func ParseLimit(s string) (uint64, error) {
	in := strings.TrimSpace(s)
	if strings.EqualFold(in, "unlimited") || in == "0" {
		return 0, nil
	}
	bad := func(why string) (uint64, error) {
		return 0, fmt.Errorf("%w %q: %s", ErrBadLimit, s, why)
	}
	if in == "" {
		return bad("empty")
	}
	num, unit := in, MiB
	upper := strings.ToUpper(in)
	for _, suf := range []struct {
		s string
		u uint64
	}{{"KIB", KiB}, {"MIB", MiB}, {"GIB", GiB}, {"TIB", TiB}, {"KB", KiB}, {"MB", MiB}, {"GB", GiB}, {"TB", TiB},
		{"K", KiB}, {"M", MiB}, {"G", GiB}, {"T", TiB}, {"B", 1}} {
		if strings.HasSuffix(upper, suf.s) {
			num, unit = in[:len(in)-len(suf.s)], suf.u
			break
		}
	}
	if num == "" {
		return bad("no number")
	}
	if num[0] == '-' {
		return bad("negative")
	}
	for _, r := range num {
		if (r < '0' || r > '9') && r != '.' {
			return bad("want a number of MB or a size such as 500M, 10G, 1.5T, or unlimited")
		}
	}
	if !strings.Contains(num, ".") { // whole numbers exactly, without float rounding
		n, err := strconv.ParseUint(num, 10, 64)
		if err != nil || n > MaxLimit/unit {
			return bad("larger than 1 EiB")
		}
		return n * unit, nil
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
		return bad("not a number")
	}
	b := f * float64(unit)
	if b > MaxLimit {
		return bad("larger than 1 EiB")
	}
	if b < 1 && f != 0 {
		return bad("less than one byte")
	}
	return uint64(b), nil
}

// FormatLimit formats a limit for the limits file: whole MiB as a bare
// number (the bash tool's format), anything else in bytes with a "B"
// suffix, and no limit as "unlimited". ParseLimit reads each form back.
func FormatLimit(b uint64) string {
	switch {
	case b == 0:
		return "unlimited"
	case b%MiB == 0:
		return strconv.FormatUint(b/MiB, 10)
	}
	return strconv.FormatUint(b, 10) + "B"
}
