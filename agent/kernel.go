package agent

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/nft"
	"github.com/myvpn/bwagent/quota"
)

// Dataplane is the part of bpf.Datapath the loop drives. It is an interface
// so that the table tests can use a fake kernel that enforces budgets as
// the real one does.
type Dataplane interface {
	EnsureAttached() (repaired []string, err error)
	Epoch() (bpf.Epoch, error)
	EachCounter(fn func(uid uint32, c bpf.Counters)) error
	EachMoved(fn func(uid uint32, c bpf.Counters)) error
	CountersOf(uid uint32) (bpf.Counters, error)
	QuotaUsed(uid uint32) (uint64, error)
	ReconcilePolicies(desired map[uint32]bpf.Policy) (int, error)
	ApplyPolicies(changes map[uint32]bpf.Policy) error
	Stats() (bpf.Stats, error)
	Protected(uid uint32) bool
}

// Firewall is the part of nft.Firewall the loop drives; an interface so
// that tests can fake it.
type Firewall interface {
	Reconcile(desired []uint32) (nft.Result, error)
}

// counterFullTicks is how often the kernel counters of every UID are read;
// in between, only those of the UIDs the BPF programs marked as moved.
const counterFullTicks = 30

// The kernel policy map is read back in full and repaired every tick while
// it holds up to policyVerifyEvery policies (well under a millisecond), and
// every policyVerifyTicks ticks beyond (reading 10,000 policies takes about
// 4 ms). The agent's own writes go out every tick regardless.
const (
	policyVerifyEvery = 2000
	policyVerifyTicks = 5
)

// kernelSide is the kernel's part of the loop, for SSH users: a source (the
// per-UID counters and their baselines) and an enforcer (the BPF policy map
// and the nft set of blocked UIDs, both derived from one desired state:
// policy).
type kernelSide struct {
	// Source: the last sample of each UID's counters folded into usage.
	base     kbases
	epochs   []quota.Epoch // indexed by kbase.epoch
	baseQ    []uint32      // baselines to commit
	sampleIn int           // ticks to the next full read of the counters
	seen     bpf.Epoch     // the counters' epoch at the last full read

	// Enforcer: the desired policy of every UID that has one. A blocked
	// policy puts the UID in the nft set too.
	policy    map[uint32]bpf.Policy
	changes   map[uint32]bpf.Policy // not yet written to the kernel
	verifyIn  int
	verified  bool
	anchorErr error
	blocked   []uint32 // the UIDs of blocked policies, sorted: the nft set
	nftDirty  bool
	stats     bpf.Stats // the data plane's own counters at the last tick
}

func newKernelSide() kernelSide {
	return kernelSide{
		base:     kbases{uids: make(map[uint32]kbase)},
		policy:   make(map[uint32]bpf.Policy),
		changes:  make(map[uint32]bpf.Policy),
		nftDirty: true,
	}
}

// kbase is the baseline of one UID's kernel counters, compact: there can
// be one for every UID on the machine.
type kbase struct {
	epoch    uint32 // index into kernelSide.epochs
	dirty    bool
	set      bool // in kbases.accts: the account has a baseline
	up, down uint64
}

// kbases are the baselines of the kernel's counters by ID: a UID's in a
// map, an account's in a slice by account, for the registry gives accounts
// out in order from bpf.AccountBase (24 bytes an account; the map took
// about 60 with its slack, 3 MB at 50,000 Xray users).
type kbases struct {
	uids  map[uint32]kbase // and any account past kbaseDense
	accts []kbase          // by ID less bpf.AccountBase
}

// kbaseDense bounds how far past the accounts in the slice a new one may
// be to join it; one further is kept in the map (the registry gives IDs
// out in order: a counter of an ID far past them was written by hand).
const kbaseDense = 1024

// get returns id's baseline, and whether it has one.
func (m *kbases) get(id uint32) (kbase, bool) {
	if i := id - bpf.AccountBase; id >= bpf.AccountBase && i < uint32(len(m.accts)) && m.accts[i].set {
		return m.accts[i], true
	}
	b, ok := m.uids[id]
	return b, ok
}

