package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/devices"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/sockkill"
	"github.com/myvpn/bwagent/sshsess"
	"github.com/myvpn/bwagent/store"
	"github.com/myvpn/bwagent/view"
)

// Device limits.
//
// A user's devices are derived, every tick, from what owns the user's open
// connections: the SSH sessions (package sshsess's Tracker) and the Xray
// connections of the access log (xraydevices.go); package devices groups
// them by client address and decides which devices a limit leaves out. The
// loop owns only what is decided on top: which devices are refused. A
// refused device's connections are cut (an SSH session's socket destroyed,
// which ends the session; an Xray connection's socket destroyed by its
// cookie), and its new ones too while the user has their allowed number of
// other devices; nobody else's connection is touched, no address is
// banned, no server restarted. The first cut of a refusal is an event (the
// block log, notifications); the user's status does not change.
//
// The limit is applied at every tick, and at once when a user's new
// connection comes between ticks (an SSH login attributed, an access log
// line), so a refused device's new connection is cut within milliseconds.

// Sockets lists and destroys the TCP connections of servers' ports:
// package sockkill's, in the agent's network namespace. The interface
// exists so that the table tests can fake the kernel's sockets.
type Sockets interface {
	// Conns returns the connections (no listeners) to the local ports,
	// from any address, with their byte counts if bytes is set.
	Conns(ports []uint16, bytes bool) ([]sockkill.Conn, error)
	// EachConn calls fn with each connection Conns(ports, false) lists,
	// as the kernel gives them, without holding them all; fn may see one
	// twice (sockkill.Each).
	EachConn(ports []uint16, fn func(sockkill.Conn)) error
	// Destroy destroys the sockets, named by their cookies, and returns
	// how many it destroyed.
	Destroy(conns []sockkill.Conn) (int, error)
}

// kernelSockets is Sockets over package sockkill.
type kernelSockets struct{}

var _ Sockets = kernelSockets{}

func (kernelSockets) Conns(ports []uint16, bytes bool) ([]sockkill.Conn, error) {
	return sockkill.List(sockkill.Filter{LocalPorts: ports, AnyRemote: true, Bytes: bytes})
}

func (kernelSockets) EachConn(ports []uint16, fn func(sockkill.Conn)) error {
	return sockkill.Each(sockkill.Filter{LocalPorts: ports, AnyRemote: true}, fn)
}

func (kernelSockets) Destroy(conns []sockkill.Conn) (int, error) { return sockkill.Destroy(conns) }

// refusalLinger is how long a refused device stays refused once it has no
// connection left: a client that reconnects within it is cut again, with
// no new event; one that comes back later is a new device.
const refusalLinger = time.Minute

// deviceSide is the loop's part for device limits.
type deviceSide struct {
	socks Sockets // constant after New

	// Owned by the loop.
	xconns  xlive                               // the users' open Xray connections
	refused map[string]map[devices.Key]*refusal // by user
	// sshHeld are the users with an SSH device as of the last tick: their
	// sessions may end without a change the loop sees otherwise.
	sshHeld map[*user]struct{}
	// all makes the next enforceDevices look at every user (at start,
	// after a new config or limits file), not only those whose
	// connections or records changed; look is its reused set.
	all  bool
	look map[*user]struct{}
	// limitedLines counts the limits file's lines with a device limit
	// (loadLimits).
	limitedLines int
	// conns and plain are the room connsOf and limitDevices reuse for
	// one user at a time: nothing keeps them after limitDevices (their
	// old entries hold addresses and ports, nothing to let go of).
	conns []userConn
	plain []devices.Conn
}

// refusal is a device refused for its user's device limit.
type refusal struct {
	last   time.Time // when it was last cut or found refused
	logged bool      // its first cut is an event already
}

// userConn is one open connection of a user, and how to cut it.
type userConn struct {
	devices.Conn
	port uint16   // the server's port
	pid  int      // an SSH session's process; 0 for an Xray connection
	xkey xconnKey // an Xray connection's
}

// liveDevice is a device as published: its view without its bytes, and
// its connections, whose bytes a reader asks the kernel for.
type liveDevice struct {
	v     view.Device
	conns []connRef
}

// connRef is a connection of a device: the server's port and the client.
type connRef struct {
	port   uint16
	client netip.AddrPort
}

// deviceLimit returns how many devices the user of r may have; 0 is no
// limit.
func (a *Agent) deviceLimit(r *record) int {
	return r.plan().Devices.Of(int(a.cfg.Devices.Default))
}

