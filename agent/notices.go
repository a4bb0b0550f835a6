package agent

import (
	"fmt"
	"math"
	"slices"
	"strconv"
	"time"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

// Notices are the events the agent records only to notify
// (quota.ActThreshold, ActExpiring, ActFailed, ActRecovered): a user's usage
// crossing a configured share of their limit, once per usage period (a user
// blocked in the same tick gets the block only); a
// user's expiry date coming within notify.expiry_days, once per date; a
// part of the agent failing or working again. They go to the state
// database in the same batch as the tick that noticed them, marked Logged:
// they never reach the block log. Every user event also carries the user's
// usage, limit and status (noteEvent), which notifications show.
//
// What was noticed is read back from the state database at the first tick
// (the latest notice of each user and part), so a restart neither repeats a
// notice nor loses one: a notice and the usage that caused it are in the
// same commit. Delivering them is package notify's work.

// notices is what the loop remembers of what it noticed; owned by the loop.
type notices struct {
	loaded    bool
	threshold map[string]thresholdMark // by user: the highest threshold noticed this period
	expiring  map[string]quota.Instant // by user: the expiry date noticed
	failing   map[string]string        // by part of the agent: the failure noticed
}

// thresholdMark is the highest threshold noticed for a user, and when: a
// mark from before the user's last reset is of an earlier period. The zero
// mark is none.
type thresholdMark struct {
	pct int
	at  quota.Instant
}

// loadNotices reads, once, the latest notices from the state database. A
// database that cannot be read (it was just read at start) is reported and
// taken as having none.
func (a *Agent) loadNotices() *notices {
	n := &a.notes
	if n.loaded {
		return n
	}
	n.loaded = true
	n.threshold = make(map[string]thresholdMark)
	n.expiring = make(map[string]quota.Instant)
	n.failing = make(map[string]string)
	read := func(fn func(store.Event), actions ...string) {
		es, err := a.store.LatestEvents(actions...)
		if err != nil {
			a.logs.warnOnce("notices", "earlier notices not read: some may be repeated", "err", err)
		}
		for _, e := range es {
			fn(e)
		}
	}
	read(func(e store.Event) {
		if pct, err := strconv.Atoi(e.Detail); err == nil {
			n.threshold[e.Name] = thresholdMark{pct: pct, at: quota.At(e.Time)}
		}
	}, quota.ActThreshold)
	read(func(e store.Event) {
		if t, err := time.Parse(time.RFC3339Nano, e.Detail); err == nil {
			n.expiring[e.Name] = quota.At(t)
		}
	}, quota.ActExpiring)
	read(func(e store.Event) {
		if e.Action == quota.ActFailed && e.Protocol == "" {
			n.failing[e.Name] = e.Reason
		}
	}, quota.ActFailed, quota.ActRecovered)
	return n
}

// noteEvent completes e, an event just recorded for u, with u's usage,
// limit and status.
func (a *Agent) noteEvent(u *user, e *store.Event) {
	st, p := u.r.state(), u.r.plan()
	e.Used, e.Limit, e.Status = st.Used(a.rules), p.Limit, string(st.Status(p, a.rules))
}

// noteUser records u's notices after its evaluation at now: thresholds its
// usage crossed, an expiry coming. A coming warning is a timer of the loop.
func (a *Agent) noteUser(u *user, now time.Time) {
	n := a.loadNotices()
	r := u.r
	st, plan := r.state(), r.plan()
	if ths := a.cfg.Notify.Thresholds; len(ths) > 0 {
		reached := quota.Reached(st.Used(a.rules), plan.Limit, ths)
		orig := n.threshold[r.name]
		m := orig
		if m.at <= st.LastReset {
			// Of an earlier period: a reset starts a new one. (A notice at
			// the instant of the reset is older: the reset zeroes the usage
			// that instant, and no threshold is crossed at zero.)
			m = thresholdMark{}
		}
		if reached < m.pct {
			// A raised limit put usage back under the mark: crossing it
			// again is news.
			m = thresholdMark{pct: reached, at: m.at}
		}
		if reached > m.pct && !st.Blocked {
			// A user blocked in the same tick gets the block only.
			for _, t := range ths {
				if t > m.pct && t <= reached {
					a.notice(u, now, quota.ActThreshold, fmt.Sprintf("Usage reached %d%% of the limit", t), strconv.Itoa(t))
				}
			}
		}
		if reached > m.pct {
			m = thresholdMark{pct: reached, at: quota.At(now)}
		}
		switch {
		case m == orig:
		case m.pct == 0:
			delete(n.threshold, r.name)
		default:
			n.threshold[r.name] = m
		}
	}
	exp := plan.Expires
	if from := quota.WarnFrom(exp, a.cfg.Notify.ExpiryDays); !from.IsZero() {
		switch {
		case !from.Reached(now):
			if from < quota.At(a.work.nextWake) {
				a.work.nextWake = from.Time()
			}
		case !exp.Reached(now) && n.expiring[r.name] != exp:
			days := math.Ceil(exp.Time().Sub(now).Hours() / 24)
			a.notice(u, now, quota.ActExpiring, fmt.Sprintf("Expires on %s (in %.0f days)",
				exp.Time().In(a.loc).Format("2006-01-02 15:04"), days), exp.Time().UTC().Format(time.RFC3339Nano))
			n.expiring[r.name] = exp
		}
	}
}

// notice records a notice of u.
func (a *Agent) notice(u *user, now time.Time, action, reason, detail string) {
	r := u.r
	e := store.Event{Time: now, Protocol: string(r.proto()), Name: r.name, Action: action, Reason: reason, Logged: true, Detail: detail}
	a.noteEvent(u, &e)
	a.rec.events = append(a.rec.events, e)
	a.log.Info("user "+action, "user", r.name, "protocol", r.proto(), "reason", reason)
}

// noteHealth records the parts of the agent that started failing or work
// again since the last notice; a part whose error only changes is not news.
func (a *Agent) noteHealth(now time.Time) {
	n := a.loadNotices()
	var changed []string
	for subject, msg := range a.logs.reported {
		if _, was := n.failing[subject]; was != (msg != "") {
			changed = append(changed, subject)
		}
	}
	slices.Sort(changed)
	for _, subject := range changed {
		e := store.Event{Time: now, Name: subject, Logged: true}
		if msg := a.logs.reported[subject]; msg != "" {
			e.Action, e.Reason = quota.ActFailed, msg
			n.failing[subject] = msg
		} else {
			e.Action, e.Reason = quota.ActRecovered, "was failing: "+n.failing[subject]
			delete(n.failing, subject)
		}
		a.rec.events = append(a.rec.events, e)
	}
}
