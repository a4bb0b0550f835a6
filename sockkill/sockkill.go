// Package sockkill finds TCP connections with the kernel's sock_diag
// interface and destroys them (SOCK_DESTROY, what `ss -K` does).
//
// The agent uses it to cut the live connections of a blocked Xray user: all
// Xray users share one process, so nothing but their address tells their
// sockets apart, and removing a user from Xray's inbounds does not close the
// connections the user already has. [Cut] destroys the sockets of the Xray
// inbound ports whose remote address is one of the user's (optionally only
// those of Xray's UID). Deciding which addresses are safe to cut, e.g. that
// no other online user shares one, is the caller's business: this package
// destroys exactly what it is asked to.
//
// # What a destroyed socket does
//
// Destroying a connected socket aborts it in the kernel at once (tcp_abort,
// with ECONNABORTED): the kernel sends the peer a RST and closes the socket.
// The descriptor stays open until the process that holds it (Xray) closes
// it; that process sees the error on its next call: a read it is blocked in
// returns ECONNABORTED at once, after that reads see end of file and writes
// EPIPE. The peer (the user's client) sees ECONNRESET on its next read.
// Other connections, from other addresses or to other ports, and the
// listening socket are not disturbed. The tests check all of this on the
// kernel they run on (6.18), over IPv4, IPv6 and a dual-stack listener.
//
// # What it can do
//
//   - TCP over IPv4 and IPv6, including IPv4 clients of a dual-stack
//     listener (Go's, and so Xray's, default), whose sockets the kernel
//     reports as IPv6 with IPv4-mapped addresses (::ffff:a.b.c.d): a remote
//     address matches in either form.
//   - Connections in any state but LISTEN and TIME_WAIT: established ones,
//     ones that are closing (CLOSE_WAIT and the like), ones not yet
//     accepted by Xray.
//   - Filter by local port (the inbound ports), remote address and owning
//     UID (the socket's idiag_uid: the UID that created the listening
//     socket, inherited by every connection it accepts).
//   - List every connection of some local ports, from any address
//     (Filter.AnyRemote), with each socket's byte counts (Filter.Bytes):
//     how the agent follows the Xray connections of the users' devices and
//     shows what each device moved.
//   - Any network namespace, through a [Handle] opened in it (Xray in a
//     container).
//
// # What it cannot do
//
//   - Tell users apart behind one address (NAT, a shared proxy): it cuts
//     every connection from the address.
//   - See the user when something stands between the user and the socket
//     that is listed: behind a reverse proxy on the same host (nginx in
//     front of a WebSocket or gRPC inbound) the user's connection ends at
//     the proxy, so the filter must name the proxy's port and UID, not
//     Xray's; behind a CDN the user's address never reaches the host at
//     all.
//   - Cut UDP transports (QUIC, mKCP, Shadowsocks UDP, XHTTP over HTTP/3):
//     their server side is one socket shared by every peer.
//   - Stop the user from reconnecting: the caller removes the user from
//     Xray first, so that new connections fail authentication, and then
//     cuts. [Cut] is not atomic: a connection accepted after its listing is
//     not cut.
//   - Work without CAP_NET_ADMIN (in the user namespace that owns the
//     socket's network namespace): listing needs no privilege, destroying
//     fails with [ErrPermission]. A kernel built without
//     CONFIG_INET_DIAG_DESTROY fails with [ErrNotSupported].
//
// Destroying is precise: a [Conn] from [List] carries the socket's cookie,
// a number the kernel gives no other socket, and Destroy names the socket
// by it, so a connection that closed after it was listed is skipped, never
// mistaken for another socket. [Destroy] explains why this matters.
//
// # Cost
//
// [List] has the kernel walk its whole TCP table once per address family
// (once for IPv4 and once for IPv6, since IPv4 clients can be in either),
// whatever the filter; with a single local port the kernel sends only that
// port's sockets. With 5000 connections in the namespace a List took about
// 10 ms on the test VM. [Destroy] costs one netlink round trip per socket.
package sockkill

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"sync"
	"time"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Sentinel errors. Errors of this package wrap one of them where one
