// Package agent is bwagent's control loop. Data flows one way through it:
//
//   - sources produce counter samples with typed keys and epochs (the
//     kernel's per-UID counters for SSH users, kernel.go; Xray's per-user
//     counters, xray.go), folded into usage against baselines;
//   - the accounting core (package quota) turns usage into statuses
//     (account.go);
//   - enforcers make the world match: the BPF policy map and the nft set of
//     blocked UIDs, both derived from one desired state (kernel.go); Xray's
//     inbounds, the cut of a blocked user's connections and the marker
//     files (xray.go, files.go); the device limits, which cut a user's
//     device one too many (devices.go, xraydevices.go);
//   - records persist it: the state database, beside the loop (records.go),
//     the usage JSON files, beside the loop (files.go), and the block log.
//
// The loop is Run(ctx) around step(now). It also repairs whatever someone
// broke since the last tick: a detached program, a flushed ruleset, a
// deleted marker or usage file, a blocked user an Xray restart let back in.
//
// Who owns what: everything in Agent below "owned by the loop" is touched
// only by the loop goroutine (and by New before Run starts). Readers
// (Users, User, History, Health, Updates) are served from snapshots the
// loop publishes at the end of each tick (snapshot.go) and never wait for a
// tick. Operator commands that change state (Reset, Unblock, SetLimit...)
// are queued to the loop and applied between ticks, so a command and a
// tick never overwrite each other; before Run has started they fail with
// ErrStarting. The kernel, nftables and Xray sit behind small interfaces,
// faked in the table tests and real in the integration tests.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/fleet"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/sockkill"
	"github.com/myvpn/bwagent/sshsess"
	"github.com/myvpn/bwagent/store"
	"github.com/myvpn/bwagent/view"
	"github.com/myvpn/bwagent/xrayaccess"
	"github.com/myvpn/bwagent/xrayconf"
	"github.com/myvpn/bwagent/xraystats"
)

// MemoryLimit returns the Go runtime soft memory limit bwagent keeps (unless
// GOMEMLIMIT is set) when the runtime holds inUse bytes that are no garbage
// (the live heap, and the runtime's own memory: goroutine stacks, its
// metadata, the heap's fragmentation) and the agent allocates rate bytes a
// second. Without a limit the collector lets the heap grow to twice the
// live data before it runs; a limit at or under inUse would make it run
// without end, and one that leaves less room than the agent allocates
// between two collections makes it run all the time. So the room above
// inUse is what memoryRoomTime of the agent's allocation takes, at least
// a sixteenth of inUse plus 4 MiB (the room when little is allocated) and
// at most half of it plus 16 MiB (a bound on the peak); the limit is never
// under 40 MiB. A collection costs about 10 ms of CPU at a 50 MB live heap
// (measured with 50,000 Xray users): one or two a tick cost less than a
// bigger heap would cost in memory.
func MemoryLimit(inUse, rate uint64) int64 {
	lo, hi := inUse/16+4<<20, inUse/2+16<<20
	room := min(max(rate*uint64(memoryRoomTime/time.Second), lo), hi)
	return max(40<<20, int64(inUse+room))
}

// memoryRoomTime is how long the agent's steady allocation takes to fill
// the room MemoryLimit leaves: the collector runs about that often at most,
// up to the room's bound.
const memoryRoomTime = time.Second

// MemoryLimiter keeps the soft memory limit following the memory in use
// and the allocation rate (see MemoryLimit). Call Update often (bwagent:
// every second), from one goroutine: the limit follows the memory in use as
// of the last collection at each call, and the steady rate of allocation:
// the lower of the rates over the last two memoryRateWindows, so that a
// burst (a first start's reading of every user and file) does not raise
// the peak, but steady garbage gets its room after two windows.
type MemoryLimiter struct {
	from   time.Time // the start of the window the rate is being measured over
	allocs uint64    // heap bytes allocated before from
	last   uint64    // bytes a second over the last whole window
	rate   uint64    // the lower of the last two windows'
}

