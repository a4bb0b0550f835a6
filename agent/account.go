package agent

import (
	"fmt"
	"slices"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/quota"
)

// A tick costs in proportion to what changed, not to the number of users:
// only users with new traffic, a command, a changed plan or account, or a
// due timer are evaluated; only their kernel policies are written; only
// their rows are committed and their files queued. A full pass over every
// user happens at start, at local midnight, when a user's timer (scheduled
// reset, expiry, end of a manual unblock) is due, and after a reload.

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

// queue marks u for evaluation at this tick.
func (a *Agent) queue(u *user) {
	if !u.queued {
		u.queued = true
		a.evalQ = append(a.evalQ, u)
	}
}

// touch records that u changed at now: its row is committed this tick and
// its usage file written as js says.
func (a *Agent) touch(u *user, now time.Time, js jsonState) {
	if !u.dirty {
		u.dirty = true
		a.dirtyQ = append(a.dirtyQ, u)
	}
	u.updated = quota.At(now)
	a.markJSON(u, js)
}

// markJSON asks for u's usage file to be written (js: how soon).
func (a *Agent) markJSON(u *user, js jsonState) {
	if js <= u.json {
		return
	}
	if u.json == jsonClean {
		a.jsonQ = append(a.jsonQ, u)
	}
	u.json = js
}

// sampleKernel folds the kernel's per-UID counters into the SSH users'
// usage. Every UID in the SSH range keeps a baseline, owned or not, so an
// account created later for a UID is not charged what the UID moved before.
// After it, each baseline is this tick's sample of its UID.
func (a *Agent) sampleKernel(now time.Time) error {
	if !a.cfg.SSH.Enabled {
		return nil
	}
	epoch, err := a.dp.Epoch()
	if err != nil {
		return err
	}
	lo, hi := a.cfg.SSH.UIDMin, a.cfg.SSH.UIDMax
	each := a.dp.EachMoved
	if a.sampleIn--; a.sampleIn <= 0 || epoch != a.epochSeen {
		// At start, after the counters restarted, and now and then as a
		// safety net: every UID. EachCounter does not clear the marks, so
		// the next EachMoved reads some UIDs again, harmlessly.
		each, a.sampleIn, a.epochSeen = a.dp.EachCounter, counterFullTicks, epoch
	}
	eid := a.epochID(epoch)
	return each(func(uid uint32, c bpf.Counters) {
		if uid < lo || uid >= hi {
			return
		}
		b, seen := a.sshBase[uid]
		if seen && b.epoch == eid && b.up == c.TxBytes && b.down == c.RxBytes {
			return
		}
		d := quota.Since(a.sample(b, seen), quota.Sample{Epoch: epoch, Up: c.TxBytes, Down: c.RxBytes})
		if !b.dirty {
			a.baseQ = append(a.baseQ, uid)
		}
		a.sshBase[uid] = kbase{epoch: eid, dirty: true, up: c.TxBytes, down: c.RxBytes}
		if u := a.byUID[uid]; u != nil && (d != quota.Usage{}) {
			a.charge(u, now, d)
		}
	})
}

// charge adds d to u's usage and queues u for evaluation. A new day
// rewrites the user's file at once, so daily_usage never shows yesterday's
// bytes.
func (a *Agent) charge(u *user, now time.Time, d quota.Usage) {
	js := jsonUsage
	day := a.day(now)
	if u.st.Day != day {
		js = jsonUrgent
	}
	if fin, rolled := u.st.AddOn(day, d); rolled {
		a.history = append(a.history, dayRow(u.name, fin))
	}
	a.touch(u, now, js)
	a.queue(u)
}

// day returns now's local day, formatted once per day.
func (a *Agent) day(now time.Time) string {
	y, m, d := now.Date()
	if y != a.dayY || m != a.dayM || d != a.dayD || a.dayStr == "" {
		a.dayY, a.dayM, a.dayD, a.dayStr = y, m, d, quota.Day(now)
	}
	return a.dayStr
}

