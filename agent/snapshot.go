package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/view"
)

// Reads never go through the loop. At the end of each tick that changed a
// user the loop publishes a snapshot: the current record of every user, by
// name. Records are immutable once published (Agent.edit copies them), so
// publishing costs a slice of pointers, not a copy of the users, and a
// reader never waits for a tick nor a tick for a reader.

// snapshot is the users as of the end of one tick.
type snapshot struct {
	version uint64
	users   []*record // sorted by name
	rules   quota.Rules
	loc     *time.Location
	today   string        // the local day at publication
	changed chan struct{} // closed when a newer snapshot replaces this one
	// deviceDefault is the configured default device limit.
	deviceDefault int
}

// publisher is the loop's side of the snapshots.
type publisher struct {
	// Owned by the loop.
	gen        uint32  // records created after publication gen are not yet published
	changed    bool    // a record changed since the last publication
	membership bool    // a user came or went since the last publication
	order      []*user // every user, sorted by name (rebuilt when membership changes)

	snap atomic.Pointer[snapshot]
}

// publish makes the users' current records the snapshot readers see, if
// anything changed.
func (a *Agent) publish(now time.Time) {
	p := &a.pub
	if !p.changed && p.snap.Load() != nil {
		return
	}
	if p.membership {
		p.order = p.order[:0]
		for _, u := range a.users {
			p.order = append(p.order, u)
		}
		slices.SortFunc(p.order, func(x, y *user) int { return strings.Compare(x.r.name, y.r.name) })
		p.membership = false
	}
	s := &snapshot{users: make([]*record, len(p.order)), rules: a.rules, loc: a.loc,
		today: quota.Day(now.In(a.loc)), changed: make(chan struct{}),
		deviceDefault: int(a.cfg.Devices.Default)}
	for i, u := range p.order {
		s.users[i] = u.r
	}
	old := p.snap.Load()
	if old != nil {
		s.version = old.version + 1
	}
	p.snap.Store(s)
	if old != nil {
		close(old.changed)
	}
	p.gen++
	p.changed = false
}

// view renders a record for readers.
func (s *snapshot) view(r *record) view.User {
	t := r.terms()
	st, p := r.state(), t.plan
	v := view.User{
		Name: r.name, Protocol: t.proto, Protocols: r.protocols(), UID: r.uid, Present: r.present(),
		Status: st.Status(p, s.rules), Used: st.Used(s.rules), Limit: p.Limit,
		Upload: st.Total.Up, Download: st.Total.Down,
		Reason: st.Reason, BlockTime: st.BlockTime.Time(), LastReset: st.LastReset.Time(),
		Override:  view.Override{Active: st.Override.Active, Limit: st.Override.Limit, Until: st.Override.Until.Time()},
		NextReset: st.NextReset.Time(), Expires: p.Expires.Time(), Updated: r.updated.Time(),
		Devices: len(r.devices()), DevicesLimit: p.Devices.Of(s.deviceDefault),
		Speed: r.speed(s.rules),
	}
	if st.Day == s.today {
		v.Today = s.rules.Metric.Of(st.Today)
	}
	v.Remaining, _ = st.Remaining(p, s.rules)
	return v
}

// find returns the named user's record, or nil.
func (s *snapshot) find(name string) *record {
	i, ok := slices.BinarySearchFunc(s.users, name, func(r *record, n string) int { return strings.Compare(r.name, n) })
	if !ok {
		return nil
	}
	return s.users[i]
}

func (s *snapshot) lookup(name string) (*record, error) {
	if err := quota.ValidName(name); err != nil {
		return nil, err
	}
	r := s.find(name)
	if r == nil {
		return nil, fmt.Errorf("%w %q: not an account in the SSH UID range nor an Xray client", ErrUnknownUser, name)
	}
	return r, nil
}

// Users returns every known user as of the last tick, sorted by name.
func (a *Agent) Users(ctx context.Context) ([]view.User, error) {
	s := a.pub.snap.Load()
	out := make([]view.User, len(s.users))
	for i, r := range s.users {
		out[i] = s.view(r)
	}
	return out, ctx.Err()
}

// User returns one user as of the last tick.
func (a *Agent) User(ctx context.Context, name string) (view.User, error) {
	s := a.pub.snap.Load()
	r, err := s.lookup(name)
	if err != nil {
		return view.User{}, err
	}
	v := s.view(r)
	if a.fl != nil {
		a.fleetShares(ctx, &v)
	}
	return v, ctx.Err()
}

// Updates returns the version of the users' snapshot now and a channel
// that is closed when a newer one is published.
func (a *Agent) Updates() (version uint64, changed <-chan struct{}) {
	s := a.pub.snap.Load()
	return s.version, s.changed
}

// History returns the user's per-day usage, today included, for days in
// [from, to] ("" is unbounded): the finished days from the state database
// and those still waiting for a commit, and today's from the last tick.
func (a *Agent) History(ctx context.Context, name, from, to string) ([]view.Day, error) {
	s := a.pub.snap.Load()
	r, err := s.lookup(name)
	if err != nil {
		return nil, err
	}
	in := func(day string) bool { return day != "" && (from == "" || day >= from) && (to == "" || day <= to) }
	days := make(map[string]view.Day)
	// Pending rows first: a row committed between the two reads is then
	// found in both, never in neither.
	for _, h := range a.commits.pendingHistory(name) {
		if in(h.Day) {
			days[h.Day] = view.Day{Day: h.Day, Up: h.Up, Down: h.Down}
		}
	}
	rows, err := a.store.History(name, from, to)
	if err != nil {
		return nil, err
	}
	for _, h := range rows {
		if _, pending := days[h.Day]; !pending {
			days[h.Day] = view.Day{Day: h.Day, Up: h.Up, Down: h.Down}
		}
	}
	if in(r.day) {
		days[r.day] = view.Day{Day: r.day, Up: r.today.Up, Down: r.today.Down}
	}
	out := make([]view.Day, 0, len(days))
	for _, d := range days {
		out = append(out, d)
	}
	slices.SortFunc(out, func(x, y view.Day) int { return strings.Compare(x.Day, y.Day) })
	return out, ctx.Err()
}