// memoryRateWindow is how long MemoryLimiter measures the allocation rate
// over.
const memoryRateWindow = 10 * time.Second

// memoryMetrics are what MemoryLimiter reads: the live heap as of the last
// collection, the bytes allocated so far, and the runtime's memory: all it
// holds (total less released), the heap's objects (live or garbage) and
// its free space, the rest being its own.
var memoryMetrics = []string{
	"/gc/heap/live:bytes",
	"/gc/heap/allocs:bytes",
	"/memory/classes/total:bytes",
	"/memory/classes/heap/released:bytes",
	"/memory/classes/heap/objects:bytes",
	"/memory/classes/heap/free:bytes",
}

// Update sets the runtime's soft memory limit (debug.SetMemoryLimit) for the
// memory in use and the allocation rate, at now, and returns it.
func (m *MemoryLimiter) Update(now time.Time) int64 {
	s := make([]metrics.Sample, len(memoryMetrics))
	for i, name := range memoryMetrics {
		s[i].Name = name
	}
	metrics.Read(s)
	var v [6]uint64
	for i := range s {
		if s[i].Value.Kind() == metrics.KindUint64 {
			v[i] = s[i].Value.Uint64()
		}
	}
	live, allocs, total, released, objects, free := v[0], v[1], v[2], v[3], v[4], v[5]
	inUse := live
	if held := total - min(total, released+objects+free); held > 0 {
		inUse += held // stacks, metadata, fragmentation
	}
	switch d := now.Sub(m.from); {
	case m.from.IsZero() || d < 0 || allocs < m.allocs:
		m.from, m.allocs = now, allocs
	case d >= memoryRateWindow:
		r := uint64(float64(allocs-m.allocs) / d.Seconds())
		m.rate, m.last = min(r, m.last), r
		m.from, m.allocs = now, allocs
	}
	limit := MemoryLimit(inUse, m.rate)
	debug.SetMemoryLimit(limit)
	return limit
}

// LiveHeap returns the bytes of heap the last garbage collection found
// live.
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
	ErrUnknownUser = errors.New("unknown user")
	ErrNoLimit     = errors.New("user has no limit")
	ErrStarting    = errors.New("agent is starting; try again in a moment")
	ErrStopped     = errors.New("agent is stopping")
	ErrRunning     = errors.New("agent loop is already running")
	ErrNeedRestart = errors.New("settings that need a restart changed")
)

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
	// Observers are told of each tick, charge, event and commit.
	Observers []Observer
	// Sessions attributes SSH sessions to their users in the kernel; nil
	// leaves them uncounted (see SessionKernel).
	Sessions SessionKernel
	// XrayKernel counts Xray users' connections in the kernel; nil leaves
	// them to Xray's own counters (see xrayconns.go).
	XrayKernel XrayKernel
	// Sockets lists and destroys the servers' connections, for the device
	// limits (devices.go); nil is package sockkill's.
	Sockets Sockets
	// Fleet is the fleet database's client in fleet mode (Config.Fleet
	// set), opened or not: the agent syncs through it beside the loop
	// (fleet.go). Nil: no fleet.
	Fleet *fleet.Client
}

