package quota

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// Status is a user's standing, as the bash tool named them.
type Status string

// Statuses, from the most to the least severe.
const (
	Disabled  Status = "DISABLED"  // blocked by an administrator; a reset does not lift it
	Blocked   Status = "BLOCKED"   // over the limit or expired
	Throttled Status = "THROTTLED" // over the limit with a throttle rate: slowed, not blocked
	Warning   Status = "WARNING"   // at or over the warning threshold
	Active    Status = "ACTIVE"    // within the limit
	Unlimited Status = "UNLIMITED" // no limit
)

// ParseStatus accepts a status name in any case.
func ParseStatus(s string) (Status, error) {
	for _, st := range []Status{Disabled, Blocked, Throttled, Warning, Active, Unlimited} {
		if strings.EqualFold(string(st), s) {
			return st, nil
		}
	}
	return "", fmt.Errorf("unknown status %q (want active, warning, blocked, throttled, unlimited or disabled)", s)
}

// Block reasons, written to the usage JSON, the marker files and the block
// log exactly as the bash tool wrote them.
const (
	ReasonLimit    = "Bandwidth Limit Reached"
	ReasonDisabled = "Disabled by administrator"
	ReasonExpired  = "Expired"
	// ReasonThrottled is the block log's reason when a user reaches the
	// limit and is slowed to their throttle rate instead of blocked.
	ReasonThrottled = ReasonLimit + " (throttled)"
)

// Actions of the events a State change emits; the agent records them and
// appends them to the block log.
const (
	ActBlock   = "block"
	ActUnblock = "unblock"
	ActDisable = "disable"
	ActEnable  = "enable"
	ActReset   = "reset"
	// ActThrottle is a user over the limit slowed to their throttle rate
	// instead of blocked; what lifts a block (ActUnblock) lifts it.
	ActThrottle = "throttle"
)

// Errors of the administrative operations.
var (
	ErrDisabled   = errors.New("user is disabled; enable them instead of unblocking")
	ErrNotBlocked = errors.New("user is not blocked")
)

// Metric selects the traffic counted against a limit.
type Metric uint8

// Metrics. Upload is traffic from the user, download traffic to the user.
const (
	Total Metric = iota
	Upload
	Download
)

// String returns the metric's name, as the config spells it: "total",
// "upload" or "download".
func (m Metric) String() string {
	switch m {
	case Upload:
		return "upload"
	case Download:
		return "download"
	}
	return "total"
}

// Usage is a byte count in both directions.
type Usage struct{ Up, Down uint64 }

// Add returns u + v.
func (u Usage) Add(v Usage) Usage { return Usage{u.Up + v.Up, u.Down + v.Down} }

// Of returns the bytes of u that m counts.
func (m Metric) Of(u Usage) uint64 {
	switch m {
	case Upload:
		return u.Up
	case Download:
		return u.Down
	}
	return u.Up + u.Down
}

// Plan is what the operator configured for a user (the limits file).
type Plan struct {
	Limit   uint64   // bytes; 0 is unlimited
	Reset   Schedule // automatic reset, if any
	Expires Instant  // the user is blocked from this instant on; zero never
	// Devices is the user's own device limit (devices=N); DevicesDefault
	// leaves it to the configured default. It changes no status: the
	// agent cuts a device over it.
	Devices DeviceLimit
	// Speed is the user's own speed caps (speed=); zero leaves them to
	// Rules.Speed.
	Speed Speed
	// Throttle is the user's own throttle rates (throttle=): over the limit
	// they are slowed to it instead of blocked. Zero leaves it to
	// Rules.Throttle.
	Throttle Speed
}

// Rules are the policy knobs shared by all users.
type Rules struct {
	Metric Metric
	// Warning is the fraction of the limit (0 < Warning <= 1) from which a
	// user is in WARNING.
	Warning float64
	// Speed and Throttle are the caps and throttle rates of users whose
	// plan has none of their own; zero: none.
	Speed, Throttle Speed
}

// SpeedOf returns the caps a user of plan p with state s is to have: the
// throttle rates while throttled, else the plan's (or the default) speed
// caps; zero is none. A blocked or disabled user has none: nothing passes.
// Whether anything can enforce them (a kernel ID that counts the user's
// traffic) is the caller's to know: caps nothing enforces are not in force.
func (s *State) SpeedOf(p Plan, r Rules) Speed {
	switch s.Status(p, r) {
	case Throttled:
		return p.Throttle.Or(r.Throttle)
	case Blocked, Disabled:
		return Speed{}
	}
	return p.Speed.Or(r.Speed)
}

