package agent

import (
	"math"
	"time"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

// An Xray user's debt (what the kernel counted of their connections and
// Xray has not reported yet, less Xray's reports the kernel has not
// folded: see chargeXray) is committed with the usage it was charged in,
// so that a restart neither loses nor repeats a byte. It has one row in
// the store's baselines, in one of two forms:
//
//   - owedOrigin ("moved"): the debt itself, up and down (toNet). Its
//     epoch's Start is when the user's counts last moved. Written for a
//     user without a kernel account (the kernel not counting Xray's
//     connections), and by agents before this form existed.
//   - paidOrigin ("paid"): the debt as a point on the counters of the
//     user's kernel account (whose ID is its epoch's Gen) and Xray's: the
//     account's baseline, less Xray's baseline, less the debt. Each byte
//     the kernel counts adds to the account's baseline and to the debt
//     alike, and each byte of Xray's that pays the debt off adds to Xray's
//     baseline and takes from the debt alike, which leaves that point
//     where it is: the row is written again only when Xray reports more
//     than it owed, a debt is forgiven or paid off, either side's counters
//     restart, or the user's account changes. A user moving every tick
//     had a row every tick, and another at every read of Xray's counters
//     (with a tenth of 10,000 users moving, a third of a commit's rows).
//     Its epoch's Start is when it was written, not when the user last
//     moved: a start takes itself as every such user's last move, so it
//     forgives a debt no earlier than Xray's idle time after it (later
//     than the agent that stopped would have, never earlier, which could
//     charge twice what Xray reports after it).
//
// The store holds the two baselines and the point as of the same commit
// (a baseline is in every commit that changed it, and the rows of the
// users whose point changed are too: see debtRows), so the debt is the
// difference at any start. An account's ID names the same user for as long
// as the kernel's counters keep their epoch (bpf.Datapath.Account); when
// they start a new one, at a start too, every row of that form is looked
// at again (debtsAnew) in the commit of the new epoch's first baselines,
// so that no row is left on an ID another user is given.
const (
	owedOrigin = "moved"
	paidOrigin = "paid"
)

// savedDebt is the row of a user's debt as the store holds it: none (the
// zero savedDebt), the debt itself (owedOrigin: acct zero, point the debt,
// which is not zero), or a point on an account (paidOrigin: acct not
// zero). 24 bytes, in every xbase.
type savedDebt struct {
	point quota.Usage
	acct  uint32
}

// paid reports whether the row is of the paidOrigin form.
func (s savedDebt) paid() bool { return s.acct != 0 }

// owing reports whether b has a debt or credit.
func (b *xbase) owing() bool {
	return b.owed != (quota.Usage{}) || b.credit != (quota.Usage{})
}

// debtRow returns the row of b's debt that the next commit writes, and
// false if the store already holds it, or holds none and b owes nothing;
// and the row as saved, for b.saved once it is in a batch. A debt paid off
// has no row, or one of zero in the first form: the counters of a user who
// owes nothing move no row.
func (a *Agent) debtRow(email string, b *xbase, now time.Time) (store.Baseline, savedDebt, bool) {
	up, down := toNet(b.owed, b.credit)
	src := quota.OwedSource(email)
	owing := b.owing()
	if xk := a.xr.conns.k; xk != nil && owing {
		if acct, ok := xk.AccountOf(email); ok {
			point := a.debtPoint(acct, b, quota.Usage{Up: up, Down: down})
			sv := b.saved
			if sv.acct == acct && sv.point == point {
				return store.Baseline{}, sv, false
			}
			return store.Baseline{Source: src, Epoch: quota.Epoch{Origin: paidOrigin, Start: now.Unix(), Gen: uint64(acct)}, Rx: point.Down, Tx: point.Up},
				savedDebt{acct: acct, point: point}, true
		}
	}
	if !owing && b.saved == (savedDebt{}) {
		return store.Baseline{}, b.saved, false
	}
	// While it owes, and once more as zero when it paid off one the store
	// holds.
	return store.Baseline{Source: src, Epoch: quota.Epoch{Origin: owedOrigin, Start: int64(b.moved)}, Rx: down, Tx: up},
		savedDebt{point: quota.Usage{Up: up, Down: down}}, true
}

// debtPoint returns the point of b's debt net (toNet) on the counters of
// account acct and Xray's: the baselines as this commit leaves them in the
// store, the account's less Xray's less net, each direction modulo 2^64.
// With a net of zero it is the point of no debt.
func (a *Agent) debtPoint(acct uint32, b *xbase, net quota.Usage) quota.Usage {
	k, _ := a.kernel.base.get(acct) // the zero kbase if the account never moved
	return quota.Usage{Up: k.up - b.up - net.Up, Down: k.down - b.down - net.Down}
}

// loadDebt takes the row bl of a debt from the store at now. A paidOrigin
// row needs the kernel's and Xray's baselines loaded first.
func (a *Agent) loadDebt(bl store.Baseline, now time.Time) {
	b := a.xr.baseOf(bl.Source.Name)
	switch bl.Epoch.Origin {
	case paidOrigin:
		acct := uint32(bl.Epoch.Gen)
		point := quota.Usage{Up: bl.Tx, Down: bl.Rx}
		zero := a.debtPoint(acct, b, quota.Usage{})
		b.owed, b.credit = fromNet(zero.Up-point.Up, zero.Down-point.Down)
		// The row's Start is when it was written; the user may have moved
		// since: now is the latest the last move can have been.
		b.moved = unixSeconds(max(bl.Epoch.Start, now.Unix()))
		b.saved = savedDebt{acct: acct, point: point}
	default:
		b.owed, b.credit = fromNet(bl.Tx, bl.Rx)
		b.moved = unixSeconds(bl.Epoch.Start)
		b.saved = savedDebt{point: quota.Usage{Up: bl.Tx, Down: bl.Rx}}
	}
}

// debtsAnew queues for the next commit every debt kept on an account (the
// paidOrigin form): the kernel's counters start a new epoch, in which an ID
// can be given to another user, whose baseline would move the row's
// meaning. debtRow writes each again on the user's account now, or in the
// first form.
func (a *Agent) debtsAnew() {
	for email, b := range a.xr.base {
		if b.saved.paid() {
			a.xr.queueBase(email, b, false)
		}
	}
}

// unixSeconds is t, Unix seconds, as an xbase keeps it: within 1970 to
// 2106.
func unixSeconds(t int64) uint32 { return uint32(min(max(t, 0), math.MaxUint32)) }
