package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

// metaImported marks a store that has imported the usage JSON files of an
// earlier install (done once, on the first start).
const metaImported = "usage_json_imported"

// sshSource is the baseline key of a UID's kernel counters.
func sshSource(uid uint32) string { return "uid:" + strconv.FormatUint(uint64(uid), 10) }

// load restores the users and baselines from the store, imports the usage
// files of an earlier install on the first start, and queues the events
// that were committed but never reached the block log.
func (a *Agent) load() error {
	rows, err := a.st.Users()
	if err != nil {
		return err
	}
	for _, r := range rows {
		u := fromRow(r)
		a.users[u.name] = u
		a.markJSON(u, jsonUsage) // written again once, so files lost while the agent was down come back
	}
	bases, err := a.st.Baselines()
	if err != nil {
		return err
	}
	for _, b := range bases {
		if uid, ok := strings.CutPrefix(b.Source, "uid:"); ok {
			if n, err := strconv.ParseUint(uid, 10, 32); err == nil {
				a.sshBase[uint32(n)] = kbase{epoch: a.epochID(b.Epoch), up: b.Tx, down: b.Rx}
				continue
			}
		}
		a.otherBase[b.Source] = &baseline{Sample: quota.Sample{Epoch: b.Epoch, Up: b.Tx, Down: b.Rx}}
	}
	if _, done, err := a.st.Meta(metaImported); err != nil {
		return err
	} else if !done {
		if err := a.importJSON(); err != nil {
			return err
		}
	}
	unlogged, err := a.st.UnloggedEvents()
	if err != nil {
		return err
	}
	a.commits = newCommitter(a.st, a.cfg.Paths.BlockLog, a.loc, unlogged)
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
			u = &user{name: d.Username}
			if p, err := quota.ParseProtocol(d.Protocol); err == nil {
				u.proto = p
			}
			a.users[u.name] = u
		}
		if (u.st.Total != quota.Usage{}) {
			continue // already accounted by this agent
		}
		imp := func(n uint64) quota.Usage {
			if a.rules.Metric == quota.Download {
				return quota.Usage{Down: n}
			}
			return quota.Usage{Up: n}
		}
		u.st.Total = imp(d.TotalUsage)
		if d.Upload+d.Download > 0 { // written by this agent: exact split
			u.st.Total = quota.Usage{Up: d.Upload, Down: d.Download}
		}
		if t, ok := parseOpsTime(d.UpdatedAt, a.loc); ok && quota.Day(t) == quota.Day(now) {
			u.st.Day, u.st.Today = quota.Day(now), imp(d.DailyUsage)
		}
		if t, ok := parseOpsTime(d.LastReset, a.loc); ok {
			u.st.LastReset = quota.At(t)
		}
		if d.Blocked {
			if d.BlockReason == quota.ReasonDisabled {
				u.st.Disabled = true
			}
			u.st.Blocked, u.st.Reason = true, d.BlockReason
			if u.st.Reason == "" {
				u.st.Reason = quota.ReasonLimit
			}
			t, _ := parseOpsTime(d.BlockTime, a.loc)
			u.st.BlockTime = quota.At(t)
		}
		a.touch(u, now, jsonUrgent)
		a.events = append(a.events, store.Event{Time: now, Protocol: string(u.proto), Name: u.name, Action: "import",
			Reason: fmt.Sprintf("imported %d bytes from %s", d.TotalUsage, filepath.Join(a.cfg.Paths.UsageDir, u.name+".json")), Logged: true})
	}
	if len(docs) > 0 {
		a.log.Info("imported usage files of an earlier install", "users", len(docs), "dir", a.cfg.Paths.UsageDir)
	}
	b := a.batch(now)
	b.Meta = map[string]string{metaImported: now.Format(time.RFC3339)}
	if err := a.st.Commit(b); err != nil {
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
	b := &store.Batch{History: a.history, Events: a.events, Logged: a.logged}
	if len(a.dirtyQ) > 0 {
		b.Users = make([]store.User, 0, len(a.dirtyQ))
		for _, u := range a.dirtyQ {
			b.Users = append(b.Users, userRow(u, now))
		}
	}
	if len(a.baseQ) > 0 {
		b.Baselines = make([]store.Baseline, 0, len(a.baseQ))
		for _, uid := range a.baseQ {
			bl := a.sshBase[uid]
			b.Baselines = append(b.Baselines, store.Baseline{Source: sshSource(uid), Epoch: a.epochs[bl.epoch], Rx: bl.down, Tx: bl.up})
		}
	}
	for _, src := range a.otherQ {
		bl := a.otherBase[src]
		b.Baselines = append(b.Baselines, store.Baseline{Source: src, Epoch: bl.Epoch, Rx: bl.Down, Tx: bl.Up})
	}
	return b
}

