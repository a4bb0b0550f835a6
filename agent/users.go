package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
	"time"
	"unique"

	"github.com/myvpn/bwagent/bpf"
	pw "github.com/myvpn/bwagent/internal/passwd"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
)

// record is what readers may see of a user: the facts of one version of
// it. A record is immutable once published (see publisher): the loop
// changes a user only through Agent.edit, which copies a published record
// first, so a reader holding an older snapshot never sees it move.
//
// A user is one name with one limit, whatever its sources: an SSH account
// (a UID), an Xray client (an email), or both (the same customer sold
// both): every source counts against the one limit, and a block stops all
// of them.
//
// A record is small (96 bytes), since there is one per user and a new one
// for each user whose usage moved in a tick: it holds what differs from
// user to user and moves every tick (the usage), and a handle on its
// terms, everything else, which seldom changes and which many users share.
type record struct {
	name    string
	day     string      // the local day today belongs to (quota.State.Day)
	total   quota.Usage // quota.State.Total
	today   quota.Usage // quota.State.Today
	updated quota.Instant
	uid     uint32 // the SSH account's
	gen     uint32 // the publication this record was created after
	ssh     bool   // an account in the passwd file right now
	xray    bool   // a client in Xray's config right now
	// capped: one of the user's IDs in the kernel carries their speed caps
	// (Agent.deriveCaps, at each evaluation); without it none is in force.
	capped bool
	t      unique.Handle[terms]
	// devs are the user's devices as of the end of the tick (devices.go;
	// nil: none): replaced, never changed in place. A pointer, not a
	// slice: a record of 104 bytes takes 112, one of 120 takes 128 (1.6 MB
	// at 50,000 users).
	devs *[]liveDevice
}

// devices returns r's devices.
func (r *record) devices() []liveDevice {
	if r.devs == nil {
		return nil
	}
	return *r.devs
}

// terms are the parts of a record that seldom change: the protocols, the
// plan and the state besides the usage. They are interned (package unique):
// users with equal terms (the same plan, not blocked, not reset by hand)
// share one copy, which the runtime frees once no record holds it.
type terms struct {
	proto  quota.Protocol // ssh for an SSH account, else the Xray client's protocol
	xproto quota.Protocol // the Xray client's protocol while the user is one, else ""
	plan   quota.Plan     // from the limits file
	st     quota.State    // Total, Day and Today zero: they are in the record
}

// noTerms is the terms of a new user.
var noTerms = unique.Make(terms{})

// terms returns r's terms.
func (r *record) terms() terms { return r.t.Value() }

func (r *record) proto() quota.Protocol  { return r.t.Value().proto }
func (r *record) xproto() quota.Protocol { return r.t.Value().xproto }
func (r *record) plan() quota.Plan       { return r.t.Value().plan }

// state returns r's whole accounting state.
func (r *record) state() quota.State {
	st := r.t.Value().st
	st.Total, st.Day, st.Today = r.total, r.day, r.today
	return st
}

// blocked reports whether the user is blocked outright under rl (for the
// limit, an expiry or by an administrator): not a user throttled at the
// limit, who keeps working at their throttle rate.
func (r *record) blocked(rl quota.Rules) bool {
	t := r.t.Value()
	return t.st.Enforced(t.plan, rl)
}

// speed returns the speed caps in force for r under rl: its plan's or the
// default caps, the throttle rate while throttled (quota.State.SpeedOf),
// and none where no ID of r's in the kernel carries them (capped false) or
// r has no source left. The kernel's policies, the views and the usage
// files all take the caps from here.
func (r *record) speed(rl quota.Rules) quota.Speed {
	if !r.capped || !r.present() {
		return quota.Speed{}
	}
	st := r.state()
	return st.SpeedOf(r.plan(), rl)
}

// xrayBlocked reports whether r's Xray client is stopped as blocked:
// blocked outright, or throttled while the kernel does not count Xray's
// connections (xray.connections off, or Linux before 6.0), so that it
// could not slow them: a throttle rate it cannot enforce must not become
// a way around the limit.
func (a *Agent) xrayBlocked(r *record) bool {
	return r.blocked(a.rules) || (r.t.Value().st.Blocked && !a.xr.conns.active())
}

// setTerms makes t r's terms, r being a record the loop may write.
func (r *record) setTerms(t terms) {
	if t != r.t.Value() {
		r.t = unique.Make(t)
	}
}

