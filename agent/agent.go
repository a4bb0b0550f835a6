// Package agent is bwagent's control loop. Every tick it turns counters
// (the kernel's per-UID counters for SSH users, Xray's per-user counters for
// Xray users) into usage, usage into statuses, and statuses into enforcement
// (the BPF policy map with an exact in-kernel budget and the nft set for SSH
// users; Xray's inbounds, through its API, for Xray users) and records (the
// state database, the usage JSON files, the marker files and the block
// log). It also repairs whatever someone broke since the last tick: a
// detached program, a flushed ruleset, a deleted marker or usage file, a
// blocked user an Xray restart let back in.
//
// The loop is Run(ctx) around step(now). Operator commands (Reset, Unblock,
// SetLimit...) are queued to the loop and applied between ticks, so a
// command and a tick never overwrite each other. The kernel, nftables and
// Xray sit behind small interfaces, faked in the table tests and real in
// the integration tests.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/nft"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/sockkill"
	"github.com/myvpn/bwagent/store"
	"github.com/myvpn/bwagent/xrayconf"
	"github.com/myvpn/bwagent/xraystats"
)

// Interval bounds, as in the bash tool's service (1-5 seconds).
const (
	MinInterval     = time.Second
	MaxInterval     = 5 * time.Second
	DefaultInterval = 2 * time.Second
)

// kernelSlack is how close to the limit an SSH user's usage counts as
// reaching it. The kernel budget refuses any packet that would cross the
// limit, so usage stops short of it by less than the largest packet (a
// 64 KiB GSO batch); without the slack such a user would sit just under the
// limit, unable to send full packets, and never be marked blocked.
const kernelSlack = 64 * quota.KiB

// MemoryLimit returns the Go runtime soft memory limit bwagent keeps (unless
// GOMEMLIMIT is set) for a live heap of live bytes: without a limit the
// collector lets the heap grow to twice the live data before it runs; a limit
// at or under the live heap would make it run without end. So: half again the
// live heap plus 16 MiB of room, and never under 40 MiB.
func MemoryLimit(live uint64) int64 {
	return max(40<<20, int64(live+live/2)+16<<20)
}

// LiveHeap returns the bytes of heap the last garbage collection found
// live, for MemoryLimit.
func LiveHeap() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return s[0].Value.Uint64()
}

// Errors of the operator commands.
var (
	ErrInterval    = errors.New("interval must be from 1s to 5s")
	ErrUnknownUser = errors.New("unknown user")
	ErrNoLimit     = errors.New("user has no limit")
	ErrStopped     = errors.New("agent is stopping")
)

// Dataplane is the part of bpf.Datapath the loop drives.
type Dataplane interface {
	EnsureAttached() error
	Epoch() (string, error)
	EachCounter(fn func(uid uint32, c bpf.Counters)) error
	EachMoved(fn func(uid uint32, c bpf.Counters)) error
	CountersOf(uid uint32) (bpf.Counters, error)
	QuotaUsed(uid uint32) (uint64, error)
	ReconcilePolicies(desired map[uint32]bpf.Policy) (int, error)
	ApplyPolicies(changes map[uint32]bpf.Policy) error
	Protected(uid uint32) bool
}

// Firewall is the part of nft.Firewall the loop drives.
type Firewall interface {
	Reconcile(desired []uint32) (nft.Result, error)
}

// Options are what New needs. Config supplies every path and knob.
type Options struct {
	Config    config.Config
	Dataplane Dataplane
	Firewall  Firewall
	Store     *store.Store
	// Xray reaches Xray; its nil fields get the real implementations.
	Xray Xray
	Log  *slog.Logger
	// Now is the clock; nil is time.Now.
	Now func() time.Time
}

