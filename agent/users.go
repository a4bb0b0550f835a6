package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
	"time"

	"github.com/myvpn/bwagent/bpf"
	pw "github.com/myvpn/bwagent/internal/passwd"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
)

// record is what readers may see of a user: the facts of one version of
// it. A record is immutable once published (see publisher): the loop
// changes a user only through Agent.edit, which copies a published record
// first, so a reader holding an older snapshot never sees it move.
type record struct {
	name    string
	proto   quota.Protocol
	uid     uint32 // SSH users
	gen     uint32 // the publication this record was created after
	st      quota.State
	plan    quota.Plan    // from the limits file
	updated quota.Instant // last change of usage or state
	present bool          // an account in the passwd file (or an Xray client) right now
}

// user is the loop's handle on one user: its current record and the loop's
// own bookkeeping, which readers never see.
type user struct {
	r *record

	// status is the status last decided for r: a change is recorded.
	status quota.Status

	anchor    anchor // kernel budget granted (SSH users)
	hasAnchor bool

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
	jsonUsage            // usage moved: written at the next JSON interval
	jsonUrgent           // status or record changed: written this tick
)

// newUser adds a user to the table, with the limits line its name may
// already have.
func (a *Agent) newUser(name string, proto quota.Protocol) *user {
	u := &user{r: &record{name: name, proto: proto, plan: a.plans[name], gen: a.pub.gen}}
	delete(a.plans, name)
	a.users[name] = u
	a.pub.changed, a.pub.membership = true, true
	return u
}

// dropUser forgets a user who left longer than the retention ago: from
// memory now, from the state database (user row and counter baselines;
// their per-day history stays) in this tick's commit.
func (a *Agent) dropUser(u *user) {
	r := u.r
	delete(a.users, r.name)
	a.pub.changed, a.pub.membership = true, true
	a.rec.dropUsers = append(a.rec.dropUsers, r.name)
	if r.proto.Xray() {
		a.xr.dropBaseline(r.name, &a.rec)
	}
	a.log.Info("user forgotten: gone longer than the retention", "user", r.name, "protocol", r.proto,
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
		if r.present || r.updated >= cutoff {
			continue
		}
		sshKnown := a.passwdStamp.valid || !a.cfg.SSH.Enabled
		xrayKnown := a.xr.conf != nil || !a.cfg.Xray.Enabled
		switch {
		case r.proto == quota.SSH && !sshKnown, r.proto.Xray() && !xrayKnown, r.proto == "" && !(sshKnown && xrayKnown):
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
	for _, ac := range sel.Accounts {
		u := a.users[ac.Name]
		switch {
		case u == nil:
			u = a.newUser(ac.Name, quota.SSH)
			a.touch(u, now, jsonUrgent)
		case u.r.proto != quota.SSH && u.r.proto != "" && u.r.present:
			a.logs.warnOnce("clash:"+ac.Name, "an SSH account has the name of an Xray user; the SSH account is not accounted",
				"name", ac.Name, "protocol", u.r.proto)
			continue
		}
		if prev := a.byUID[ac.UID]; prev != nil && prev != u {
			a.log.Warn("UID changed owner: its usage and blocks are now the new account's", "uid", ac.UID,
				"from", prev.r.name, "to", ac.Name)
		}
		if r := u.r; r.proto != quota.SSH || r.uid != ac.UID || !r.present {
			if r.present && r.proto == quota.SSH && r.uid != ac.UID {
				a.kernel.release(r.uid) // the old UID is no longer this user's
			}
			w := a.edit(u)
			w.proto, w.uid, w.present = quota.SSH, ac.UID, true
			u.hasAnchor = false
			a.touch(u, now, jsonUrgent)
			a.queue(u)
		}
		owners[ac.UID] = u
		seen[ac.Name] = true
	}
	for name, u := range a.users {
		if r := u.r; r.proto == quota.SSH && r.present && !seen[name] {
			a.leave(u, now) // the account is gone; its record and usage stay
		}
	}
	a.byUID = owners
	a.passwdStamp = s
	return nil
}

// leave marks u as gone from its source (passwd, Xray's config): it is no
// longer accounted or enforced; its record stays for the retention.
func (a *Agent) leave(u *user, now time.Time) {
	w := a.edit(u)
	w.present = false
	w.updated = quota.At(now)
	a.touch(u, now, jsonClean)
	u.hasAnchor = false
	if w.proto == quota.SSH && a.byUID[w.uid] == u {
		delete(a.byUID, w.uid)
		a.kernel.release(w.uid)
	}
	if w.proto.Xray() {
		a.markersDirty = true
	}
}

// loadLimits re-reads the limits file when it changed. A bad line is logged
// once with its line number and skipped (again only if it changes); the
// other lines still apply.
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
		if !a.limitsBad[msg] {
			a.log.Warn("limits file: bad line skipped", "err", msg)
		}
	}
	a.limitsBad = bad
	plans := make(map[string]quota.Plan)
	for _, e := range l.Entries() {
		plans[e.User] = e.Plan(a.loc)
	}
	// Each user keeps its plan; a.plans keeps only the lines of names that
	// are no user yet (an account created later takes its line then).
	for name, u := range a.users {
		if p := plans[name]; u.r.plan != p {
			a.edit(u).plan = p
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
