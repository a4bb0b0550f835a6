package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/sockkill"
	"github.com/myvpn/bwagent/xrayaccess"
)

// The users' open Xray connections, for their devices (devices.go).
//
// Each line of Xray's access log names a connection: its client's address
// and port, the inbound and the user. The agent keeps each such connection
// as long as it is open: every tick it lists the TCP connections of the
// inbounds' ports (sock_diag) and ties each logged connection to its
// socket (by its cookie) at the first listing after its line; a connection
// whose socket is gone is forgotten. A logged connection whose socket is
// not there at that first listing (it closed already; or it came through
// a proxy in front of Xray that passed the client's address on, so the
// socket's peer is the proxy; or a UDP transport) counts for a minute
// after its line, as the issue asks of UDP, and cannot be cut.
//
// When the agent starts, the connections that were open before come back
// from the kernel where it counts Xray's connections (xrayconns.go): each
// claimed socket is attributed to its user's account (bw_sock), which the
// agent reads from Xray's own descriptors (pidfd_getfd), as package
// sshsess does for SSH sessions. Their start is unknown: they count as the
// oldest.

// Bounds of the table of Xray connections.
const (
	// xconnLinger is how long a logged connection whose socket was not
	// found counts for its device.
	xconnLinger = time.Minute
	// maxXconns bounds the connections kept; lines past it are not kept
	// (logged once) until connections close.
	maxXconns = 1 << 18
	// xliveListTicks is how often the inbounds' connections are listed
	// while no user has a device limit: for the devices shown (bwctl,
	// the usage files), not for a limit. With limits, every tick.
	xliveListTicks = 5
	// xliveFreshList is how many connections logged since the last
	// listing make the next tick list them sooner than xliveListTicks:
	// short connections are forgotten only by a listing, so this bounds
	// the table by what a few ticks bring (at 50,000 users with a tenth
	// opening one a tick, 25,000 closed connections, 5 MB, were kept
	// between two listings).
	xliveFreshList = 4096
)

// xconnKey is a logged connection: its client's address (IPv4 unmapped)
// and port, and the inbound's port.
type xconnKey struct {
	client netip.AddrPort
	port   uint16
}

// xconn is one open Xray connection of a user: 144 bytes, one for every
// connection open.
type xconn struct {
	key   xconnKey
	user  string
	proto quota.Protocol // the inbound's
	// since is when Xray logged it, Unix nanoseconds; zero for a
	// connection open before the agent started (recovered from the
	// kernel).
	since int64
	at    int64 // when the agent learnt of it, Unix nanoseconds
	// listed: the inbounds' connections were listed since its line; its
	// socket is tied to it then, or never.
	listed bool
	seen   uint32 // the listing (xlive.listings) that last found its socket
	// Its socket as listed, once tied (see tie and socket): the local
	// address, the kernel's cookie (zero until tied) and the device it
	// is bound to. Its peer is key's client.
	local   netip.AddrPort
	cookie  uint64
	ifindex uint32
}

// tie ties c to its socket s, as listed.
func (c *xconn) tie(s sockkill.Conn) {
	c.local, c.cookie, c.ifindex = s.Local, s.Cookie, s.Interface
}

// socket returns c's socket for sockkill.Destroy, as the kernel names it:
// its peer is the client of c's key, IPv4-mapped on a dual-stack socket
// (the key's is unmapped).
func (c *xconn) socket() sockkill.Conn {
	remote := c.key.client
	if c.local.Addr().Is4In6() && remote.Addr().Is4() {
		remote = netip.AddrPortFrom(netip.AddrFrom16(remote.Addr().As16()), remote.Port())
	}
	return sockkill.Conn{Local: c.local, Remote: remote, Cookie: c.cookie, Interface: c.ifindex}
}

// sinceTime returns since as a time, zero for zero.
func (c *xconn) sinceTime() time.Time {
	if c.since == 0 {
		return time.Time{}
	}
	return time.Unix(0, c.since)
}

// xlive are the users' open Xray connections, owned by the loop.
type xlive struct {
	// conns are the connections by key; byUser the same by user, in no
	// order: a user has a few, and a slice of them takes a tenth of a map's
	// memory (a map of up to eight entries takes 416 bytes: 20 MB at
	// 50,000 users).
	conns  map[xconnKey]*xconn
	byUser map[string][]*xconn
	// noted is noteXrayConns' set of a batch's users, kept for the next.
	noted map[string]bool
	// changed names the users whose connections came or went since the
	// last enforceDevices, which looks at them (and takes the set).
	changed map[string]struct{}
	// recovered is the follower whose start the kernel's attributions
	// were read at: a new follower (the agent's start, a new access log)
	// reads them again.
	recovered *follower
	listIn    int    // ticks to the next listing while no user has a device limit
	fresh     int    // connections put since the last listing (see xliveFreshList)
	listings  uint32 // the listings so far (see xconn.seen)
}

func (x *xlive) len() int { return len(x.conns) }

