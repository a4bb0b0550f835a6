// Package devices tells a user's devices apart and decides which of them a
// device limit leaves out.
//
// A device is a client address with at least one open connection of the
// user (an SSH session, an Xray connection): an IPv4 address, or an IPv6
// prefix (a phone's privacy addresses rotate within its /64, so the length
// is the caller's to choose). It counts once whatever the number of its
// connections and whichever server they reach: a user who is both an SSH
// account and an Xray client and connects to both from one phone has one
// device. An address with no open connection is no device.
//
// A connection whose client address is the server's own address of that
// connection comes from a proxy on the host (stunnel, an SSH-over-WebSocket
// proxy, nginx without the PROXY protocol), which hides the real client:
// each such connection is a device of its own (see Key). Where Xray logs
// the real address (the PROXY protocol, X-Forwarded-For), that address is
// the client's and counts as any other.
//
// The package is pure: no I/O and no clock. The caller gathers the
// connections (package sshsess, Xray's access log), groups them (Group),
// asks Limit which devices to cut, and cuts them.
package devices

import (
	"cmp"
	"net/netip"
	"slices"
	"time"

	"github.com/myvpn/bwagent/quota"
)

// Key identifies a device: comparable, and the same for every connection
// of the device. The zero Key is no device.
type Key struct {
	prefix netip.Prefix
	// port is a local proxy's connection's client port: such a
	// connection is a device of its own.
	port uint16
}

// String returns the device's address as the block log shows it:
// "203.0.113.7", "2001:db8:1:2::/64", or for a proxy on the host the
// connection's client address and port, "127.0.0.1:40312".
func (k Key) String() string {
	a := k.prefix.Addr()
	switch {
	case !a.IsValid():
		return ""
	case k.port != 0:
		return netip.AddrPortFrom(a, k.port).String()
	case a.Is4() || k.prefix.Bits() == 128:
		return a.String()
	}
	return k.prefix.String()
}

// Prefix returns the addresses of the device: an IPv4 address or an IPv6
// address as a full-length prefix, or an IPv6 prefix.
func (k Key) Prefix() netip.Prefix { return k.prefix }

// Local reports whether the device is one connection of a proxy on the
// host.
func (k Key) Local() bool { return k.port != 0 }

// compare orders keys: by address, then prefix length, then port.
func (k Key) compare(o Key) int {
	if c := k.prefix.Addr().Compare(o.prefix.Addr()); c != 0 {
		return c
	}
	return cmp.Or(cmp.Compare(k.prefix.Bits(), o.prefix.Bits()), cmp.Compare(k.port, o.port))
}

// Conn is one open connection of a user.
type Conn struct {
	// Client is the client's address and port: the peer of the server's
	// socket, or the source Xray logs.
	Client netip.AddrPort
	// Server is the server's own address of the connection (its socket's
	// local address), if known. A client at that same address is a proxy
	// on the host.
	Server netip.Addr
	// Proto is the protocol of the connection: ssh, or the Xray inbound's.
	Proto quota.Protocol
	// Since is when the connection opened; the zero time is before
	// anyone could tell (open when the agent started), the earliest.
	Since time.Time
}

// KeyOf returns the device of c, IPv6 addresses grouped by prefixes of
// ipv6Bits (1 to 128). IPv4-mapped IPv6 addresses are IPv4 addresses here.
func KeyOf(c Conn, ipv6Bits int) Key {
	a := c.Client.Addr().Unmap().WithZone("")
	if !a.IsValid() {
		return Key{}
	}
	bits := 32
	if a.Is6() {
		bits = min(max(ipv6Bits, 1), 128)
	}
	if s := c.Server.Unmap().WithZone(""); s.IsValid() && s == a {
		// A proxy on the host: one device per connection.
		return Key{prefix: netip.PrefixFrom(a, a.BitLen()), port: c.Client.Port()}
	}
	p, _ := a.Prefix(bits)
	return Key{prefix: p}
}

// Device is one device of a user.
type Device struct {
	Key Key
	// Since is when its oldest open connection opened (zero: before the
	// agent could tell).
	Since time.Time
	// Conns are the indexes of its connections in the slice given to
	// Group.
	Conns []int
	// Protocols are the protocols of its connections, sorted, each once.
	Protocols []quota.Protocol
}

