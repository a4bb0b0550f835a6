package agent

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/sockkill"
	"github.com/myvpn/bwagent/xrayconf"
	"github.com/myvpn/bwagent/xraystats"
)

// XrayAPI is the part of xraystats.Client the loop drives.
type XrayAPI interface {
	SysStats(ctx context.Context) (xraystats.SysStats, error)
	ScanUserTraffic(ctx context.Context, fn func(email []byte, downlink bool, value int64)) error
	AddUser(ctx context.Context, inboundTag, email string, acct xraystats.Account) error
	RemoveUser(ctx context.Context, inboundTag, email string) error
	OnlineIPs(ctx context.Context, email string) (map[string]int64, error)
	OnlineUsers(ctx context.Context) (map[string]map[string]int64, error)
	InboundUsers(ctx context.Context, inboundTag string) ([]string, error)
	Close() error
}

// xrayVerifyTicks is how often the agent lists the inbounds of blocked users
// to find one someone added back (a panel, a manual API call): every 5th
// tick, one call per such inbound.
const xrayVerifyTicks = 5

// Reading every user's counters costs Xray and the agent in proportion to
// the users (some 80 ms at 50,000 users), however few moved. It is needed
// every tick only for bytes the kernel does not count. Where the kernel
// counts every connection Xray's users can make (kernelCountsXray), Xray
// counts nothing more than the first bytes of a connection before its
// claim (at most xrayPendingMax), so its counters are read every
// xrayReadTicks ticks to pay off the debt and charge those, and at once
// whenever bytes the kernel did not count may be flowing: after a new
// config or a new epoch of Xray's counters, when the kernel let a
// connection go unclaimed, and while the last read found a user with more
// bytes than the kernel counted beyond xrayPendingMax for each new
// connection (see chargeXray).
const (
	xrayReadTicks  = 5
	xrayPendingMax = 64 * quota.KiB
)

// Xray is how the agent finds and reaches Xray: its config (users and the
// API address) and a client for the API.
type Xray struct {
	// Load reads Xray's config; nil is xrayconf.Load of the configured
	// paths.
	Load func() (*xrayconf.Config, error)
	// Dial returns a client for the API at addr; nil is xraystats.Dial.
	Dial func(ctx context.Context, addr string) (XrayAPI, error)
	// Cut destroys the Xray-side connections from these client addresses to
	// these inbound ports; nil cuts nothing (see README: what blocking an
	// Xray user can and cannot do).
	Cut func(remotes []netip.Addr, ports []uint16) (int, error)
	// Listeners finds the listening sockets of ports, whose UIDs are
	// Xray's; nil is sockkill.Listeners.
	Listeners func(ports []uint16) ([]sockkill.Conn, error)
}

// xrayState is Xray's part of the loop, for Xray users: a source (Xray's
// per-user counters and their baselines) and an enforcer (the users of
// Xray's inbounds and the cut of a blocked user's connections).
type xrayState struct {
	conf    *xrayconf.Config
	users   xclients // conf's clients by email
	api     XrayAPI
	apiAddr string

	// Source: the last sample of each user's counters folded into usage.
	base  map[string]*xbase
	baseQ []string // baselines to commit
	// epochs are the epochs of the baselines, by xbase.epoch; the first is
	// none (a user not read yet, or no read yet). epochID is the counters'
	// epoch now (see curEpoch).
	epochs  []quota.Epoch
	epochID uint32
	// changed are the users whose counters this read found moved
	// (seeCounter), with their values, to fold into usage after it.
	changed []xread
	// see is seeCounter as a func value, made once (New), not per read.
	see func(email []byte, downlink bool, value int64)

	// The counters' epoch: Xray's start, from its uptime, kept while
	// consecutive reads agree on it within a few seconds.
	start time.Time
	sys   xraystats.SysStats // the last read, whose totals only grow within one Xray

	// removed are the users the agent has taken out of Xray's inbounds (and
	// must put back when they are unblocked), as far as this Xray process
	// goes: a restart reloads every user from the config.
	removed map[string]bool
	// enforceAll makes the next enforceXray look at every user, not only
	// those who changed since the last commit: at start, after a new config
	// or a new epoch (Xray reloaded every user), after a failure.
	enforceAll bool
	// verifyIn counts the ticks to the next listing of the inbounds.
	verifyIn int
	// wasActive is whether the kernel counted Xray's connections at the
	// last evaluation: a change evaluates and enforces every user again
	// (see xrayBlocked, capsCarried).
	wasActive bool

	// When the counters are read (see xrayReadTicks): readIn counts the
	// ticks to the next read, readNow asks for one at the next tick,
	// excess is set by a read that found bytes the kernel did not count,
	// unclaimed is the kernel's count of connections it let go
	// unclaimed, as of the last tick, reads counts the reads (an epoch of
	// the claims counted in xbase), and allHeld says the config's inbounds
	// are all ones whose connections the kernel holds until claimed.
	readIn    int
	readNow   bool
	excess    bool
	unclaimed uint64
	reads     uint32
	allHeld   bool

	// conns counts the users' connections in the kernel (xrayconns.go).
	conns xconns
}