// Agent runs the control loop. Its exported methods may be called from any
// goroutine; they are applied by the loop between ticks.
type Agent struct {
	cfg   config.Config
	rules quota.Rules
	loc   *time.Location
	dp    Dataplane
	fw    Firewall
	st    *store.Store
	log   *slog.Logger
	now   func() time.Time

	users map[string]*user      // every user ever seen, present or not
	byUID map[uint32]*user      // present SSH users
	plans map[string]quota.Plan // limits of names that are no user yet

	// Counter baselines: the last sample folded into the totals.
	sshBase   map[uint32]kbase
	otherBase map[string]*baseline // Xray users' counters, by source ("xray:EMAIL")
	epochs    []string             // counter epochs, indexed by kbase.epoch

	// Work of this tick: users to evaluate, rows and baselines to commit,
	// usage files to write.
	evalQ    []*user
	retryQ   []*user // to evaluate again next tick
	dirtyQ   []*user
	baseQ    []uint32
	otherQ   []string // otherBase sources to commit
	jsonQ    []*user
	fullEval bool      // evaluate every user this tick
	nextWake time.Time // earliest timer (midnight, a reset, an expiry...)
	today    string
	dayY     int // the local day dayStr names
	dayM     time.Month
	dayD     int
	dayStr   string

	// The kernel policies the SSH users should have, the changes not yet
	// written, and when the whole map is next read back.
	sampleIn  int    // ticks to the next full read of the kernel counters
	epochSeen string // the counters' epoch at the last full read
	policy    map[uint32]bpf.Policy
	changes   map[uint32]bpf.Policy
	verifyIn  int
	verified  bool
	anchorErr error

	nftSet       map[uint32]struct{} // blocked SSH UIDs
	blockedUIDs  []uint32            // nftSet sorted, for the firewall
	nftDirty     bool
	markersDirty bool

	passwdStamp, limitsStamp stamp

	// Records waiting for the next commit, and the committer that writes
	// them (and the block log) beside the loop.
	history []store.DayUsage
	events  []store.Event
	logged  []int64
	commits *committer

	xray Xray
	xr   xrayState

	files    *fileWriter
	watch    *dirWatch // the usage directory, for files others touched
	lastJSON time.Time
	markers  map[string]opsfiles.Marker // blocked Xray users

	reported map[string]string // last error message per subject, to log once per change
	warned   map[string]bool   // one-time warnings

	cmds     chan request
	running  atomic.Bool
	status   atomic.Pointer[Health]
	interval time.Duration
	mu       sync.Mutex // guards interval changes seen by Run
}

// Health is the agent's own state, for the status command.
type Health struct {
	LastTick     time.Time
	TickDuration time.Duration
	Users        int
	Errors       map[string]string // subject → error, empty when healthy
	// Components are the agent's parts with their state: "ok", a short
	// description, or the error (kernel, nftables, xray, state database,
	// usage files).
	Components map[string]string
}

// request is an operator command for the loop.
type request struct {
	fn   func(now time.Time) error
	done chan error
}

// baseline is the last counter sample of one source folded into usage.
type baseline struct {
	quota.Sample
	dirty bool
}

// kbase is the baseline of one UID's kernel counters, compact: there can
// be one for every UID on the machine.
type kbase struct {
	epoch    uint32 // index into Agent.epochs
	dirty    bool
	up, down uint64
}

// epochID returns the index of epoch in a.epochs, adding it if new.
func (a *Agent) epochID(epoch string) uint32 {
	for i, e := range a.epochs {
		if e == epoch {
			return uint32(i)
		}
	}
	a.epochs = append(a.epochs, epoch)
	return uint32(len(a.epochs) - 1)
}

// sample returns the baseline b as a counter sample; a UID never seen is the
// zero sample.
func (a *Agent) sample(b kbase, seen bool) quota.Sample {
	if !seen {
		return quota.Sample{}
	}
	return quota.Sample{Epoch: a.epochs[b.epoch], Up: b.up, Down: b.down}
}

// anchor is a budget granted to an SSH user in the kernel: the absolute
// ceiling on the kernel's charged bytes, and what it was computed for.
type anchor struct {
	limit     uint64
	lastReset quota.Instant // the last reset it was granted after
	metric    quota.Metric
	ceiling   uint64
}

// CheckInterval validates a tick interval, mapping zero to the default.
func CheckInterval(d time.Duration) (time.Duration, error) {
	if d == 0 {
		return DefaultInterval, nil
	}
	if d < MinInterval || d > MaxInterval {
		return 0, fmt.Errorf("%w, got %v", ErrInterval, d)
	}
	return d, nil
}

