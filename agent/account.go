package agent

import (
	"slices"
	"time"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

// A tick costs in proportion to what changed, not to the number of users:
// only users with new traffic, a command, a changed plan or account, or a
// due timer are evaluated; only their kernel policies are written; only
// their rows are committed and their files queued. A full pass over every
// user happens at start, at local midnight, when a user's timer (scheduled
// reset, expiry, end of a manual unblock) is due, and after a reload.

// tickWork is what the current tick must still do, by user.
type tickWork struct {
	evalQ    []*user
	retryQ   []*user // to evaluate again next tick
	dirtyQ   []*user // rows to commit
	jsonQ    []*user // usage files to write
	fullEval bool    // evaluate every user this tick
	nextWake time.Time
	today    string // the local day of the last evaluation

	// The local day dayStr names, formatted once per day.
	dayY   int
	dayM   time.Month
	dayD   int
	dayStr string
}

// kernelSlack is how close to the limit an SSH user's usage counts as
// reaching it: 1/16 of the limit, at most 64 KiB.
//
// The kernel budget refuses any packet that would cross the limit, so usage
// stops short of it. A refused packet makes TCP back off and send smaller
// segments, so usage creeps up to within about one segment of the limit,
// but the first refusal can come a whole 64 KiB GSO batch early; without
// the slack such a user could sit just under the limit, unable to send,
// and never be marked blocked. A fixed 64 KiB would block a 100 KiB limit
// at 36 KiB, so small limits get a proportionally small slack.
func kernelSlack(limit uint64) uint64 {
	return min(64*quota.KiB, limit/16)
}

// queue marks u for evaluation at this tick.
func (a *Agent) queue(u *user) {
	if !u.queued {
		u.queued = true
		a.work.evalQ = append(a.work.evalQ, u)
	}
}

// touch records that u changed at now: its row is committed this tick and
// its usage file written as js says.
func (a *Agent) touch(u *user, now time.Time, js jsonState) {
	if !u.dirty {
		u.dirty = true
		a.work.dirtyQ = append(a.work.dirtyQ, u)
	}
	a.edit(u).updated = quota.At(now)
	a.markJSON(u, js)
}

// markJSON asks for u's usage file to be written (js: how soon).
func (a *Agent) markJSON(u *user, js jsonState) {
	if js <= u.json {
		return
	}
	if u.json == jsonClean {
		a.work.jsonQ = append(a.work.jsonQ, u)
	}
	u.json = js
}

// charge adds d to u's usage and queues u for evaluation. A new day
// rewrites the user's file at once, so daily_usage never shows yesterday's
// bytes.
func (a *Agent) charge(u *user, now time.Time, d quota.Usage) {
	js := jsonUsage
	day := a.day(now)
	w := a.edit(u)
	if w.day != day {
		js = jsonUrgent
	}
	use := w.usage()
	if fin, rolled := use.AddOn(day, d); rolled {
		a.rec.history = append(a.rec.history, dayRow(w.name, fin))
	}
	w.setUsage(use)
	if a.fl != nil {
		a.fleetCharge(w.name, d)
	}
	a.touch(u, now, js)
	a.queue(u)
	a.obs.Charged(w.proto(), d)
}

// day returns now's local day, formatted once per day.
func (a *Agent) day(now time.Time) string {
	w := &a.work
	y, m, d := now.Date()
	if y != w.dayY || m != w.dayM || d != w.dayD || w.dayStr == "" {
		w.dayY, w.dayM, w.dayD, w.dayStr = y, m, d, quota.Day(now)
	}
	return w.dayStr
}

// evaluate applies the rules to the users queued this tick, or to every
// present user when a timer is due or something global changed.
func (a *Agent) evaluate(now time.Time) {
	w := &a.work
	today := a.day(now)
	if active := a.xr.conns.active(); active != a.xr.wasActive {
		// Whether the kernel counts Xray's connections decides whose caps
		// it carries (capsCarried) and whether a throttled client stays
		// in Xray (xrayBlocked).
		a.xr.wasActive, w.fullEval = active, true
		a.xr.enforceAll, a.markersDirty = true, true
	}
	if w.fullEval || !now.Before(w.nextWake) || today != w.today {
		w.fullEval, w.today = false, today
		y, m, d := now.Date()
		w.nextWake = time.Date(y, m, d+1, 0, 0, 0, 0, now.Location())
		for _, u := range a.users {
			if u.r.present() {
				a.evaluateUser(u, now, today)
			}
		}
	} else {
		for _, u := range w.evalQ {
			if u.r.present() {
				a.evaluateUser(u, now, today)
			}
		}
	}
	for _, u := range w.evalQ {
		u.queued = false
	}
	clear(w.evalQ)
	w.evalQ = trimmed(w.evalQ[:0])
	for _, u := range w.retryQ {
		a.queue(u)
	}
	clear(w.retryQ)
	w.retryQ = trimmed(w.retryQ[:0])
}

// statuses are the statuses by user.status, in a byte.
var statuses = [...]quota.Status{"", quota.Disabled, quota.Blocked, quota.Throttled, quota.Warning, quota.Active, quota.Unlimited}

func statusIndex(s quota.Status) uint8 { return uint8(slices.Index(statuses[:], s)) }

// trimmed returns q, or a copy of it that holds only its elements when a
// big tick (the first: every user) left it far larger than it is now: the
// queues keep their memory from tick to tick, but not what one tick of
// 100,000 users needed.
func trimmed[T any](q []T) []T {
	if cap(q) > 4096 && len(q) < cap(q)/4 {
		return slices.Clone(q)
	}
	return q
}

func (a *Agent) evaluateUser(u *user, now time.Time, today string) {
	if u.r.day != today {
		w := a.edit(u)
		use := w.usage()
		if fin, rolled := use.AddOn(today, quota.Usage{}); rolled {
			a.rec.history = append(a.rec.history, dayRow(w.name, fin))
		}
		w.setUsage(use)
		a.touch(u, now, jsonUrgent)
	}
	t := u.r.terms()
	var slack uint64
	if _, n := a.kernelKeys(u); n > 0 || t.proto == quota.SSH {
		slack = a.fleetSlack(u.r.name, t.plan.Limit, kernelSlack(t.plan.Limit))
	}
	wasBlocked := a.xrayBlocked(u.r)
	// On a copy: a user the rules leave alone keeps its published record.
	old := u.r.state()
	st := old
	ev := st.Advance(now, t.plan, a.rules, slack)
	if st != old {
		a.edit(u).setState(st)
	}
	a.record(u, ev)
	if st := statusIndex(st.Status(t.plan, a.rules)); st != u.status || len(ev) > 0 {
		// The first status after a start is no change to record.
		if u.status != 0 || len(ev) > 0 {
			a.touch(u, now, jsonUrgent)
		}
		u.status = st
	}
	r := u.r
	for _, w := range [...]quota.Instant{st.NextReset, st.Override.Until, t.plan.Expires} {
		if !w.IsZero() && !w.Reached(now) && w < quota.At(a.work.nextWake) {
			a.work.nextWake = w.Time()
		}
	}
	if r.xray && a.xrayBlocked(r) != wasBlocked {
		a.markersDirty = true
	}
	a.deriveCaps(u) // kernel.go: the caps in force, for the policy below and the views
	if _, n := a.kernelKeys(u); n > 0 || r.ssh && a.byUID[r.uid] == u {
		a.updatePolicy(u)
	}
	a.noteUser(u, now) // notices.go: thresholds crossed, an expiry coming
}

// record queues u's events for the state database and the block log, and
// logs them.
func (a *Agent) record(u *user, ev []quota.Event) {
	for _, e := range ev {
		if a.fl != nil {
			a.fleetEvent(u.r.name, e)
		}
		a.rec.events = append(a.rec.events, eventRow(u.r, e))
		a.noteEvent(u, &a.rec.events[len(a.rec.events)-1]) // notices.go: usage, limit, status
		a.log.Info("user "+e.Action, "user", u.r.name, "protocol", u.r.proto(), "reason", e.Reason)
		a.obs.Event(u.r.proto(), e.Action, e.Reason)
	}
}

func eventRow(r *record, e quota.Event) store.Event {
	return store.Event{Time: e.Time, Protocol: string(r.proto()), Name: r.name, Action: e.Action, Reason: e.Reason}
}

func dayRow(name string, d quota.DayTotal) store.DayUsage {
	return store.DayUsage{Name: name, Day: d.Day, Up: d.Usage.Up, Down: d.Usage.Down}
}