// applies, together with the kernel's error number; use [errors.Is].
var (
	// ErrNotSupported: the kernel cannot do it. Destroying needs
	// CONFIG_INET_DIAG_DESTROY (the kernel answers EOPNOTSUPP without it),
	// listing needs the inet_diag and tcp_diag modules.
	ErrNotSupported = errors.New("not supported by this kernel")
	// ErrPermission: destroying a socket needs CAP_NET_ADMIN (EPERM), and
	// opening a Handle in another network namespace CAP_SYS_ADMIN.
	ErrPermission = errors.New("permission denied (needs CAP_NET_ADMIN)")
	// ErrClosed: the Handle was closed.
	ErrClosed = errors.New("handle closed")
)

// timeout bounds each send to and receive from the kernel.
const timeout = 10 * time.Second

// State is the TCP state of a socket, as the kernel numbers them
// (include/net/tcp_states.h).
type State uint8

// TCP states.
const (
	StateEstablished State = 1 + iota
	StateSynSent
	StateSynRecv
	StateFinWait1
	StateFinWait2
	StateTimeWait
	StateClose
	StateCloseWait
	StateLastAck
	StateListen
	StateClosing
	// stateNewSynRecv is the kernel's state of a request socket (a
	// handshake in progress); sock_diag reports those as StateSynRecv.
	stateNewSynRecv
)

var stateNames = [...]string{
	StateEstablished: "ESTABLISHED",
	StateSynSent:     "SYN_SENT",
	StateSynRecv:     "SYN_RECV",
	StateFinWait1:    "FIN_WAIT1",
	StateFinWait2:    "FIN_WAIT2",
	StateTimeWait:    "TIME_WAIT",
	StateClose:       "CLOSE",
	StateCloseWait:   "CLOSE_WAIT",
	StateLastAck:     "LAST_ACK",
	StateListen:      "LISTEN",
	StateClosing:     "CLOSING",
	stateNewSynRecv:  "NEW_SYN_RECV",
}

// String returns the kernel's name of the state, e.g. "ESTABLISHED".
func (s State) String() string {
	if int(s) < len(stateNames) && stateNames[s] != "" {
		return stateNames[s]
	}
	return fmt.Sprintf("State(%d)", uint8(s))
}

// Conn is one TCP socket as the kernel's sock_diag reports it.
type Conn struct {
	// Local and Remote are the socket's addresses as the kernel has them:
	// an IPv4 client of a dual-stack listener has IPv4-mapped IPv6
	// addresses (::ffff:192.0.2.1) here.
	Local, Remote netip.AddrPort
	// State is the TCP state when listed.
	State State
	// UID owns the socket (idiag_uid): for an accepted connection, the UID
	// that created the listening socket.
	UID uint32
	// Inode is the socket's inode number, as in /proc/PID/fd
	// ("socket:[Inode]"); 0 while no process holds it: before it is
	// accepted, after the holder closed it.
	Inode uint64
	// Cookie is the kernel's number for the socket, which no other socket
	// gets (only its own TIME_WAIT remnant keeps it); Destroy destroys
	// this socket and no other. 0: unknown (a Conn not made by List), see
	// Destroy.
	Cookie uint64
	// Interface is the index of the device the socket is bound to, 0 if
	// none.
	Interface uint32
	// BytesSent and BytesReceived are the TCP payload bytes the socket
	// sent (and the peer acknowledged) and received so far (tcp_info's
	// bytes_acked and bytes_received), when the Filter asked for them
	// (Filter.Bytes); 0 otherwise.
	BytesSent, BytesReceived uint64
}

// String describes c for logs, e.g.
// "198.18.0.1:443<-198.18.0.2:40000 ESTABLISHED uid=1000 inode=123".
func (c Conn) String() string {
	return fmt.Sprintf("%s<-%s %s uid=%d inode=%d", c.Local, c.Remote, c.State, c.UID, c.Inode)
}