// groupIndexed is how many devices Group searches one by one before it
// makes an index of them.
const groupIndexed = 8

// Group returns the devices of one user's open connections, oldest first
// (by Since, then by Key), IPv6 addresses grouped by prefixes of ipv6Bits.
// Connections without a client address are left out.
func Group(conns []Conn, ipv6Bits int) []Device {
	var devs []Device
	// A user's few devices are searched; an index is made past
	// groupIndexed of them.
	var at map[Key]int
	for i, c := range conns {
		k := KeyOf(c, ipv6Bits)
		if k == (Key{}) {
			continue
		}
		j, ok := -1, false
		if at != nil {
			j, ok = at[k]
		} else {
			j = slices.IndexFunc(devs, func(d Device) bool { return d.Key == k })
			ok = j >= 0
		}
		if !ok {
			j = len(devs)
			devs = append(devs, Device{Key: k, Since: c.Since})
			if at != nil {
				at[k] = j
			} else if len(devs) > groupIndexed {
				at = make(map[Key]int, 2*len(devs))
				for n, d := range devs {
					at[d.Key] = n
				}
			}
		}
		d := &devs[j]
		d.Conns = append(d.Conns, i)
		if c.Since.Before(d.Since) {
			d.Since = c.Since
		}
		if !slices.Contains(d.Protocols, c.Proto) {
			d.Protocols = append(d.Protocols, c.Proto)
		}
	}
	for i := range devs {
		slices.Sort(devs[i].Protocols)
	}
	slices.SortFunc(devs, func(x, y Device) int { return older(x, y) })
	return devs
}

// older orders devices oldest first: by Since, then by Key.
func older(x, y Device) int {
	return cmp.Or(x.Since.Compare(y.Since), x.Key.compare(y.Key))
}

// Which says which device of a user over their limit is cut.
type Which uint8

// Which devices are cut.
const (
	// Newest cuts the device that came last: the others keep working.
	Newest Which = iota
	// Oldest cuts the device that came first: the newest login wins.
	Oldest
)

// Verdict is what a device limit makes of one device.
type Verdict uint8

// Verdicts.
const (
	// Allowed: the device may stay (a device refused before that is
	// allowed now is no longer refused).
	Allowed Verdict = iota
	// Refused: the device is one too many and is refused from now on: its
	// connections are cut, and its new ones too while the user has the
	// allowed number of other devices.
	Refused
	// StillRefused: the device was refused before and still is: the user
	// has the allowed number of other devices. Its connections are cut.
	StillRefused
)

// Limit applies a limit of n devices (n > 0) to one user's devices (as
// Group returns them, oldest first) and returns a verdict for each, in the
// same order. wasRefused reports the devices refused before.
//
// A device refused before stays refused while the user has n other
// devices that are not refused; otherwise it is allowed again, oldest
// first. Of the devices that are not refused, those past n are refused:
// the newest ones, or with Oldest the oldest ones. So with Newest a new
// device is refused while the first n stay, and with Oldest a new device
// replaces the oldest, which then stays out while the others are there (it
// does not come back and replace another). With n or fewer devices,
// nothing is cut.
func Limit(devs []Device, n int, which Which, wasRefused func(Key) bool) []Verdict {
	out := make([]Verdict, len(devs))
	if n <= 0 {
		return out
	}
	var others []int // the devices not refused, oldest first
	for i, d := range devs {
		if !wasRefused(d.Key) {
			others = append(others, i)
		}
	}
	for i, d := range devs {
		if !wasRefused(d.Key) {
			continue
		}
		if len(others) >= n {
			out[i] = StillRefused
			continue
		}
		// Room again: an allowed device like the others.
		j, _ := slices.BinarySearchFunc(others, i, func(o, i int) int { return older(devs[o], devs[i]) })
		others = slices.Insert(others, j, i)
	}
	if extra := len(others) - n; extra > 0 {
		cut := others[len(others)-extra:]
		if which == Oldest {
			cut = others[:extra]
		}
		for _, i := range cut {
			out[i] = Refused
		}
	}
	return out
}
