package agent

import (
	"context"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/sockkill"
	"github.com/myvpn/bwagent/xrayaccess"
	"github.com/myvpn/bwagent/xrayconf"
)

// Xray users' connections, counted in the kernel.
//
// Where the kernel can (Linux 6.0), Xray's config names an access log and
// xray.connections is on, each Xray user has a kernel account (an ID from
// bpf.AccountBase on, kept in a pinned map as long as the counters), and
// each TCP connection accepted on an Xray inbound's port starts pending in
// the kernel. When the line of the access log for it names its user, the
// agent writes a claim (the client's address and port and the inbound's
// port, for the user's account) and the packet programs count the
// connection for the account from its next packet on, with the bytes it
// moved while pending, and enforce the user's budget and block on it, as
// for an SSH account. So XTLS Vision's spliced bytes are counted live, a
// crash of Xray loses nothing the kernel counted, and a limit stops the
// connection at the packet.
//
// Xray's own counters are still read: they count what the kernel could not
// attribute (UDP, connections through a proxy in front of Xray, lines lost
// or never written, the first bytes of a connection before its claim):
// every tick, unless the kernel counts every connection Xray's users can
// make (see xrayReadTicks). The kernel's count of a user is charged as it
// comes and is owed by Xray, whose counters report the same connection's
// bytes later (at the connection's close for Vision); Xray's next counts
// pay off what is owed before anything more is charged (chargeXray). So
// nothing is counted twice, and nothing the kernel counted waits for Xray.

// XrayKernel is the part of bpf.Datapath that counts Xray users'
// connections in the kernel.
type XrayKernel interface {
	// Account returns the user's kernel account, made at the first call.
	Account(name string) (uint32, error)
	// AccountOf returns the user's account if the user has one.
	AccountOf(name string) (uint32, bool)
	// AccountName returns the user of an account.
	AccountName(id uint32) (string, bool)
	// ClaimAll makes each claim's connection (from its client to its
	// local port) count for its account when the kernel sees its next
	// packet, in order, stopping at the first it cannot make: it returns
	// how many it made and that one's error. Unclaim removes those of
	// the claims that no connection took and that still name the same
	// account (one written again since for another account stays), and
	// says how many.
	ClaimAll(cs []bpf.Claim) (int, error)
	Unclaim(cs []bpf.Claim) (int, error)
	// SetXrayPorts makes the inbound ports' new connections pending.
	SetXrayPorts(hold, claimOnly []uint16) error
	// Tag makes the packets of a UID's sockets (Xray's) look their
	// attribution up.
	Tag(uid uint32) error
	// SocketAttribution returns the attribution of the socket fd (a
	// descriptor of the agent's): a claimed connection's is its user's
	// account, which the agent reads back at its start (xraydevices.go).
	SocketAttribution(fd int) (a bpf.Attribution, ok bool, err error)
}

// Timings of the claims.
const (
	// claimTTL is how long a claim no connection took stays at least (up
	// to a tick more: the tick takes them back): the kernel holds a
	// connection's claim lookups for 5 s after it is accepted.
	claimTTL = 10 * time.Second
	// accessPoll is how often at most the access log is read while Xray
	// writes to it (the follower is woken by a watch of its directory):
	// the kernel lets a pending connection move 64 KiB before it holds
	// it.
	accessPoll = 10 * time.Millisecond
	// maxRecycled bounds the access log batches handed back to the
	// follower: a burst's (a backlog read after a stall) is left to the
	// collector rather than kept.
	maxRecycled = 4096
	// xconnRefreshTicks is how often the ports and Xray's UIDs are
	// written again, to repair them and to find an Xray that restarted as
	// another user.
	xconnRefreshTicks = 30
)