// Filter selects sockets. A socket is selected when it matches every field
// that is set.
type Filter struct {
	// LocalPorts are the ports the sockets must have on this host: the
	// inbound ports of Xray. Empty: any port.
	LocalPorts []uint16
	// Remotes are the addresses at the other end. Unlike the other
	// fields, empty selects nothing: a user without online addresses has
	// nothing to cut. IPv4 and IPv4-mapped IPv6 addresses are the same
	// address here; zones are ignored.
	Remotes []netip.Addr
	// AnyRemote selects every remote address instead of Remotes: every
	// connection to LocalPorts, which must not be empty then (AnyRemote
	// without LocalPorts selects nothing, so that no Filter selects every
	// connection of the host).
	AnyRemote bool
	// UID, if set, is the UID the sockets must belong to: Xray's.
	UID *uint32
	// Bytes asks the kernel for each socket's byte counts
	// (Conn.BytesSent, Conn.BytesReceived), which costs it a little more
	// per socket.
	Bytes bool
}

// Handle is a sock_diag netlink socket in one network namespace. Its
// methods may be called concurrently; the kernel answers them one at a
// time.
type Handle struct {
	mu      sync.RWMutex // held for writing by Close only
	sockets map[int]*nl.SocketHandle
}

// NewHandle opens a Handle in the caller's network namespace.
func NewHandle() (*Handle, error) {
	return NewHandleAt(netns.None())
}

// NewHandleAt opens a Handle in the network namespace ns, which the
// caller may close afterwards. ns 0 or [netns.None] mean the caller's own
// namespace; another one needs CAP_SYS_ADMIN.
func NewHandleAt(ns netns.NsHandle) (*Handle, error) {
	s, err := socketAt(ns)
	if err != nil {
		return nil, wrap("open sock_diag socket", err)
	}
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	s.SetSendTimeout(&tv)
	s.SetReceiveTimeout(&tv)
	return &Handle{sockets: map[int]*nl.SocketHandle{
		unix.NETLINK_SOCK_DIAG: {Socket: s},
	}}, nil
}

// socketAt opens a NETLINK_SOCK_DIAG socket in ns. A socket belongs to the
// namespace it was created in for good, so it can be used from any thread
// afterwards.
func socketAt(ns netns.NsHandle) (*nl.NetlinkSocket, error) {
	if ns == 0 || !ns.IsOpen() {
		return nl.GetNetlinkSocketAt(netns.None(), netns.None(), unix.NETLINK_SOCK_DIAG)
	}
	type result struct {
		s   *nl.NetlinkSocket
		err error
	}
	res := make(chan result, 1)
	go func() {
		// A thread of its own that is never unlocked: it ends with this
		// goroutine instead of going back to the scheduler in ns.
		runtime.LockOSThread()
		if err := netns.Set(ns); err != nil {
			res <- result{nil, fmt.Errorf("join netns: %w", err)}
			return
		}
		s, err := nl.GetNetlinkSocketAt(netns.None(), netns.None(), unix.NETLINK_SOCK_DIAG)
		res <- result{s, err}
	}()
	r := <-res
	return r.s, r.err
}

// Close closes the Handle's socket. Later calls fail with [ErrClosed].
func (h *Handle) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, sh := range h.sockets {
		sh.Close()
	}
	h.sockets = nil
	return nil
}

// request returns a netlink request of type typ on h's socket. h.mu must
// be held.
func (h *Handle) request(typ, flags int) (*nl.NetlinkRequest, error) {
	if h.sockets == nil {
		// A request without sockets would open one in the namespace of
		// whatever thread runs it: never.
		return nil, ErrClosed
	}
	return &nl.NetlinkRequest{
		NlMsghdr: unix.NlMsghdr{
			Len:   unix.SizeofNlMsghdr,
			Type:  uint16(typ),
			Flags: unix.NLM_F_REQUEST | uint16(flags),
		},
		Sockets: h.sockets,
	}, nil
}

