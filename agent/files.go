package agent

import (
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
)

// fileWriter writes the usage JSON files off the loop, so a slow or full disk
// never delays a tick. It keeps only the names of the users whose file is
// due and renders each from the latest published snapshot when it writes,
// so a file is never older than the tick that queued it, a backlog holds
// no old copies of users, and a failed write is retried with the newest
// state at the next kick.
type fileWriter struct {
	snap func() *snapshot // the latest published users; constant
	// pump, if not nil, is called after each chunk of files written: the
	// usage directory's watch reads the events the files raised (see
	// dirWatch.pump). Constant.
	pump func()

	// flushMu is held during a flush: the writer's, and the loop's last
	// one at shutdown, never write at once (one spare, two contents).
	flushMu sync.Mutex
	enc     opsfiles.UsageEncoder // the files of a chunk, under flushMu

	mu      sync.Mutex
	dir     string
	pending map[string]struct{}
	lastErr error
	written uint64 // files written, for tests and benchmarks
	wake    waker
}

func newFileWriter(dir string, snap func() *snapshot) *fileWriter {
	return &fileWriter{dir: dir, snap: snap, pending: make(map[string]struct{}), wake: newWaker()}
}

// setDir makes later writes go to dir.
func (w *fileWriter) setDir(dir string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.dir = dir
}

// submit queues the files of names. The writer renders them at its next
// kick, which the loop gives after publishing the tick that queued them.
func (w *fileWriter) submit(names []string) {
	if len(names) == 0 {
		return
	}
	w.mu.Lock()
	for _, n := range names {
		w.pending[n] = struct{}{}
	}
	w.mu.Unlock()
}

// kick wakes the writer, which writes whatever is pending (failed files
// included: kicked every tick, it retries them every tick).
func (w *fileWriter) kick() { w.wake.wake() }

func (w *fileWriter) run(ctx context.Context) { w.wake.run(ctx, w.flush) }

// flush writes everything pending now, in one batch (one filesystem sync for
// all files), each user as the latest snapshot has them; users who left or
// were forgotten since are skipped. Files that failed stay pending.
func (w *fileWriter) flush() error {
	w.flushMu.Lock()
	defer w.flushMu.Unlock()
	w.mu.Lock()
	if len(w.pending) == 0 {
		w.mu.Unlock()
		return w.err()
	}
	names := slices.Sorted(maps.Keys(w.pending))
	w.pending = make(map[string]struct{})
	dir := w.dir
	w.mu.Unlock()

	s := w.snap()
	var errs []error
	var failedNames []string
	mkdirErr := os.MkdirAll(dir, 0o755)
	written := 0
	// In chunks, so a start that rewrites every file holds a bounded amount
	// of rendered JSON at a time.
	for chunk := range slices.Chunk(names, writeChunk) {
		w.enc.Reset() // the last chunk is written
		files := make([]opsfiles.File, 0, len(chunk))
		var fileNames []string
		for _, name := range chunk {
			r := s.find(name)
			if r == nil || !r.present() {
				continue
			}
			doc := s.usageDoc(r)
			files = append(files, opsfiles.File{Name: name + ".json", Data: w.enc.Encode(&doc), Perm: 0o644})
			fileNames = append(fileNames, name)
		}
		for i, err := range writeAll(dir, files, mkdirErr) {
			if err != nil {
				errs = append(errs, err)
				failedNames = append(failedNames, fileNames[i])
			} else {
				written++
			}
		}
		if w.pump != nil {
			w.pump()
		}
	}

	w.mu.Lock()
	defer w.mu.Unlock()
	w.written += uint64(written)
	for _, name := range failedNames {
		w.pending[name] = struct{}{}
	}
	w.lastErr = nil
	if len(errs) > 0 {
		w.lastErr = fmt.Errorf("%d of %d usage files not written (kept for retry): %w", len(errs), len(names), errs[0])
	}
	return w.lastErr
}

// writeChunk is how many usage files are written (and synced) together;
// the watch is pumped after each chunk, whose five events a file must fit
// the kernel's default queue of 16,384 (see dirWatch.pump).
const writeChunk = 1000

var _ = [16384 - 5*writeChunk]struct{}{} // a compile-time check of the above

// writeAll writes files into dir in one batch, or fails them all with
// mkdirErr when dir could not be created.
func writeAll(dir string, files []opsfiles.File, mkdirErr error) []error {
	if mkdirErr == nil {
		return opsfiles.WriteBatch(dir, files)
	}
	errs := make([]error, len(files))
	for i := range errs {
		errs[i] = mkdirErr
	}
	return errs
}

func (w *fileWriter) err() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.lastErr
}