// xconns is the loop's part for Xray's connections in the kernel.
type xconns struct {
	k XrayKernel
	// listeners finds the listening sockets of ports (sockkill.Listeners).
	listeners func(ports []uint16) ([]sockkill.Conn, error)

	// entries brings the access log's attributions from the follower's
	// goroutine to the loop, which hands the slices back through free once
	// done with them (cleared), for the follower to fill again.
	entries, free chan []xrayaccess.Entry
	fol           *follower

	// kernel: claims are written (x.k and xray.connections); without it
	// the access log is followed for the users' devices alone
	// (devices.go).
	kernel bool

	// The ports and Xray's UIDs as last written; refreshIn counts the
	// ticks to the next writing.
	hold, claimOnly []uint16
	tagged          map[uint32]bool
	refreshIn       int
	synced          *xrayconf.Config // the config they were written for

	// claims are the claims written, in order, taken back after
	// claimTTL; claimRuns says when: one run for each batch written
	// (40 bytes a claim, not 64 with a time each).
	claims    []bpf.Claim
	claimRuns []claimRun
	// batch and claimOf are claimXray's claims of one access log batch
	// and their users, kept for the next.
	batch   []bpf.Claim
	claimOf []string
	// Counts for the health report: claims written, and access log lines
	// that named no user of that inbound.
	claimed, strays uint64
}

// claimRun is n claims written together, at (Unix nanoseconds).
type claimRun struct {
	at int64
	n  int
}

// follower runs an access log's Follower on its own goroutine.
type follower struct {
	path   string
	cancel context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	err    error // the Follower's last error, nil once it reads again
}

// active reports whether Xray's connections are counted in the kernel.
func (x *xconns) active() bool { return x.kernel && x.fol != nil }

// stop stops the follower and lifts the hold on Xray's ports.
func (x *xconns) stop() error {
	if x.fol != nil {
		x.fol.cancel()
		<-x.fol.done
		x.fol = nil
	}
	x.kernel = false
	return x.release()
}

// release lifts the hold on Xray's ports.
func (x *xconns) release() error {
	if x.k == nil || x.hold == nil && x.claimOnly == nil {
		return nil
	}
	x.hold, x.claimOnly = nil, nil
	return x.k.SetXrayPorts(nil, nil)
}

// syncXrayConns keeps Xray's connections counted in the kernel as the
// config says: the ports pending, Xray's UIDs tagged, every user with an
// account, the access log followed. The access log is followed too where
// the kernel cannot count them (no x.k, xray.connections off): its lines
// say which devices the users' connections come from (devices.go). bg is
// the context the follower runs in; nil (an agent driven without Run)
// follows nothing.
func (a *Agent) syncXrayConns(bg context.Context, now time.Time) error {
	x := &a.xr.conns
	conf := a.xr.conf
	confChanged := conf != x.synced
	x.synced = conf
	path, why := "", ""
	switch {
	case !a.cfg.Xray.Enabled:
		return x.stop()
	case conf == nil:
		return nil // no config (yet): Xray's counters alone, as before
	case conf.AccessLog == "":
		why = "Xray's config names no access log (\"log\": {\"access\": FILE})"
	case conf.LogMaskAddress != "":
		why = "Xray's access log masks addresses (log.maskAddress)"
	case !filepath.IsAbs(conf.AccessLog):
		why = fmt.Sprintf("Xray's access log %q is relative to a directory the agent does not know", conf.AccessLog)
	default:
		path = conf.AccessLog
	}
	if why != "" {
		a.logs.warnOnce("xconns:"+why, "xray connections are not counted in the kernel, only by Xray, and their devices are not seen: "+why)
		return x.stop()
	}
	var errs []error
	if x.fol != nil && x.fol.path != path {
		x.fol.cancel()
		<-x.fol.done
		x.fol = nil
	}
	if x.fol == nil && bg != nil {
		fol, err := a.follow(bg, path)
		if err != nil {
			return err
		}
		x.fol = fol
		confChanged = true
	}
	if x.fol == nil {
		return nil
	}
	kernel := x.k != nil && a.cfg.Xray.Connections
	if !kernel {
		x.kernel = false
		x.fol.mu.Lock()
		err := x.fol.err
		x.fol.mu.Unlock()
		return errors.Join(x.release(), err)
	}
	if !x.kernel {
		x.kernel, confChanged = true, true
	}
	if x.refreshIn--; confChanged || x.refreshIn <= 0 {
		x.refreshIn = xconnRefreshTicks
		errs = append(errs, a.writeXrayPorts())
	}
	if confChanged {
		for email := range a.xr.users.all() {
			if _, err := x.k.Account(email); err != nil {
				errs = append(errs, err)
				break
			}
		}
	}
	a.expireClaims(now)
	x.fol.mu.Lock()
	errs = append(errs, x.fol.err)
	x.fol.mu.Unlock()
	return errors.Join(errs...)
}

