package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

// metaImported marks a store that has imported the usage JSON files of an
// earlier install (done once, on the first start).
const metaImported = "usage_json_imported"

// records are the rows and events of the ticks since the last commit,
// handed to the committer together with the changed users and baselines.
type records struct {
	history       []store.DayUsage
	events        []store.Event
	logged        []int64 // events appended to the block log, to mark in the store
	dropUsers     []string
	dropBaselines []quota.Source
}

// load restores the users and baselines from the store, imports the usage
// files of an earlier install on the first start, and queues the events
// that were committed but never reached the block log.
func (a *Agent) load() error {
	rows, err := a.store.Users()
	if err != nil {
		return err
	}
	for _, r := range rows {
		// Not present until their source (passwd, Xray's config) names
		// them; their usage files are written again then.
		a.users[r.Name] = &user{r: fromRow(r)}
	}
	bases, err := a.store.Baselines()
	if err != nil {
		return err
	}
	var debts []store.Baseline
	for _, b := range bases {
		s := quota.Sample{Epoch: b.Epoch, Up: b.Tx, Down: b.Rx}
		switch b.Source.Kind {
		case quota.SourceUID:
			a.kernel.base.put(b.Source.UID, kbase{epoch: a.kernel.epochID(b.Epoch), up: s.Up, down: s.Down})
		case quota.SourceXray:
			a.xr.setSample(a.xr.baseOf(b.Source.Name), s)
		case quota.SourceOwed:
			debts = append(debts, b) // after the kernel's baselines
		case quota.SourceFleet:
			if a.fl == nil {
				a.rec.dropBaselines = append(a.rec.dropBaselines, b.Source) // fleet mode turned off
				continue
			}
			a.fleetLoad(b.Source.Name, b.Epoch, quota.Usage{Up: s.Up, Down: s.Down})
		}
	}
	now := a.now()
	for _, b := range debts {
		a.loadDebt(b, now)
	}
	if _, done, err := a.store.Meta(metaImported); err != nil {
		return err
	} else if !done {
		if err := a.importJSON(); err != nil {
			return err
		}
	}
	unlogged, err := a.store.UnloggedEvents()
	if err != nil {
		return err
	}
	a.commits = newCommitter(a.store, a.cfg.Paths.BlockLog, a.loc, unlogged)
	a.commits.obs = a.obs
	return nil
}

// importJSON takes over the totals of the usage files an earlier install
// (the bash tool) left, once. The bash tool counted upload, so its totals
// are imported as upload (as download if this agent counts download only).
// A corrupt file is moved aside, never deleted, and reported.
func (a *Agent) importJSON() error {
	now := a.now().In(a.loc)
	docs, bad := opsfiles.ImportDir(a.cfg.Paths.UsageDir)
	for _, err := range bad {
		a.log.Warn("usage file from an earlier install not imported", "err", err)
		var pe *os.PathError
		if errors.Is(err, opsfiles.ErrCorrupt) && errors.As(err, &pe) {
			if to, merr := opsfiles.MoveAside(pe.Path, now); merr == nil {
				a.log.Warn("corrupt usage file moved aside", "from", pe.Path, "to", to)
			}
		}
	}
	for _, d := range docs {
		u := a.users[d.Username]
		if u == nil {
			proto, _ := quota.ParseProtocol(d.Protocol)
			u = a.newUser(d.Username, proto)
		}
		if (u.r.total != quota.Usage{}) {
			continue // already accounted by this agent
		}
		w := a.edit(u)
		st := w.state()
		imp := func(n uint64) quota.Usage {
			if a.rules.Metric == quota.Download {
				return quota.Usage{Down: n}
			}
			return quota.Usage{Up: n}
		}
		st.Total = imp(d.TotalUsage)
		if d.Upload+d.Download > 0 { // written by this agent: exact split
			st.Total = quota.Usage{Up: d.Upload, Down: d.Download}
		}
		if t, ok := parseOpsTime(d.UpdatedAt, a.loc); ok && quota.Day(t) == quota.Day(now) {
			st.Day, st.Today = quota.Day(now), imp(d.DailyUsage)
		}
		if t, ok := parseOpsTime(d.LastReset, a.loc); ok {
			st.LastReset = quota.At(t)
		}
		if d.Blocked {
			if d.BlockReason == quota.ReasonDisabled {
				st.Disabled = true
			}
			st.Blocked, st.Reason = true, d.BlockReason
			if st.Reason == "" {
				st.Reason = quota.ReasonLimit
			}
			t, _ := parseOpsTime(d.BlockTime, a.loc)
			st.BlockTime = quota.At(t)
		}
		w.setState(st)
		a.touch(u, now, jsonClean) // written once the user is present
		a.rec.events = append(a.rec.events, store.Event{Time: now, Protocol: string(w.proto()), Name: w.name, Action: "import",
			Reason: fmt.Sprintf("imported %d bytes from %s", d.TotalUsage, filepath.Join(a.cfg.Paths.UsageDir, w.name+".json")), Logged: true})
	}
	if len(docs) > 0 {
		a.log.Info("imported usage files of an earlier install", "users", len(docs), "dir", a.cfg.Paths.UsageDir)
	}
	b := a.batch(now)
	b.Meta = map[string]string{metaImported: now.Format(time.RFC3339)}
	if err := a.store.Commit(b); err != nil {
		return fmt.Errorf("import usage files: %w", err)
	}
	a.clearDirty()
	return nil
}