// New returns an agent over the given boundaries, with its state loaded from
// the store. On the first start with an empty store it imports the usage
// JSON files of an earlier install, so a migrating operator loses nothing.
func New(o Options) (*Agent, error) {
	interval, err := CheckInterval(o.Config.Interval)
	if err != nil {
		return nil, err
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	a := &Agent{
		dp:           o.Dataplane,
		fw:           o.Firewall,
		st:           o.Store,
		log:          o.Log,
		now:          o.Now,
		users:        make(map[string]*user),
		byUID:        make(map[uint32]*user),
		plans:        make(map[string]quota.Plan),
		sshBase:      make(map[uint32]kbase),
		otherBase:    make(map[string]*baseline),
		policy:       make(map[uint32]bpf.Policy),
		nftSet:       make(map[uint32]struct{}),
		changes:      make(map[uint32]bpf.Policy),
		fullEval:     true,
		nftDirty:     true,
		markersDirty: true,
		reported:     make(map[string]string),
		warned:       make(map[string]bool),
		cmds:         make(chan request),
		interval:     interval,
	}
	if err := a.applyConfig(o.Config); err != nil {
		return nil, err
	}
	a.xray = o.Xray
	if a.xray.Load == nil {
		a.xray.Load = func() (*xrayconf.Config, error) {
			return xrayconf.Load(a.cfg.Xray.Configs, a.cfg.Xray.ConfigDir)
		}
	}
	if a.xray.Dial == nil {
		a.xray.Dial = func(ctx context.Context, addr string) (XrayAPI, error) {
			return xraystats.Dial(ctx, addr, xraystats.WithTimeout(a.cfg.Xray.Timeout))
		}
	}
	if a.xray.Cut == nil {
		a.xray.Cut = func(remotes []netip.Addr, ports []uint16) (int, error) {
			return sockkill.Cut(sockkill.Filter{LocalPorts: ports, Remotes: remotes})
		}
	}
	a.xr.removed = make(map[string]bool)
	a.files = newFileWriter(a.cfg.Paths.UsageDir)
	a.watch = newDirWatch(a.cfg.Paths.UsageDir)
	if err := a.load(); err != nil {
		return nil, err
	}
	for _, dir := range []string{a.cfg.Paths.UsageDir, a.cfg.Paths.MarkerDir} {
		if gone, err := opsfiles.RemoveStaleTemps(dir, time.Minute); err == nil && len(gone) > 0 {
			a.log.Info("removed temporary files an interrupted write left", "dir", dir, "files", len(gone))
		}
	}
	a.status.Store(&Health{Errors: map[string]string{}})
	return a, nil
}

// applyConfig installs the knobs of cfg that can change while running.
func (a *Agent) applyConfig(cfg config.Config) error {
	m, err := quota.ParseMetric(string(cfg.Metric))
	if err != nil {
		return err
	}
	loc := cfg.TimeZone
	if loc == nil {
		loc = time.Local
	}
	a.cfg = cfg
	a.loc = loc
	a.rules = quota.Rules{Metric: m, Warning: cfg.WarningPercent / 100}
	if a.rules.Warning <= 0 || a.rules.Warning > 1 {
		a.rules.Warning = 0.8
	}
	// Force the sources to be read again under the new paths, and every
	// user to be evaluated under the new rules.
	a.passwdStamp, a.limitsStamp = stamp{}, stamp{}
	a.fullEval = true
	return nil
}

// Run ticks until ctx is done, applying operator commands between ticks.
// When ctx ends it runs a last step, so the bytes counted since the last tick
// are committed, and writes the pending files before returning.
func (a *Agent) Run(ctx context.Context) error {
	a.running.Store(true)
	defer a.running.Store(false)
	fctx, stopFiles := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { a.files.run(fctx) })
	wg.Go(func() { a.commits.run(fctx) })
	defer func() {
		stopFiles()
		wg.Wait()
		a.Close()
	}()

	interval := a.currentInterval()
	t := time.NewTicker(interval)
	defer t.Stop()
	a.tick()
	for {
		select {
		case <-ctx.Done():
			a.drain()
			a.tick()
			if err := a.commits.flush(); err != nil {
				a.log.Error("last commit failed at shutdown", "err", err)
			}
			if err := a.files.flush(); err != nil {
				a.log.Error("usage files not written at shutdown", "err", err)
			}
			return nil
		case <-t.C:
			a.tick()
		case r := <-a.cmds:
			err := r.fn(a.now().In(a.loc))
			if err == nil {
				// A command is durable when it returns.
				a.tick()
				if cerr := a.commits.flush(); cerr != nil {
					err = fmt.Errorf("applied, but not yet saved (retried every tick): %w", cerr)
				}
			}
			r.done <- err
		}
		if iv := a.currentInterval(); iv != interval {
			interval = iv
			t.Reset(iv)
		}
	}
}

// drain refuses the commands still queued when the loop stops.
func (a *Agent) drain() {
	for {
		select {
		case r := <-a.cmds:
			r.done <- ErrStopped
		default:
			return
		}
	}
}

func (a *Agent) currentInterval() time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.interval
}