// follow starts following the access log at path.
func (a *Agent) follow(bg context.Context, path string) (*follower, error) {
	f, err := xrayaccess.Open(path, xrayaccess.Options{Interval: accessPoll})
	if err != nil {
		return nil, fmt.Errorf("follow Xray's access log: %w", err)
	}
	ctx, cancel := context.WithCancel(bg)
	fol := &follower{path: path, cancel: cancel, done: make(chan struct{})}
	ch, free := a.xr.conns.entries, a.xr.conns.free
	go func() {
		defer close(fol.done)
		defer f.Close()
		for {
			var buf []xrayaccess.Entry
			select {
			case buf = <-free:
			default:
			}
			es, err := f.AppendNext(ctx, buf)
			if ctx.Err() != nil {
				return
			}
			fol.mu.Lock()
			if err != nil {
				fol.err = fmt.Errorf("access log: %w", err)
			} else {
				fol.err = nil
			}
			fol.mu.Unlock()
			if len(es) == 0 {
				continue
			}
			select {
			case ch <- es:
			case <-ctx.Done():
				return
			}
		}
	}()
	a.log.Info("xray's access log followed: whose each connection is", "file", path)
	return fol, nil
}

// writeXrayPorts makes the TCP inbounds' ports pending in the kernel and
// tags the UIDs their listening sockets belong to. A connection to an
// inbound of plain TCP (Xray's "raw"), without the PROXY protocol, is
// held after its first 64 KiB until claimed: the address Xray logs is its
// socket's peer. On other transports (WebSocket, gRPC, XHTTP... often
// behind a proxy that passes the client's address in a header) the
// address may be another, so their connections are only claimed, never
// held.
func (a *Agent) writeXrayPorts() error {
	x := &a.xr.conns
	var hold, claimOnly []uint16
	for _, in := range a.xr.conf.Inbounds {
		if in.Port <= 0 || in.Port > 65535 || len(in.Users) == 0 {
			continue
		}
		switch {
		case in.Network == "kcp" || in.Network == "quic":
			// UDP transports: Xray counts them.
		case in.Network == "raw" && !in.ProxyProtocol:
			hold = append(hold, uint16(in.Port))
		default:
			claimOnly = append(claimOnly, uint16(in.Port))
		}
	}
	slices.Sort(hold)
	slices.Sort(claimOnly)
	hold, claimOnly = slices.Compact(hold), slices.Compact(claimOnly)
	if err := x.k.SetXrayPorts(hold, claimOnly); err != nil {
		return err
	}
	if !slices.Equal(hold, x.hold) || !slices.Equal(claimOnly, x.claimOnly) {
		a.log.Info("xray inbound ports pending in the kernel until their connections are claimed", "held", hold, "claimed only", claimOnly)
	}
	x.hold, x.claimOnly = hold, claimOnly
	ls, err := x.listeners(append(slices.Clone(hold), claimOnly...))
	if err != nil {
		return fmt.Errorf("find Xray's listening sockets: %w", err)
	}
	if x.tagged == nil {
		x.tagged = make(map[uint32]bool)
	}
	for _, l := range ls {
		if err := x.k.Tag(l.UID); err != nil {
			return err
		}
		if !x.tagged[l.UID] {
			x.tagged[l.UID] = true
			a.log.Info("xray's sockets looked up in the kernel", "uid", l.UID, "port", l.Local.Port())
		}
	}
	return nil
}