// xclients are the clients of an Xray config by email, each a user of one
// or more inbounds: where each is in the config's lists of clients, not a
// copy. A user of one inbound (nearly all) is its inbound's and index
// there, 24 bytes a user in the map (a list of its own took 40); a user of
// several has the list of its entries.
type xclients struct {
	conf    *xrayconf.Config
	one     map[string]xclientRef
	several map[string][]xrayconf.User
}

// xclientRef is the place of a client in its config: its inbound's index
// and its own in that inbound's Users.
type xclientRef struct{ in, i uint32 }

// newXclients indexes conf's clients by email.
func newXclients(conf *xrayconf.Config) xclients {
	c := xclients{conf: conf, one: make(map[string]xclientRef)}
	for i := range conf.Inbounds {
		us := conf.Inbounds[i].Users
		for j := range us {
			email := us[j].Email
			if r, ok := c.one[email]; ok {
				if c.several == nil {
					c.several = make(map[string][]xrayconf.User)
				}
				c.several[email] = []xrayconf.User{conf.Inbounds[r.in].Users[r.i], us[j]}
				delete(c.one, email)
			} else if have, ok := c.several[email]; ok {
				c.several[email] = append(have, us[j])
			} else {
				c.one[email] = xclientRef{in: uint32(i), i: uint32(j)}
			}
		}
	}
	return c
}

// of returns email's entries, one per inbound it is in, in config order;
// nil if it is no client. Not to be changed: the config's own.
func (c *xclients) of(email string) []xrayconf.User {
	if r, ok := c.one[email]; ok {
		return c.at(r)
	}
	return c.several[email]
}

// at returns the entry at r as a list of one, a window on its inbound's.
func (c *xclients) at(r xclientRef) []xrayconf.User {
	us := c.conf.Inbounds[r.in].Users
	return us[r.i : r.i+1 : r.i+1]
}

// len returns the number of clients.
func (c *xclients) len() int { return len(c.one) + len(c.several) }

// all yields each client's email and entries (see of), in no order.
func (c *xclients) all() iter.Seq2[string, []xrayconf.User] {
	return func(yield func(string, []xrayconf.User) bool) {
		for email, r := range c.one {
			if !yield(email, c.at(r)) {
				return
			}
		}
		for email, us := range c.several {
			if !yield(email, us) {
				return
			}
		}
	}
}

// xbase is the baseline of one Xray user's counters, and what the kernel
// counted of the user's connections that they have not reported yet (see
// chargeXray). There is one for every Xray user: it is small (96 bytes;
// its user's email is its key in xrayState.base).
type xbase struct {
	up, down  uint64 // the counters as last folded into usage
	owed      quota.Usage
	credit    quota.Usage // reported by Xray before the kernel folded it (chargeXray)
	saved     savedDebt   // the debt's row as the store holds it (see debtRow)
	moved     uint32      // when either count of the user last moved, Unix seconds: a debt's age
	epoch     uint32      // of up and down: an index into xrayState.epochs
	changed   uint32      // 1 + the index of this read's values in xrayState.changed; 0: none
	claims    uint32      // connections claimed for the user since read number claimRead
	claimRead uint32
	unheld    bool // one of those claims was a loopback peer's, never held
	dirty     bool // in xrayState.baseQ: its debt's row may be due (see debtRow)
	// counted says the counters' own row is due too: up, down or epoch
	// changed since the last commit. A tick where only the kernel moved
	// changes the debt alone, and the row of counters that did not move
	// is not written again (a quarter of a commit's rows with a tenth of
	// 10,000 users moving).
	counted bool
}