// List returns the TCP sockets, IPv4 and IPv6, that f selects, in no
// particular order. Listening sockets and TIME_WAIT sockets are never
// listed. Listing needs no privilege.
func (h *Handle) List(f Filter) ([]Conn, error) {
	var conns []Conn
	err := h.each(f, func(c Conn) { conns = append(conns, c) }, func() func() {
		n := len(conns)
		return func() { conns = conns[:n] } // a dump taken again
	})
	if err != nil {
		return nil, err
	}
	return conns, nil
}

// Each calls fn with each TCP socket that f selects, as List lists them,
// as the kernel's messages are read: the sockets are not held all at once
// (List of 100,000 connections holds 11 MB of them, and allocated twice
// that growing its slice). fn may see a socket twice: when the kernel's
// tables change during its dump, the dump is taken again, from the start.
func (h *Handle) Each(f Filter, fn func(Conn)) error {
	return h.each(f, fn, nil)
}

// each implements List and Each. If undo is not nil, it is called before
// each family's dump, and what it returns is called when that dump is
// taken again.
func (h *Handle) each(f Filter, fn func(Conn), undo func() func()) error {
	remotes := make(map[netip.Addr]bool, len(f.Remotes))
	need4 := false
	for _, a := range f.Remotes {
		if !a.IsValid() {
			continue
		}
		a = a.Unmap().WithZone("")
		remotes[a] = true
		need4 = need4 || a.Is4()
	}
	if f.AnyRemote {
		need4 = true
	} else if len(remotes) == 0 {
		return nil
	}
	ports := make(map[uint16]bool, len(f.LocalPorts))
	for _, p := range f.LocalPorts {
		if p != 0 {
			ports[p] = true
		}
	}
	if len(f.LocalPorts) > 0 && len(ports) == 0 || f.AnyRemote && len(ports) == 0 {
		return nil // only port 0, which no connection has; or every connection
	}

	// The kernel can filter a dump by one local port (idiag_sport; 0 for
	// any), which spares it and us the other sockets' messages. It walks
	// its whole table for each dump though, so for several ports one dump
	// filtered here is cheaper than one dump per port.
	sport := uint16(0)
	if len(ports) == 1 {
		for p := range ports {
			sport = p
		}
	}
	// IPv4 clients can show up in both families: on IPv4 sockets, and on
	// IPv6 ones of a dual-stack listener (mapped). IPv6 ones only in IPv6.
	families := []uint8{unix.AF_INET6}
	if need4 {
		families = []uint8{unix.AF_INET, unix.AF_INET6}
	}

	h.mu.RLock()
	defer h.mu.RUnlock()
	for _, family := range families {
		var again func()
		if undo != nil {
			again = undo()
		}
		err := h.dump(family, listStates, sport, f.Bytes, func(c Conn) {
			if !f.AnyRemote && !remotes[c.Remote.Addr().Unmap()] {
				return
			}
			if len(ports) > 0 && !ports[c.Local.Port()] {
				return
			}
			if f.UID != nil && c.UID != *f.UID {
				return
			}
			fn(c)
		}, again)
		if err != nil {
			return err
		}
	}
	return nil
}

// dump calls fn with every socket of family in the states of mask
// (idiag_states), with local port sport if it is not 0, and with its byte
// counts if bytes is set, as the kernel's messages are read. When the
// kernel's tables changed during the dump, it takes it again, from the
// start, calling again first if it is not nil. h.mu must be held.
func (h *Handle) dump(family uint8, states uint32, sport uint16, bytes bool, fn func(Conn), again func()) error {
	const attempts = 3
	for attempt := 1; ; attempt++ {
		req, err := h.request(nl.SOCK_DIAG_BY_FAMILY, unix.NLM_F_DUMP)
		if err != nil {
			return err
		}
		dr := &diagReq{
			family: family,
			states: states,
			id:     sockID{sport: sport, cookie: [2]uint32{noCookie, noCookie}},
		}
		if bytes {
			dr.ext = 1 << (inetDiagInfo - 1)
		}
		req.AddData(dr)
		var perr error
		err = req.ExecuteIter(unix.NETLINK_SOCK_DIAG, nl.SOCK_DIAG_BY_FAMILY, func(m []byte) bool {
			c, err := parseMsg(m)
			if err != nil {
				perr = err
				return false
			}
			fn(c)
			return true
		})
		if errors.Is(err, nl.ErrDumpInterrupted) && attempt < attempts {
			// The tables changed under the dump: take a new one.
			if again != nil {
				again()
			}
			continue
		}
		if err == nil {
			err = perr
		}
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				// No sock_diag handler for the family or protocol.
				err = fmt.Errorf("%w: %w", ErrNotSupported, err)
			}
			return wrap(fmt.Sprintf("list TCP sockets (family %d)", family), err)
		}
		return nil
	}
}