// put makes b id's baseline.
func (m *kbases) put(id uint32, b kbase) {
	i := id - bpf.AccountBase
	if id < bpf.AccountBase || i >= uint32(len(m.accts))+kbaseDense {
		m.uids[id] = b
		return
	}
	for j := uint32(len(m.accts)); j <= i; j++ {
		// An account the map holds (put when it was far past the slice)
		// moves into it: an ID is in one of the two.
		old, ok := m.uids[bpf.AccountBase+j]
		if ok {
			delete(m.uids, bpf.AccountBase+j)
			old.set = true
		}
		m.accts = append(m.accts, old)
	}
	b.set = true
	m.accts[i] = b
}

// epochID returns the index of e in k.epochs, adding it if new.
func (k *kernelSide) epochID(e quota.Epoch) uint32 {
	if i := slices.Index(k.epochs, e); i >= 0 {
		return uint32(i)
	}
	k.epochs = append(k.epochs, e)
	return uint32(len(k.epochs) - 1)
}

// sample returns the baseline b as a counter sample; a UID never seen is the
// zero sample.
func (k *kernelSide) sample(b kbase, seen bool) quota.Sample {
	if !seen {
		return quota.Sample{}
	}
	return quota.Sample{Epoch: k.epochs[b.epoch], Up: b.up, Down: b.down}
}

func kernelEpoch(e bpf.Epoch) quota.Epoch {
	return quota.Epoch{Origin: e.Boot, Gen: uint64(e.CounterMap)}
}

// setPolicy records p as uid's desired policy and queues the change.
func (k *kernelSide) setPolicy(uid uint32, p bpf.Policy) {
	cur, ok := k.policy[uid]
	if zero := (p == bpf.Policy{}); (zero && !ok) || (ok && cur == p) {
		return
	}
	if cur.Blocked != p.Blocked {
		k.nftDirty = true
	}
	if (p == bpf.Policy{}) {
		delete(k.policy, uid)
	} else {
		k.policy[uid] = p
	}
	k.changes[uid] = p
}

// unwritten reports whether a policy change of one of keys has not been
// written to the kernel yet.
func (k *kernelSide) unwritten(keys []uint32) bool {
	for _, key := range keys {
		if _, ok := k.changes[key]; ok {
			return true
		}
	}
	return false
}

// release drops whatever uid's policy was: its user left or no longer owns
// it.
func (k *kernelSide) release(uid uint32) { k.setPolicy(uid, bpf.Policy{}) }

// releaseUIDs drops the policy of every UID (SSH users turned off); Xray's
// accounts keep theirs.
func (k *kernelSide) releaseUIDs() {
	for uid := range k.policy {
		if uid < bpf.AccountBase {
			k.release(uid)
		}
	}
}

// resetChanges empties the change set, and drops its memory after a big
// one (the first tick gives every limited user a budget).
func (k *kernelSide) resetChanges() {
	if len(k.changes) > 1024 {
		k.changes = make(map[uint32]bpf.Policy)
		return
	}
	clear(k.changes)
}

// sampleKernel folds the kernel's per-UID counters into the SSH users'
// usage. Every UID in the SSH range keeps a baseline, owned or not, so an
// account created later for a UID is not charged what the UID moved before.
// After it, each baseline is this tick's sample of its UID.
func (a *Agent) sampleKernel(now time.Time) error {
	ssh, xk := a.cfg.SSH.Enabled, a.xr.conns.k
	if !ssh && xk == nil {
		return nil
	}
	k := &a.kernel
	epoch, err := a.dp.Epoch()
	if err != nil {
		return err
	}
	lo, hi := a.cfg.SSH.UIDMin, a.cfg.SSH.UIDMax
	each := a.dp.EachMoved
	if k.sampleIn--; k.sampleIn <= 0 || epoch != k.seen {
		if epoch != k.seen {
			// At start, and after the counters restarted: the account
			// IDs may be another user's now (see debtsAnew).
			a.debtsAnew()
		}
		// At start, after the counters restarted, and now and then as a
		// safety net: every UID. EachCounter does not clear the marks, so
		// the next EachMoved reads some UIDs again, harmlessly.
		each, k.sampleIn, k.seen = a.dp.EachCounter, counterFullTicks, epoch
	}
	qe := kernelEpoch(epoch)
	eid := k.epochID(qe)
	return each(func(uid uint32, c bpf.Counters) {
		acct := uid >= bpf.AccountBase
		switch {
		case acct && xk == nil:
			return
		case !acct && (!ssh || uid < lo || uid >= hi):
			return
		}
		b, seen := k.base.get(uid)
		if seen && b.epoch == eid && b.up == c.TxBytes && b.down == c.RxBytes {
			return
		}
		d := quota.Since(k.sample(b, seen), quota.Sample{Epoch: qe, Up: c.TxBytes, Down: c.RxBytes})
		if !b.dirty {
			k.baseQ = append(k.baseQ, uid)
		}
		k.base.put(uid, kbase{epoch: eid, dirty: true, up: c.TxBytes, down: c.RxBytes})
		if (d == quota.Usage{}) {
			return
		}
		if acct {
			if name, ok := xk.AccountName(uid); ok {
				if u := a.users[name]; u != nil && u.r.xray {
					a.chargeXray(u, now, d, quota.Usage{})
				}
			}
			return
		}
		if u := a.byUID[uid]; u != nil {
			a.charge(u, now, d)
		}
	})
}

