package agent

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

// committer writes each tick's batch to the state database beside the loop,
// so a tick never waits for SQLite (about 13 µs a row: 10,000 changed users
// take over 100 ms). Each batch still goes in one transaction, totals and
// baselines together, so a crash at any moment loses and double counts
// nothing: what was not committed is counted again from the old baselines.
//
// When a commit fails or is still running at the next tick, the next batch
// is merged into the waiting one (rows are absolute values, the later one
// wins) and both go in the same transaction.
//
// Right after a commit it appends the committed events to the operators'
// block log, and hands their IDs back to the loop, which marks them logged
// in a later batch: a crash in between can repeat a log line, never lose one.
type committer struct {
	st  *store.Store
	obs observers // constant after New

	commitMu sync.Mutex // held during a commit

	mu       sync.Mutex
	pending  *store.Batch
	inflight *store.Batch  // being committed now
	unlogged []store.Event // committed, not yet in the block log
	logged   []int64       // in the block log, not yet marked in the store
	logPath  string
	loc      *time.Location
	lastErr  error
	logErr   error
	wake     waker
}

func newCommitter(st *store.Store, logPath string, loc *time.Location, unlogged []store.Event) *committer {
	return &committer{st: st, logPath: logPath, loc: loc, unlogged: unlogged, wake: newWaker()}
}

// waker wakes a background writer: wakes while it works coalesce into one
// more round, and a wake never blocks the loop.
type waker chan struct{}

func newWaker() waker { return make(waker, 1) }

func (w waker) wake() {
	select {
	case w <- struct{}{}:
	default:
	}
}

// run calls flush after each wake until ctx is done; flush reports its own
// errors to whoever asks.
func (w waker) run(ctx context.Context, flush func() error) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-w:
			flush()
		}
	}
}

// setLog changes where the block log is written.
func (c *committer) setLog(path string, loc *time.Location) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.logPath, c.loc = path, loc
}

// submit queues b for the next commit.
func (c *committer) submit(b *store.Batch) {
	if b.Empty() {
		return
	}
	c.mu.Lock()
	c.pending = mergeBatch(c.pending, b)
	c.mu.Unlock()
	c.wake.wake()
}

// retry wakes the committer if a failed commit or block log append waits,
// so it is tried again every tick even when nothing new changed.
func (c *committer) retry() {
	c.mu.Lock()
	waiting := c.pending != nil || len(c.unlogged) > 0
	c.mu.Unlock()
	if waiting {
		c.wake.wake()
	}
}

func (c *committer) run(ctx context.Context) { c.wake.run(ctx, c.flush) }

// flush commits what is pending now, then appends the block log, and
// returns the commit's error.
func (c *committer) flush() error {
	c.commitMu.Lock()
	defer c.commitMu.Unlock()
	return c.flushLocked()
}

// flushIfIdle is flush unless a commit is running: then it returns
// errCommitBusy at once instead of waiting for it (the loop must not wait
// for a commit of thousands of rows). A nil error means everything
// submitted before the call is committed.
func (c *committer) flushIfIdle() error {
	if !c.commitMu.TryLock() {
		return errCommitBusy
	}
	defer c.commitMu.Unlock()
	return c.flushLocked()
}

// errCommitBusy is flushIfIdle's answer while a commit runs.
var errCommitBusy = errors.New("a commit is running")