// Destroy destroys each socket in conns and returns how many it
// destroyed. The holder of a destroyed socket sees ECONNABORTED, the peer a
// RST (see the package documentation).
//
// A socket that no longer exists is skipped, not an error: its connection
// was closed since it was listed. This includes a Conn whose 4-tuple now
// belongs to a new connection: Destroy matches the cookie, so it never
// destroys a socket it was not given. (One remnant keeps the cookie: if
// this host closed the connection first, its side lingers in TIME_WAIT;
// Destroy removes that, which neither a process nor the peer notices, and
// counts it.)
//
// A Conn without a cookie (not from List) is looked up first, and only a
// connected socket with exactly its addresses is destroyed. This matters:
// the kernel looks a 4-tuple up like an arriving packet, so a tuple whose
// connection is gone names the listening socket of its local address (the
// inbound). The 6.18 kernel refuses to destroy a listener (EINVAL), but
// older kernels' tcp_abort may stop it, which is what naming sockets by
// address alone, like netlink.SocketDestroy, risks. Destroy never names a
// listener.
//
// Errors for single sockets are joined and returned after trying the rest;
// [ErrPermission] and [ErrNotSupported] stop Destroy at the first socket,
// since they apply to every one.
func (h *Handle) Destroy(conns []Conn) (int, error) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	n := 0
	var errs []error
	for _, c := range conns {
		err := h.destroy(c)
		switch {
		case err == nil:
			n++
		case errors.Is(err, errGone):
			// closed since listed
		case errors.Is(err, ErrPermission), errors.Is(err, ErrNotSupported), errors.Is(err, ErrClosed):
			return n, err
		default:
			errs = append(errs, err)
		}
	}
	return n, errors.Join(errs...)
}

// errGone: the socket no longer exists.
var errGone = errors.New("socket gone")

// destroy destroys c's socket. h.mu must be held.
func (h *Handle) destroy(c Conn) error {
	family, id, err := c.request()
	if err != nil {
		return fmt.Errorf("sockkill: destroy %v: %w", c, err)
	}
	if c.Cookie == 0 {
		if id.cookie, err = h.resolve(family, id, c); err != nil {
			return err
		}
	}
	req, err := h.request(nl.SOCK_DESTROY, unix.NLM_F_ACK)
	if err != nil {
		return err
	}
	req.AddData(&diagReq{family: family, states: ^uint32(0), id: id})
	_, err = req.Execute(unix.NETLINK_SOCK_DIAG, 0)
	return destroyErr(c, err)
}

// destroyErr turns the kernel's answer to SOCK_DESTROY for c into an error
// of this package: nil, errGone, or one that wraps a sentinel if one
// applies.
func destroyErr(c Conn, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ENOENT), errors.Is(err, unix.ESTALE):
		// No socket with this tuple and cookie: the kernel answers ENOENT
		// to a cookie that does not match too (ESTALE in its own
		// sock_diag_check_cookie, which some paths return as is).
		return errGone
	case errors.Is(err, unix.EOPNOTSUPP):
		err = fmt.Errorf("%w (needs CONFIG_INET_DIAG_DESTROY): %w", ErrNotSupported, err)
	}
	return wrap(fmt.Sprintf("destroy %v", c), err)
}