// Agent runs the control loop. Its exported methods may be called from any
// goroutine.
type Agent struct {
	// Constant after New.
	dp    Dataplane
	fw    Firewall
	store *store.Store
	log   *slog.Logger
	now   func() time.Time
	xray  Xray
	obs   observers
	// inline makes commands run on the caller with a tick, without Run:
	// only the package's table tests set it.
	inline bool

	// Owned by the loop.
	cfg   config.Config
	rules quota.Rules
	loc   *time.Location

	users map[string]*user      // every user, present or left within the retention
	byUID map[uint32]*user      // present SSH users by UID
	plans map[string]quota.Plan // limits of names that are no user yet

	// bg is Run's context for the loop's helpers (the access log's
	// follower); nil before Run.
	bg context.Context

	work   tickWork    // what this tick must evaluate, commit and write
	kernel kernelSide  // SSH users: kernel counters, policies and the nft set
	xr     xrayState   // Xray users: config, counters, inbounds, connections
	sess   sessionSide // SSH sessions: attribution in the kernel, cuts
	dev    deviceSide  // device limits: Xray's open connections, refused devices
	rec    records     // rows and events waiting for the next commit

	markers      map[string]opsfiles.Marker // blocked Xray users
	markersDirty bool
	files        *fileWriter // writes the usage files beside the loop
	watch        *dirWatch   // the usage directory, for files others touched
	lastJSON     time.Time
	jsonRounds   uint64     // JSON intervals so far (see jsonLazyRounds)
	commits      *committer // writes the state database and the block log beside the loop
	fl           *fleetSide // fleet mode (fleet.go); nil without

	passwdStamp, limitsStamp stamp
	limitsBad                map[string]bool // bad lines of the limits file, logged once
	nextExpire               time.Time       // next look for users past the retention
	ticks                    uint64
	logs                     reporter
	notes                    notices // what was notified (notices.go)

	// Shared with readers and callers.
	pub      publisher
	health   atomic.Pointer[view.Health]
	cmds     chan request
	state    atomic.Int32 // loopIdle, loopRunning, loopStopped
	interval atomic.Int64 // time.Duration
	ready    chan struct{}
	readyOne sync.Once
}

// States of the loop.
const (
	loopIdle int32 = iota
	loopRunning
	loopStopped
)

// request is an operator command for the loop.
type request struct {
	fn   func(now time.Time) error
	done chan error
}

// New returns an agent over the given boundaries, with its state loaded from
// the store. On the first start with an empty store it imports the usage
// JSON files of an earlier install, so a migrating operator loses nothing.
func New(o Options) (*Agent, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	a := &Agent{
		dp:           o.Dataplane,
		fw:           o.Firewall,
		store:        o.Store,
		log:          o.Log,
		now:          o.Now,
		obs:          o.Observers,
		users:        make(map[string]*user),
		byUID:        make(map[uint32]*user),
		plans:        make(map[string]quota.Plan),
		kernel:       newKernelSide(),
		markersDirty: true,
		logs:         newReporter(o.Log),
		cmds:         make(chan request),
		ready:        make(chan struct{}),
	}
	a.work.fullEval = true
	a.applyConfig(o.Config)
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
	a.xr = newXrayState()
	a.xr.see = a.seeCounter
	a.xr.conns.k = o.XrayKernel
	a.xr.conns.entries = make(chan []xrayaccess.Entry, 64)
	a.xr.conns.free = make(chan []xrayaccess.Entry, 4)
	a.xr.conns.listeners = a.xray.Listeners
	if a.xr.conns.listeners == nil {
		a.xr.conns.listeners = sockkill.Listeners
	}
	a.sess.k = o.Sessions
	a.sess.events = make(chan sshsess.ProcEvent, 1024)
	a.dev.socks = o.Sockets
	if a.dev.socks == nil {
		a.dev.socks = kernelSockets{}
	}
	if o.Fleet != nil {
		a.fl = newFleetSide(o.Fleet, fleet.Describe(o.Config.Fleet.Database))
	}
	a.files = newFileWriter(a.cfg.Paths.UsageDir, a.pub.snap.Load)
	a.watch = newDirWatch(a.cfg.Paths.UsageDir)
	a.files.pump = a.watch.pump
	if err := a.load(); err != nil {
		return nil, err
	}
	for _, dir := range []string{a.cfg.Paths.UsageDir, a.cfg.Paths.MarkerDir} {
		if gone, err := opsfiles.RemoveStaleTemps(dir, time.Minute); err == nil && len(gone) > 0 {
			a.log.Info("removed temporary files an interrupted write left", "dir", dir, "files", len(gone))
		}
	}
	a.pub.changed, a.pub.membership = true, true
	a.publish(a.now())
	a.health.Store(&view.Health{Errors: map[string]string{}, Components: map[string]string{"agent": "starting"}})
	return a, nil
}