// setState makes st r's accounting state, r being a record the loop may
// write.
func (r *record) setState(st quota.State) {
	r.total, r.day, r.today = st.Total, st.Day, st.Today
	st.Total, st.Day, st.Today = quota.Usage{}, "", quota.Usage{}
	t := r.terms()
	t.st = st
	r.setTerms(t)
}

// setPlan makes p r's plan, r being a record the loop may write.
func (r *record) setPlan(p quota.Plan) {
	t := r.terms()
	t.plan = p
	r.setTerms(t)
}

// setProtos sets r's Xray protocol and derives its main one, r being a
// record the loop may write.
func (r *record) setProtos(xproto quota.Protocol) {
	t := r.terms()
	t.xproto = xproto
	t.proto = r.mainProtoOf(t)
	r.setTerms(t)
}

// usage returns r's usage as a state holding only it, for charging.
func (r *record) usage() quota.State {
	return quota.State{Total: r.total, Day: r.day, Today: r.today}
}

// setUsage sets r's usage from st, r being a record the loop may write.
func (r *record) setUsage(st quota.State) { r.total, r.day, r.today = st.Total, st.Day, st.Today }

// present reports whether the user has a source now: an account or an
// Xray client.
func (r *record) present() bool { return r.ssh || r.xray }

// protocols lists the user's sources now, the SSH account first.
func (r *record) protocols() []quota.Protocol {
	var ps []quota.Protocol
	if r.ssh {
		ps = append(ps, quota.SSH)
	}
	if r.xray {
		ps = append(ps, r.xproto())
	}
	return ps
}

// mainProtoOf is the protocol a user with terms t is shown and logged with:
// ssh while it has an account, else its Xray protocol (or the last it had).
func (r *record) mainProtoOf(t terms) quota.Protocol {
	switch {
	case r.ssh:
		return quota.SSH
	case r.xray:
		return t.xproto
	}
	return t.proto // gone from every source: as it was last
}

// user is the loop's handle on one user: its current record and the loop's
// own bookkeeping, which readers never see.
type user struct {
	r *record

	anchor    anchor // kernel budget granted (SSH users)
	hasAnchor bool

	// status is the status last decided for r (an index into statuses; 0
	// none yet): a change is recorded.
	status uint8

	queued bool      // in this tick's evaluation queue
	dirty  bool      // the state row must be committed
	json   jsonState // what the usage file needs
}

// edit returns u's record for writing: a copy if the current one may have
// been published.
func (a *Agent) edit(u *user) *record {
	if u.r.gen != a.pub.gen {
		c := *u.r
		c.gen = a.pub.gen
		u.r = &c
		a.pub.changed = true
	}
	return u.r
}

// jsonState says how soon a user's usage file must be rewritten.
type jsonState uint8

const (
	jsonClean  jsonState = iota
	jsonLazy             // the device count alone changed: written within jsonLazyRounds intervals
	jsonUsage            // usage moved: written at the next JSON interval
	jsonUrgent           // status or record changed: written this tick
)

// jsonLazyRounds is how many JSON intervals a file whose device count alone
// changed may wait (30 s with the default 5 s): a user with short
// connections would otherwise have the file written again as each
// connection comes and goes. A write for any other reason takes the count
// along; bwctl devices is live.
const jsonLazyRounds = 6

// newUser adds a user to the table, with the limits line its name may
// already have.
func (a *Agent) newUser(name string, proto quota.Protocol) *user {
	r := &record{name: name, gen: a.pub.gen, t: noTerms}
	r.setTerms(terms{proto: proto, plan: a.plans[name]})
	u := &user{r: r}
	delete(a.plans, name)
	a.users[name] = u
	if a.fl != nil {
		a.fl.pend[name] = true
	}
	a.pub.changed, a.pub.membership = true, true
	return u
}

// compactPlans gives a.plans a map of its own size: newUser takes a new
// user's line out of it, and a map keeps the size it had (a first start
// with 50,000 users in the limits file left 3.7 MB of empty map).
func (a *Agent) compactPlans() {
	plans := make(map[string]quota.Plan, len(a.plans))
	for name, p := range a.plans {
		plans[name] = p
	}
	a.plans = plans
}

