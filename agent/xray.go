package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/xrayconf"
	"github.com/myvpn/bwagent/xraystats"
)

// XrayAPI is the part of xraystats.Client the loop drives.
type XrayAPI interface {
	SysStats(ctx context.Context) (xraystats.SysStats, error)
	UserTraffic(ctx context.Context) (map[string]xraystats.Traffic, error)
	AddUser(ctx context.Context, inboundTag, email string, acct xraystats.Account) error
	RemoveUser(ctx context.Context, inboundTag, email string) error
	OnlineIPs(ctx context.Context, email string) (map[string]int64, error)
	InboundUsers(ctx context.Context, inboundTag string) ([]string, error)
	Close() error
}

// xrayVerifyTicks is how often the agent lists the inbounds of blocked users
// to find one someone added back (a panel, a manual API call): every 5th
// tick, one call per such inbound.
const xrayVerifyTicks = 5

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
}

// xrayState is the agent's view of Xray.
type xrayState struct {
	conf    *xrayconf.Config
	users   map[string][]xrayconf.User // email → one entry per inbound
	api     XrayAPI
	apiAddr string

	// The counters' epoch: Xray's start, from its uptime, kept while
	// consecutive reads agree on it within a few seconds.
	start time.Time
	epoch string
	sys   xraystats.SysStats // the last read, whose totals only grow within one Xray

	// removed are the users the agent has taken out of Xray's inbounds (and
	// must put back when they are unblocked), as far as this Xray process
	// goes: a restart reloads every user from the config.
	removed map[string]bool
	// verifyIn counts the ticks to the next listing of the inbounds.
	verifyIn int
}

// xrayEpochSlack is how far two estimates of Xray's start (now - uptime,
// with uptime in whole seconds) may differ and still be the same process.
const xrayEpochSlack = 3 * time.Second

// xraySource is the baseline key of an Xray user's counters.
func xraySource(email string) string { return "xray:" + email }

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
	traffic, err := a.xr.api.UserTraffic(cctx)
	if err != nil {
		return confErr, err
	}
	for email, t := range traffic {
		u := a.users[email]
		if u == nil || !u.proto.Xray() || !u.present {
			continue
		}
		src := xraySource(email)
		cur := quota.Sample{Epoch: a.xr.epoch, Up: uint64(max(t.Uplink, 0)), Down: uint64(max(t.Downlink, 0))}
		b := a.otherBase[src]
		if b == nil {
			b = &baseline{}
			a.otherBase[src] = b
		}
		if b.Sample == cur {
			continue
		}
		d := quota.Since(b.Sample, cur)
		if !b.dirty {
			a.otherQ = append(a.otherQ, src)
		}
		b.Sample, b.dirty = cur, true
		if (d != quota.Usage{}) {
			a.charge(u, now, d)
		}
	}
	return confErr, nil
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
	epoch := "xray@" + strconv.FormatInt(start.Unix(), 10) + "." + strconv.FormatUint(sys.Mallocs, 10)
	if a.xr.start.IsZero() {
		for src, b := range a.otherBase {
			if !strings.HasPrefix(src, "xray:") {
				continue
			}
			if rest, ok := strings.CutPrefix(b.Epoch, "xray@"); ok {
				sec, _, _ := strings.Cut(rest, ".")
				if n, err := strconv.ParseInt(sec, 10, 64); err == nil && absDur(start.Sub(time.Unix(n, 0))) <= xrayEpochSlack {
					epoch = b.Epoch
					break
				}
			}
		}
	} else {
		a.log.Warn("xray restarted: its counters start from zero; blocked users are removed again", "uptime", uptime)
	}
	a.xr.start, a.xr.epoch = start, epoch
	clear(a.xr.removed)
}

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
		a.warnOnce("xray-none", "no xray config found; xray users are not accounted", "err", err)
		return nil
	}
	if err != nil {
		return err
	}
	for _, p := range conf.Problems {
		a.warnOnce("xrayconf:"+p.String(), "xray config: "+p.String())
	}
	if !conf.Stats || !conf.UserStats {
		a.warnOnce("xray-nostats", "xray config does not count users' traffic: add \"stats\": {} and policy.levels.\"0\" statsUserUplink and statsUserDownlink true", "files", conf.Files)
	}
	byEmail := make(map[string][]xrayconf.User)
	for _, xu := range conf.Users() {
		byEmail[xu.Email] = append(byEmail[xu.Email], xu)
	}
	for email, xus := range byEmail {
		u := a.users[email]
		switch {
		case u == nil:
			u = &user{name: email, proto: xus[0].Protocol, plan: a.plans[email]}
			delete(a.plans, email)
			a.users[email] = u
			a.touch(u, now, jsonUrgent)
		case u.proto == quota.SSH && u.present:
			a.warnOnce("clash:"+email, "an Xray user has the name of an SSH account; the Xray user is not accounted", "name", email)
			delete(byEmail, email)
			continue
		}
		if !u.present || u.proto != xus[0].Protocol {
			u.present, u.proto = true, xus[0].Protocol
			a.touch(u, now, jsonUrgent)
		}
		a.queue(u)
	}
	for name, u := range a.users {
		if u.proto.Xray() && u.present && byEmail[name] == nil {
			u.present = false // gone from the config; the record and usage stay
			a.markersDirty = true
		}
	}
	a.xr.conf, a.xr.users = conf, byEmail
	return nil
}