// evaluate applies the rules to the users queued this tick, or to every
// present user when a timer is due or something global changed.
func (a *Agent) evaluate(now time.Time) {
	today := a.day(now)
	if a.fullEval || !now.Before(a.nextWake) || today != a.today {
		a.fullEval, a.today = false, today
		y, m, d := now.Date()
		a.nextWake = time.Date(y, m, d+1, 0, 0, 0, 0, now.Location())
		for _, u := range a.users {
			if u.present {
				a.evaluateUser(u, now, today)
			}
		}
	} else {
		for _, u := range a.evalQ {
			if u.present {
				a.evaluateUser(u, now, today)
			}
		}
	}
	for _, u := range a.evalQ {
		u.queued = false
	}
	clear(a.evalQ)
	a.evalQ = a.evalQ[:0]
	for _, u := range a.retryQ {
		a.queue(u)
	}
	a.retryQ = a.retryQ[:0]
}

func (a *Agent) evaluateUser(u *user, now time.Time, today string) {
	if u.st.Day != today {
		if fin, rolled := u.st.AddOn(today, quota.Usage{}); rolled {
			a.history = append(a.history, dayRow(u.name, fin))
		}
		a.touch(u, now, jsonUrgent)
	}
	var slack uint64
	if u.proto == quota.SSH && u.plan.Limit > 0 {
		slack = kernelSlack
	}
	ev := u.st.Advance(now, u.plan, a.rules, slack)
	a.record(u, ev)
	if st := u.st.Status(u.plan, a.rules); st != u.status || len(ev) > 0 {
		// The first status after a start is no change to record.
		if u.status != "" || len(ev) > 0 {
			a.touch(u, now, jsonUrgent)
		}
		u.status = st
	}
	for _, w := range [...]quota.Instant{u.st.NextReset, u.st.Override.Until, u.plan.Expires} {
		if !w.IsZero() && !w.Reached(now) && w < quota.At(a.nextWake) {
			a.nextWake = w.Time()
		}
	}
	if u.st.Blocked != u.enforcedBlock {
		u.enforcedBlock = u.st.Blocked
		if u.proto.Xray() {
			a.markersDirty = true
		}
	}
	if u.proto == quota.SSH {
		a.nftBlock(u.uid, u.st.Blocked)
		a.updatePolicy(u)
	}
}