// put makes c the connection at k, replacing whatever was there (a
// connection that closed, whose client port and address came again).
func (x *xlive) put(k xconnKey, c *xconn) {
	if x.conns == nil {
		x.conns = make(map[xconnKey]*xconn)
		x.byUser = make(map[string][]*xconn)
	}
	if prev := x.conns[k]; prev != nil {
		x.drop(prev.user, k)
	}
	c.key = k
	x.fresh++
	x.conns[k] = c
	x.byUser[c.user] = append(x.byUser[c.user], c)
	x.touch(c.user)
}

// of returns user's connection k, or nil.
func (x *xlive) of(user string, k xconnKey) *xconn {
	if c := x.conns[k]; c != nil && c.user == user {
		return c
	}
	return nil
}

// touch notes that user's connections changed.
func (x *xlive) touch(user string) {
	if x.changed == nil {
		x.changed = make(map[string]struct{})
	}
	x.changed[user] = struct{}{}
}

// drop forgets user's connection k.
func (x *xlive) drop(user string, k xconnKey) {
	if x.of(user, k) == nil {
		return
	}
	delete(x.conns, k)
	cs := x.byUser[user]
	i := slices.IndexFunc(cs, func(c *xconn) bool { return c.key == k })
	x.touch(user)
	last := len(cs) - 1
	cs[i], cs[last] = cs[last], nil
	if last == 0 {
		delete(x.byUser, user)
	} else {
		x.byUser[user] = cs[:last]
	}
}

// noteXrayConns keeps the connections of the access log's lines whose user
// is a client of the inbound that took them, and applies the device limit
// of each user whose connections came at once: a refused device's new
// connection is cut within milliseconds of its line.
func (a *Agent) noteXrayConns(es []xrayaccess.Entry, now time.Time) {
	x := &a.dev.xconns
	if a.xr.conf == nil {
		return
	}
	if x.noted == nil {
		x.noted = make(map[string]bool)
	}
	users := x.noted
	defer clear(users)
	for _, e := range es {
		if !a.xrayClientOf(e.Email, e.InboundTag) || !e.Source.IsValid() {
			continue
		}
		in, ok := a.xr.conf.Inbound(e.InboundTag)
		if !ok || in.Port <= 0 || in.Port > 65535 {
			continue
		}
		if x.len() >= maxXconns {
			a.logs.warnOnce("xconns-full", "too many open Xray connections to follow their devices; new ones are left out until some close", "max", maxXconns)
			break
		}
		since := e.Time
		if since.IsZero() || since.After(now) || now.Sub(since) > xconnLinger {
			since = now // a clock off, or an old line: when the agent learnt of it
		}
		k := xconnKey{client: netip.AddrPortFrom(e.Source.Addr().Unmap(), e.Source.Port()), port: uint16(in.Port)}
		x.put(k, &xconn{user: e.Email, proto: in.Protocol, since: since.UnixNano(), at: now.UnixNano()})
		users[e.Email] = true
	}
	for name := range users {
		if u := a.users[name]; u != nil {
			a.limitUserDevices(u, now)
		}
	}
}

// syncXrayLive lists the TCP connections of the inbounds' ports and keeps
// the logged connections that are still open: each is tied to its socket
// at the first listing after its line, and forgotten when that socket is
// gone; one never tied is forgotten at once on a port the kernel holds
// (the logged address is the socket's peer there: it closed), and
// xconnLinger after its line elsewhere (behind a proxy the logged address
// may be no socket's). Where the
// kernel counts Xray's connections, the connections open before the
// follower started are read back from it first. While no user has a device
// limit, the listing (a walk of the kernel's TCP table) is every
// xliveListTicks ticks only, or sooner once xliveFreshList connections came.
func (a *Agent) syncXrayLive(now time.Time) error {
	x := &a.dev.xconns
	var errs []error
	if fol := a.xr.conns.fol; fol != nil && fol != x.recovered && a.xr.conns.active() {
		x.recovered = fol
		errs = append(errs, a.recoverXrayConns())
	}
	if x.len() == 0 {
		return errors.Join(errs...)
	}
	if x.listIn--; x.listIn > 0 && x.fresh < xliveFreshList && !a.devicesLimited() {
		return errors.Join(errs...)
	}
	x.listIn, x.fresh = xliveListTicks, 0
	seen := make(map[uint16]bool)
	var ports []uint16
	for k := range x.conns {
		if !seen[k.port] {
			seen[k.port] = true
			ports = append(ports, k.port)
		}
	}
	// Each socket is matched as the kernel's messages are read: a listing
	// held whole (112 bytes a socket, twice while its slice grew), with
	// maps of its sockets by cookie and by key, would take some 30 MB for
	// a moment at 100,000 open connections. Seen twice (a dump taken
	// again), a socket changes nothing more; one seen by a dump that was
	// then taken again, and closed before the second, is forgotten at the
	// next listing rather than this one.
	x.listings++
	listing := x.listings
	err := a.dev.socks.EachConn(ports, func(s sockkill.Conn) {
		c := x.conns[xconnKey{client: netip.AddrPortFrom(s.Remote.Addr().Unmap(), s.Remote.Port()), port: s.Local.Port()}]
		switch {
		case c == nil:
		case c.cookie != 0:
			if c.cookie == s.Cookie {
				c.seen = listing
			}
		case !c.listed && s.Cookie != 0:
			c.tie(s)
			c.listed, c.seen = true, listing
		}
	})
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("list Xray's connections: %w", err))...)
	}
	for k, c := range x.conns {
		switch {
		case c.cookie != 0:
			if c.seen != listing {
				x.drop(c.user, k) // closed
			}
		case !c.listed:
			c.listed = true
			if _, held := slices.BinarySearch(a.xr.conns.hold, k.port); held {
				// On a held port the logged address is the socket's
				// peer: not listed, it closed already.
				x.drop(c.user, k)
			}
		case now.UnixNano()-c.at > int64(xconnLinger):
			x.drop(c.user, k)
		}
	}
	return errors.Join(errs...)
}

