package quota

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestValidName(t *testing.T) {
	for _, ok := range []string{"john", "user123", "alice@example.com", "a_b-c.d", "ünïcode", strings.Repeat("x", MaxNameLen)} {
		if err := ValidName(ok); err != nil {
			t.Errorf("ValidName(%q) = %v", ok, err)
		}
	}
	for name, why := range map[string]string{
		"":                                "empty",
		"../etc/passwd":                   "'.'",
		"a/b":                             "separator",
		"a\\b":                            "separator",
		"..":                              "'.'",
		"a..b":                            "'..'",
		".hidden":                         "'.'",
		"-rf":                             "'-'",
		"a\x00b":                          "control",
		"a\nb":                            "control",
		"a\x7fb":                          "control",
		"a b":                             "whitespace",
		"\xff\xfe":                        "UTF-8",
		strings.Repeat("x", MaxNameLen+1): "longer",
	} {
		err := ValidName(name)
		if !errors.Is(err, ErrBadName) || !strings.Contains(err.Error(), why) {
			t.Errorf("ValidName(%q) = %v, want ErrBadName mentioning %q", name, err, why)
		}
	}
}

func TestParseLimit(t *testing.T) {
	for in, want := range map[string]uint64{
		"10240": 10 * GiB, "500M": 500 * MiB, "10G": 10 * GiB, "1.5T": TiB + TiB/2, "10gb": 10 * GiB,
		"2GiB": 2 * GiB, "64K": 64 * KiB, "unlimited": 0, "0": 0, " 1 ": MiB, "1234B": 1234,
		"1152921504606846975B": MaxLimit - 1, "1073741824G": MaxLimit,
	} {
		got, err := ParseLimit(in)
		if err != nil || got != want {
			t.Errorf("ParseLimit(%q) = %d, %v; want %d", in, got, err, want)
		}
		if want != 0 {
			if back, err := ParseLimit(FormatLimit(got)); err != nil || back != got {
				t.Errorf("FormatLimit(%d) = %q reads back as %d, %v", got, FormatLimit(got), back, err)
			}
		}
	}
	for _, in := range []string{"", "abc", "-5", "10X", "1e3", "99999999999999999999", "2000000T", "G", "1.2.3M", "NaN"} {
		if _, err := ParseLimit(in); !errors.Is(err, ErrBadLimit) {
			t.Errorf("ParseLimit(%q) = %v, want ErrBadLimit", in, err)
		}
	}
}

