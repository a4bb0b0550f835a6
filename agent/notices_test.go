package agent

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

// notices returns the committed events of the given actions, oldest first,
// as "action name detail".
func (e *env) notices(actions ...string) []string {
	e.t.Helper()
	es, err := e.a.store.Events("", 0)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []string
	for _, ev := range slices.Backward(es) {
		if slices.Contains(actions, ev.Action) {
			out = append(out, strings.TrimSpace(ev.Action+" "+ev.Name+" "+ev.Detail))
		}
	}
	return out
}

// lastEvent returns the last committed event of action.
func (e *env) lastEvent(action string) store.Event {
	e.t.Helper()
	es, err := e.a.store.Events("", 0)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, ev := range es {
		if ev.Action == action {
			return ev
		}
	}
	e.t.Fatalf("no %s event in %+v", action, es)
	return store.Event{}
}

// TestThresholdNotices: 80% and 90% of the limit are each noticed once per
// usage period, in order, with the usage, limit and status; again after a
// reset; never repeated by a restart; and never in the block log.
func TestThresholdNotices(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 10\n")
	e.step(0)
	th := func(want ...string) {
		t.Helper()
		if got := e.notices(quota.ActThreshold); !slices.Equal(got, want) {
			t.Fatalf("threshold notices %q, want %q", got, want)
		}
	}
	e.dp.blast(1001, 7*quota.MiB, 1500, true)
	e.step(time.Second)
	th()
	e.dp.blast(1001, quota.MiB+quota.MiB/2, 1500, true) // 8.5 MiB
	e.step(time.Second)
	th("threshold john 80")
	ev := e.lastEvent(quota.ActThreshold)
	if ev.Used != 8*quota.MiB+quota.MiB/2 || ev.Limit != 10*quota.MiB || ev.Status != string(quota.Warning) ||
		ev.Reason != "Usage reached 80% of the limit" || ev.Protocol != "ssh" || !ev.Logged {
		t.Errorf("threshold event %+v", ev)
	}
	e.dp.blast(1001, quota.MiB/4, 1500, true) // still under 90%
	e.step(time.Second)
	th("threshold john 80")

	// A restart remembers the notice.
	e.start()
	e.dp.blast(1001, quota.MiB/8, 1500, true)
	e.step(time.Second)
	th("threshold john 80")
	e.dp.blast(1001, quota.MiB/2, 1500, true) // over 90%
	e.step(time.Second)
	th("threshold john 80", "threshold john 90")
	e.step(time.Second)
	th("threshold john 80", "threshold john 90")

	// A reset starts a new period; a jump past both thresholds in one
	// tick notices each, in order.
	if err := e.a.Reset(context.Background(), "john"); err != nil {
		t.Fatal(err)
	}
	e.dp.blast(1001, 9*quota.MiB+quota.MiB/2, 1500, true)
	e.step(time.Second)
	th("threshold john 80", "threshold john 90", "threshold john 80", "threshold john 90")

	// Past both thresholds and the limit in one tick: the block only,
	// and no threshold notices later in the period.
	e.write("bw-limit.conf", "john 10\nmary 1\n")
	e.step(time.Second)
	e.dp.blast(1002, 2*quota.MiB, 1500, true)
	e.step(time.Second)
	e.step(time.Second)
	if v := e.user("mary"); v.Status != quota.Blocked {
		t.Fatalf("mary %+v", v)
	}
	th("threshold john 80", "threshold john 90", "threshold john 80", "threshold john 90")

	// The block log has the block-log actions only.
	for _, l := range e.logLines() {
		if strings.Contains(l, "%") {
			t.Errorf("a threshold notice reached the block log: %q", l)
		}
	}
}

// TestThresholdPeriodAcrossRestart: a reset, then usage past both thresholds
// while the agent was down (the kernel counts on): the new agent notices
// both, since the notices it remembers are of the earlier period.
func TestThresholdPeriodAcrossRestart(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 10\n")
	e.step(0)
	e.dp.blast(1001, 9*quota.MiB+quota.MiB/2, 1500, true)
	e.step(time.Second)
	if err := e.a.Reset(context.Background(), "john"); err != nil {
		t.Fatal(err)
	}
	e.step(time.Second)
	e.dp.blast(1001, 9*quota.MiB+quota.MiB/2, 1500, true) // while stopped
	e.start()
	e.step(time.Second)
	want := []string{"threshold john 80", "threshold john 90", "threshold john 80", "threshold john 90"}
	if got := e.notices(quota.ActThreshold); !slices.Equal(got, want) {
		t.Errorf("threshold notices %q, want %q", got, want)
	}
}

