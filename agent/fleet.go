package agent

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/myvpn/bwagent/fleet"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/view"
)

// Fleet mode (package fleet): one quota per user across nodes, kept in
// PostgreSQL.
//
// Who owns what: the loop owns every user's fleet state (fleetUser); the
// fleet client (fleetSide.run, beside the loop like the committer) owns
// the database conversation. The hand-off is one report at a time: at the
// end of a tick the loop builds a report (its own cumulative counts, the
// leases it wants with the ceiling its kernel enforces now, events, hand
// edits of the limits file, scheduled resets it saw) and hands it over
// only while no other is out; the client syncs it and hands the reply back,
// which the loop applies as soon as it comes (other nodes' usage, plans,
// resets, the administrator's switches, new leases), evaluating and
// enforcing the users it touched at once. The tick never waits for the
// network, and a reply is applied to the kernel before the next report
// says what the kernel enforces: the database never records less than a
// node may be enforcing (see package fleet's lease rule).
//
// A user's usage (Total) in fleet mode is its global usage: this node's
// own count in the current period plus the other nodes' as last read. The
// own count is the node's journal: it is committed to the state database
// with the counter baselines it was counted from (a "fleet:" baseline),
// so a crash neither loses nor repeats a byte of it, and reports are
// absolute, so a report repeated or lost changes nothing.

// fleetUser is the loop's fleet state of one user.
type fleetUser struct {
	period   uint64
	rev      uint64
	own      quota.Usage // this node's count in period
	others   quota.Usage // the other nodes', as last read
	nodes    int         // the nodes that counted some of the user in period, as last read
	acked    quota.Usage // own as the database has it
	lease    uint64      // ceiling on the metric of own (hasLease)
	hasLease bool
	fallback uint64 // ceiling enforced without a lease, before the database answered once
	// kernel is a ceiling on the metric of own that the kernel enforces:
	// that of its budget, the lease the budget was computed for or the
	// count if more (a lease lowered below what the kernel let through
	// meanwhile). A budget lower than kernel leaves it as it is until the
	// report after the budget was written (lower).
	kernel uint64
	lower  *kernelCheck
	// unsaved is the lease before a lowering that the state database may
	// still have (a node restarted enforces the lease it has), until a
	// commit after the lowering succeeded (fleetSaveLowered).
	unsaved  uint64
	rateMark uint64 // metric of own at the last report
	rate     uint64 // the rate of the last lease request
	dirty    bool   // in baseQ
}

// kernelCheck is what a lowered kernel budget was computed from: its lease
// (limit), the own count it took as used, and the kernel's charged total
// read before (q).
type kernelCheck struct{ limit, used, q uint64 }

// held is the ceiling on the metric of own this node may be enforcing:
// its lease, or more while the kernel's budget is still one computed for
// a higher lease or for a count already past the lease. The database
// records at least this, so it never grants another node bytes this
// node's kernel may have let through.
func (f *fleetUser) held() uint64 {
	h := f.fallback
	if f.hasLease {
		h = f.lease
	}
	return max(h, f.kernel, f.unsaved)
}

type fleetReply struct {
	report *fleet.Report
	res    *fleet.Result
	err    error
	nodes  string // the fleet's nodes, for the component (every few syncs)
}

type fleetSide struct {
	c     *fleet.Client
	dsn   string // without password, for messages
	users map[string]*fleetUser
	baseQ []string

	in   chan *fleet.Report
	out  chan fleetReply
	busy bool

	reached   bool // the database answered since start
	synced    bool // a full read was applied
	failing   time.Time
	lastSync  time.Time
	err       error
	nodesLine string
	syncs     int

	plans map[string]fleet.User // every user's plan as the fleet has it
	pend  map[string]bool       // users the next report looks at

	// The limits file: its stamp as this node last wrote it, and a hand
	// edit to import.
	wrote     stamp
	editAt    time.Time
	edited    []opsfiles.Entry
	importing bool     // an import is out
	released  bool     // a reply lowered a lease
	unsaved   []string // users whose lowered lease may not be committed yet
	rewrite   bool

	events    []fleet.Event
	rollovers []fleet.Rollover
	ticks     int
	mu        sync.Mutex // guards nodesLine for the component
}