// applyConfig installs the settings of cfg that apply while running, and
// makes the next tick re-read the sources and evaluate every user.
func (a *Agent) applyConfig(cfg config.Config) {
	a.cfg = cfg
	a.loc = cfg.Location()
	a.rules = cfg.Rules()
	a.interval.Store(int64(cfg.Interval))
	a.passwdStamp, a.limitsStamp = stamp{}, stamp{}
	a.pub.changed = true // the default device limit is in the snapshot
	a.work.fullEval = true
	a.dev.all = true
	a.nextExpire = time.Time{}
}

// Run ticks until ctx is done, applying operator commands between ticks.
// When ctx ends it runs a last step, so the bytes counted since the last tick
// are committed, and writes the pending files before returning. Run may be
// called once.
func (a *Agent) Run(ctx context.Context) error {
	if !a.state.CompareAndSwap(loopIdle, loopRunning) {
		return ErrRunning
	}
	defer a.state.Store(loopStopped)
	fctx, stopFiles := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { a.files.run(fctx) })
	wg.Go(func() { a.commits.run(fctx) })
	if a.sess.k != nil {
		wg.Go(func() { a.watchProcesses(fctx) })
	}
	if a.fl != nil {
		wg.Go(func() { a.fl.run(fctx, a.currentInterval()) })
	}
	a.bg = fctx
	defer func() {
		stopFiles()
		wg.Wait()
		a.Close()
	}()

	interval := a.currentInterval()
	t := time.NewTicker(interval)
	defer t.Stop()
	a.tick()
	a.readyOne.Do(func() { close(a.ready) })
	for {
		select {
		case <-ctx.Done():
			a.state.Store(loopStopped)
			a.drain()
			a.xr.readNow = true // what only Xray counted since its last read
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
			r.done <- a.apply(r.fn)
		case ev := <-a.sess.events:
			a.sessionProcess(ev, a.now())
		case <-a.polling():
			a.pollSessions(a.now())
		case rep := <-a.fleetOut():
			a.fleetApply(rep, a.now())
		case es := <-a.xr.conns.entries:
			now := a.now()
			a.claimXray(es, now)
			a.noteXrayConns(es, now)
			clear(es) // let go of their strings
			if cap(es) <= maxRecycled {
				select {
				case a.xr.conns.free <- es[:0]:
				default:
				}
			}
		}
		if iv := a.currentInterval(); iv != interval {
			interval = iv
			t.Reset(iv)
		}
	}
}

