package quota

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestParseRate(t *testing.T) {
	for in, want := range map[string]Rate{
		"20mbit": 20e6, "20Mbit": 20e6, "512kbit": 512e3, "1gbit": 1e9, "1.5mbit": 1.5e6,
		"1kbit": MinRate, "10gbit": MaxRate, "0.5mbit": 500e3,
	} {
		got, err := ParseRate(in)
		if err != nil || got != want {
			t.Errorf("ParseRate(%q) = %v, %v; want %d", in, got, err, want)
			continue
		}
		if back, err := ParseRate(got.String()); err != nil || back != got {
			t.Errorf("ParseRate(%q.String() = %q) = %v, %v", in, got.String(), back, err)
		}
	}
	if s := Rate(1500).String(); s != "1.5kbit" {
		t.Errorf("Rate(1500) = %q", s)
	}
	for in, why := range map[string]string{
		"20mb": "no unit", "20M": "no unit", "fast": "no unit", "0kbit": "zero", "-5mbit": "not a positive number",
		"": "no unit", "mbit": "no number", "20": "no unit", "11gbit": "above 10gbit", "0.5kbit": "below 1kbit",
		"99999999999999999999gbit": "above 10gbit", "1e3kbit": "not a positive number", "1..2mbit": "not a number",
		"20 mbit": "not a positive number",
	} {
		_, err := ParseRate(in)
		if !errors.Is(err, ErrBadRate) || !strings.Contains(err.Error(), why) ||
			!strings.Contains(err.Error(), "kbit, mbit or gbit") || !strings.Contains(err.Error(), `"`+in+`"`) {
			t.Errorf("ParseRate(%q) = %v; want ErrBadRate naming the value, %q and the units", in, err, why)
		}
	}
}

func TestParseSpeed(t *testing.T) {
	for in, want := range map[string]Speed{"20mbit": {20e6, 20e6}, "10mbit/2mbit": {10e6, 2e6}} {
		got, err := ParseSpeed(in)
		if err != nil || got != want || got.String() != in || !got.Valid() {
			t.Errorf("ParseSpeed(%q) = %v (%q), %v; want %v", in, got, got.String(), err, want)
		}
	}
	for _, in := range []string{"10mbit/", "/2mbit", "10mbit/2mb", "10mbit/2mbit/1mbit", "off"} {
		if got, err := ParseSpeed(in); !errors.Is(err, ErrBadRate) {
			t.Errorf("ParseSpeed(%q) = %v, %v; want ErrBadRate", in, got, err)
		}
	}
	if (Speed{Down: 5}).Valid() || (Speed{Down: 20e6}).Valid() || !(Speed{}).Valid() {
		t.Error("Valid accepts a rate out of bounds or a single direction")
	}
	if got := (Speed{}).Or(Speed{1e6, 1e6}); got != (Speed{1e6, 1e6}) {
		t.Errorf("Or: %v", got)
	}
	if got := Rate(20e6).BytesPerSecond(); got != 2_500_000 {
		t.Errorf("BytesPerSecond = %d", got)
	}
}

// A user over the limit with a throttle rate is THROTTLED, not blocked
// outright: their caps are the throttle rate, the event says throttled, and
// everything that lifts a block lifts it. Without a throttle rate (the
// plan's or the default) it is a block as before; expiry and disable still
// block.
func TestThrottled(t *testing.T) {
	now := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	speed, throttle := Speed{20e6, 20e6}, Speed{4e6, 4e6}
	r := Rules{Metric: Total, Warning: 0.8}
	p := Plan{Limit: 100, Speed: speed, Throttle: throttle}
	var s State
	if got := s.SpeedOf(p, r); got != speed {
		t.Errorf("caps under the limit = %v, want %v", got, speed)
	}
	s.Add(now, Usage{Down: 100})
	ev := s.Advance(now, p, r, 0)
	if len(ev) != 1 || ev[0].Action != ActThrottle || ev[0].Reason != ReasonThrottled {
		t.Fatalf("events at the limit = %+v", ev)
	}
	if st := s.Status(p, r); st != Throttled || s.Enforced(p, r) || s.SpeedOf(p, r) != throttle {
		t.Errorf("at the limit: %s, enforced %v, caps %v", st, s.Enforced(p, r), s.SpeedOf(p, r))
	}
	if ev := s.Advance(now, p, r, 0); len(ev) != 0 {
		t.Errorf("a second tick: %+v", ev)
	}
	// Without its throttle rate the same state is a block.
	noThrottle := Plan{Limit: 100, Speed: speed}
	if st := s.Status(noThrottle, r); st != Blocked || !s.Enforced(noThrottle, r) || !s.SpeedOf(noThrottle, r).IsZero() {
		t.Errorf("without a throttle rate: %s, enforced %v", st, s.Enforced(noThrottle, r))
	}
	// The default throttle rate does what the plan's does.
	rd := r
	rd.Throttle = throttle
	if st := s.Status(noThrottle, rd); st != Throttled || s.SpeedOf(noThrottle, rd) != throttle {
		t.Errorf("default throttle: %s, %v", st, s.SpeedOf(noThrottle, rd))
	}
	// A reset lifts it and brings the speed cap back.
	s.Reset(now, "")
	ev = s.Advance(now, p, r, 0)
	if len(ev) != 1 || ev[0].Action != ActUnblock || s.Status(p, r) != Active || s.SpeedOf(p, r) != speed {
		t.Errorf("after reset: %+v, %s, %v", ev, s.Status(p, r), s.SpeedOf(p, r))
	}
	// A manual unblock too: full speed, not the throttle rate.
	s.Add(now, Usage{Down: 100})
	s.Advance(now, p, r, 0)
	if _, err := s.Unblock(now, p, 0); err != nil || s.SpeedOf(p, r) != speed {
		t.Errorf("manual unblock: %v, %v", err, s.SpeedOf(p, r))
	}
	// A raised limit.
	var s2 State
	s2.Add(now, Usage{Down: 100})
	s2.Advance(now, p, r, 0)
	raised := p
	raised.Limit = 200
	if s2.Advance(now, raised, r, 0); s2.Status(raised, r) != Active {
		t.Errorf("raised limit: %s", s2.Status(raised, r))
	}
	// Expiry and disable block, throttle rate or not.
	var s3 State
	exp := p
	exp.Expires = At(now.Add(-time.Hour))
	if ev := s3.Advance(now, exp, r, 0); len(ev) != 1 || ev[0].Action != ActBlock || s3.Status(exp, r) != Blocked || !s3.Enforced(exp, r) {
		t.Errorf("expired: %+v, %s", ev, s3.Status(exp, r))
	}
	var s4 State
	s4.Add(now, Usage{Down: 100})
	s4.Advance(now, p, r, 0)
	s4.Disable(now)
	if s4.Status(p, r) != Disabled || !s4.Enforced(p, r) || !s4.SpeedOf(p, r).IsZero() {
		t.Errorf("disabled: %s", s4.Status(p, r))
	}
	if st, err := ParseStatus("throttled"); err != nil || st != Throttled {
		t.Errorf("ParseStatus: %v, %v", st, err)
	}
}