// kernelKeys returns the IDs the kernel counts and enforces u under: its
// UID while it is an SSH account (unless protected), then its Xray
// account while it is an Xray client with one. Its budget is charged to
// the first: the policy of the second names it as its quota key.
func (a *Agent) kernelKeys(u *user) (keys [2]uint32, n int) {
	r := u.r
	if r.ssh && a.byUID[r.uid] == u && !a.dp.Protected(r.uid) {
		keys[n] = r.uid
		n++
	}
	if xk := a.xr.conns.k; r.xray && xk != nil {
		if id, ok := xk.AccountOf(r.name); ok {
			keys[n] = id
			n++
		}
	}
	return keys, n
}

// capsCarried reports whether one of u's IDs in the kernel carries its
// speed caps, and why a source of u's escapes them ("" none does), and
// whether that reason is every Xray client's (the kernel, the config), not
// u's own. Its UID carries them while it is u's SSH account and not
// protected (as in kernelKeys). Its Xray account carries them only while
// the kernel counts Xray's connections (xconns.active): a connection is the
// account's once claimed, and claims are written only then, whatever
// accounts the pinned maps keep from an earlier run. A throttled Xray
// client the kernel cannot slow is removed from Xray instead (xrayBlocked);
// removed says why.
func (a *Agent) capsCarried(u *user) (carried bool, why, removed string, everyone bool) {
	r := u.r
	var whys []string
	everyone = true
	if r.ssh && a.byUID[r.uid] == u {
		if a.dp.Protected(r.uid) {
			whys, everyone = append(whys, fmt.Sprintf("SSH: its UID %d is protected (kernel.protected_uids)", r.uid)), false
		} else {
			carried = true
		}
	}
	if r.xray {
		why, all := a.xrayUncounted(r.name)
		switch {
		case why == "":
			carried = true
		case a.xrayBlocked(r):
			removed = why
		default:
			whys = append(whys, "Xray: "+why)
		}
		everyone = everyone && all
	}
	return carried, strings.Join(whys, "; "), removed, everyone
}

// xrayUncounted says why the kernel does not count the named Xray client's
// connections ("" it does), and whether that holds for every client.
func (a *Agent) xrayUncounted(name string) (why string, everyone bool) {
	x := &a.xr.conns
	switch {
	case x.k == nil:
		return "the kernel cannot count Xray's connections (Linux before 6.0)", true
	case !a.cfg.Xray.Connections:
		return "xray.connections = false", true
	case !x.active():
		return "the kernel does not count Xray's connections now (see the xray component in bwctl status)", true
	}
	if _, ok := x.k.AccountOf(name); !ok {
		return "no kernel account", false
	}
	return "", false
}

// deriveCaps decides whether u's speed caps are in force (record.capped),
// and warns of caps that nothing enforces, or that part of u's traffic
// escapes: once per user and reason, or once for all users when the reason
// is every Xray client's (a server with a default cap and thousands of
// clients logs one line, naming the first).
func (a *Agent) deriveCaps(u *user) {
	carried, why, removed, everyone := a.capsCarried(u)
	flip, warn := carried != u.r.capped, why != "" || removed != "" && !carried
	if !flip && !warn {
		return // the usual case: nothing changed, nothing escapes
	}
	st := u.r.state()
	caps := st.SpeedOf(u.r.plan(), a.rules)
	if flip {
		a.edit(u).capped = carried
		if !caps.IsZero() {
			a.markJSON(u, jsonUrgent) // the caps shown changed
		}
	}
	if !warn || caps.IsZero() {
		return
	}
	name := u.r.name
	args := []any{"user", name, "caps", caps.String()}
	key := name
	if everyone {
		key, args = "*", append(args, "logged", "once for every user alike")
	}
	switch {
	case !carried && why != "":
		a.logs.warnOnce("nocap:none:"+key+":"+why, "speed caps not enforced, none shown: the kernel counts none of the user's traffic",
			append(args, "why", why)...)
	case !carried:
		a.logs.warnOnce("nocap:removed:"+key+":"+removed, "throttle rate not enforced: the user is removed from Xray as a blocked one is",
			append(args, "why", removed)...)
	default:
		a.logs.warnOnce("nocap:part:"+key+":"+why, "speed caps enforced on part of the user's traffic only",
			append(args, "uncapped", why)...)
	}
}