// TestThresholdRaisedLimit: a raised limit that puts usage back under a
// noticed threshold makes crossing it again news; unlimited users and an
// empty thresholds list notice nothing.
func TestThresholdRaisedLimit(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 10\nmary unlimited\n")
	e.step(0)
	e.dp.blast(1001, 8*quota.MiB+quota.MiB/2, 1500, true)
	e.dp.blast(1002, 100*quota.MiB, 1500, true)
	e.step(time.Second)
	e.write("bw-limit.conf", "john 20\nmary unlimited\n") // 42.5%
	e.step(time.Second)
	e.dp.blast(1001, 8*quota.MiB, 1500, true) // 82.5% of 20 MiB
	e.step(time.Second)
	want := []string{"threshold john 80", "threshold john 80"}
	if got := e.notices(quota.ActThreshold); !slices.Equal(got, want) {
		t.Errorf("threshold notices %q, want %q", got, want)
	}
	if ev := e.lastEvent(quota.ActThreshold); ev.Limit != 20*quota.MiB {
		t.Errorf("second notice has limit %d, want 20 MiB", ev.Limit)
	}

	e.cfg.Notify.Thresholds = nil
	if err := e.a.Reload(context.Background(), e.cfg); err != nil {
		t.Fatal(err)
	}
	e.dp.blast(1001, 2*quota.MiB, 1500, true) // 92.5%
	e.step(time.Second)
	if got := e.notices(quota.ActThreshold); !slices.Equal(got, want) {
		t.Errorf("threshold notices without thresholds %q, want %q", got, want)
	}
}

// TestExpiryNotice: an expiry date is noticed expiry_days before it, once,
// even across a restart; a new date is noticed again; the expiry itself is
// a block, as before.
func TestExpiryNotice(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 100 expires=2026-12-05\nmary 100\n")
	e.step(0)
	ex := func(want ...string) {
		t.Helper()
		if got := e.notices(quota.ActExpiring); !slices.Equal(got, want) {
			t.Fatalf("expiry notices %q, want %q", got, want)
		}
	}
	e.clock = time.Date(2026, 12, 1, 23, 59, 0, 0, time.UTC)
	e.step(0)
	ex()
	e.step(2 * time.Minute) // 2026-12-02 00:01, 3 days before
	ex("expiring john 2026-12-05T00:00:00Z")
	ev := e.lastEvent(quota.ActExpiring)
	if ev.Reason != "Expires on 2026-12-05 00:00 (in 3 days)" || ev.Limit != 100*quota.MiB || ev.Status != string(quota.Active) {
		t.Errorf("expiry event %+v", ev)
	}
	e.step(time.Hour)
	e.start()
	e.step(time.Hour)
	ex("expiring john 2026-12-05T00:00:00Z")

	// Extended: the new date is news when its time comes.
	e.write("bw-limit.conf", "john 100 expires=2026-12-10\nmary 100\n")
	e.step(time.Second)
	ex("expiring john 2026-12-05T00:00:00Z")
	e.clock = time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	e.step(0)
	ex("expiring john 2026-12-05T00:00:00Z", "expiring john 2026-12-10T00:00:00Z")
	e.clock = time.Date(2026, 12, 10, 0, 0, 1, 0, time.UTC)
	e.step(0)
	if v := e.user("john"); v.Status != quota.Blocked || v.Reason != quota.ReasonExpired {
		t.Errorf("john after expiry: %+v", v)
	}
	ex("expiring john 2026-12-05T00:00:00Z", "expiring john 2026-12-10T00:00:00Z")
}