func parseOpsTime(s string, loc *time.Location) (time.Time, bool) {
	t, err := opsfiles.ParseTime(s, loc)
	return t, err == nil && !t.IsZero()
}

// batch collects everything that changed since the last commit.
func (a *Agent) batch(now time.Time) *store.Batch {
	rec := &a.rec
	b := &store.Batch{History: rec.history, Events: rec.events, Logged: rec.logged,
		DropUsers: rec.dropUsers, DropBaselines: rec.dropBaselines}
	if len(a.work.dirtyQ) > 0 {
		rows := make(userRows, 0, len(a.work.dirtyQ))
		at := &now
		for _, u := range a.work.dirtyQ {
			if a.users[u.r.name] == u { // not forgotten since
				rows = append(rows, userRef{r: u.r, at: at})
			}
		}
		b.UserRows = rows
	}
	k := &a.kernel
	// Room for every row, the debts' included, so that the slice is not
	// grown and copied over and over (at 50,000 users moving, that was
	// three quarters of what it allocated).
	n := len(k.baseQ)
	a.debtRows(now, func(*xbase, store.Baseline, savedDebt) { n++ })
	if a.fl != nil {
		n += len(a.fl.baseQ)
	}
	for _, email := range a.xr.baseQ {
		if bl := a.xr.base[email]; bl != nil && bl.counted {
			n++
		}
	}
	if n > 0 {
		b.Baselines = make([]store.Baseline, 0, n)
	}
	for _, uid := range k.baseQ {
		bl, _ := k.base.get(uid)
		b.Baselines = append(b.Baselines, store.Baseline{Source: quota.UIDSource(uid), Epoch: k.epochs[bl.epoch], Rx: bl.down, Tx: bl.up})
	}
	a.fleetBaselines(func(src quota.Source, e quota.Epoch, u quota.Usage) {
		b.Baselines = append(b.Baselines, store.Baseline{Source: src, Epoch: e, Rx: u.Down, Tx: u.Up})
	})
	for _, email := range a.xr.baseQ {
		if bl := a.xr.base[email]; bl != nil && bl.counted {
			b.Baselines = append(b.Baselines, store.Baseline{Source: quota.XraySource(email), Epoch: a.xr.epochs[bl.epoch], Rx: bl.down, Tx: bl.up})
		}
	}
	a.debtRows(now, func(bl *xbase, row store.Baseline, sv savedDebt) {
		b.Baselines = append(b.Baselines, row)
		bl.saved = sv
	})
	return b
}

// debtRows calls fn with each row of an Xray user's debt that the next
// commit writes (debtRow): of the users whose debt changed, and of those
// whose kernel account's baseline did, which moves a paidOrigin row's
// meaning if the debt did not follow it (a restart of the counters).
func (a *Agent) debtRows(now time.Time, fn func(*xbase, store.Baseline, savedDebt)) {
	for _, email := range a.xr.baseQ {
		if bl := a.xr.base[email]; bl != nil {
			if row, sv, ok := a.debtRow(email, bl, now); ok {
				fn(bl, row, sv)
			}
		}
	}
	xk := a.xr.conns.k
	if xk == nil {
		return
	}
	for _, id := range a.kernel.baseQ {
		if id < bpf.AccountBase {
			continue
		}
		if name, ok := xk.AccountName(id); ok {
			if bl := a.xr.base[name]; bl != nil && !bl.dirty { // not done above
				if row, sv, ok := a.debtRow(name, bl, now); ok {
					fn(bl, row, sv)
				}
			}
		}
	}
}