// Enforced reports whether the user is blocked outright (BLOCKED or
// DISABLED): dropped in the kernel, removed from Xray, cut. A throttled
// user is not: they keep working at their throttle rate.
func (s *State) Enforced(p Plan, r Rules) bool {
	return s.Blocked && s.Status(p, r) != Throttled
}

// Override is a manual unblock in force: the user stays unblocked although
// over the limit (or expired) until their usage is reset, the limit is raised
// above Limit or removed, or Until passes.
type Override struct {
	Active bool
	Limit  uint64  // the limit when the override was granted
	Until  Instant // zero: no end time
}

// State is one user's accounting state: everything that must survive a
// restart. The agent owns one per user and persists it every tick it
// changes.
type State struct {
	Total     Usage  // since the last reset
	Day       string // the local day (YYYY-MM-DD) Today belongs to
	Today     Usage
	Reason    string // why Blocked
	BlockTime Instant
	LastReset Instant
	Override  Override
	Schedule  string  // the schedule NextReset was computed from
	NextReset Instant // zero: none
	Blocked   bool
	Disabled  bool
}

// Event is a change of a user's standing, for the record and the block log.
type Event struct {
	Time   time.Time
	Action string // one of the Act constants
	Reason string
}

// scheduledReset begins the reason of a scheduled reset, which names its
// schedule: "Usage reset (scheduled monthly:1)".
const scheduledReset = "Usage reset (scheduled "

// IsScheduledReset reports whether reason is a scheduled reset's (State's
// Advance), not an operator's.
func IsScheduledReset(reason string) bool { return strings.HasPrefix(reason, scheduledReset) }

// DayTotal is a finished day of usage, for the per-day history.
type DayTotal struct {
	Day   string
	Usage Usage
}

// Add charges d to the user at now. When now is on a later local day than
// the state's, the finished day is returned for the history and today's
// usage starts from zero; d is charged to the new day.
func (s *State) Add(now time.Time, d Usage) (finished DayTotal, rolled bool) {
	return s.AddOn(Day(now), d)
}

// AddOn is Add with the local day (YYYY-MM-DD) given, so a caller charging
// many users at one instant formats it once and the users share the string.
func (s *State) AddOn(day string, d Usage) (finished DayTotal, rolled bool) {
	if s.Day != day {
		if s.Day != "" && (s.Today != Usage{}) {
			finished, rolled = DayTotal{Day: s.Day, Usage: s.Today}, true
		}
		s.Day, s.Today = day, Usage{}
	}
	s.Total = s.Total.Add(d)
	s.Today = s.Today.Add(d)
	return finished, rolled
}

// Used returns the bytes counted against the limit.
func (s *State) Used(r Rules) uint64 { return r.Metric.Of(s.Total) }

// Status derives the user's status from the state and plan.
func (s *State) Status(p Plan, r Rules) Status {
	switch {
	case s.Disabled:
		return Disabled
	case s.Blocked && s.Reason == ReasonLimit && !p.Throttle.Or(r.Throttle).IsZero():
		return Throttled
	case s.Blocked:
		return Blocked
	case p.Limit == 0:
		return Unlimited
	case float64(s.Used(r)) >= r.Warning*float64(p.Limit):
		return Warning
	}
	return Active
}

// Remaining returns the bytes left before the limit (0 when over it or
// blocked for it), and false for an unlimited plan.
func (s *State) Remaining(p Plan, r Rules) (uint64, bool) {
	if p.Limit == 0 {
		return 0, false
	}
	used := s.Used(r)
	if used >= p.Limit || (s.Blocked && s.Reason == ReasonLimit) {
		return 0, true
	}
	return p.Limit - used, true
}