// xread is what a read found of a user whose counters moved.
type xread struct {
	u        *user
	b        *xbase
	up, down uint64
}

// sample returns b's baseline as a sample of the counters.
func (x *xrayState) sample(b *xbase) quota.Sample {
	return quota.Sample{Epoch: x.epochs[b.epoch], Up: b.up, Down: b.down}
}

// setSample makes s b's baseline.
func (x *xrayState) setSample(b *xbase, s quota.Sample) {
	b.up, b.down, b.epoch = s.Up, s.Down, x.epochIndex(s.Epoch)
}

// curEpoch is the epoch of Xray's counters now: zero before the first
// read of Xray's uptime.
func (x *xrayState) curEpoch() quota.Epoch { return x.epochs[x.epochID] }

// epochIndex returns the index of e in x.epochs, adding it if new.
func (x *xrayState) epochIndex(e quota.Epoch) uint32 {
	if i := slices.Index(x.epochs, e); i >= 0 {
		return uint32(i)
	}
	x.epochs = append(x.epochs, e)
	return uint32(len(x.epochs) - 1)
}

// claimsSince returns the connections claimed for b's user since read
// number read.
func (b *xbase) claimsSince(read uint32) (n uint32, unheld bool) {
	if b.claimRead != read {
		return 0, false
	}
	return b.claims, b.unheld
}

// claimed counts a connection claimed for email, for the next read.
func (x *xrayState) claimed(email string, unheld bool) {
	b := x.baseOf(email)
	if b.claimRead != x.reads {
		b.claims, b.claimRead, b.unheld = 0, x.reads, false
	}
	b.claims++
	b.unheld = b.unheld || unheld
}

// baseOf returns email's baseline, a zero one if it has none yet.
func (x *xrayState) baseOf(email string) *xbase {
	b := x.base[email]
	if b == nil {
		b = &xbase{}
		x.base[email] = b
	}
	return b
}

// queueBase queues the baseline b of email for the next commit: its debt,
// and its counters too if counted is set.
func (x *xrayState) queueBase(email string, b *xbase, counted bool) {
	if !b.dirty {
		b.dirty = true
		x.baseQ = append(x.baseQ, email)
	}
	b.counted = b.counted || counted
}

func newXrayState() xrayState {
	return xrayState{removed: make(map[string]bool), base: make(map[string]*xbase), enforceAll: true, readNow: true,
		epochs: []quota.Epoch{{}}}
}

// close drops the API client.
func (x *xrayState) close() {
	if x.api != nil {
		x.api.Close()
		x.api = nil
	}
}

// dropBaseline forgets a departed user's counters, in memory now and in
// the store with rec's commit.
func (x *xrayState) dropBaseline(email string, rec *records) {
	if _, ok := x.base[email]; ok {
		delete(x.base, email)
		rec.dropBaselines = append(rec.dropBaselines, quota.XraySource(email), quota.OwedSource(email))
	}
}

// xrayEpochSlack is how far two estimates of Xray's start (now - uptime,
// with uptime in whole seconds) may differ and still be the same process.
const xrayEpochSlack = 3 * time.Second