// recoverXrayConns reads back, from the kernel's attributions of Xray's
// sockets, the users' connections that were open before the access log was
// followed: each socket of an inbound's port that the kernel counts for a
// user's account. It borrows them from the processes that hold them (Xray)
// with pidfd_getfd, once per follower.
func (a *Agent) recoverXrayConns() error {
	xk, conf := a.xr.conns.k, a.xr.conf
	if xk == nil || conf == nil {
		return nil
	}
	protos := make(map[uint16]quota.Protocol)
	for _, in := range conf.Inbounds {
		if in.Port > 0 && in.Port <= 65535 && len(in.Users) > 0 {
			protos[uint16(in.Port)] = in.Protocol
		}
	}
	ports := make([]uint16, 0, len(protos))
	for p := range protos {
		ports = append(ports, p)
	}
	conns, err := a.dev.socks.Conns(ports, false)
	if err != nil {
		return fmt.Errorf("list Xray's connections: %w", err)
	}
	byInode := make(map[uint64]sockkill.Conn, len(conns))
	for _, c := range conns {
		if c.Inode != 0 {
			byInode[c.Inode] = c
		}
	}
	found := 0
	err = borrowSockets("/proc", byInode, func(inode uint64, fd int) {
		at, ok, err := xk.SocketAttribution(fd)
		if err != nil || !ok || at.Pending || at.Forward || !at.Server || at.UID < bpf.AccountBase {
			return
		}
		name, ok := xk.AccountName(at.UID)
		if !ok {
			return
		}
		c := byInode[inode]
		k := xconnKey{client: netip.AddrPortFrom(c.Remote.Addr().Unmap(), c.Remote.Port()), port: c.Local.Port()}
		if a.dev.xconns.conns[k] != nil {
			return
		}
		xc := &xconn{user: name, proto: protos[k.port], listed: true}
		xc.tie(c)
		a.dev.xconns.put(k, xc)
		found++
	})
	if found > 0 {
		a.log.Info("xray connections open before the agent started, read back from the kernel", "connections", found)
	}
	if err != nil {
		return fmt.Errorf("read back Xray's open connections: %w", err)
	}
	return nil
}

// borrowSockets calls fn with a duplicate (pidfd_getfd) of each socket of
// inodes that a process holds, once per socket, and closes it after. It
// looks at every process's descriptors under proc.
func borrowSockets(proc string, inodes map[uint64]sockkill.Conn, fn func(inode uint64, fd int)) error {
	if len(inodes) == 0 {
		return nil
	}
	dir, err := os.ReadDir(proc)
	if err != nil {
		return fmt.Errorf("list processes: %w", err)
	}
	done := make(map[uint64]bool, len(inodes))
	var errs []error
	for _, e := range dir {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 0 {
			continue
		}
		fdDir := filepath.Join(proc, e.Name(), "fd")
		fds, err := os.ReadDir(fdDir)
		if err != nil {
			continue // gone, or a kernel thread
		}
		type held struct {
			fd    int
			inode uint64
		}
		var hs []held
		for _, f := range fds {
			target, err := os.Readlink(filepath.Join(fdDir, f.Name()))
			if err != nil {
				continue
			}
			s, ok := strings.CutPrefix(target, "socket:[")
			if !ok {
				continue
			}
			inode, err := strconv.ParseUint(strings.TrimSuffix(s, "]"), 10, 64)
			if _, want := inodes[inode]; err != nil || !want || done[inode] {
				continue
			}
			if fd, err := strconv.Atoi(f.Name()); err == nil {
				hs = append(hs, held{fd, inode})
			}
		}
		if len(hs) == 0 {
			continue
		}
		pidfd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			errs = append(errs, fmt.Errorf("pidfd_open %d: %w", pid, err))
			continue
		}
		for _, h := range hs {
			nfd, err := unix.PidfdGetfd(pidfd, h.fd, 0)
			if err != nil {
				continue // closed meanwhile
			}
			done[h.inode] = true
			fn(h.inode, nfd)
			unix.Close(nfd)
		}
		unix.Close(pidfd)
		if len(done) == len(inodes) {
			break
		}
	}
	return errors.Join(errs...)
}