// dropUser forgets a user who left longer than the retention ago: from
// memory now, from the state database (user row and counter baselines;
// their per-day history stays) in this tick's commit.
func (a *Agent) dropUser(u *user) {
	r := u.r
	delete(a.users, r.name)
	a.pub.changed, a.pub.membership = true, true
	a.rec.dropUsers = append(a.rec.dropUsers, r.name)
	a.xr.dropBaseline(r.name, &a.rec)
	if a.fl != nil {
		delete(a.fl.users, r.name)
		a.rec.dropBaselines = append(a.rec.dropBaselines, quota.FleetSource(r.name))
	}
	delete(a.notes.threshold, r.name) // nil maps before the first tick: a no-op
	delete(a.notes.expiring, r.name)
	a.log.Info("user forgotten: gone longer than the retention", "user", r.name, "protocol", r.proto(),
		"last_seen", r.updated.Time().In(a.loc).Format(time.DateTime), "retention", a.cfg.Retention)
}

// expire drops the users who left (no account, no Xray client) more than
// the retention ago. A source that could not be read this run (a missing
// passwd file, a broken Xray config at start) makes its users look gone:
// they are kept until it has been read.
func (a *Agent) expire(now time.Time) {
	if now.Before(a.nextExpire) {
		return
	}
	a.nextExpire = now.Add(time.Hour)
	cutoff := quota.At(now.Add(-a.cfg.Retention))
	for _, u := range a.users {
		r := u.r
		if r.present() || r.updated >= cutoff {
			continue
		}
		sshKnown := a.passwdStamp.valid || !a.cfg.SSH.Enabled
		xrayKnown := a.xr.conf != nil || !a.cfg.Xray.Enabled
		switch t := r.terms(); {
		case t.proto == quota.SSH && !sshKnown, (t.proto.Xray() || t.xproto != "") && !xrayKnown, t.proto == "" && !(sshKnown && xrayKnown):
			continue
		}
		a.dropUser(u)
	}
}

// stamp identifies a version of a file cheaply, to re-read it only when it
// changed.
type stamp struct {
	ino, size int64
	mtime     time.Time
	missing   bool
	valid     bool
}

func statStamp(path string) (stamp, error) {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return stamp{missing: true, valid: true}, nil
	}
	if err != nil {
		return stamp{}, err
	}
	s := stamp{size: fi.Size(), mtime: fi.ModTime(), valid: true}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.ino = int64(st.Ino)
	}
	return s, nil
}