// sampleXray reads Xray's config if it changed, folds Xray's per-user
// counters into usage and returns an error for the report; enforcement is
// enforceXray, after the rules ran. An unreachable Xray or a broken config
// never stops the SSH side: each part fails on its own and is logged once.
func (a *Agent) sampleXray(ctx context.Context, now time.Time) (confErr, apiErr error) {
	if !a.cfg.Xray.Enabled {
		return nil, nil
	}
	confErr = a.loadXrayConfig(now)
	if a.xr.conf == nil {
		return confErr, nil
	}
	addr := a.cfg.Xray.API
	if addr == "" {
		addr = a.xr.conf.API
	}
	if addr == "" {
		return confErr, fmt.Errorf("no API address: set xray.api, or an api section in %s", strings.Join(a.xr.conf.Files, ", "))
	}
	if a.xr.api == nil || a.xr.apiAddr != addr {
		if a.xr.api != nil {
			a.xr.api.Close()
		}
		api, err := a.xray.Dial(ctx, addr)
		if err != nil {
			return confErr, err
		}
		a.xr.api, a.xr.apiAddr = api, addr
	}
	cctx, cancel := context.WithTimeout(ctx, a.cfg.Xray.Timeout)
	defer cancel()
	sys, err := a.xr.api.SysStats(cctx)
	if errors.Is(err, xraystats.ErrUnavailable) {
		// Xray restarted or went away: a new connection now rather than
		// waiting out the old one's reconnection backoff.
		a.xr.api.Close()
		a.xr.api = nil
		api, derr := a.xray.Dial(cctx, addr)
		if derr != nil {
			return confErr, derr
		}
		a.xr.api = api
		sys, err = api.SysStats(cctx)
	}
	if err != nil {
		return confErr, err
	}
	a.xrayEpoch(now, sys)
	if !a.xrayReadDue() {
		return confErr, nil
	}
	if err := a.xr.api.ScanUserTraffic(cctx, a.xr.see); err != nil {
		a.xr.dropChanged()
		a.xr.readNow = true
		return confErr, err
	}
	a.xr.excess = false
	a.foldXray(now)
	a.xr.reads++
	return confErr, nil
}

// xrayReadDue reports whether every user's counters are read this tick
// (see xrayReadTicks).
func (a *Agent) xrayReadDue() bool {
	x := &a.xr
	unclaimed := a.kernel.stats.XrayUnclaimed
	grew := unclaimed != x.unclaimed
	x.unclaimed = unclaimed
	x.readIn--
	if x.readNow || x.excess || grew || x.readIn <= 0 || !a.kernelCountsXray() {
		x.readNow, x.readIn = false, xrayReadTicks
		return true
	}
	return false
}

// kernelCountsXray reports whether the kernel counts every connection
// Xray's users can make: it claims them from the access log
// (xrayconns.go), it has found Xray's sockets, and every inbound with users
// takes plain TCP (raw) without the PROXY protocol and no UDP, so the
// address Xray logs is the connection's and a connection is held until its
// claim comes.
func (a *Agent) kernelCountsXray() bool {
	x := &a.xr
	return x.allHeld && x.conns.active() && len(x.conns.tagged) > 0
}

// heldInbound reports whether the kernel holds the connections of in's
// port until they are claimed, and has no other traffic of its users to
// miss: plain TCP (raw), without the PROXY protocol, and no UDP.
func heldInbound(in xrayconf.Inbound) bool {
	return in.Network == "raw" && !in.ProxyProtocol && !in.UDP && in.Port > 0 && in.Port <= 65535
}

// seeCounter takes one of a user's counters from the read under way:
// nothing is done for a counter that did not move, and nothing allocated
// but a new user's baseline. A user whose counter moved goes on the
// changed list, with this read's values as they come.
func (a *Agent) seeCounter(email []byte, downlink bool, value int64) {
	x := &a.xr
	b := x.base[string(email)]
	var u *user // found once a counter moved, if not before
	if b == nil {
		if u = a.users[string(email)]; u == nil || !u.r.xray {
			return // not a client of Xray's config now
		}
		b = x.baseOf(u.r.name)
	}
	v := uint64(max(value, 0))
	if b.changed == 0 {
		same := b.epoch == x.epochID
		last := b.up
		if downlink {
			last = b.down
		}
		if same && v == last {
			return
		}
		// The other counter, should this read not list it: as it was,
		// or none yet in a new epoch.
		if u == nil {
			if u = a.users[string(email)]; u == nil {
				return // no user: nothing to fold it into (foldXray)
			}
		}
		r := xread{u: u, b: b}
		if same {
			r.up, r.down = b.up, b.down
		}
		x.changed = append(x.changed, r)
		b.changed = uint32(len(x.changed))
	}
	r := &x.changed[b.changed-1]
	if downlink {
		r.down = v
	} else {
		r.up = v
	}
}