// TestExpiryNoticeTimer: the notice is due at a time that is no midnight
// (a time zone with daylight saving time): the loop wakes for it, with no
// traffic and no other timer.
func TestExpiryNoticeTimer(t *testing.T) {
	e := newEnv(t)
	ny, err := time.LoadLocation("America/New_York")
	if err != nil {
		t.Fatal(err)
	}
	e.cfg.TimeZone, e.cfg.TimeZoneName = ny, "America/New_York"
	e.cfg.Notify.ExpiryDays = 2
	e.start()
	// 2026-11-03 00:00 EST is 72 hours after 2026-11-01 00:00 EDT: two
	// days of 24 hours before it is 2026-11-01 01:00 EDT.
	e.write("bw-limit.conf", "john 100 expires=2026-11-03\n")
	e.clock = time.Date(2026, 11, 1, 0, 30, 0, 0, ny)
	e.step(0)
	if got := e.notices(quota.ActExpiring); len(got) != 0 {
		t.Fatalf("noticed too early: %q", got)
	}
	if w := e.a.work.nextWake; !w.Equal(time.Date(2026, 11, 1, 1, 0, 0, 0, ny)) {
		t.Errorf("next wake %v, want the notice's time", w)
	}
	e.step(31 * time.Minute)
	if got := e.notices(quota.ActExpiring); len(got) != 1 {
		t.Errorf("expiry notices %q, want one", got)
	}
}

// TestHealthNotices: a part of the agent that fails is noticed once (not
// again when its error changes), its recovery once; a restart remembers a
// failure, and notices the recovery if it recovered meanwhile.
func TestHealthNotices(t *testing.T) {
	e := newEnv(t)
	e.step(0)
	h := func(want ...string) {
		t.Helper()
		if got := e.notices(quota.ActFailed, quota.ActRecovered); !slices.Equal(got, want) {
			t.Fatalf("health notices %q, want %q", got, want)
		}
	}
	h()
	fail := func(msg string) {
		e.dp.mu.Lock()
		e.dp.failNext = errors.New(msg)
		e.dp.mu.Unlock()
	}
	fail("map gone")
	e.step(time.Second)
	h("failed kernel counters")
	ev := e.lastEvent(quota.ActFailed)
	if ev.Reason != "map gone" || ev.Protocol != "" || !ev.Logged {
		t.Errorf("failed event %+v", ev)
	}
	fail("map gone again") // another error: no news
	e.step(time.Second)
	h("failed kernel counters")
	e.step(time.Second)
	h("failed kernel counters", "recovered kernel counters")
	if ev := e.lastEvent(quota.ActRecovered); ev.Reason != "was failing: map gone" {
		t.Errorf("recovered event %+v", ev)
	}

	// Failing across a restart: no second notice, then the recovery.
	fail("down")
	e.step(time.Second)
	e.start()
	fail("still down")
	e.step(time.Second)
	h("failed kernel counters", "recovered kernel counters", "failed kernel counters")
	e.step(time.Second)
	h("failed kernel counters", "recovered kernel counters", "failed kernel counters", "recovered kernel counters")

	// Failing when stopped, working at the next start: the recovery.
	fail("down")
	e.step(time.Second)
	e.start()
	e.step(time.Second)
	h("failed kernel counters", "recovered kernel counters", "failed kernel counters", "recovered kernel counters",
		"failed kernel counters", "recovered kernel counters")
	for _, l := range e.logLines() {
		if strings.Contains(l, "kernel counters") {
			t.Errorf("a health notice reached the block log: %q", l)
		}
	}
}

// TestEventsCarryUsage: every user event records the user's usage, limit
// and status when it happened.
func TestEventsCarryUsage(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 1\n")
	e.step(0)
	e.dp.blast(1001, 2*quota.MiB, 1500, true)
	e.step(time.Second)
	b := e.lastEvent(quota.ActBlock)
	if b.Limit != quota.MiB || b.Status != string(quota.Blocked) || b.Used == 0 || b.Used > quota.MiB || b.Reason != quota.ReasonLimit {
		t.Errorf("block event %+v", b)
	}
	if err := e.a.Disable(context.Background(), "john"); err != nil {
		t.Fatal(err)
	}
	if d := e.lastEvent(quota.ActDisable); d.Status != string(quota.Disabled) || d.Used != b.Used {
		t.Errorf("disable event %+v", d)
	}
}