// maxJSONPerTick bounds the usage files one tick renders, so a start that
// rewrites every file spreads the work over several ticks.
const maxJSONPerTick = 10000

// queueJSON hands the usage files that are due to the writer: status changes
// at once, usage-only changes once per JSON interval.
func (a *Agent) queueJSON(now time.Time) {
	all := now.Sub(a.lastJSON) >= a.cfg.JSONInterval || now.Before(a.lastJSON)
	lazy := false
	if all {
		a.jsonRounds++
		lazy = a.jsonRounds%jsonLazyRounds == 0
	}
	q := a.work.jsonQ
	docs := make([]string, 0, min(len(q), maxJSONPerTick))
	keep := q[:0]
	for _, u := range q {
		if len(docs) >= maxJSONPerTick {
			keep = append(keep, u) // the rest next tick
			continue
		}
		switch {
		case a.users[u.r.name] != u || !u.r.present():
			u.json = jsonClean // forgotten, or left: its file stays as it was
		case u.json == jsonUrgent || (all && u.json == jsonUsage) || (lazy && u.json == jsonLazy):
			docs = append(docs, u.r.name)
			u.json = jsonClean
		case u.json != jsonClean:
			keep = append(keep, u)
		}
	}
	clear(q[len(keep):])
	a.work.jsonQ = trimmed(keep)
	if all {
		a.lastJSON = now
	}
	a.files.submit(docs)
}

// repairJSON marks for rewriting the usage files someone else deleted, moved
// or edited since the last tick (all of them if the directory itself went),
// so they are back within a tick. The agent owns these files.
func (a *Agent) repairJSON() error {
	names, all, err := a.watch.drain()
	if all {
		for _, u := range a.users {
			if u.r.present() {
				a.markJSON(u, jsonUrgent)
			}
		}
	}
	for _, name := range names {
		if u := a.users[name]; u != nil && u.r.present() {
			a.markJSON(u, jsonUrgent)
		}
	}
	return err
}

// usageDoc renders r's usage file.
func (s *snapshot) usageDoc(r *record) opsfiles.Usage {
	t := r.terms()
	st, plan := r.state(), t.plan
	status := st.Status(plan, s.rules)
	d := opsfiles.Usage{
		Username:    r.name,
		TotalUsage:  st.Used(s.rules),
		TotalLimit:  plan.Limit,
		Blocked:     st.Enforced(plan, s.rules),
		BlockReason: st.Reason,
		BlockTime:   opsfiles.FormatTime(st.BlockTime.Time(), s.loc),
		LastReset:   opsfiles.FormatTime(st.LastReset.Time(), s.loc),
		Protocol:    string(t.proto),
		Status:      string(status),
		Upload:      st.Total.Up,
		Download:    st.Total.Down,
		UpdatedAt:   opsfiles.FormatTime(r.updated.Time(), s.loc),
	}
	for _, p := range r.protocols() {
		d.Protocols = append(d.Protocols, string(p))
	}
	if st.Day == s.today {
		d.DailyUsage = s.rules.Metric.Of(st.Today)
	}
	if rem, limited := st.Remaining(plan, s.rules); limited {
		d.Remaining = &rem
	}
	d.Devices = len(r.devices())
	if n := plan.Devices.Of(s.deviceDefault); n > 0 {
		d.DevicesLimit = &n
	}
	sp := r.speed(s.rules)
	for _, f := range []struct {
		r   quota.Rate
		dst **uint64
	}{{sp.Down, &d.SpeedDown}, {sp.Up, &d.SpeedUp}} {
		if f.r != 0 {
			n := uint64(f.r)
			*f.dst = &n
		}
	}
	return d
}

// syncMarkers makes the marker directory hold a file for exactly the blocked
// Xray users.
func (a *Agent) syncMarkers() error {
	if a.markersDirty {
		a.markers = make(map[string]opsfiles.Marker)
		for _, u := range a.users {
			if r := u.r; r.xray && a.xrayBlocked(r) {
				st := r.terms().st
				a.markers[r.name] = opsfiles.Marker{Reason: st.Reason, Time: st.BlockTime.Time()}
			}
		}
	}
	// With no blocked Xray user and nothing to fix, there is nothing to read.
	if len(a.markers) == 0 && !a.markersDirty && a.logs.reported["marker files"] == "" {
		return nil
	}
	a.markersDirty = false
	added, removed, err := opsfiles.SyncMarkers(a.cfg.Paths.MarkerDir, a.markers, a.loc)
	if len(added)+len(removed) > 0 {
		a.log.Info("marker files synced", "added", added, "removed", removed)
	}
	return err
}