// resolve finds the cookie of the connected socket that c names without
// one, or errGone if there is none: no socket at all, or only the listener
// that the kernel's lookup falls back to.
func (h *Handle) resolve(family uint8, id sockID, c Conn) ([2]uint32, error) {
	req, err := h.request(nl.SOCK_DIAG_BY_FAMILY, 0)
	if err != nil {
		return id.cookie, err
	}
	req.AddData(&diagReq{family: family, states: ^uint32(0), id: id})
	var found *Conn
	var perr error
	err = req.ExecuteIter(unix.NETLINK_SOCK_DIAG, nl.SOCK_DIAG_BY_FAMILY, func(m []byte) bool {
		got, err := parseMsg(m)
		if err != nil {
			perr = err
		} else {
			found = &got
		}
		return false
	})
	if err == nil {
		err = perr
	}
	if errors.Is(err, unix.ENOENT) {
		return id.cookie, errGone
	}
	if err != nil {
		return id.cookie, wrap(fmt.Sprintf("look up %v", c), err)
	}
	if found == nil || found.State == StateListen || found.State == StateTimeWait ||
		!sameAddrPort(found.Local, c.Local) || !sameAddrPort(found.Remote, c.Remote) {
		return id.cookie, errGone
	}
	return [2]uint32{uint32(found.Cookie), uint32(found.Cookie >> 32)}, nil
}

func sameAddrPort(a, b netip.AddrPort) bool {
	return a.Port() == b.Port() && a.Addr().Unmap() == b.Addr().Unmap().WithZone("")
}

// Cut destroys the sockets that f selects: List, then Destroy. It returns
// how many it destroyed.
func (h *Handle) Cut(f Filter) (int, error) {
	conns, err := h.List(f)
	if err != nil {
		return 0, err
	}
	return h.Destroy(conns)
}

// Listeners returns the listening TCP sockets, IPv4 and IPv6, on the given
// local ports (none: no socket). Their UID is the UID whose accepted
// connections they make: Xray's, for its inbounds' ports.
func (h *Handle) Listeners(ports []uint16) ([]Conn, error) {
	want := make(map[uint16]bool, len(ports))
	for _, p := range ports {
		if p != 0 {
			want[p] = true
		}
	}
	if len(want) == 0 {
		return nil, nil
	}
	h.mu.RLock()
	defer h.mu.RUnlock()
	var conns []Conn
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		n := len(conns)
		err := h.dump(family, 1<<StateListen, 0, false, func(c Conn) {
			if want[c.Local.Port()] {
				conns = append(conns, c)
			}
		}, func() { conns = conns[:n] })
		if err != nil {
			return nil, err
		}
	}
	return conns, nil
}

// Listeners is [Handle.Listeners] in the caller's network namespace.
func Listeners(ports []uint16) ([]Conn, error) {
	h, err := NewHandle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	return h.Listeners(ports)
}

// List is [Handle.List] in the caller's network namespace.
func List(f Filter) ([]Conn, error) {
	h, err := NewHandle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	return h.List(f)
}

// Each is [Handle.Each] in the caller's network namespace.
func Each(f Filter, fn func(Conn)) error {
	h, err := NewHandle()
	if err != nil {
		return err
	}
	defer h.Close()
	return h.Each(f, fn)
}

// Destroy is [Handle.Destroy] in the caller's network namespace.
func Destroy(conns []Conn) (int, error) {
	if len(conns) == 0 {
		return 0, nil
	}
	h, err := NewHandle()
	if err != nil {
		return 0, err
	}
	defer h.Close()
	return h.Destroy(conns)
}

// Cut is [Handle.Cut] in the caller's network namespace.
func Cut(f Filter) (int, error) {
	h, err := NewHandle()
	if err != nil {
		return 0, err
	}
	defer h.Close()
	return h.Cut(f)
}

// wrap prefixes err with the package and op, and adds the sentinel that
// its error number stands for.
func wrap(op string, err error) error {
	switch {
	case errors.Is(err, ErrNotSupported), errors.Is(err, ErrPermission):
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		err = fmt.Errorf("%w: %w", ErrPermission, err)
	case errors.Is(err, unix.EPROTONOSUPPORT):
		err = fmt.Errorf("%w: %w", ErrNotSupported, err)
	}
	return fmt.Errorf("sockkill: %s: %w", op, err)
}