func TestSchedule(t *testing.T) {
	loc, err := time.LoadLocation("Asia/Jakarta")
	if err != nil {
		t.Skip(err)
	}
	at := func(s string) time.Time {
		tm, err := time.ParseInLocation("2006-01-02 15:04", s, loc)
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	for _, c := range []struct{ sched, now, next string }{
		{"daily", "2026-11-29 23:59", "2026-11-30 00:00"},
		{"daily", "2026-11-30 00:00", "2026-12-01 00:00"},
		{"weekly:mon", "2026-11-29 10:00", "2026-11-30 00:00"}, // a Sunday
		{"weekly:sun", "2026-11-29 10:00", "2026-12-06 00:00"},
		{"weekly:0", "2026-11-28 10:00", "2026-11-29 00:00"},
		{"monthly:1", "2026-11-29 10:00", "2026-12-01 00:00"},
		{"monthly:31", "2026-02-10 10:00", "2026-02-28 00:00"},
		{"monthly:31", "2026-02-28 00:00", "2026-03-31 00:00"},
		{"monthly:15", "2026-12-20 00:00", "2027-01-15 00:00"},
	} {
		s, err := ParseSchedule(c.sched)
		if err != nil {
			t.Fatal(err)
		}
		if got := s.Next(at(c.now)); !got.Equal(at(c.next)) {
			t.Errorf("%s after %s: %v, want %s", c.sched, c.now, got, c.next)
		}
		if back, _ := ParseSchedule(s.String()); back != s {
			t.Errorf("%v does not round-trip through %q", s, s.String())
		}
	}
	for _, bad := range []string{"hourly", "weekly", "weekly:funday", "monthly:0", "monthly:32", "daily:3", "none:1"} {
		if _, err := ParseSchedule(bad); !errors.Is(err, ErrBadSchedule) {
			t.Errorf("ParseSchedule(%q) = %v", bad, err)
		}
	}
	if !(Schedule{}).Next(time.Now()).IsZero() {
		t.Error("the zero schedule resets")
	}
}

func TestSince(t *testing.T) {
	for _, c := range []struct {
		base, cur Sample
		want      Usage
	}{
		{Sample{Epoch{Origin: "e"}, 10, 20}, Sample{Epoch{Origin: "e"}, 15, 20}, Usage{5, 0}},
		{Sample{Epoch{Origin: "e"}, 10, 20}, Sample{Epoch{Origin: "e"}, 3, 25}, Usage{3, 25}},   // went down: restarted
		{Sample{Epoch{Origin: "e"}, 10, 20}, Sample{Epoch{Origin: "f"}, 50, 60}, Usage{50, 60}}, // new epoch
		{Sample{}, Sample{Epoch{Origin: "e"}, 7, 8}, Usage{7, 8}},                               // first reading
		{Sample{Epoch{Origin: "e"}, 7, 8}, Sample{Epoch{Origin: "e"}, 7, 8}, Usage{}},
	} {
		if got := Since(c.base, c.cur); got != c.want {
			t.Errorf("Since(%v, %v) = %v, want %v", c.base, c.cur, got, c.want)
		}
	}
}

// TestAdvance walks one user through the rules, one step per row.
func TestAdvance(t *testing.T) {
	t0 := time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC)
	r := Rules{Metric: Total, Warning: 0.8}
	lim := Plan{Limit: 1000}
	var s State
	type step struct {
		name    string
		do      func(now time.Time) error
		plan    Plan
		slack   uint64
		actions string // events emitted, space separated
		status  Status
	}
	add := func(up, down uint64) func(time.Time) error {
		return func(now time.Time) error { s.Add(now, Usage{up, down}); return nil }
	}
	steps := []step{
		{"unlimited", add(5000, 0), Plan{}, 0, "", Unlimited},
		{"limit set, far over", nil, lim, 0, "block", Blocked},
		{"reset lifts it", func(now time.Time) error { s.Reset(now, ""); return nil }, lim, 0, "unblock", Active},
		{"warning at 80%", add(400, 400), lim, 0, "", Warning},
		{"just under", add(199, 0), lim, 0, "", Warning},
		{"at the limit", add(1, 0), lim, 0, "block", Blocked},
		{"stays blocked", add(0, 0), lim, 0, "", Blocked},
		{"manual unblock", func(now time.Time) error {
			ev, err := s.Unblock(now, lim, 0)
			if len(ev) != 1 || ev[0].Action != ActUnblock {
				t.Errorf("unblock events %v", ev)
			}
			return err
		}, lim, 0, "", Warning},
		{"not re-blocked while over", add(500, 0), lim, 0, "", Warning},
		{"limit lowered: override holds", nil, Plan{Limit: 900}, 0, "", Warning},
		{"limit raised but still over: blocked again", nil, Plan{Limit: 1200}, 0, "block", Blocked},
		{"limit raised above usage", nil, Plan{Limit: 3000}, 0, "unblock", Active},
		{"disable", func(now time.Time) error { s.Disable(now); return nil }, Plan{Limit: 3000}, 0, "", Disabled},
		{"unblock refused while disabled", func(now time.Time) error {
			if _, err := s.Unblock(now, lim, 0); !errors.Is(err, ErrDisabled) {
				t.Errorf("unblock of a disabled user: %v", err)
			}
			return nil
		}, Plan{Limit: 3000}, 0, "", Disabled},
		{"reset keeps disabled", func(now time.Time) error { s.Reset(now, ""); return nil }, Plan{Limit: 3000}, 0, "", Disabled},
		{"enable", func(now time.Time) error { s.Enable(now); return nil }, Plan{Limit: 3000}, 0, "", Active},
		{"kernel slack: within 64 KiB counts as reached", add(2990, 0), Plan{Limit: 3000}, 64, "block", Blocked},
		{"unblock for a while", func(now time.Time) error { _, err := s.Unblock(now, Plan{Limit: 3000}, time.Minute); return err }, Plan{Limit: 3000}, 64, "", Warning},
		{"duration over: blocked again", func(time.Time) error { t0 = t0.Add(2 * time.Minute); return nil }, Plan{Limit: 3000}, 64, "block", Blocked},
		{"unblock, then reset ends the override", func(now time.Time) error {
			if _, err := s.Unblock(now, Plan{Limit: 3000}, 0); err != nil {
				return err
			}
			s.Reset(now, "")
			if s.Override.Active {
				t.Error("reset left the override")
			}
			return nil
		}, Plan{Limit: 3000}, 64, "", Active},
		{"expired", nil, Plan{Limit: 3000, Expires: At(t0.Add(-time.Hour))}, 0, "block", Blocked},
		{"expiry moved", nil, Plan{Limit: 3000, Expires: At(t0.Add(time.Hour))}, 0, "unblock", Active},
	}
	for _, st := range steps {
		t0 = t0.Add(time.Second)
		if st.do != nil {
			if err := st.do(t0); err != nil {
				t.Fatalf("%s: %v", st.name, err)
			}
		}
		ev := s.Advance(t0, st.plan, r, st.slack)
		var acts []string
		for _, e := range ev {
			acts = append(acts, e.Action)
		}
		if got := strings.Join(acts, " "); got != st.actions {
			t.Errorf("%s: events %q, want %q", st.name, got, st.actions)
		}
		if got := s.Status(st.plan, r); got != st.status {
			t.Errorf("%s: status %s, want %s (state %+v)", st.name, got, st.status, s)
		}
	}
	if s.Reason != "" || !s.BlockTime.IsZero() {
		t.Errorf("unblocked state keeps block fields: %+v", s)
	}
}