// loadAccounts re-reads the SSH accounts when the passwd file changed.
func (a *Agent) loadAccounts(now time.Time) error {
	if !a.cfg.SSH.Enabled {
		return nil
	}
	path := a.cfg.Paths.Passwd
	s, err := statStamp(path)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if s == a.passwdStamp {
		return nil
	}
	entries, err := pw.Read(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	sel := pw.Accounts(entries, a.cfg.SSH.UIDMin, a.cfg.SSH.UIDMax, a.cfg.SSH.Exclude)
	for _, e := range sel.BadNames {
		a.logs.warnOnce("badname:"+e.Name, "account name is not a safe file name; not accounted", "name", fmt.Sprintf("%q", e.Name), "line", e.Line, "err", quota.ValidName(e.Name))
	}
	for _, d := range sel.Duplicates {
		a.logs.warnOnce(fmt.Sprintf("dup:%d:%s:%d", d.UID, d.Name, d.Line), "two accounts share a UID or a name; the first in the file is accounted",
			"uid", d.UID, "ignored", d.Name, "line", d.Line, "accounted", d.Owner.Name)
	}
	seen := make(map[string]bool, len(sel.Accounts))
	owners := make(map[uint32]*user, len(sel.Accounts))
	created := false
	for _, ac := range sel.Accounts {
		u := a.users[ac.Name]
		switch {
		case u == nil:
			u = a.newUser(ac.Name, quota.SSH)
			a.touch(u, now, jsonUrgent)
			created = true
		case u.r.xray && !u.r.ssh:
			a.log.Info("an SSH account has the name of an Xray client: one user, one limit, counted from both",
				"name", ac.Name, "protocols", "ssh+"+string(u.r.xproto()))
		}
		if prev := a.byUID[ac.UID]; prev != nil && prev != u {
			a.log.Warn("UID changed owner: its usage and blocks are now the new account's", "uid", ac.UID,
				"from", prev.r.name, "to", ac.Name)
		}
		if r := u.r; !r.ssh || r.uid != ac.UID {
			if r.ssh && r.uid != ac.UID {
				a.kernel.release(r.uid) // the old UID is no longer this user's
			}
			w := a.edit(u)
			w.uid, w.ssh = ac.UID, true
			w.setProtos(w.xproto())
			u.hasAnchor = false
			a.touch(u, now, jsonUrgent)
			a.queue(u)
		}
		owners[ac.UID] = u
		seen[ac.Name] = true
	}
	for name, u := range a.users {
		if u.r.ssh && !seen[name] {
			a.leaveSSH(u, now) // the account is gone; its record and usage stay
		}
	}
	if created {
		a.compactPlans()
	}
	a.byUID = owners
	a.passwdStamp = s
	return nil
}

// leaveSSH marks u's SSH account as gone: its UID is no longer counted or
// enforced for u. A user with no source left keeps its record for the
// retention.
func (a *Agent) leaveSSH(u *user, now time.Time) {
	w := a.edit(u)
	w.ssh = false
	w.setProtos(w.xproto())
	u.hasAnchor = false
	if a.byUID[w.uid] == u {
		delete(a.byUID, w.uid)
		a.kernel.release(w.uid)
	}
	a.left(u, now)
}

// leaveXray marks u's Xray client as gone from Xray's config.
func (a *Agent) leaveXray(u *user, now time.Time) {
	if xk := a.xr.conns.k; xk != nil {
		if id, ok := xk.AccountOf(u.r.name); ok {
			a.kernel.release(id)
			u.hasAnchor = false
		}
	}
	w := a.edit(u)
	w.xray = false
	w.setProtos(w.xproto())
	a.markersDirty = true
	a.left(u, now)
}

// left records that u lost a source: its file is rewritten while it has
// another, and the retention counts from now when it has none.
func (a *Agent) left(u *user, now time.Time) {
	w := a.edit(u)
	w.updated = quota.At(now)
	js := jsonUrgent
	if !w.present() {
		js = jsonClean
	}
	a.touch(u, now, js)
	a.queue(u)
}

// loadLimits re-reads the limits file when it changed. A bad line is logged
// once with its line number and skipped (again only if it changes); the
// other lines still apply. A bad devices= value is logged the same way,
// and the rest of its line applies.
func (a *Agent) loadLimits(now time.Time) error {
	path := a.cfg.Paths.Limits
	s, err := statStamp(path)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if s == a.limitsStamp {
		return nil
	}
	l, lineErrs, err := opsfiles.ReadLimits(path)
	if err != nil {
		return err
	}
	bad := make(map[string]bool, len(lineErrs))
	for _, le := range lineErrs {
		msg := le.Error()
		bad[msg] = true
		switch {
		case a.limitsBad[msg]:
		case le.Partial:
			a.log.Warn("limits file: bad value ignored, the rest of the line applies", "err", msg)
		default:
			a.log.Warn("limits file: bad line skipped", "err", msg)
		}
	}
	a.limitsBad = bad
	if a.fleetLimitsRead(s, l.Entries()) {
		// A hand edit in fleet mode applies once the fleet took it.
		a.limitsStamp = s
		return nil
	}
	plans := make(map[string]quota.Plan)
	a.dev.limitedLines, a.dev.all = 0, true
	for _, e := range l.Entries() {
		plans[e.User] = e.Plan(a.loc)
		if e.Devices > 0 {
			a.dev.limitedLines++
		}
	}
	// Each user keeps its plan; a.plans keeps only the lines of names that
	// are no user yet (an account created later takes its line then).
	for name, u := range a.users {
		if p := plans[name]; u.r.plan() != p {
			a.edit(u).setPlan(p)
			a.touch(u, now, jsonUrgent)
			a.queue(u)
		}
	}
	// A new map: Go maps keep their size after deletes.
	a.plans = make(map[string]quota.Plan)
	for name, p := range plans {
		if a.users[name] == nil {
			a.plans[name] = p
		}
	}
	a.limitsStamp = s
	return nil
}

// direction maps the counted metric to the traffic a kernel budget charges.
func direction(m quota.Metric) bpf.Direction {
	switch m {
	case quota.Upload:
		return bpf.Tx
	case quota.Download:
		return bpf.Rx
	}
	return bpf.Both
}