// updatePolicy works out the kernel policy of an SSH user and queues it if
// it changed: blocked users are dropped both ways, limited ones get a budget
// that lets exactly their remaining bytes through, everyone else has none.
func (a *Agent) updatePolicy(u *user) {
	if uid := u.r.uid; u.r.ssh && a.byUID[uid] == u && a.dp.Protected(uid) {
		a.logs.warnOnce(fmt.Sprintf("protected:%d", uid), "UID is protected: never blocked or budgeted in the kernel", "user", u.r.name, "uid", uid)
	}
	keys, n := a.kernelKeys(u)
	if n == 0 {
		return
	}
	var p bpf.Policy
	switch t := u.r.terms(); {
	case t.st.Enforced(t.plan, a.rules):
		p = bpf.Policy{Blocked: true}
		u.hasAnchor = false
	case t.st.Blocked: // throttled: no budget, the throttle rate below
		u.hasAnchor = false
	case t.plan.Limit > 0 && !t.st.Override.Active:
		an, err := a.anchor(u, keys[:n])
		if err != nil {
			a.kernel.anchorErr = err
			a.work.retryQ = append(a.work.retryQ, u) // try again next tick
			return
		}
		p = bpf.Policy{Quota: direction(an.metric), Ceiling: an.ceiling}
	default:
		u.hasAnchor = false
	}
	p.Rate = kernelRate(u.r.speed(a.rules))
	for i, key := range keys[:n] {
		q := p
		if i > 0 && (q.Quota != 0 || q.Rate != bpf.Rate{}) {
			q.QuotaKey = keys[0] // one budget and one speed cap
		}
		a.kernel.setPolicy(key, q)
	}
}

// kernelRate is a user's caps as the kernel takes them: download is what
// the user receives (Rx), upload what they send (Tx), in bytes per second.
func kernelRate(s quota.Speed) bpf.Rate {
	return bpf.Rate{Rx: s.Down.BytesPerSecond(), Tx: s.Up.BytesPerSecond()}
}

// anchor is a budget granted to an SSH user in the kernel: the absolute
// ceiling on the kernel's charged bytes, and what it was computed for.
type anchor struct {
	key       uint32 // the kernel ID it is charged to
	limit     uint64
	lastReset quota.Instant // the last reset it was granted after
	metric    quota.Metric
	ceiling   uint64
}

// anchor returns u's kernel budget, computing a new one when the limit,
// the last reset or the metric changed since it was granted.
//
// The kernel budget is an absolute ceiling on the UID's charged bytes
// (bpf.Datapath.QuotaUsed): bpf.Ceiling of the charged bytes and the
// remaining allowance, read in the order that can only under-grant: first
// the charged total q, then the UID's counters again; bytes that moved since
// this tick's sample (the baseline) are taken off the allowance, and those
// that moved after q was read are charged twice. Once granted, the ceiling
// stays fixed while the charged total and the usage grow in step.
func (a *Agent) anchor(u *user, keys []uint32) (anchor, error) {
	r := u.r
	t := r.terms()
	p := t.plan
	st := r.state()
	// In fleet mode the budget is the node's lease on its own count.
	limit, used := a.fleetBudget(u, p.Limit, st.Used(a.rules))
	if an := u.anchor; u.hasAnchor && an.key == keys[0] && an.limit == limit && an.lastReset == t.st.LastReset && an.metric == a.rules.Metric {
		return an, nil
	}
	q, err := a.dp.QuotaUsed(keys[0])
	if err != nil {
		return anchor{}, err
	}
	var extra uint64
	for _, key := range keys {
		c, err := a.dp.CountersOf(key)
		if err != nil {
			return anchor{}, err
		}
		var sampled quota.Usage
		if b, ok := a.kernel.base.get(key); ok {
			sampled = quota.Usage{Up: b.up, Down: b.down}
		}
		extra += a.rules.Metric.Of(quota.Since(
			quota.Sample{Up: sampled.Up, Down: sampled.Down},
			quota.Sample{Up: c.TxBytes, Down: c.RxBytes}))
	}
	used += extra
	var remaining uint64
	if used < limit {
		remaining = limit - used
	}
	a.fleetAnchored(u, limit, used, q)
	u.anchor = anchor{key: keys[0], limit: limit, lastReset: t.st.LastReset, metric: a.rules.Metric, ceiling: bpf.Ceiling(q, remaining)}
	u.hasAnchor = true
	return u.anchor, nil
}