// Ready is closed once Run has finished its first tick: the kernel is
// enforcing and the agent takes commands. Serve the control socket and
// handle SIGHUP only after it.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// apply runs a command and a tick on the loop, and waits for its commit: a
// command is durable when it returns.
func (a *Agent) apply(fn func(now time.Time) error) error {
	err := fn(a.now().In(a.loc))
	if err != nil {
		return err
	}
	a.tick()
	if cerr := a.commits.flush(); cerr != nil {
		return fmt.Errorf("applied, but not yet saved (retried every tick): %w", cerr)
	}
	return nil
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

func (a *Agent) currentInterval() time.Duration { return time.Duration(a.interval.Load()) }

// Tick runs one tick on the caller and waits for its commit, for a caller
// that drives the agent without Run (a benchmark); it fails with ErrRunning
// once Run has started.
func (a *Agent) Tick() error {
	if a.state.Load() != loopIdle {
		return ErrRunning
	}
	return a.apply(func(time.Time) error { return nil })
}

// tick runs one step and publishes the users and the agent's health.
func (a *Agent) tick() {
	now, start := a.now(), time.Now()
	a.step(now) // each failing part is logged once by the reporter and kept in Health
	a.ticks++
	a.publish(now)
	st := a.kernel.stats
	h := &view.Health{LastTick: now, TickDuration: time.Since(start), Ticks: a.ticks, Users: len(a.users),
		Errors: a.logs.errors(),
		Kernel: view.KernelStats{DroppedBlocked: st.DroppedBlocked, DroppedQuota: st.DroppedQuota,
			CountersFull: st.CountersFull, QuotaFull: st.QuotaFull,
			SSHSessions: uint64(a.sessionCount()), SSHHeld: st.SSHHeld, SSHUnattributed: st.SSHUnattributed,
			SSHNeverAttributed: st.SSHReleased,
			XrayClaimed:        st.XrayClaimed, XrayHeld: st.XrayHeld, XrayUnclaimed: st.XrayUnclaimed,
			DroppedRate: st.RateDropped}}
	h.Components = a.components(h.Errors)
	a.health.Store(h)
	a.files.kick()
	a.obs.Tick(*h)
}

// Close releases what the agent holds besides its boundaries (the inotify
// watch of the usage directory, the Xray client) and lifts the kernel's
// hold on SSH logins, which no one would attribute any more. Run closes it when it
// returns; an agent driven without Run (tests, benchmarks) must be closed.
func (a *Agent) Close() error {
	a.watch.close()
	a.xr.close()
	return errors.Join(a.xr.conns.stop(), a.stopSessions())
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
		"kernel":         first("ok: programs attached", "attach", "kernel maps", "kernel counters", "kernel policy"),
		"nftables":       first(fmt.Sprintf("ok: %d blocked UIDs", len(a.kernel.blocked)), "nftables"),
		"state database": first("ok: "+a.cfg.Paths.StateDB, "state database"),
		"usage files":    first("ok: "+a.cfg.Paths.UsageDir, "usage files", "usage directory watch", "marker files", "block log"),
	}
	if !a.cfg.SSH.Enabled {
		c["kernel"], c["nftables"] = "disabled (ssh.enabled = false)", "disabled (ssh.enabled = false)"
	}
	c["ssh sessions"] = first(a.sessionsComponent(), "ssh sessions", "ssh session cuts")
	c["speed caps"] = first(a.speedComponent(), "kernel policy")
	if a.fl != nil {
		c["fleet"] = a.fleetComponent(errs)
	}
	switch {
	case !a.cfg.Xray.Enabled:
		c["xray"] = "disabled (xray.enabled = false)"
	case a.xr.conf == nil && errs["xray config"] == "":
		c["xray"] = "no xray config found"
	default:
		ok := fmt.Sprintf("ok: API %s, %d users", a.xr.apiAddr, a.xr.users.len())
		switch fol := a.xr.conns.fol; {
		case a.xr.conns.active():
			ok += ", connections counted in the kernel from " + fol.path
		case fol != nil:
			ok += ", devices seen from " + fol.path
		}
		c["xray"] = first(ok, "xray config", "xray api", "xray users", "xray connections")
	}
	return c
}

// speedComponent says how speed caps are enforced and how many users have
// one in the kernel now. Policing is the mechanism on every machine: a
// token bucket per user and direction in the packet programs, packets past
// it dropped (at egress with a congestion notification, so TCP slows
// down). Pacing (EDT: a departure time in skb->tstamp that an fq qdisc
// holds the packet until) is not implemented: it needs fq on the egress
// device, and the machines this was built and measured on have none.
func (a *Agent) speedComponent() string {
	n := 0
	for _, p := range a.kernel.policy {
		if p.Rate != (bpf.Rate{}) {
			n++
		}
	}
	return fmt.Sprintf("ok: policing (a token bucket per user and direction in the packet programs; no EDT pacing), %d kernel IDs capped", n)
}

// Health returns the agent's state as of the last tick.
func (a *Agent) Health() view.Health { return *a.health.Load() }