// devicesLimited reports whether a user may have a device limit: the
// configured default, or a line of the limits file.
func (a *Agent) devicesLimited() bool {
	return a.cfg.Devices.Default > 0 || a.dev.limitedLines > 0
}

// which returns the configured choice of the device to cut.
func (a *Agent) which() devices.Which {
	if a.cfg.Devices.Cut == config.CutOldest {
		return devices.Oldest
	}
	return devices.Newest
}

// connsOf returns u's open connections: its SSH sessions and its Xray
// connections.
//
// The result is valid until the next call: it reuses its room.
func (a *Agent) connsOf(u *user) []userConn {
	out := a.dev.conns[:0]
	defer func() { a.dev.conns = out[:0] }()
	if r := u.r; r.ssh && a.byUID[r.uid] == u && a.sess.tr != nil {
		for _, s := range a.sess.tr.Sessions(r.uid) {
			out = append(out, sessionConn(s))
		}
	}
	for _, c := range a.dev.xconns.byUser[u.r.name] {
		out = append(out, xrayConn(c.key, c))
	}
	return out
}

func sessionConn(s sshsess.Session) userConn {
	return userConn{Conn: devices.Conn{Client: s.Remote, Server: s.Local.Addr(), Proto: quota.SSH, Since: s.Start}, port: s.Local.Port(), pid: s.PID}
}

func xrayConn(k xconnKey, c *xconn) userConn {
	return userConn{Conn: devices.Conn{Client: k.client, Server: c.local.Addr(), Proto: c.proto, Since: c.sinceTime()}, port: k.port, xkey: k}
}

// limitUserDevices applies u's device limit to u's connections now,
// between ticks: when a new connection of u came.
func (a *Agent) limitUserDevices(u *user, now time.Time) {
	if a.deviceLimit(u.r) == 0 || u.r.blocked(a.rules) || !u.r.present() {
		return
	}
	if _, err := a.limitDevices(u, a.connsOf(u), now); err != nil {
		a.logs.report("device limits", err) // the tick's report clears it once it works again
	}
}

// limitDevices applies u's device limit to conns, u's open connections:
// it cuts the connections of the devices refused, records the first cut
// of each refusal, and returns u's devices that are left, with their
// connections, oldest first.
func (a *Agent) limitDevices(u *user, conns []userConn, now time.Time) ([]liveDevice, error) {
	if len(conns) == 0 {
		return nil, nil // no device: nothing allowed, nothing to cut
	}
	bits := int(a.cfg.Devices.IPv6Prefix)
	plain := a.dev.plain[:0]
	for _, c := range conns {
		plain = append(plain, c.Conn)
	}
	devs := devices.Group(plain, bits)
	clear(plain)
	a.dev.plain = plain[:0]
	n := a.deviceLimit(u.r)
	name := u.r.name
	ref := a.dev.refused[name]
	var verdicts []devices.Verdict
	if n > 0 && !u.r.blocked(a.rules) && u.r.present() {
		verdicts = devices.Limit(devs, n, a.which(), func(k devices.Key) bool { return ref[k] != nil })
	}
	var errs []error
	var left []liveDevice
	for i, d := range devs {
		v := devices.Allowed
		if verdicts != nil {
			v = verdicts[i]
		}
		if v == devices.Allowed {
			if ref[d.Key] != nil {
				delete(ref, d.Key) // room again
				a.log.Info("device no longer refused: the user has room for it", "user", name, "device", d.Key.String())
			}
			left = append(left, liveOf(d, conns, false))
			continue
		}
		if ref == nil {
			ref = make(map[devices.Key]*refusal)
			if a.dev.refused == nil {
				a.dev.refused = make(map[string]map[devices.Key]*refusal)
			}
			a.dev.refused[name] = ref
		}
		rf := ref[d.Key]
		if rf == nil {
			rf = &refusal{}
			ref[d.Key] = rf
		}
		rf.last = now
		cut, uncut, err := a.cutDevice(u, d, conns)
		if err != nil {
			errs = append(errs, fmt.Errorf("cut device %s of %s: %w", d.Key, name, err))
		}
		if uncut > 0 {
			a.logs.warnOnce("nocut:"+name+"/"+d.Key.String(), "a refused device's connections cannot be cut (through a proxy in front of Xray, or a UDP transport): it stays connected",
				"user", name, "device", d.Key.String(), "connections", uncut)
			ld := liveOf(d, conns, true)
			ld.v.Connections = uncut
			left = append(left, ld)
		}
		if cut == 0 {
			continue
		}
		if !rf.logged {
			rf.logged = true
			a.deviceEvent(u, d.Key, now)
		}
		a.log.Info("device over the user's device limit cut", "user", name, "device", d.Key.String(),
			"connections", cut, "devices", len(devs), "limit", n, "again", v == devices.StillRefused)
	}
	return left, errors.Join(errs...)
}