// flushLocked is flush with commitMu held.
func (c *committer) flushLocked() error {
	c.mu.Lock()
	b := c.pending
	c.pending, c.inflight = nil, b
	c.mu.Unlock()
	var err error
	if b != nil {
		start := time.Now()
		err = c.st.Commit(b)
		c.obs.Committed(time.Since(start), err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.inflight = nil
	if b != nil {
		c.lastErr = err
		if err != nil {
			// Put it back under anything submitted meanwhile, which is newer.
			c.pending = mergeBatch(b, c.pending)
		} else {
			for _, e := range b.Events {
				if !e.Logged {
					c.unlogged = append(c.unlogged, e)
				}
			}
		}
	}
	if len(c.unlogged) > 0 {
		c.appendLog()
	}
	return err
}

// appendLog writes the unlogged events that belong in the block log.
func (c *committer) appendLog() {
	lines := make([]opsfiles.LogLine, 0, len(c.unlogged))
	for _, e := range c.unlogged {
		switch e.Action {
		case quota.ActBlock, quota.ActThrottle, quota.ActUnblock, quota.ActDisable, quota.ActEnable, quota.ActReset, quota.ActDevice:
			lines = append(lines, opsfiles.LogLine{Time: e.Time, Protocol: e.Protocol, Username: e.Name, Reason: e.Reason})
		}
	}
	if len(lines) > 0 {
		if c.logErr = opsfiles.AppendLog(c.logPath, lines, c.loc); c.logErr != nil {
			return
		}
	}
	c.logErr = nil
	for _, e := range c.unlogged {
		c.logged = append(c.logged, e.ID)
	}
	c.unlogged = nil
}

// takeLogged returns the IDs of the events appended to the block log since
// the last call, for the loop to mark in its next batch.
func (c *committer) takeLogged() []int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.logged
	c.logged = nil
	return l
}

// pendingHistory returns name's finished days waiting for a commit.
func (c *committer) pendingHistory(name string) []store.DayUsage {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []store.DayUsage
	for _, b := range []*store.Batch{c.inflight, c.pending} { // older first: a later row wins
		if b == nil {
			continue
		}
		for _, h := range b.History {
			if h.Name == name {
				out = append(out, h)
			}
		}
	}
	return out
}

func (c *committer) err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastErr
}

func (c *committer) logError() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.logErr
}

// mergeBatch returns older with newer applied on top: newer rows replace
// older rows of the same key, events and marks accumulate.
func mergeBatch(older, newer *store.Batch) *store.Batch {
	switch {
	case older == nil:
		return newer
	case newer == nil:
		return older
	}
	m := &store.Batch{
		Events: append(older.Events, newer.Events...),
		Logged: append(older.Logged, newer.Logged...),
	}
	// The store applies drops before upserts. An upsert of older that
	// newer drops must go, or it would bring the row back; a drop of older
	// that newer upserts again is undone by the upsert, as it should be.
	droppedUser := make(map[string]bool, len(newer.DropUsers))
	for _, n := range newer.DropUsers {
		droppedUser[n] = true
	}
	droppedBase := make(map[quota.Source]bool, len(newer.DropBaselines))
	for _, s := range newer.DropBaselines {
		droppedBase[s] = true
	}
	// Rows of older that newer upserts again (as Users or UserRows) go too:
	// the store writes Users before UserRows, so an older row of one kind
	// must not win over a newer row of the other.
	newerUser := make(map[string]bool, len(newer.Users))
	for _, u := range newer.Users {
		newerUser[u.Name] = true
	}
	newerRows, _ := newer.UserRows.(userRows)
	for _, r := range newerRows {
		newerUser[r.r.name] = true
	}
	olderRows, _ := older.UserRows.(userRows)
	m.Users = mergeKeyed(slices.DeleteFunc(slices.Clone(older.Users), func(u store.User) bool { return droppedUser[u.Name] || newerUser[u.Name] }),
		newer.Users, func(u store.User) string { return u.Name })
	if rows := append(slices.DeleteFunc(slices.Clone(olderRows), func(r userRef) bool { return droppedUser[r.r.name] || newerUser[r.r.name] }),
		newerRows...); len(rows) > 0 {
		m.UserRows = rows
	}
	m.Baselines = mergeKeyed(slices.DeleteFunc(slices.Clone(older.Baselines), func(b store.Baseline) bool { return droppedBase[b.Source] }),
		newer.Baselines, func(b store.Baseline) quota.Source { return b.Source })
	m.History = mergeKeyed(older.History, newer.History, func(h store.DayUsage) [2]string { return [2]string{h.Name, h.Day} })
	m.DropUsers = append(slices.Clip(older.DropUsers), newer.DropUsers...)
	m.DropBaselines = append(slices.Clip(older.DropBaselines), newer.DropBaselines...)
	if len(older.Meta)+len(newer.Meta) > 0 {
		m.Meta = make(map[string]string)
		for k, v := range older.Meta {
			m.Meta[k] = v
		}
		for k, v := range newer.Meta {
			m.Meta[k] = v
		}
	}
	return m
}

// mergeKeyed returns the rows of older whose key newer lacks, then newer.
func mergeKeyed[T any, K comparable](older, newer []T, key func(T) K) []T {
	seen := make(map[K]bool, len(newer))
	for _, r := range newer {
		seen[key(r)] = true
	}
	out := make([]T, 0, len(older)+len(newer))
	for _, r := range older {
		if !seen[key(r)] {
			out = append(out, r)
		}
	}
	return append(out, newer...)
}