// tick runs one step and records the agent's health.
func (a *Agent) tick() {
	now, start := a.now(), time.Now()
	a.step(now) // each failing part is logged once by report and kept in Health
	h := &Health{LastTick: now, TickDuration: time.Since(start), Users: len(a.users), Errors: map[string]string{}}
	for k, v := range a.reported {
		if v != "" {
			h.Errors[k] = v
		}
	}
	h.Components = a.components(h.Errors)
	a.status.Store(h)
	a.files.kick()
}

// Close releases what the agent holds besides its boundaries (the inotify
// watch of the usage directory). Run closes it when it returns; an agent
// driven without Run (tests, benchmarks) must be closed.
func (a *Agent) Close() error {
	a.watch.close()
	if a.xr.api != nil {
		a.xr.api.Close()
		a.xr.api = nil
	}
	return nil
}

// components describes each part of the agent for Health.
func (a *Agent) components(errs map[string]string) map[string]string {
	first := func(ok string, subjects ...string) string {
		for _, s := range subjects {
			if e := errs[s]; e != "" {
				return s + ": " + e
			}
		}
		return ok
	}
	c := map[string]string{
		"kernel":         first("ok: programs attached", "attach", "kernel counters", "kernel policy"),
		"nftables":       first(fmt.Sprintf("ok: %d blocked UIDs", len(a.blockedUIDs)), "nftables"),
		"state database": first("ok: "+a.cfg.Paths.StateDB, "state database"),
		"usage files":    first("ok: "+a.cfg.Paths.UsageDir, "usage files", "usage directory watch", "marker files", "block log"),
	}
	if !a.cfg.SSH.Enabled {
		c["kernel"], c["nftables"] = "disabled (ssh.enabled = false)", "disabled (ssh.enabled = false)"
	}
	switch {
	case !a.cfg.Xray.Enabled:
		c["xray"] = "disabled (xray.enabled = false)"
	case a.xr.conf == nil && errs["xray config"] == "":
		c["xray"] = "no xray config found"
	default:
		c["xray"] = first(fmt.Sprintf("ok: API %s, %d users", a.xr.apiAddr, len(a.xr.users)), "xray config", "xray api", "xray users")
	}
	return c
}

// Health returns the agent's state as of the last tick.
func (a *Agent) Health() Health { return *a.status.Load() }

// do runs fn on the loop between ticks and waits for it; without a running
// loop (tests, start-up) it runs fn and a step inline.
func (a *Agent) do(ctx context.Context, fn func(now time.Time) error) error {
	if !a.running.Load() {
		now := a.now().In(a.loc)
		if err := fn(now); err != nil {
			return err
		}
		a.tick()
		return a.commits.flush()
	}
	r := request{fn: fn, done: make(chan error, 1)}
	select {
	case a.cmds <- r:
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-r.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// report logs err for subject once per change of message, and a recovery
// when a subject that failed works again.
func (a *Agent) report(subject string, err error) {
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if prev := a.reported[subject]; prev != msg {
		if err != nil {
			a.log.Error(subject+" failed", "err", err)
		} else {
			a.log.Info(subject+" recovered", "after", prev)
		}
	}
	a.reported[subject] = msg
}

// warnOnce logs a warning the first time key is seen.
func (a *Agent) warnOnce(key, msg string, args ...any) {
	if a.warned[key] {
		return
	}
	a.warned[key] = true
	a.log.Warn(msg, args...)
}

// step does one tick's work at now: read the sources, count, decide,
// enforce, record. Each part runs even if an earlier one failed, so a full
// disk never stops enforcement and a broken nftables never stops counting.
func (a *Agent) step(now time.Time) error {
	now = now.In(a.loc)
	var errs []error
	part := func(subject string, err error) {
		a.report(subject, err)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", subject, err))
		}
	}
	part("user accounts", a.loadAccounts())
	part("limits file", a.loadLimits())
	part("attach", a.dp.EnsureAttached())
	part("kernel counters", a.sampleKernel(now))
	ctx := context.Background()
	xconf, xapi := a.sampleXray(ctx, now)
	part("xray config", xconf)
	part("xray api", xapi)
	a.evaluate(now)
	part("kernel policy", a.enforceKernel())
	part("nftables", a.enforceNFT())
	part("xray users", a.enforceXray(ctx))
	part("marker files", a.syncMarkers())
	part("state database", a.commit(now))
	part("block log", a.commits.logError())
	part("usage directory watch", a.repairJSON())
	a.queueJSON(now)
	part("usage files", a.files.err())
	return errors.Join(errs...)
}