func newFleetSide(c *fleet.Client, dsn string) *fleetSide {
	return &fleetSide{c: c, dsn: dsn, users: map[string]*fleetUser{}, in: make(chan *fleet.Report, 1),
		out: make(chan fleetReply, 1), plans: map[string]fleet.User{}, pend: map[string]bool{}}
}

// fleetOut is the channel of the fleet client's replies (nil: no fleet).
func (a *Agent) fleetOut() <-chan fleetReply {
	if a.fl == nil {
		return nil
	}
	return a.fl.out
}

// run syncs each report the loop hands over; a sync is bounded so that a
// partition shows within a few ticks.
func (f *fleetSide) run(ctx context.Context, interval time.Duration) {
	timeout := max(2*interval, 4*time.Second)
	for {
		select {
		case <-ctx.Done():
			return
		case r := <-f.in:
			sctx, cancel := context.WithTimeout(ctx, timeout)
			res, err := f.c.Sync(sctx, r)
			rep := fleetReply{report: r, res: res, err: err}
			f.syncs++
			if err == nil && f.syncs%5 == 1 {
				rep.nodes = f.describeNodes(sctx)
			}
			cancel()
			select {
			case f.out <- rep:
			case <-ctx.Done():
				return
			}
		}
	}
}

func (f *fleetSide) describeNodes(ctx context.Context) string {
	nodes, now, err := f.c.Nodes(ctx)
	if err != nil {
		return ""
	}
	var parts []string
	for _, n := range nodes {
		s := n.Name
		switch {
		case n.LastReport.IsZero():
			s += " (never reported)"
		case !n.Online:
			s += fmt.Sprintf(" (offline, last report %s ago)", now.Sub(n.LastReport).Round(time.Second))
		default:
			s += fmt.Sprintf(" (last report %s ago)", now.Sub(n.LastReport).Round(100*time.Millisecond))
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, ", ")
}

// fleetUserOf returns u's fleet state, new if it has none.
func (a *Agent) fleetUserOf(name string) *fleetUser {
	f := a.fl.users[name]
	if f == nil {
		f = &fleetUser{period: 1}
		if p, ok := a.fl.plans[name]; ok {
			f.period, f.rev = p.Period, p.Rev
		}
		a.fl.users[name] = f
	}
	return f
}

func (a *Agent) fleetDirty(name string, f *fleetUser) {
	if !f.dirty {
		f.dirty = true
		a.fl.baseQ = append(a.fl.baseQ, name)
	}
}

// fleetCharge adds d to the node's own count of the user.
func (a *Agent) fleetCharge(name string, d quota.Usage) {
	f := a.fleetUserOf(name)
	f.own = f.own.Add(d)
	a.fl.pend[name] = true
	a.fleetDirty(name, f)
}

// fleetEvent queues an event of the block log for the events table.
func (a *Agent) fleetEvent(name string, e quota.Event) {
	switch e.Action {
	case quota.ActBlock, quota.ActUnblock, quota.ActDisable, quota.ActEnable, quota.ActReset:
	default:
		return
	}
	f := a.fleetUserOf(name)
	if e.Action == quota.ActReset && quota.IsScheduledReset(e.Reason) {
		// A scheduled reset: the period ends here on every node; the
		// first node to report it moves the database's.
		a.fl.rollovers = append(a.fl.rollovers, fleet.Rollover{Name: name, From: f.period, At: e.Time})
		a.fleetNewPeriod(name, f, f.period+1)
	}
	a.fl.events = append(a.fl.events, fleet.Event{Name: name, Period: f.period, Rev: f.rev, Kind: e.Action, Reason: e.Reason, At: e.Time})
}

// fleetNewPeriod starts the user's new usage period on this node.
func (a *Agent) fleetNewPeriod(name string, f *fleetUser, period uint64) {
	f.period = period
	f.own, f.others, f.acked, f.nodes = quota.Usage{}, quota.Usage{}, quota.Usage{}, 0
	f.hasLease, f.lease, f.fallback, f.kernel, f.lower, f.unsaved, f.rateMark = false, 0, 0, 0, nil, 0, 0
	a.fl.pend[name] = true
	a.fleetDirty(name, f)
	if u := a.users[name]; u != nil {
		u.hasAnchor = false
	}
}

// fleetBudget returns the limit and the used bytes the kernel budget of u
// is computed from: in fleet mode the user's lease and the node's own
// count. Before the database answered once (unreachable at start) the
// node enforces the plan on the global usage it last knew, and says so in
// the fleet component.
func (a *Agent) fleetBudget(u *user, limit, used uint64) (uint64, uint64) {
	if a.fl == nil {
		return limit, used
	}
	f := a.fleetUserOf(u.r.name)
	own := a.rules.Metric.Of(f.own)
	switch {
	case f.hasLease:
		return f.lease, own
	case !a.fl.reached:
		// Local enforcement: what the limit leaves after the others' usage.
		others := a.rules.Metric.Of(f.others)
		if limit > others {
			f.fallback = limit - others
		} else {
			f.fallback = 0
		}
		return f.fallback, own
	}
	// Waiting for the first grant (within a tick): nothing more.
	return own, own
}

// fleetSlack is how close to the limit a user's global usage counts as
// reaching it: the kernel's slack (kernelSlack) once per node that counted
// some of it in the period, as each node's kernel may refuse a packet a
// whole GSO batch short of its lease and the user then move nothing more
// on it (at most 1/16 of the limit, as on one server, unless one node's
// slack is more).
func (a *Agent) fleetSlack(name string, limit, slack uint64) uint64 {
	if a.fl == nil {
		return slack
	}
	f := a.fl.users[name]
	if f == nil || f.nodes <= 1 {
		return slack
	}
	return min(slack*uint64(f.nodes), max(slack, limit/16))
}

// fleetAnchored records the ceiling on the node's own count of u that u's
// new kernel budget enforces: the budget lets the rest of limit through
// on top of used (the own count with what the kernel counted since the
// last sample), nothing if used is past limit. A budget lower than the
// one before (the lease lowered) lets through, on top of used, what the
// kernel let through under the budget before until the new one was
// written: its ceiling is known once written (fleetLowered).
func (a *Agent) fleetAnchored(u *user, limit, used, q uint64) {
	if a.fl == nil {
		return
	}
	f := a.fleetUserOf(u.r.name)
	if c := max(limit, used); c >= f.kernel {
		f.kernel, f.lower = c, nil
		return
	}
	f.lower = &kernelCheck{limit: limit, used: used, q: q}
}

// fleetLowered works out the ceiling a lowered kernel budget enforces, once
// written: what the kernel charged since its basis was read (q) passed on
// top of used, and the budget refuses more past its lease. (A program run
// on another CPU that read the budget before it was written ends within
// microseconds of the write.)
func (a *Agent) fleetLowered(f *fleetUser, key uint32) error {
	c := f.lower
	if c == nil {
		return nil
	}
	q, err := a.dp.QuotaUsed(key)
	if err != nil {
		return err
	}
	f.kernel, f.lower = max(c.limit, c.used+q-min(q, c.q)), nil
	return nil
}

// fleetReport hands this tick's report to the fleet client unless one is
// out.
func (a *Agent) fleetReport(now time.Time) error {
	fl := a.fl
	fl.ticks++
	if fl.busy {
		return fl.status(now)
	}
	a.fleetSaveLowered()
	var lowerErrs []error // budgets whose ceiling could not be read: no lease asked
	r := &fleet.Report{Events: fl.events, Rollovers: fl.rollovers}
	fl.events, fl.rollovers = nil, nil
	// The users to look at: those that moved, changed or wait for room
	// (fl.pend), and every 30 ticks every user (leases renewed now and
	// then, rows for users the fleet may not know).
	names := fl.pend
	fl.pend = make(map[string]bool, len(names))
	if fl.ticks%30 == 1 {
		for name := range a.users {
			names[name] = true
		}
		for name := range fl.users {
			names[name] = true
		}
	}
	for name := range names {
		u := a.users[name]
		f := fl.users[name]
		if f == nil {
			if u == nil || !u.r.present() {
				continue
			}
			// A row for a user the fleet may not know yet, so that a
			// command on any node knows them.
			f = a.fleetUserOf(name)
			r.Usage = append(r.Usage, fleet.Usage{Name: name, Period: f.period})
		}
		if f.own != f.acked || (!fl.reached && f.own != (quota.Usage{})) {
			r.Usage = append(r.Usage, fleet.Usage{Name: name, Period: f.period, Up: f.own.Up, Down: f.own.Down})
		}
		if u == nil || !u.r.present() {
			continue
		}
		t := u.r.terms()
		keys, n := a.kernelKeys(u)
		if n == 0 || t.plan.Limit == 0 || t.st.Blocked || t.st.Override.Active {
			continue
		}
		unknown := a.kernel.unwritten(keys[:n])
		if !unknown { // read once the lowered budget is written, not before
			if err := a.fleetLowered(f, keys[0]); err != nil {
				lowerErrs = append(lowerErrs, fmt.Errorf("user %q: kernel budget after a lowered lease: %w", name, err))
				unknown = true
			}
		}
		if unknown {
			// Its budget is not in the kernel yet (a write failed, retried
			// next tick), or what it enforces is not known: the database
			// keeps its record, which covers the budget before. It asks
			// again at the next tick.
			fl.pend[name] = true
			continue
		}
		m := a.rules.Metric.Of(f.own)
		// At its ceiling the node's traffic waits for room (the kernel
		// drops it): it renews every tick, and its demand is the rate it
		// had, not the nothing it moves now.
		atCeiling := f.hasLease && m+kernelSlack(t.plan.Limit) >= f.lease
		rate := (m - min(m, f.rateMark)) * uint64(time.Second) / uint64(a.currentInterval())
		if atCeiling {
			rate = max(rate, f.rate)
		}
		f.rate, f.rateMark = rate, m
		r.Leases = append(r.Leases, fleet.LeaseReq{Name: name, Period: f.period, Held: f.held(), Rate: rate})
		if atCeiling || !f.hasLease {
			fl.pend[name] = true // again next tick
		}
	}
	if fl.synced && fl.edited != nil && !fl.importing {
		r.Imports = a.fleetImports()
		fl.edited = nil
		fl.importing = len(r.Imports) > 0
	}
	fl.busy = true
	fl.in <- r
	return errors.Join(fl.status(now), errors.Join(lowerErrs...))
}

// fleetSaveLowered commits the state database's pending batch, which has
// the leases lowered since the last report, before a report says they are
// lower: a node killed after the report restarts with the lease the
// database records, not the one before, which another node may have been
// granted. It commits only if no commit is running (the loop does not
// wait for one); a commit running, or failed, leaves the leases held at
// the ones before until a later report.
func (a *Agent) fleetSaveLowered() {
	fl := a.fl
	if len(fl.unsaved) == 0 || a.commits.flushIfIdle() != nil {
		return
	}
	for _, name := range fl.unsaved {
		if f := fl.users[name]; f != nil {
			f.unsaved = 0
		}
	}
	fl.unsaved = fl.unsaved[:0]
}

// status is the fleet's part of the health: the last sync's error.
func (fl *fleetSide) status(now time.Time) error {
	if fl.err == nil {
		return nil
	}
	what := "enforcing the last leases"
	if !fl.reached {
		what = "enforcing locally: each limit on the usage this node knows (other nodes may use the same remainder)"
	}
	return fmt.Errorf("fleet database %s unreachable since %s, %s; retrying every tick: %w",
		fl.dsn, fl.failing.Format(time.DateTime), what, fl.err)
}

// fleetImports returns the hand edit of the limits file as imports: every
// line that differs from the fleet's plan, and the removal of every line
// the fleet has that the file lost, unless the file lost all of them (a
// truncated file is no instruction to lift every limit).
func (a *Agent) fleetImports() []fleet.Import {
	fl := a.fl
	var out []fleet.Import
	inFile := map[string]bool{}
	for _, e := range fl.edited {
		inFile[e.User] = true
		e.Line = 0
		if p, ok := fl.plans[e.User]; ok && p.Line && p.Entry == e {
			continue
		}
		out = append(out, fleet.Import{Entry: e, Line: true, At: fl.editAt})
	}
	var lost []string
	lines := 0
	for name, p := range fl.plans {
		if p.Line {
			lines++
			if !inFile[name] {
				lost = append(lost, name)
			}
		}
	}
	if len(lost) > 0 && len(lost) == lines && len(fl.edited) == 0 {
		a.log.Warn("limits file lost every line: not taken as lifting every limit of the fleet; rewritten from the fleet database", "lines", lines)
		fl.rewrite = true
		return out
	}
	slices.Sort(lost)
	for _, name := range lost {
		out = append(out, fleet.Import{Entry: opsfiles.Entry{User: name}, Line: false, At: fl.editAt})
	}
	for _, im := range out {
		a.log.Info("limits file edited by hand: sent to the fleet", "user", im.Entry.User, "line", im.Line, "limit", im.Entry.Limit)
	}
	return out
}

// fleetReply applies the fleet client's reply, then evaluates and enforces
// what it changed at once.
func (a *Agent) fleetApply(rep fleetReply, now time.Time) {
	fl := a.fl
	fl.busy = false
	now = now.In(a.loc)
	if rep.err != nil {
		if fl.err == nil {
			fl.failing = now
		}
		fl.err = rep.err
		// What was in the report goes again in the next (cumulative).
		fl.events = append(rep.report.Events, fl.events...)
		fl.rollovers = append(rep.report.Rollovers, fl.rollovers...)
		if len(rep.report.Imports) > 0 {
			fl.importing = false
			if fl.edited == nil {
				for _, im := range rep.report.Imports {
					if im.Line {
						fl.edited = append(fl.edited, im.Entry)
					}
				}
			}
		}
		for _, u := range rep.report.Usage {
			fl.pend[u.Name] = true
		}
		for _, l := range rep.report.Leases {
			fl.pend[l.Name] = true
		}
		a.logs.report("fleet", fl.status(now))
		a.settleFleet(now)
		return
	}
	if fl.err != nil {
		a.log.Info("fleet database reachable again", "after", now.Sub(fl.failing).Round(time.Second))
	}
	fl.err, fl.reached, fl.lastSync = nil, true, now
	if rep.nodes != "" {
		fl.mu.Lock()
		fl.nodesLine = rep.nodes
		fl.mu.Unlock()
	}
	res := rep.res
	for _, u := range rep.report.Usage {
		if f := fl.users[u.Name]; f != nil && f.period == u.Period {
			f.acked = quota.Usage{Up: u.Up, Down: u.Down}
		}
	}
	if len(rep.report.Imports) > 0 {
		fl.importing = false
		for _, im := range res.Refused {
			a.log.Warn("limits file edit not applied: the fleet's plan of the user changed after the file; the line is rewritten from the fleet database",
				"user", im.Entry.User, "file_time", im.At.Format(time.DateTime))
		}
		fl.rewrite = true
	}
	a.fleetUsers(res.Users, now)
	if res.Full {
		fl.synced = true
		fl.rewrite = true
	}
	for _, g := range res.Grants {
		f := fl.users[g.Name]
		u := a.users[g.Name]
		if f == nil || f.period != g.Period {
			continue
		}
		if !f.hasLease || f.lease != g.Ceiling {
			if f.hasLease && g.Ceiling < f.lease {
				fl.released = true // say so at once: another node waits for it
				if f.unsaved == 0 {
					fl.unsaved = append(fl.unsaved, g.Name)
				}
				f.unsaved = max(f.unsaved, f.lease)
			}
			f.lease, f.hasLease = g.Ceiling, true
			a.fleetDirty(g.Name, f)
			if u != nil {
				u.hasAnchor = false
				a.queue(u)
			}
		}
	}
	a.logs.report("fleet", nil)
	if fl.rewrite && fl.synced && fl.edited == nil && !fl.importing {
		a.logs.report("limits file", a.fleetWriteLimits(now))
	}
	a.settleFleet(now)
	if fl.released {
		// The kernel enforces the smaller leases now: report them, so that
		// the database hands the room to the nodes that wait for it
		// without waiting for the next tick.
		fl.released = false
		a.logs.report("fleet", a.fleetReport(now))
	}
}

// fleetUsers applies the users the database says changed.
func (a *Agent) fleetUsers(us []fleet.User, now time.Time) {
	fl := a.fl
	for _, d := range us {
		old, had := fl.plans[d.Name]
		fl.plans[d.Name] = d
		if had && (old.Line != d.Line || old.Entry != d.Entry) || !had && d.Line {
			fl.rewrite = true
		}
		u := a.users[d.Name]
		f := fl.users[d.Name]
		if u == nil {
			if f != nil && d.Period > f.period {
				a.fleetNewPeriod(d.Name, f, d.Period)
			}
			continue
		}
		if f == nil {
			f = a.fleetUserOf(d.Name)
			if f.period < d.Period {
				f.period = d.Period
				a.fleetDirty(d.Name, f)
			}
		}
		var ev []quota.Event
		st := u.r.state()
		if d.Period > f.period {
			// A reset on another node (or a command): a new period.
			ev = append(ev, st.Reset(now, "Usage reset (fleet)")...)
			a.fleetNewPeriod(d.Name, f, d.Period)
		}
		if d.Period == f.period {
			// The others' usage: the sum less this node's row, which the
			// database has as this node last sent it.
			f.others = quota.Usage{Up: d.Used.Up - min(d.Used.Up, f.acked.Up), Down: d.Used.Down - min(d.Used.Down, f.acked.Down)}
			f.nodes = d.Nodes
			fl.pend[d.Name] = true // renew its lease
		}
		if d.Rev != f.rev {
			// The administrator's switches, as the last command left them.
			switch {
			case d.Disabled && !st.Disabled:
				ev = append(ev, st.Disable(now)...)
			case !d.Disabled && st.Disabled:
				ev = append(ev, st.Enable(now)...)
			}
			if d.Unblocked && !st.Override.Active && d.Period == f.period {
				st.Override = quota.Override{Active: true, Limit: d.UnblockLimit, Until: quota.At(d.UnblockUntil)}
				if st.Blocked && !st.Disabled {
					st.Blocked, st.Reason, st.BlockTime = false, "", 0
					ev = append(ev, quota.Event{Time: now, Action: quota.ActUnblock, Reason: "Unblocked manually"})
				}
			}
			f.rev = d.Rev
		}
		st.Total = f.own.Add(f.others)
		if st != u.r.state() {
			a.edit(u).setState(st)
			a.touch(u, now, jsonUsage)
		}
		if len(ev) > 0 {
			a.touch(u, now, jsonUrgent)
		}
		a.record(u, ev)
		u.hasAnchor = u.hasAnchor && len(ev) == 0
		a.queue(u)
	}
}

// fleetWriteLimits makes the limits file say what the fleet's plans say,
// keeping its comments, and loads it.
func (a *Agent) fleetWriteLimits(now time.Time) error {
	fl := a.fl
	fl.rewrite = false
	path := a.cfg.Paths.Limits
	l, _, err := opsfiles.ReadLimits(path)
	if err != nil {
		return err
	}
	before := string(l.Marshal())
	for _, name := range slices.Sorted(maps.Keys(fl.plans)) {
		p := fl.plans[name]
		if p.Line {
			e := p.Entry
			e.User = name
			if err := l.Set(e); err != nil {
				a.logs.warnOnce("fleetline:"+name, "fleet plan not written to the limits file", "user", name, "err", err)
			}
		} else {
			l.Remove(name)
		}
	}
	if string(l.Marshal()) != before {
		if err := opsfiles.WriteLimits(path, l); err != nil {
			return err
		}
	}
	s, err := statStamp(path)
	if err != nil {
		return err
	}
	fl.wrote = s
	a.limitsStamp = stamp{}
	return a.loadLimits(now)
}

// fleetLimitsRead is called by loadLimits with the file it read: a file
// this node did not write is a hand edit, imported into the fleet. Once
// the node has read the fleet's plans, it reports true: the edit applies
// here when the fleet took it (within a tick), or is undone. Before (the
// database unreachable since the start) the file applies here at once.
func (a *Agent) fleetLimitsRead(s stamp, entries []opsfiles.Entry) (wait bool) {
	if a.fl == nil || s == a.fl.wrote {
		return false
	}
	if s.missing {
		a.fl.rewrite = true
		return a.fl.synced
	}
	a.fl.edited = append([]opsfiles.Entry{}, entries...) // never nil: an edit that removed every line is one
	a.fl.editAt = s.mtime
	return a.fl.synced
}

// settleFleet evaluates and enforces the users a reply changed, without
// reading the sources: the rules, the enforcers and the records of a tick.
func (a *Agent) settleFleet(now time.Time) {
	a.decide(now, func(subject string, err error) { a.logs.report(subject, err) }, false)
	a.publish(now)
	a.files.kick()
}

// fleetBaselines adds the changed fleet journal rows to b's baselines.
func (a *Agent) fleetBaselines(add func(src quota.Source, e quota.Epoch, u quota.Usage)) {
	if a.fl == nil {
		return
	}
	for _, name := range a.fl.baseQ {
		f := a.fl.users[name]
		if f == nil {
			continue
		}
		var lease int64
		if f.hasLease {
			lease = int64(f.lease) + 1
		}
		add(quota.FleetSource(name), quota.Epoch{Origin: "fleet", Gen: f.period, Start: lease}, f.own)
		f.dirty = false
	}
	a.fl.baseQ = trimmed(a.fl.baseQ[:0])
}

// fleetLoad restores a user's fleet journal row.
func (a *Agent) fleetLoad(name string, e quota.Epoch, own quota.Usage) {
	// Its row in the database is taken to be as the journal has it
	// (reported before the crash, or at the first sync after it).
	f := &fleetUser{period: max(e.Gen, 1), own: own, acked: own}
	if e.Start > 0 {
		f.lease, f.hasLease = uint64(e.Start-1), true
	}
	if u := a.users[name]; u != nil {
		t := u.r.total
		f.others = quota.Usage{Up: t.Up - min(t.Up, own.Up), Down: t.Down - min(t.Down, own.Down)}
	}
	a.fl.users[name] = f
	a.fl.pend[name] = true
}

// fleetComponent describes the fleet for Health.
func (a *Agent) fleetComponent(errs map[string]string) string {
	fl := a.fl
	if e := errs["fleet"]; e != "" {
		return "fleet: " + e
	}
	fl.mu.Lock()
	nodes := fl.nodesLine
	fl.mu.Unlock()
	if !fl.reached {
		return "connecting to " + fl.dsn
	}
	s := fmt.Sprintf("ok: node %s, database %s reachable (last sync %s)", fl.c.Node(), fl.dsn, fl.lastSync.Format(time.TimeOnly))
	if nodes != "" {
		s += "; nodes: " + nodes
	}
	return s
}

// Fleet commands: the change is made in the database first, in a
// transaction of its own, so that it applies to every node (each applies
// it at its next sync, within a tick); then here at once. With the
// database unreachable a command fails and changes nothing: the plan is
// the fleet's.

// fleetCommand checks the user here (check runs on the loop; a user this
// node has not seen may still be the fleet's), runs op on the database and
// applies its result.
func (a *Agent) fleetCommand(ctx context.Context, name string, check func(u *user) error, op func(now time.Time) (fleet.User, error)) error {
	if err := quota.ValidName(name); err != nil {
		return err
	}
	if check != nil {
		if err := a.do(ctx, func(time.Time) error {
			if u := a.users[name]; u != nil {
				return check(u)
			}
			return nil
		}); err != nil {
			return err
		}
	}
	d, err := op(a.now().In(a.loc))
	if errors.Is(err, fleet.ErrUnknownUser) {
		return fmt.Errorf("%w %q: not a user of any node of the fleet", ErrUnknownUser, name)
	}
	if err != nil {
		return err
	}
	return a.do(ctx, func(now time.Time) error {
		a.fleetUsers([]fleet.User{d}, now)
		if a.fl.rewrite && a.fl.synced && a.fl.edited == nil && !a.fl.importing {
			return a.fleetWriteLimits(now)
		}
		return nil
	})
}

func (a *Agent) fleetReset(ctx context.Context, name string) error {
	return a.fleetCommand(ctx, name, nil, func(now time.Time) (fleet.User, error) { return a.fl.c.Reset(ctx, name, now) })
}

func (a *Agent) fleetResetAll(ctx context.Context) (int, error) {
	n, err := a.fl.c.ResetAll(ctx, a.now())
	if err != nil {
		return 0, err
	}
	// Every node, this one too, applies it at its next sync.
	return n, a.Check(ctx)
}

func (a *Agent) fleetSwitch(ctx context.Context, name string, disable bool) error {
	return a.fleetCommand(ctx, name, nil, func(now time.Time) (fleet.User, error) {
		if disable {
			return a.fl.c.Disable(ctx, name, now)
		}
		return a.fl.c.Enable(ctx, name, now)
	})
}

func (a *Agent) fleetUnblock(ctx context.Context, name string, d time.Duration) error {
	return a.fleetCommand(ctx, name, func(u *user) error {
		st := u.r.state()
		if _, err := st.Unblock(a.now(), u.r.plan(), d); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		return nil
	}, func(now time.Time) (fleet.User, error) {
		var until time.Time
		if d > 0 {
			until = now.Add(d)
		}
		return a.fl.c.Unblock(ctx, name, until, now)
	})
}

// fleetEditPlan changes the user's line in the fleet's plans; edit works
// on a limits file holding only that line, as the local commands do.
func (a *Agent) fleetEditPlan(ctx context.Context, name string, edit func(l *opsfiles.Limits) error) error {
	return a.fleetCommand(ctx, name, nil, func(now time.Time) (fleet.User, error) {
		return a.fl.c.EditPlan(ctx, name, now, func(e *opsfiles.Entry, line *bool) error {
			l, _ := opsfiles.ParseLimits("", nil)
			if *line {
				cur := *e
				cur.User = name
				if err := l.Set(cur); err != nil {
					return err
				}
			}
			if err := edit(l); err != nil {
				return err
			}
			ne, ok := l.Lookup(name)
			ne.Line = 0
			*e, *line = ne, ok
			return nil
		})
	})
}

// fleetShares adds each node's share of the user, from the database.
func (a *Agent) fleetShares(ctx context.Context, v *view.User) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	shares, err := a.fl.c.Shares(ctx, v.Name)
	if err != nil {
		v.FleetNote = "the fleet database did not answer: " + err.Error()
		return
	}
	for _, s := range shares {
		use := quota.Usage{Up: s.Up, Down: s.Down}
		v.Fleet = append(v.Fleet, view.NodeShare{Node: s.Node, Upload: s.Up, Download: s.Down,
			Used: a.rules.Metric.Of(use), Lease: s.Ceiling})
	}
}