// clearDirty forgets what changed: it is in a batch now.
func (a *Agent) clearDirty() {
	for _, u := range a.work.dirtyQ {
		u.dirty = false
	}
	clear(a.work.dirtyQ)
	a.work.dirtyQ = trimmed(a.work.dirtyQ[:0])
	k := &a.kernel
	for _, uid := range k.baseQ {
		if bl, ok := k.base.get(uid); ok {
			bl.dirty = false
			k.base.put(uid, bl)
		}
	}
	k.baseQ = trimmed(k.baseQ[:0])
	for _, email := range a.xr.baseQ {
		if bl := a.xr.base[email]; bl != nil {
			bl.dirty, bl.counted = false, false
		}
	}
	clear(a.xr.baseQ)
	a.xr.baseQ = trimmed(a.xr.baseQ[:0])
	a.rec = records{}
}

// commit hands this tick's changes to the committer: usage, baselines,
// history and events together in one transaction, so a crash at any moment
// neither loses nor double counts a byte. It returns the last commit's
// error; a failed batch stays queued and goes with the next.
func (a *Agent) commit(now time.Time) error {
	a.rec.logged = append(a.rec.logged, a.commits.takeLogged()...)
	b := a.batch(now)
	a.clearDirty()
	a.commits.submit(b)
	a.commits.retry()
	return a.commits.err()
}

// userRows are the user rows of a batch as the records they are rendered
// from when the store writes them (store.UserRows): a batch holds a pointer
// per changed user rather than a row (about 250 bytes; every user's at the
// first tick). The records are immutable from the end of the tick that
// built the batch on (the loop edits copies), and nothing edits them
// between the batch and the end of its tick.
type userRows []userRef

// userRef is a user's record as of a batch, and the batch's time, shared
// by its rows.
type userRef struct {
	r  *record
	at *time.Time
}

func (l userRows) Len() int                 { return len(l) }
func (l userRows) Name(i int) string        { return l[i].r.name }
func (l userRows) Row(i int, u *store.User) { *u = userRow(l[i].r, *l[i].at) }

func userRow(r *record, now time.Time) store.User {
	t := r.terms()
	s := &t.st
	return store.User{
		Name: r.name, Protocol: string(t.proto), UID: r.uid,
		Up: r.total.Up, Down: r.total.Down,
		Day: r.day, DayUp: r.today.Up, DayDown: r.today.Down,
		Blocked: s.Blocked, BlockReason: s.Reason, BlockTime: s.BlockTime.Time(),
		Disabled: s.Disabled, LastReset: s.LastReset.Time(),
		Unblocked: s.Override.Active, UnblockLimit: s.Override.Limit, UnblockUntil: s.Override.Until.Time(),
		Schedule: s.Schedule, NextReset: s.NextReset.Time(),
		UpdatedAt: now,
	}
}

func fromRow(r store.User) *record {
	rec := &record{name: r.Name, uid: r.UID, updated: quota.At(r.UpdatedAt), t: noTerms}
	rec.setTerms(terms{proto: quota.Protocol(r.Protocol)})
	rec.setState(quota.State{
		Total: quota.Usage{Up: r.Up, Down: r.Down},
		Day:   r.Day, Today: quota.Usage{Up: r.DayUp, Down: r.DayDown},
		Blocked: r.Blocked, Reason: r.BlockReason, BlockTime: quota.At(r.BlockTime),
		Disabled: r.Disabled, LastReset: quota.At(r.LastReset),
		Override: quota.Override{Active: r.Unblocked, Limit: r.UnblockLimit, Until: quota.At(r.UnblockUntil)},
		Schedule: r.Schedule, NextReset: quota.At(r.NextReset),
	})
	return rec
}

// toNet and fromNet keep a user's debt and credit in one row: each
// direction has one or the other (chargeXray), written as the debt less
// the credit, a negative value in two's complement.
func toNet(owed, credit quota.Usage) (up, down uint64) {
	return owed.Up - credit.Up, owed.Down - credit.Down
}

func fromNet(up, down uint64) (owed, credit quota.Usage) {
	if int64(up) < 0 {
		credit.Up = -up
	} else {
		owed.Up = up
	}
	if int64(down) < 0 {
		credit.Down = -down
	} else {
		owed.Down = down
	}
	return owed, credit
}