// foldXray charges the users whose counters the read found moved.
func (a *Agent) foldXray(now time.Time) {
	x := &a.xr
	for _, r := range x.changed {
		b, u := r.b, r.u
		b.changed = 0
		if !u.r.xray {
			continue
		}
		cur, last := quota.Sample{Epoch: x.curEpoch(), Up: r.up, Down: r.down}, x.sample(b)
		if last == cur {
			continue
		}
		d := quota.Since(last, cur)
		x.queueBase(u.r.name, b, true)
		b.up, b.down, b.epoch = r.up, r.down, x.epochID
		if (d != quota.Usage{}) {
			a.chargeXray(u, now, quota.Usage{}, d)
		}
	}
	clear(x.changed)
	x.changed = trimmed(x.changed[:0])
}

// dropChanged forgets what a read that failed half way found: the next
// read finds it again.
func (x *xrayState) dropChanged() {
	for _, r := range x.changed {
		r.b.changed = 0
	}
	clear(x.changed)
	x.changed = trimmed(x.changed[:0])
}

// xrayEpoch names the lifetime of Xray's counters from its uptime. A start
// that moved, or a process total that went down (Xray's allocation and GC
// counts only grow within one process, which catches a restart within
// seconds of the last one), begins a new epoch: every user removed from
// Xray must be removed again, since Xray reloaded its config. On the first
// read after the agent starts, a saved baseline's epoch within the slack is
// taken over, so a restart of the agent alone is no new epoch.
func (a *Agent) xrayEpoch(now time.Time, sys xraystats.SysStats) {
	uptime := sys.Uptime
	start := now.Add(-uptime)
	last := a.xr.sys
	a.xr.sys = sys
	if !a.xr.start.IsZero() && absDur(start.Sub(a.xr.start)) <= xrayEpochSlack &&
		sys.TotalAlloc >= last.TotalAlloc && sys.Mallocs >= last.Mallocs && sys.NumGC >= last.NumGC {
		return
	}
	// The start, and the allocation count that tells two starts within the
	// same seconds apart.
	epoch := quota.Epoch{Origin: xrayOrigin, Start: start.Unix(), Gen: sys.Mallocs}
	if a.xr.start.IsZero() {
		for _, e := range a.xr.epochs { // those of the saved baselines
			if e.Origin == xrayOrigin && absDur(start.Sub(time.Unix(e.Start, 0))) <= xrayEpochSlack {
				epoch = e
				break
			}
		}
	} else {
		a.log.Warn("xray restarted: its counters start from zero; blocked users are removed again", "uptime", uptime)
	}
	a.xr.start, a.xr.epochID = start, a.xr.epochIndex(epoch)
	clear(a.xr.removed)
	a.xr.enforceAll, a.xr.readNow = true, true
}

// xrayOrigin is the Origin of the epochs of Xray's counters.
const xrayOrigin = "xray"

func absDur(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}

// loadXrayConfig reads Xray's config when it changed, and makes its users
// the present Xray users. A broken config keeps the last good one.
func (a *Agent) loadXrayConfig(now time.Time) error {
	if a.xr.conf != nil && !a.xr.conf.Changed() {
		return nil
	}
	conf, err := a.xray.Load()
	if errors.Is(err, xrayconf.ErrNoConfig) && a.xr.conf == nil {
		// An SSH-only server: nothing to account on the Xray side.
		a.logs.warnOnce("xray-none", "no xray config found; xray users are not accounted", "err", err)
		return nil
	}
	if err != nil {
		return err
	}
	for _, p := range conf.Problems {
		a.logs.warnOnce("xrayconf:"+p.String(), "xray config: "+p.String())
	}
	if !conf.Stats || !conf.UserStats {
		a.logs.warnOnce("xray-nostats", "xray config does not count users' traffic: add \"stats\": {} and policy.levels.\"0\" statsUserUplink and statsUserDownlink true", "files", conf.Files)
	}
	byEmail := newXclients(conf)
	created := false
	for email, xus := range byEmail.all() {
		u := a.users[email]
		switch {
		case u == nil:
			u = a.newUser(email, xus[0].Protocol)
			a.touch(u, now, jsonUrgent)
			created = true
		case u.r.ssh && !u.r.xray:
			a.log.Info("an Xray client has the name of an SSH account: one user, one limit, counted from both",
				"name", email, "protocols", "ssh+"+string(xus[0].Protocol))
		}
		if r := u.r; !r.xray || r.xproto() != xus[0].Protocol {
			w := a.edit(u)
			w.xray = true
			w.setProtos(xus[0].Protocol)
			a.touch(u, now, jsonUrgent)
			a.markersDirty = true
		}
		a.queue(u)
	}
	for name, u := range a.users {
		if u.r.xray && byEmail.of(name) == nil {
			a.leaveXray(u, now) // gone from the config; the record and usage stay
		}
	}
	if created {
		a.compactPlans()
	}
	a.xr.allHeld = true
	for _, in := range conf.Inbounds {
		if len(in.Users) > 0 && !heldInbound(in) {
			a.xr.allHeld = false
		}
	}
	a.xr.conf, a.xr.users = conf, byEmail
	a.xr.enforceAll, a.xr.readNow = true, true
	return nil
}