// claimXray writes a claim for each connection of the access log whose user
// is a client of the inbound that took it.
func (a *Agent) claimXray(es []xrayaccess.Entry, now time.Time) {
	x := &a.xr.conns
	if !x.active() || a.xr.conf == nil {
		return
	}
	// The batch's claims go to the kernel in one call; whose each one
	// is stays in x.claimOf, index for index.
	cs, of := x.batch[:0], x.claimOf[:0]
	for _, e := range es {
		if !a.xrayClientOf(e.Email, e.InboundTag) {
			x.strays++
			continue
		}
		in, ok := a.xr.conf.Inbound(e.InboundTag)
		if !ok || in.Port <= 0 || in.Port > 65535 {
			x.strays++
			continue
		}
		acct, err := x.k.Account(e.Email)
		if err != nil {
			a.logs.warnOnce("claim:account", "claiming an Xray connection in the kernel failed", "user", e.Email, "err", err)
			continue
		}
		cs = append(cs, bpf.Claim{Client: e.Source, LocalPort: uint16(in.Port), Account: acct})
		of = append(of, e.Email)
	}
	was := len(x.claims)
	for i := 0; i < len(cs); {
		n, err := x.k.ClaimAll(cs[i:])
		for j, c := range cs[i : i+n] {
			x.claims = append(x.claims, c)
			x.claimed++
			// A loopback peer is never held (see bpf's claims): it
			// can move more than xrayPendingMax before its claim.
			a.xr.claimed(of[i+j], c.Client.Addr().Unmap().IsLoopback())
		}
		i += n
		if err != nil && i < len(cs) {
			// That claim is lost; the others are not. (Warned once a
			// kind: the error names the client.)
			kind := "claim:kernel"
			if errors.Is(err, bpf.ErrInvalidClaim) {
				kind = "claim:invalid"
			}
			a.logs.warnOnce(kind, "claiming an Xray connection in the kernel failed", "user", of[i], "err", err)
			i++
		} else if n == 0 {
			break // nothing written and no error: a kernel that said nothing
		}
	}
	if n := len(x.claims) - was; n > 0 {
		x.claimRuns = append(x.claimRuns, claimRun{at: now.UnixNano(), n: n})
	}
	clear(of)
	x.batch, x.claimOf = cs[:0], of[:0]
}

// xrayClientOf reports whether email is a client of the inbound tagged tag
// in Xray's config.
func (a *Agent) xrayClientOf(email, tag string) bool {
	if email == "" || tag == "" {
		return false
	}
	for _, xu := range a.xr.users.of(email) {
		if xu.Inbound == tag {
			return true
		}
	}
	return false
}

// expireClaims takes back the claims no connection took within claimTTL,
// so that a later connection from the same address and port is never
// counted for a user by an old line. The tick does it, a claim staying up
// to an interval longer: the kernel's table of claims is read once for all
// those due (see bpf.Datapath.Unclaim).
func (a *Agent) expireClaims(now time.Time) {
	x := &a.xr.conns
	n, runs := 0, 0
	for _, r := range x.claimRuns {
		if now.UnixNano()-r.at < int64(claimTTL) {
			break
		}
		n += r.n
		runs++
	}
	if n == 0 {
		return
	}
	if _, err := x.k.Unclaim(x.claims[:n]); err != nil {
		// A claim left behind is pushed out of the kernel's table by
		// newer ones.
		a.logs.warnOnce("claim:unclaim", "taking back the Xray claims no connection took failed", "err", err)
	}
	x.claims = trimmed(slices.Delete(x.claims, 0, n))
	x.claimRuns = slices.Delete(x.claimRuns, 0, runs)
}