// enforceKernel writes this tick's policy changes. Every tick (every few
// ticks with many policies) it instead reads the whole policy map back and
// makes it equal to the desired state, repairing anything someone changed
// behind the agent's back. With SSH users turned off the desired state is
// empty, so turning them off at run time lifts every block and budget.
func (a *Agent) enforceKernel() error {
	k := &a.kernel
	err := k.anchorErr
	k.anchorErr = nil
	if k.verifyIn <= 0 {
		n, rerr := a.dp.ReconcilePolicies(k.policy)
		if rerr != nil {
			return rerr
		}
		pending := len(k.changes)
		k.resetChanges()
		if n > pending && k.verified {
			a.log.Warn("kernel policy map was altered; repaired", "entries", n)
		}
		k.verified = true
		k.verifyIn = 0
		if len(k.policy) > policyVerifyEvery {
			k.verifyIn = policyVerifyTicks - 1
		}
		return err
	}
	k.verifyIn--
	if aerr := a.dp.ApplyPolicies(k.changes); aerr != nil {
		k.verifyIn = 0 // rewrite everything next tick
		return aerr
	}
	k.resetChanges()
	return err
}

// enforceNFT makes the nftables set hold exactly the UIDs whose desired
// policy is a block. The sorted list is rebuilt only when a block changed;
// the firewall itself notices cheaply whether the kernel's table still
// matches it.
func (a *Agent) enforceNFT() error {
	k := &a.kernel
	if k.nftDirty {
		k.blocked = k.blocked[:0]
		for uid, p := range k.policy {
			if p.Blocked && uid < bpf.AccountBase { // accounts are no UIDs
				k.blocked = append(k.blocked, uid)
			}
		}
		slices.Sort(k.blocked)
		k.nftDirty = false
	}
	res, err := a.fw.Reconcile(k.blocked)
	if err != nil {
		return err
	}
	if res.Recreated {
		a.log.Warn("nftables table was missing or altered (or this is the first start); rebuilt", "blocked", len(k.blocked))
	} else if res.Added+res.Removed > 0 {
		a.log.Info("blocked set updated", "added", res.Added, "removed", res.Removed)
	}
	return nil
}

// checkDataplane keeps the programs attached and the pins in place, logging
// each repair, and reads the data plane's own counters: a full counter or
// quota map is a quota bypass, reported as an error.
func (a *Agent) checkDataplane() (attachErr, mapsErr error) {
	repaired, attachErr := a.dp.EnsureAttached()
	if len(repaired) > 0 {
		a.log.Warn("kernel data plane was altered; repaired", "repaired", repaired)
	}
	st, err := a.dp.Stats()
	if err != nil {
		return attachErr, fmt.Errorf("read kernel stats: %w", err)
	}
	a.kernel.stats = st
	switch {
	case st.CountersFull > 0 && st.QuotaFull > 0:
		return attachErr, fmt.Errorf("kernel counter and quota maps full: packets of some UIDs pass uncounted and budgeted ones are dropped; raise kernel.max_uids (now %d), then run bwagent uninstall and start the agent again", a.cfg.Kernel.MaxUIDs)
	case st.CountersFull > 0:
		return attachErr, fmt.Errorf("kernel counter map full: packets of some UIDs pass uncounted, a way around their limits; raise kernel.max_uids (now %d), then run bwagent uninstall and start the agent again", a.cfg.Kernel.MaxUIDs)
	case st.QuotaFull > 0:
		return attachErr, fmt.Errorf("kernel quota map full: packets of some budgeted UIDs are dropped; raise kernel.max_uids (now %d), then run bwagent uninstall and start the agent again", a.cfg.Kernel.MaxUIDs)
	}
	return attachErr, nil
}