// record queues u's events for the state database and the block log, and
// logs them.
func (a *Agent) record(u *user, ev []quota.Event) {
	for _, e := range ev {
		a.events = append(a.events, eventRow(u, e))
		a.log.Info("user "+e.Action, "user", u.name, "protocol", u.proto, "reason", e.Reason)
	}
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

// updatePolicy works out the kernel policy of an SSH user and queues it if
// it changed: blocked users are dropped both ways, limited ones get a budget
// that lets exactly their remaining bytes through, everyone else has none.
func (a *Agent) updatePolicy(u *user) {
	uid := u.uid
	if a.dp.Protected(uid) {
		a.warnOnce(fmt.Sprintf("protected:%d", uid), "UID is protected: never blocked or budgeted in the kernel", "user", u.name, "uid", uid)
		return
	}
	var p bpf.Policy
	switch {
	case u.st.Blocked:
		p = bpf.Policy{Blocked: true}
		u.hasAnchor = false
	case u.plan.Limit > 0 && !u.st.Override.Active:
		an, err := a.anchor(u)
		if err != nil {
			a.anchorErr = err
			a.retryQ = append(a.retryQ, u) // try again next tick
			return
		}
		p = bpf.Policy{Quota: direction(an.metric), Ceiling: an.ceiling}
	default:
		u.hasAnchor = false
	}
	a.setPolicy(uid, p)
}

// setPolicy records p as uid's desired kernel policy and queues the change.
func (a *Agent) setPolicy(uid uint32, p bpf.Policy) {
	cur, ok := a.policy[uid]
	if zero := (p == bpf.Policy{}); (zero && !ok) || (ok && cur == p) {
		return
	}
	if (p == bpf.Policy{}) {
		delete(a.policy, uid)
	} else {
		a.policy[uid] = p
	}
	a.changes[uid] = p
}

// anchor returns u's kernel budget, computing a new one when the limit,
// the last reset or the metric changed since it was granted.
//
// The kernel budget is an absolute ceiling on the UID's charged bytes
// (bpf.Datapath.QuotaUsed). The ceiling is the charged bytes now plus the
// remaining allowance, read in an order that can only under-grant: first the
// charged total q, then the UID's counters again; bytes that moved since this
// tick's sample (the baseline) are taken off the allowance, and those that
// moved after q was read are charged twice. Once granted, the ceiling stays
// fixed while the charged total and the usage grow in step.
func (a *Agent) anchor(u *user) (anchor, error) {
	p := u.plan
	if an := u.anchor; u.hasAnchor && an.limit == p.Limit && an.lastReset == u.st.LastReset && an.metric == a.rules.Metric {
		return an, nil
	}
	q, err := a.dp.QuotaUsed(u.uid)
	if err != nil {
		return anchor{}, err
	}
	c, err := a.dp.CountersOf(u.uid)
	if err != nil {
		return anchor{}, err
	}
	var sampled quota.Sample
	if b, ok := a.sshBase[u.uid]; ok {
		sampled = quota.Sample{Up: b.up, Down: b.down}
	}
	extra := a.rules.Metric.Of(quota.Since(
		quota.Sample{Up: sampled.Up, Down: sampled.Down},
		quota.Sample{Up: c.TxBytes, Down: c.RxBytes}))
	used := u.st.Used(a.rules) + extra
	var remaining uint64
	if used < p.Limit {
		remaining = p.Limit - used
	}
	ceiling := q + remaining
	if ceiling < q {
		ceiling = ^uint64(0)
	}
	u.anchor = anchor{limit: p.Limit, lastReset: u.st.LastReset, metric: a.rules.Metric, ceiling: ceiling}
	u.hasAnchor = true
	return u.anchor, nil
}

// enforceKernel writes this tick's policy changes. Every tick (every few
// ticks with many policies) it instead reads the whole policy map back and
// makes it equal to the desired state, repairing anything someone changed
// behind the agent's back.
func (a *Agent) enforceKernel() error {
	if !a.cfg.SSH.Enabled {
		return nil
	}
	err := a.anchorErr
	a.anchorErr = nil
	if a.verifyIn <= 0 {
		n, rerr := a.dp.ReconcilePolicies(a.policy)
		if rerr != nil {
			return rerr
		}
		pending := len(a.changes)
		a.resetChanges()
		if n > pending && a.verified {
			a.log.Warn("kernel policy map was altered; repaired", "entries", n)
		}
		a.verified = true
		a.verifyIn = 0
		if len(a.policy) > policyVerifyEvery {
			a.verifyIn = policyVerifyTicks - 1
		}
		return err
	}
	a.verifyIn--
	if aerr := a.dp.ApplyPolicies(a.changes); aerr != nil {
		a.verifyIn = 0 // rewrite everything next tick
		return aerr
	}
	a.resetChanges()
	return err
}

// nftBlock puts uid in the nft set of blocked UIDs or takes it out.
func (a *Agent) nftBlock(uid uint32, blocked bool) {
	if blocked && a.dp.Protected(uid) {
		return
	}
	if _, in := a.nftSet[uid]; in == blocked {
		return
	}
	if blocked {
		a.nftSet[uid] = struct{}{}
	} else {
		delete(a.nftSet, uid)
	}
	a.nftDirty = true
}

// resetChanges empties the change set, and drops its memory after a big
// one (the first tick gives every limited user a budget).
func (a *Agent) resetChanges() {
	if len(a.changes) > 1024 {
		a.changes = make(map[uint32]bpf.Policy)
		return
	}
	clear(a.changes)
}

// enforceNFT makes the nftables set hold exactly the blocked SSH UIDs. The
// sorted list is rebuilt only when a block changed; the firewall itself
// notices cheaply whether the kernel's table still matches it.
func (a *Agent) enforceNFT() error {
	if !a.cfg.SSH.Enabled {
		return nil
	}
	if a.nftDirty {
		a.blockedUIDs = a.blockedUIDs[:0]
		for uid := range a.nftSet {
			a.blockedUIDs = append(a.blockedUIDs, uid)
		}
		slices.Sort(a.blockedUIDs)
		a.nftDirty = false
	}
	res, err := a.fw.Reconcile(a.blockedUIDs)
	if err != nil {
		return err
	}
	if res.Recreated {
		a.log.Warn("nftables table was missing or altered (or this is the first start); rebuilt", "blocked", len(a.blockedUIDs))
	} else if res.Added+res.Removed > 0 {
		a.log.Info("blocked set updated", "added", res.Added, "removed", res.Removed)
	}
	return nil
}