// liveOf returns device d of conns as published.
func liveOf(d devices.Device, conns []userConn, refused bool) liveDevice {
	ld := liveDevice{v: view.Device{Address: d.Key.String(), Protocols: d.Protocols, Connections: len(d.Conns), Since: d.Since, Refused: refused}}
	for _, i := range d.Conns {
		ld.conns = append(ld.conns, connRef{port: conns[i].port, client: conns[i].Client})
	}
	return ld
}

// deviceEvent records the cut of u's device: one line of the block log
// ("Device Limit Exceeded (ADDRESS)") and a notification; u's status is
// unchanged.
func (a *Agent) deviceEvent(u *user, k devices.Key, now time.Time) {
	r := u.r
	reason := quota.ReasonDevices + " (" + k.String() + ")"
	e := store.Event{Time: now, Protocol: string(r.proto()), Name: r.name, Action: quota.ActDevice, Reason: reason}
	a.noteEvent(u, &e)
	a.rec.events = append(a.rec.events, e)
	a.log.Info("user "+quota.ActDevice, "user", r.name, "protocol", r.proto(), "reason", reason)
	a.obs.Event(r.proto(), quota.ActDevice, reason)
}

// cutDevice cuts u's connections of device d: its SSH sessions (their
// sockets destroyed, which ends the sessions) and its Xray connections
// (their sockets destroyed by cookie). It returns how many it cut and how
// many it could not: Xray connections whose socket is not the client's (a
// proxy in front of Xray, a UDP transport).
func (a *Agent) cutDevice(u *user, d devices.Device, conns []userConn) (cut, uncut int, err error) {
	var errs []error
	var xs []xconnKey
	for _, i := range d.Conns {
		c := conns[i]
		if c.pid == 0 {
			xs = append(xs, c.xkey)
			continue
		}
		if a.sess.tr == nil {
			continue
		}
		ok, err := a.sess.tr.CutSession(c.pid)
		if err != nil {
			errs = append(errs, err)
		}
		if ok {
			cut++
		}
	}
	if len(xs) > 0 {
		n, left, err := a.cutXrayConns(u.r.name, xs)
		cut, uncut = cut+n, left
		errs = append(errs, err)
	}
	return cut, uncut, errors.Join(errs...)
}

// cutXrayConns destroys the sockets of user's Xray connections ks: those
// tied to their socket by its cookie, and those whose line came since the
// last listing, found now by their client's address and port on the
// inbound's port. A connection never tied to a socket cannot be cut.
func (a *Agent) cutXrayConns(user string, ks []xconnKey) (cut, uncut int, err error) {
	x := &a.dev.xconns
	var socks []sockkill.Conn
	var fresh []xconnKey
	for _, k := range ks {
		c := x.of(user, k)
		switch {
		case c == nil:
		case c.cookie != 0:
			socks = append(socks, c.socket())
		case !c.listed:
			fresh = append(fresh, k)
		default:
			uncut++
		}
	}
	if len(fresh) > 0 {
		var ports []uint16
		for _, k := range fresh {
			if !slices.Contains(ports, k.port) {
				ports = append(ports, k.port)
			}
		}
		conns, err := a.dev.socks.Conns(ports, false)
		if err != nil {
			return 0, uncut + len(fresh), fmt.Errorf("list Xray's connections: %w", err)
		}
		byKey := make(map[xconnKey]sockkill.Conn, len(conns))
		for _, s := range conns {
			byKey[xconnKey{client: netip.AddrPortFrom(s.Remote.Addr().Unmap(), s.Remote.Port()), port: s.Local.Port()}] = s
		}
		for _, k := range fresh {
			s, ok := byKey[k]
			if !ok || s.Cookie == 0 {
				x.of(user, k).listed = true // closed already, or not the client's socket
				uncut++
				continue
			}
			socks = append(socks, s)
		}
	}
	if len(socks) == 0 {
		return 0, uncut, nil
	}
	n, err := a.dev.socks.Destroy(socks)
	for _, s := range socks {
		// Destroyed, or gone already: closed either way.
		x.drop(user, xconnKey{client: netip.AddrPortFrom(s.Remote.Addr().Unmap(), s.Remote.Port()), port: s.Local.Port()})
	}
	return n, uncut, err
}