// enforceXray makes Xray's inbounds hold exactly the users who are not
// blocked: a blocked user is removed from every inbound that has them and
// their connections are cut; an unblocked one is added back with the
// account from the config.
func (a *Agent) enforceXray(ctx context.Context) error {
	if !a.cfg.Xray.Enabled || a.xr.api == nil || a.xr.epoch == "" {
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, a.cfg.Xray.Timeout)
	defer cancel()
	var errs []error
	if a.xr.verifyIn--; a.xr.verifyIn <= 0 {
		a.xr.verifyIn = xrayVerifyTicks
		errs = append(errs, a.verifyXrayRemoved(cctx))
	}
	for email, xus := range a.xr.users {
		u := a.users[email]
		if u == nil {
			continue
		}
		switch {
		case u.st.Blocked && !a.xr.removed[email]:
			if err := a.removeXrayUser(cctx, email, xus); err != nil {
				errs = append(errs, err)
				continue
			}
			a.xr.removed[email] = true
		case !u.st.Blocked && a.xr.removed[email]:
			if err := a.addXrayUser(cctx, email, xus); err != nil {
				errs = append(errs, err)
				continue
			}
			delete(a.xr.removed, email)
		}
	}
	return errors.Join(errs...)
}

// verifyXrayRemoved lists the inbounds that should be without a removed
// user and forgets the removal of any user found back in one, so this tick
// removes them again.
func (a *Agent) verifyXrayRemoved(ctx context.Context) error {
	inbounds := make(map[string]bool)
	for email := range a.xr.removed {
		for _, xu := range a.xr.users[email] {
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
			}
		}
	}
	return nil
}

func (a *Agent) removeXrayUser(ctx context.Context, email string, xus []xrayconf.User) error {
	var ports []uint16
	for _, xu := range xus {
		if !xu.Alterable() {
			a.warnOnce("unalterable:"+email+"/"+xu.Inbound, "xray user cannot be removed through the API (untagged inbound or single-user Shadowsocks 2022); not blocked there", "user", email, "inbound", xu.Inbound)
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
// open ones of a removed user. Only source addresses no other online user
// has are cut, so nobody else loses a connection.
func (a *Agent) cutXrayUser(ctx context.Context, email string, ports []uint16) {
	if a.xray.Cut == nil || len(ports) == 0 {
		return
	}
	ips, err := a.xr.api.OnlineIPs(ctx, email)
	if err != nil || len(ips) == 0 {
		return
	}
	// Users who moved bytes lately may be online; asking Xray about every
	// user would cost a call each.
	recent := quota.At(a.now().Add(-time.Minute))
	shared := make(map[string]bool)
	for other := range a.xr.users {
		if other == email || a.xr.removed[other] {
			continue
		}
		if u := a.users[other]; u == nil || u.st.Blocked || u.updated < recent {
			continue
		}
		theirs, err := a.xr.api.OnlineIPs(ctx, other)
		if err != nil {
			continue
		}
		for ip := range theirs {
			shared[ip] = true
		}
	}
	var remotes []netip.Addr
	for ip := range ips {
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

func (a *Agent) addXrayUser(ctx context.Context, email string, xus []xrayconf.User) error {
	for _, xu := range xus {
		if !xu.Alterable() {
			continue
		}
		if err := a.xr.api.AddUser(ctx, xu.Inbound, email, xu.Account); err != nil && !errors.Is(err, xraystats.ErrExists) {
			return err
		}
	}
	a.log.Info("xray user added back to its inbounds", "user", email, "inbounds", len(xus))
	return nil
}