// Advance applies the rules at now: a due scheduled reset, the end of a
// manual unblock, and the block or unblock the plan calls for. slack is how
// far below the limit usage counts as reaching it; the agent passes the
// largest packet for users whose limit the kernel enforces to the byte, since
// the kernel refuses the packet that would cross the limit and usage stops
// just short of it.
func (s *State) Advance(now time.Time, p Plan, r Rules, slack uint64) []Event {
	var ev []Event
	if sched := p.Reset.String(); sched != s.Schedule || (s.NextReset.IsZero() && p.Reset.Period != NoReset) {
		s.Schedule, s.NextReset = sched, At(p.Reset.Next(now))
	}
	if s.NextReset.Reached(now) {
		ev = append(ev, s.Reset(now, scheduledReset+s.Schedule+")")...)
		s.NextReset = At(p.Reset.Next(now))
	}
	if o := s.Override; o.Active {
		if p.Limit == 0 || p.Limit > o.Limit || o.Until.Reached(now) {
			s.Override = Override{}
		}
	}
	want, reason := s.shouldBlock(now, p, r, slack)
	switch {
	case want && (!s.Blocked || s.Reason != reason):
		// A change of reason (say, limit to disabled) is recorded as a new
		// block; the block time stays the first one.
		if !s.Blocked {
			s.BlockTime = At(now)
		}
		s.Blocked, s.Reason = true, reason
		if s.Status(p, r) == Throttled {
			ev = append(ev, Event{Time: now, Action: ActThrottle, Reason: ReasonThrottled})
		} else {
			ev = append(ev, Event{Time: now, Action: ActBlock, Reason: reason})
		}
	case !want && s.Blocked:
		ev = append(ev, Event{Time: now, Action: ActUnblock, Reason: "Unblocked: no longer " + unblockWhy(s.Reason)})
		s.Blocked, s.Reason, s.BlockTime = false, "", 0
	}
	return ev
}

func unblockWhy(reason string) string {
	switch reason {
	case ReasonLimit:
		return "over the limit"
	case ReasonExpired:
		return "expired"
	case ReasonDisabled:
		return "disabled"
	}
	return "blocked"
}

func (s *State) shouldBlock(now time.Time, p Plan, r Rules, slack uint64) (bool, string) {
	switch {
	case s.Disabled:
		return true, ReasonDisabled
	case s.Override.Active:
		return false, ""
	case p.Expires.Reached(now):
		return true, ReasonExpired
	case p.Limit > 0 && s.Used(r) >= p.Limit-min(slack, p.Limit-1):
		return true, ReasonLimit
	}
	return false, ""
}

// Reset zeroes the usage counted against the limit (today's usage stays in
// the history), ends a manual unblock and records the reset. The block for
// the limit is lifted by the next Advance; a disabled user stays disabled.
func (s *State) Reset(now time.Time, why string) []Event {
	s.Total = Usage{}
	s.Override = Override{}
	s.LastReset = At(now)
	if why == "" {
		why = "Usage reset"
	}
	return []Event{{Time: now, Action: ActReset, Reason: why}}
}

// Disable blocks the user administratively until Enable. The block takes
// effect at once, with ReasonDisabled, and is recorded as a disable.
func (s *State) Disable(now time.Time) []Event {
	if s.Disabled {
		return nil
	}
	s.Disabled = true
	if !s.Blocked {
		s.BlockTime = At(now)
	}
	s.Blocked, s.Reason = true, ReasonDisabled
	return []Event{{Time: now, Action: ActDisable, Reason: ReasonDisabled}}
}

// Enable lifts Disable, recorded as an enable. The user's other blocks still
// apply: the next Advance blocks a user over the limit again, recorded as a
// block for the limit.
func (s *State) Enable(now time.Time) []Event {
	if !s.Disabled {
		return nil
	}
	s.Disabled = false
	if s.Blocked && s.Reason == ReasonDisabled {
		s.Blocked, s.Reason, s.BlockTime = false, "", 0
	}
	return []Event{{Time: now, Action: ActEnable, Reason: "Enabled by administrator"}}
}

// Unblock lets a user over the limit (or expired) back in without a reset,
// for d (0: until the usage is reset or the limit raised above the current
// one). It returns ErrDisabled for a disabled user and ErrNotBlocked for a
// user who is not blocked.
func (s *State) Unblock(now time.Time, p Plan, d time.Duration) ([]Event, error) {
	if s.Disabled {
		return nil, ErrDisabled
	}
	if !s.Blocked {
		return nil, ErrNotBlocked
	}
	s.Override = Override{Active: true, Limit: p.Limit}
	why := "Unblocked manually"
	if d > 0 {
		s.Override.Until = At(now.Add(d))
		why += " for " + d.String()
	}
	s.Blocked, s.Reason, s.BlockTime = false, "", 0
	return []Event{{Time: now, Action: ActUnblock, Reason: why}}, nil
}