// enforceDevices applies the device limits to the users whose devices may
// have changed since the last tick, forgets the refusals that ended, and
// publishes every user's devices. A user's devices change only with their
// connections (their Xray connections came or went, they have SSH
// sessions, or had SSH devices), their record (plan, status) or a refusal;
// every user is looked at after a new config or limits file. So a tick
// costs what changed, not every open connection.
func (a *Agent) enforceDevices(now time.Time) error {
	if a.dev.look == nil {
		a.dev.look = make(map[*user]struct{})
		a.dev.all = true
	}
	look := a.dev.look
	clear(look)
	mark := func(u *user) {
		if u != nil {
			look[u] = struct{}{}
		}
	}
	if a.dev.all {
		a.dev.all = false
		for _, u := range a.users {
			mark(u)
		}
	}
	x := &a.dev.xconns
	for name := range x.changed {
		mark(a.users[name])
	}
	clear(x.changed)
	if a.sess.tr != nil {
		a.sess.tr.EachSession(func(s sshsess.Session) { mark(a.byUID[s.UID]) })
	}
	for _, u := range a.work.dirtyQ {
		mark(u)
	}
	for name := range a.dev.refused {
		mark(a.users[name])
	}
	if a.dev.sshHeld == nil {
		a.dev.sshHeld = make(map[*user]struct{})
	}
	for u := range a.dev.sshHeld {
		if a.users[u.r.name] != u {
			delete(a.dev.sshHeld, u) // forgotten, and its record with it
			continue
		}
		mark(u) // its sessions may have ended
	}

	var errs []error
	for u := range look {
		left, err := a.limitDevices(u, a.connsOf(u), now)
		errs = append(errs, err)
		if sameDevices(u.r.devices(), left) {
			continue
		}
		if len(left) != len(u.r.devices()) {
			a.markJSON(u, jsonLazy)
		}
		var devs *[]liveDevice
		if len(left) > 0 {
			devs = &left
		}
		a.edit(u).devs = devs
		delete(a.dev.sshHeld, u)
		for _, d := range left {
			if slices.Contains(d.v.Protocols, quota.SSH) {
				a.dev.sshHeld[u] = struct{}{}
				break
			}
		}
	}
	clear(look)
	for name, ref := range a.dev.refused {
		u := a.users[name]
		for k, rf := range ref {
			if u == nil || a.deviceLimit(u.r) == 0 || now.Sub(rf.last) > refusalLinger {
				delete(ref, k)
			}
		}
		if len(ref) == 0 {
			delete(a.dev.refused, name)
		}
	}
	return errors.Join(errs...)
}

// sameDevices reports whether two lists of a user's devices show the same.
func sameDevices(x, y []liveDevice) bool {
	return slices.EqualFunc(x, y, func(a, b liveDevice) bool {
		return a.v.Address == b.v.Address && a.v.Connections == b.v.Connections && a.v.Since.Equal(b.v.Since) &&
			a.v.Refused == b.v.Refused && slices.Equal(a.v.Protocols, b.v.Protocols)
	})
}

// Devices returns the user's devices as of the last tick, oldest first,
// with the bytes their open connections moved so far, read from the kernel
// now (TCP payload both ways; 0 for a connection outside the agent's
// network namespace, or whose socket is not the client's).
func (a *Agent) Devices(ctx context.Context, name string) ([]view.Device, error) {
	s := a.pub.snap.Load()
	r, err := s.lookup(name)
	if err != nil {
		return nil, err
	}
	ld := r.devices()
	out := make([]view.Device, len(ld))
	var ports []uint16
	for i, d := range ld {
		out[i] = d.v
		for _, c := range d.conns {
			if !slices.Contains(ports, c.port) {
				ports = append(ports, c.port)
			}
		}
	}
	if len(ports) == 0 {
		return out, ctx.Err()
	}
	conns, err := a.dev.socks.Conns(ports, true)
	if err != nil {
		return out, fmt.Errorf("bytes of the devices' connections: %w", err)
	}
	moved := make(map[connRef]uint64, len(conns))
	for _, c := range conns {
		moved[connRef{port: c.Local.Port(), client: netip.AddrPortFrom(c.Remote.Addr().Unmap(), c.Remote.Port())}] += c.BytesSent + c.BytesReceived
	}
	for i, d := range ld {
		for _, c := range d.conns {
			out[i].Bytes += moved[connRef{port: c.port, client: netip.AddrPortFrom(c.client.Addr().Unmap(), c.client.Port())}]
		}
	}
	return out, ctx.Err()
}