// do runs fn on the loop between ticks, followed by a tick and a commit,
// and waits for it. Before Run has started it fails with ErrStarting, after
// Run stopped with ErrStopped.
func (a *Agent) do(ctx context.Context, fn func(now time.Time) error) error {
	switch a.state.Load() {
	case loopIdle:
		if a.inline {
			return a.apply(fn)
		}
		return ErrStarting
	case loopStopped:
		return ErrStopped
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

// step does one tick's work at now: read the sources, count, decide,
// enforce, record. Each part runs even if an earlier one failed, so a full
// disk never stops enforcement and a broken nftables never stops counting.
func (a *Agent) step(now time.Time) error {
	now = now.In(a.loc)
	var errs []error
	part := func(subject string, err error) {
		a.logs.report(subject, err)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", subject, err))
		}
	}
	ctx := context.Background()
	// Sources.
	part("user accounts", a.loadAccounts(now))
	part("limits file", a.loadLimits(now))
	attachErr, mapsErr := a.checkDataplane()
	part("attach", attachErr)
	part("kernel maps", mapsErr)
	part("ssh sessions", a.sampleSessions(now))
	part("kernel counters", a.sampleKernel(now))
	xconf, xapi := a.sampleXray(ctx, now)
	part("xray config", xconf)
	part("xray api", xapi)
	part("xray connections", a.syncXrayConns(a.bg, now))
	part("xray devices", a.syncXrayLive(now))
	a.decide(now, part, true)
	return errors.Join(errs...)
}

// decide is the second half of a tick: the rules, the enforcers and the
// records. With tick false (a fleet reply applied between ticks) it
// evaluates what the reply queued and enforces and records it, leaving the
// tick's own chores (expiry, device limits, health notices, the fleet
// report, the usage directory's repair) to the tick.
func (a *Agent) decide(now time.Time, part func(subject string, err error), tick bool) {
	ctx := context.Background()
	// Rules.
	a.evaluate(now)
	if tick {
		a.expire(now)
	}
	// Enforcers.
	part("kernel policy", a.enforceKernel())
	part("nftables", a.enforceNFT())
	part("ssh session cuts", a.enforceSessions())
	if tick {
		part("device limits", a.enforceDevices(now))
	}
	part("xray users", a.enforceXray(ctx))
	part("marker files", a.syncMarkers())
	if tick {
		a.noteHealth(now) // notices.go: parts failing and recovering
		if a.fl != nil {
			part("fleet", a.fleetReport(now))
		}
	}
	// Records.
	part("state database", a.commit(now))
	part("block log", a.commits.logError())
	if tick {
		part("usage directory watch", a.repairJSON())
	}
	a.queueJSON(now)
	part("usage files", a.files.err())
}

// reporter logs each failing part of the agent once per change of its
// error, and one-time warnings once.
type reporter struct {
	log      *slog.Logger
	reported map[string]string // subject → last error message ("" healthy)
	warned   map[string]bool
}

func newReporter(log *slog.Logger) reporter {
	return reporter{log: log, reported: make(map[string]string), warned: make(map[string]bool)}
}

// report logs err for subject once per change of message, and a recovery
// when a subject that failed works again.
func (r *reporter) report(subject string, err error) {
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if prev := r.reported[subject]; prev != msg {
		if err != nil {
			r.log.Error(subject+" failed", "err", err)
		} else {
			r.log.Info(subject+" recovered", "after", prev)
		}
	}
	r.reported[subject] = msg
}

// warnOnce logs a warning the first time key is seen.
func (r *reporter) warnOnce(key, msg string, args ...any) {
	if r.warned[key] {
		return
	}
	r.warned[key] = true
	r.log.Warn(msg, args...)
}

// errors returns the subjects failing now.
func (r *reporter) errors() map[string]string {
	m := maps.Clone(r.reported)
	maps.DeleteFunc(m, func(_, v string) bool { return v == "" })
	return m
}
