package agent

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/quota"
)

// sampleKernel folds the kernel's per-UID counters into the SSH users'
// usage. Every UID in the SSH range keeps a baseline, owned or not, so an
// account created later for a UID is not charged what the UID moved before.
func (a *Agent) sampleKernel(now time.Time) error {
	if !a.cfg.SSH.Enabled {
		return nil
	}
	epoch, err := a.dp.Epoch()
	if err != nil {
		return err
	}
	a.epoch = epoch
	if err := a.dp.Counters(a.counters); err != nil {
		return err
	}
	lo, hi := a.cfg.SSH.UIDMin, a.cfg.SSH.UIDMax
	for uid, c := range a.counters {
		if uid < lo || uid >= hi {
			continue
		}
		cur := quota.Sample{Epoch: epoch, Up: c.TxBytes, Down: c.RxBytes}
		b := a.sshBase[uid]
		if b == nil {
			b = &baseline{}
			a.sshBase[uid] = b
		}
		if b.Sample == cur {
			continue
		}
		d := quota.Since(b.Sample, cur)
		b.Sample, b.dirty = cur, true
		if u := a.byUID[uid]; u != nil && (d != quota.Usage{}) {
			a.charge(u, now, d)
		}
	}
	return nil
}

// charge adds d to u's usage.
// A new day rewrites the user's file at once, so daily_usage never shows
// yesterday's bytes.
func (a *Agent) charge(u *user, now time.Time, d quota.Usage) {
	js := jsonUsage
	if u.st.Day != quota.Day(now) {
		js = jsonUrgent
	}
	if fin, rolled := u.st.Add(now, d); rolled {
		a.history = append(a.history, dayRow(u.name, fin))
	}
	u.touch(now, js)
}

// evaluate applies the rules to every present user: day rollover, scheduled
// resets, the end of manual unblocks, blocks and unblocks.
func (a *Agent) evaluate(now time.Time) {
	today := quota.Day(now)
	for _, u := range a.users {
		if !u.present {
			continue
		}
		a.evaluateUser(u, now, today)
	}
}

func (a *Agent) evaluateUser(u *user, now time.Time, today string) {
	if u.st.Day != today {
		a.charge(u, now, quota.Usage{})
	}
	p := a.plans[u.name]
	var slack uint64
	if u.proto == quota.SSH && p.Limit > 0 {
		slack = kernelSlack
	}
	ev := u.st.Advance(now, p, a.rules, slack)
	a.record(u, ev)
	if st := u.st.Status(p, a.rules); st != u.status || len(ev) > 0 {
		u.status = st
		u.touch(now, jsonUrgent)
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

// enforceKernel makes the BPF policy map equal to the desired state: blocked
// SSH users are dropped in both directions, limited ones get a budget that
// lets exactly their remaining bytes through, everyone else has no entry.
func (a *Agent) enforceKernel() error {
	if !a.cfg.SSH.Enabled {
		return nil
	}
	clear(a.desired)
	var errs []error
	for uid, u := range a.byUID {
		if a.dp.Protected(uid) {
			a.warnOnce(fmt.Sprintf("protected:%d", uid), "UID is protected: never blocked or budgeted in the kernel", "user", u.name, "uid", uid)
			continue
		}
		p := a.plans[u.name]
		switch {
		case u.st.Blocked:
			a.desired[uid] = bpf.Policy{Blocked: true}
			delete(a.anchors, uid)
		case p.Limit > 0 && !u.st.Override.Active:
			an, err := a.anchor(u, p)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			a.desired[uid] = bpf.Policy{Quota: direction(an.metric), Ceiling: an.ceiling}
		default:
			delete(a.anchors, uid)
		}
	}
	if _, err := a.dp.ReconcilePolicies(a.desired); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// anchor returns u's kernel budget, computing a new one when the limit,
// the last reset or the metric changed since it was granted.
//
// The kernel budget is an absolute ceiling on the UID's charged bytes
// (bpf.Datapath.QuotaUsed). The ceiling is the charged bytes now plus the
// remaining allowance, read in an order that can only under-grant: first the
// charged total q, then the UID's counters again; bytes that moved since this
// tick's counter sample are taken off the allowance, and those that moved
// after q was read are charged twice. Once granted, the ceiling stays fixed
// while the charged total and the usage grow in step.
func (a *Agent) anchor(u *user, p quota.Plan) (anchor, error) {
	uid := u.uid
	an, ok := a.anchors[uid]
	if ok && an.limit == p.Limit && an.lastReset.Equal(u.st.LastReset) && an.metric == a.rules.Metric {
		return an, nil
	}
	q, err := a.dp.QuotaUsed(uid)
	if err != nil {
		return anchor{}, err
	}
	c, err := a.dp.CountersOf(uid)
	if err != nil {
		return anchor{}, err
	}
	sampled := a.counters[uid]
	extra := a.rules.Metric.Of(quota.Since(
		quota.Sample{Up: sampled.TxBytes, Down: sampled.RxBytes},
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
	an = anchor{limit: p.Limit, lastReset: u.st.LastReset, metric: a.rules.Metric, ceiling: ceiling}
	a.anchors[uid] = an
	return an, nil
}

// enforceNFT makes the nftables set hold exactly the blocked SSH UIDs.
func (a *Agent) enforceNFT() error {
	if !a.cfg.SSH.Enabled {
		return nil
	}
	var blocked []uint32
	for uid, u := range a.byUID {
		if u.st.Blocked && !a.dp.Protected(uid) {
			blocked = append(blocked, uid)
		}
	}
	slices.Sort(blocked)
	res, err := a.fw.Reconcile(blocked)
	if err != nil {
		return err
	}
	if res.Recreated {
		a.log.Warn("nftables table was missing or altered (or this is the first start); rebuilt", "blocked", len(blocked))
	} else if res.Added+res.Removed > 0 {
		a.log.Info("blocked set updated", "added", res.Added, "removed", res.Removed)
	}
	return nil
}