// enforceXray makes Xray's inbounds hold exactly the users who are not
// blocked: a blocked user is removed from every inbound that has them and
// their connections are cut; an unblocked one is added back with the
// account from the config. It looks at the users who changed since the
// last commit (a block or an unblock changes the user's row), and at every
// user only when the whole may be off (see xrayState.enforceAll).
func (a *Agent) enforceXray(ctx context.Context) error {
	if !a.cfg.Xray.Enabled {
		return nil
	}
	if a.xr.api == nil || a.xr.curEpoch().IsZero() {
		a.xr.enforceAll = true // whatever changed meanwhile, once Xray answers
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, a.cfg.Xray.Timeout)
	defer cancel()
	var errs []error
	if a.xr.verifyIn--; a.xr.verifyIn <= 0 {
		a.xr.verifyIn = xrayVerifyTicks
		errs = append(errs, a.verifyXrayRemoved(cctx))
	}
	enforce := func(u *user, xus []xrayconf.User) {
		if err := a.enforceXrayUser(cctx, u, xus); err != nil {
			errs = append(errs, err)
		}
	}
	if a.xr.enforceAll {
		for email, xus := range a.xr.users.all() {
			if u := a.users[email]; u != nil {
				enforce(u, xus)
			}
		}
	} else {
		for _, u := range a.work.dirtyQ {
			if xus := a.xr.users.of(u.r.name); xus != nil && u.r.xray && a.users[u.r.name] == u {
				enforce(u, xus)
			}
		}
	}
	err := errors.Join(errs...)
	a.xr.enforceAll = err != nil // a user that failed is tried again next tick
	return err
}

// enforceXrayUser removes u from its inbounds (xus) if it is blocked, or
// adds it back if it is not and was removed.
func (a *Agent) enforceXrayUser(ctx context.Context, u *user, xus []xrayconf.User) error {
	email := u.r.name
	switch {
	case a.xrayBlocked(u.r) && !a.xr.removed[email]:
		if err := a.removeXrayUser(ctx, email, xus); err != nil {
			return err
		}
		a.xr.removed[email] = true
	case !a.xrayBlocked(u.r) && a.xr.removed[email]:
		if err := a.addXrayUser(ctx, email, xus); err != nil {
			return err
		}
		delete(a.xr.removed, email)
	}
	return nil
}

// verifyXrayRemoved lists the inbounds that should be without a removed
// user and forgets the removal of any user found back in one, so this tick
// removes them again.
func (a *Agent) verifyXrayRemoved(ctx context.Context) error {
	inbounds := make(map[string]bool)
	for email := range a.xr.removed {
		for _, xu := range a.xr.users.of(email) {
			if xu.Alterable() {
				inbounds[xu.Inbound] = true
			}
		}
	}
	for tag := range inbounds {
		emails, err := a.xr.api.InboundUsers(ctx, tag)
		if err != nil {
			return err
		}
		for _, email := range emails {
			if a.xr.removed[email] {
				a.log.Warn("a blocked xray user was added back by someone else; removing again", "user", email, "inbound", tag)
				delete(a.xr.removed, email)
				a.xr.enforceAll = true
			}
		}
	}
	return nil
}