func TestScheduledResetAndRollover(t *testing.T) {
	loc := time.FixedZone("WIB", 7*3600)
	r := Rules{Metric: Upload, Warning: 0.8}
	sched, _ := ParseSchedule("monthly:1")
	p := Plan{Limit: 100, Reset: sched}
	var s State
	now := time.Date(2026, 11, 30, 23, 59, 0, 0, loc)
	s.Add(now, Usage{Up: 150, Down: 1000})
	if ev := s.Advance(now, p, r, 0); len(ev) != 1 || ev[0].Reason != ReasonLimit {
		t.Fatalf("events %v", ev)
	}
	if want := time.Date(2026, 12, 1, 0, 0, 0, 0, loc); !s.NextReset.Time().Equal(want) {
		t.Fatalf("next reset %v, want %v", s.NextReset, want)
	}
	// Midnight local time: the day rolls over and the monthly reset is due.
	now = time.Date(2026, 12, 1, 0, 0, 1, 0, loc)
	fin, rolled := s.Add(now, Usage{Up: 1})
	if !rolled || fin.Day != "2026-11-30" || fin.Usage != (Usage{150, 1000}) {
		t.Errorf("rollover = %v, %v", fin, rolled)
	}
	if s.Day != "2026-12-01" || s.Today != (Usage{Up: 1}) {
		t.Errorf("today = %s %v", s.Day, s.Today)
	}
	ev := s.Advance(now, p, r, 0)
	if len(ev) != 2 || ev[0].Action != ActReset || ev[1].Action != ActUnblock {
		t.Errorf("scheduled reset events %v", ev)
	}
	if s.Total != (Usage{}) || !s.LastReset.Time().Equal(now) {
		t.Errorf("after scheduled reset: %+v", s)
	}
	if want := time.Date(2027, 1, 1, 0, 0, 0, 0, loc); !s.NextReset.Time().Equal(want) {
		t.Errorf("next reset %v, want %v", s.NextReset, want)
	}
}

func TestReached(t *testing.T) {
	th := []int{80, 90}
	for _, tc := range []struct {
		used, limit uint64
		want        int
	}{
		{0, 100, 0},
		{79, 100, 0},
		{80, 100, 80},
		{89, 100, 80},
		{90, 100, 90},
		{200, 100, 90},
		{5, 0, 0},                               // unlimited
		{MaxLimit / 5 * 4, MaxLimit, 0},         // 0.4 byte under 80% of 1 EiB
		{80 << 54, 100 << 54, 80},               // exactly 80%: 100 x used overflows 64 bits
		{^uint64(0), ^uint64(0) / 100 * 90, 90}, // above the limit at the largest counts
		{8_000_000_000, 10_000_000_001, 0},
		{8_000_000_001, 10_000_000_001, 80},
	} {
		if got := Reached(tc.used, tc.limit, th); got != tc.want {
			t.Errorf("Reached(%d, %d) = %d, want %d", tc.used, tc.limit, got, tc.want)
		}
	}
	if got := Reached(50, 100, nil); got != 0 {
		t.Errorf("Reached without thresholds = %d", got)
	}
}

func TestWarnFrom(t *testing.T) {
	exp := At(time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC))
	if got, want := WarnFrom(exp, 3), At(time.Date(2026, 11, 28, 0, 0, 0, 0, time.UTC)); got != want {
		t.Errorf("WarnFrom 3 days = %v, want %v", got.Time().UTC(), want.Time().UTC())
	}
	if WarnFrom(0, 3) != 0 || WarnFrom(exp, 0) != 0 {
		t.Error("WarnFrom without an expiry or days is not zero")
	}
}