// chargeXray charges an Xray user what moved in the kernel's count of its
// connections (kern) and in Xray's own (xray). What the kernel counted is
// charged at once and owed by Xray's counters, which report the same bytes
// later; what Xray reports pays off the debt first, and only the rest, the
// bytes of connections the kernel did not count, is charged.
//
// Xray counts what it writes into a connection, not what reaches the
// client: when the kernel drops a connection's packets at the user's
// limit, or the connection is cut, what sat in its socket's buffer is in
// Xray's count and never moved. So for a user the kernel enforces (a
// kernel account, a budget or a block), Xray's surplus is charged only up
// to the limit: the kernel stopped the user there.
//
// The debt also keeps what the kernel counts and Xray never will: the
// TCP/IP headers and TLS records around Xray's payload. So that it does
// not pay for the user's uncounted connections forever, a debt is
// forgiven once neither count moved for longer than Xray keeps an idle
// connection open (its connIdle, and a minute): every connection of the
// user was closed then, and Xray has reported all of them.
func (a *Agent) chargeXray(u *user, now time.Time, kern, xray quota.Usage) {
	b := a.xr.baseOf(u.r.name)
	was := b.owed
	if now.Unix()-int64(b.moved) > int64(a.xrayIdle()/time.Second) {
		b.owed, b.credit = quota.Usage{}, quota.Usage{}
	}
	b.moved = unixSeconds(now.Unix())
	// What the kernel counted pays off the credit first: bytes Xray
	// reported before the kernel folded them (see below).
	paid := quota.Usage{Up: min(kern.Up, b.credit.Up), Down: min(kern.Down, b.credit.Down)}
	b.credit = quota.Usage{Up: b.credit.Up - paid.Up, Down: b.credit.Down - paid.Down}
	kern = quota.Usage{Up: kern.Up - paid.Up, Down: kern.Down - paid.Down}
	payUp, payDown := min(xray.Up, b.owed.Up), min(xray.Down, b.owed.Down)
	extra := quota.Usage{Up: xray.Up - payUp, Down: xray.Down - payDown}
	n, unheld := b.claimsSince(a.xr.reads)
	claims := uint64(n)
	if extra.Up+extra.Down > xrayPendingMax*(1+claims) && !unheld {
		// More than the first bytes of the user's new connections: some
		// of its traffic is Xray's alone to count. Read every tick.
		a.xr.excess = true
	}
	if room, ok := a.kernelRoom(u, kern); ok {
		extra = capUsage(extra, a.rules.Metric, room)
	}
	if claims > 0 && extra != (quota.Usage{}) {
		// A connection's first bytes are folded into the account when
		// its claim is taken, which can come after Xray reported them:
		// what Xray reports beyond the debt, up to xrayPendingMax for
		// each new connection (what a held one moves at most before
		// its claim; all of it after a loopback peer's, never held),
		// is credit the kernel's next bytes pay off rather than
		// charged twice. Credit mistaken for such bytes only delays
		// the charge of as many of the kernel's bytes to Xray's report
		// of them.
		most := xrayPendingMax * claims
		if unheld {
			most = math.MaxUint64
		}
		b.credit.Up = min(b.credit.Up+extra.Up, most)
		b.credit.Down = min(b.credit.Down+extra.Down, most)
	}
	d := kern.Add(extra)
	owed := quota.Usage{Up: b.owed.Up - payUp + kern.Up, Down: b.owed.Down - payDown + kern.Down}
	b.owed = owed
	if owed != was || paid != (quota.Usage{}) || claims > 0 && extra != (quota.Usage{}) {
		a.xr.queueBase(u.r.name, b, false)
	}
	if (d != quota.Usage{}) {
		a.charge(u, now, d)
	}
	if d != kern {
		// Xray counted bytes the kernel did not: the kernel budget is
		// what the limit leaves after every source, granted again.
		u.hasAnchor = false
	}
}

// xrayIdle is how long the user's counts must stand still before the
// debt is forgiven: Xray's connIdle and a minute.
func (a *Agent) xrayIdle() time.Duration {
	idle := 300 * time.Second
	if c := a.xr.conf; c != nil && c.ConnIdle > 0 {
		idle = c.ConnIdle
	}
	return idle + time.Minute
}

// kernelRoom returns what u's limit leaves after its usage and kern, when
// the kernel enforces u's limit on its Xray account (ok false otherwise).
func (a *Agent) kernelRoom(u *user, kern quota.Usage) (room uint64, ok bool) {
	xk := a.xr.conns.k
	if xk == nil {
		return 0, false
	}
	if _, has := xk.AccountOf(u.r.name); !has {
		return 0, false
	}
	t := u.r.terms()
	switch {
	case t.st.Enforced(t.plan, a.rules):
		return 0, true
	case t.st.Blocked: // throttled: over the limit, counted as it goes
	case t.plan.Limit == 0 || t.st.Override.Active:
		return 0, false
	}
	st := u.r.state()
	used := st.Used(a.rules) + a.rules.Metric.Of(kern)
	if used >= t.plan.Limit {
		return 0, true
	}
	return t.plan.Limit - used, true
}

// capUsage cuts u down so that m counts at most room of it (with the
// total metric, what is left after the upload goes to the download).
func capUsage(u quota.Usage, m quota.Metric, room uint64) quota.Usage {
	switch m {
	case quota.Upload:
		u.Up = min(u.Up, room)
	case quota.Download:
		u.Down = min(u.Down, room)
	default:
		u.Up = min(u.Up, room)
		u.Down = min(u.Down, room-u.Up)
	}
	return u
}