func (a *Agent) removeXrayUser(ctx context.Context, email string, xus []xrayconf.User) error {
	var ports []uint16
	for _, xu := range xus {
		if !xu.Alterable() {
			a.logs.warnOnce("unalterable:"+email+"/"+xu.Inbound, "xray user cannot be removed through the API (untagged inbound or single-user Shadowsocks 2022); not blocked there", "user", email, "inbound", xu.Inbound)
			continue
		}
		if err := a.xr.api.RemoveUser(ctx, xu.Inbound, email); err != nil && !errors.Is(err, xraystats.ErrNotFound) {
			return err
		}
		if in, ok := a.xr.conf.Inbound(xu.Inbound); ok && in.Port > 0 {
			ports = append(ports, uint16(in.Port))
		}
	}
	a.log.Info("xray user removed from its inbounds", "user", email, "inbounds", len(xus))
	a.cutXrayUser(ctx, email, ports)
	return nil
}

// cutXrayUser destroys the connections of a removed user: Xray keeps the
// open ones of a removed user. Only source addresses no other online,
// unblocked user has are cut, so nobody else loses a connection. It fails
// closed: if who else is online cannot be learnt in full (an error, the
// call deadline), nothing is cut; the user's new connections fail anyway.
func (a *Agent) cutXrayUser(ctx context.Context, email string, ports []uint16) {
	if a.xray.Cut == nil || len(ports) == 0 {
		return
	}
	online, err := a.onlineUsers(ctx, email)
	if err != nil {
		a.log.Warn("connections of a blocked xray user not cut: cannot tell which addresses other users share", "user", email, "err", err)
		return
	}
	shared := make(map[string]bool)
	for other, ips := range online {
		if other == email || a.xr.removed[other] {
			continue
		}
		if u := a.users[other]; u != nil && a.xrayBlocked(u.r) {
			continue
		}
		for ip := range ips {
			shared[ip] = true
		}
	}
	var remotes []netip.Addr
	for ip := range online[email] {
		addr, err := netip.ParseAddr(ip)
		if err != nil || shared[ip] {
			continue
		}
		remotes = append(remotes, addr)
	}
	if len(remotes) == 0 {
		return
	}
	n, err := a.xray.Cut(remotes, ports)
	if err != nil {
		a.log.Warn("cutting the connections of a blocked xray user failed", "user", email, "err", err)
		return
	}
	a.log.Info("connections of a blocked xray user cut", "user", email, "connections", n, "addresses", len(remotes))
}

// onlineUsers returns the online addresses of email and of every other user
// who may share one, by email: from Xray's bulk call where the running Xray
// has it, else one call for email and one for each user who moved bytes in
// the last minute (the others cannot be online). Any failed call is an
// error: an incomplete answer could make a bystander's address look free.
func (a *Agent) onlineUsers(ctx context.Context, email string) (map[string]map[string]int64, error) {
	all, err := a.xr.api.OnlineUsers(ctx)
	if err == nil {
		return all, nil
	}
	if !errors.Is(err, xraystats.ErrUnsupported) {
		return nil, err
	}
	out := make(map[string]map[string]int64)
	recent := quota.At(a.now().Add(-time.Minute))
	for other := range a.xr.users.all() {
		if other != email {
			if a.xr.removed[other] {
				continue
			}
			if u := a.users[other]; u == nil || a.xrayBlocked(u.r) || u.r.updated < recent {
				continue
			}
		}
		ips, err := a.xr.api.OnlineIPs(ctx, other)
		if err != nil {
			return nil, fmt.Errorf("online addresses of %s: %w", other, err)
		}
		out[other] = ips
	}
	return out, nil
}

func (a *Agent) addXrayUser(ctx context.Context, email string, xus []xrayconf.User) error {
	for _, xu := range xus {
		if !xu.Alterable() {
			continue
		}
		if err := a.xr.api.AddUser(ctx, xu.Inbound, email, xu.Account()); err != nil && !errors.Is(err, xraystats.ErrExists) {
			return err
		}
	}
	a.log.Info("xray user added back to its inbounds", "user", email, "inbounds", len(xus))
	return nil
}