// clearDirty forgets what changed: it is in a batch now.
func (a *Agent) clearDirty() {
	for _, u := range a.dirtyQ {
		u.dirty = false
	}
	clear(a.dirtyQ)
	a.dirtyQ = a.dirtyQ[:0]
	for _, uid := range a.baseQ {
		bl := a.sshBase[uid]
		bl.dirty = false
		a.sshBase[uid] = bl
	}
	a.baseQ = a.baseQ[:0]
	for _, src := range a.otherQ {
		a.otherBase[src].dirty = false
	}
	a.otherQ = a.otherQ[:0]
	a.history, a.events, a.logged = nil, nil, nil
}

// commit hands this tick's changes to the committer: usage, baselines,
// history and events together in one transaction, so a crash at any moment
// neither loses nor double counts a byte. It returns the last commit's
// error; a failed batch stays queued and goes with the next.
func (a *Agent) commit(now time.Time) error {
	a.logged = append(a.logged, a.commits.takeLogged()...)
	b := a.batch(now)
	a.clearDirty()
	a.commits.submit(b)
	a.commits.retry()
	return a.commits.err()
}

func userRow(u *user, now time.Time) store.User {
	s := &u.st
	return store.User{
		Name: u.name, Protocol: string(u.proto), UID: u.uid,
		Up: s.Total.Up, Down: s.Total.Down,
		Day: s.Day, DayUp: s.Today.Up, DayDown: s.Today.Down,
		Blocked: s.Blocked, BlockReason: s.Reason, BlockTime: s.BlockTime.Time(),
		Disabled: s.Disabled, LastReset: s.LastReset.Time(),
		Unblocked: s.Override.Active, UnblockLimit: s.Override.Limit, UnblockUntil: s.Override.Until.Time(),
		Schedule: s.Schedule, NextReset: s.NextReset.Time(),
		UpdatedAt: now,
	}
}

func fromRow(r store.User) *user {
	u := &user{name: r.Name, proto: quota.Protocol(r.Protocol), uid: r.UID, updated: quota.At(r.UpdatedAt)}
	u.st = quota.State{
		Total: quota.Usage{Up: r.Up, Down: r.Down},
		Day:   r.Day, Today: quota.Usage{Up: r.DayUp, Down: r.DayDown},
		Blocked: r.Blocked, Reason: r.BlockReason, BlockTime: quota.At(r.BlockTime),
		Disabled: r.Disabled, LastReset: quota.At(r.LastReset),
		Override: quota.Override{Active: r.Unblocked, Limit: r.UnblockLimit, Until: quota.At(r.UnblockUntil)},
		Schedule: r.Schedule, NextReset: quota.At(r.NextReset),
	}
	return u
}

func eventRow(u *user, e quota.Event) store.Event {
	return store.Event{Time: e.Time, Protocol: string(u.proto), Name: u.name, Action: e.Action, Reason: e.Reason}
}

func dayRow(name string, d quota.DayTotal) store.DayUsage {
	return store.DayUsage{Name: name, Day: d.Day, Up: d.Usage.Up, Down: d.Usage.Down}
}
