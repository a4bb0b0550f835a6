package agent

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/myvpn/bwagent/sockkill"
)

// TestXlive: the connections by key and by user stay one table: a key
// put again for another user moves to them, a drop names the owner or
// does nothing, and a user's last connection gone takes the user away.
func TestXlive(t *testing.T) {
	key := func(port uint16) xconnKey {
		return xconnKey{client: netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), port), port: 443}
	}
	var x xlive
	check := func(what string, want map[string][]uint16) {
		t.Helper()
		n := 0
		for user, ports := range want {
			var got []uint16
			for _, c := range x.byUser[user] {
				got = append(got, c.key.client.Port())
				if x.conns[c.key] != c {
					t.Errorf("%s: %s's connection %v is not the table's", what, user, c.key)
				}
			}
			slices.Sort(got)
			if !slices.Equal(got, ports) {
				t.Errorf("%s: %s has %v, want %v", what, user, got, ports)
			}
			n += len(ports)
		}
		if x.len() != n || len(x.byUser) != len(want) {
			t.Errorf("%s: %d connections of %d users, want %d of %d", what, x.len(), len(x.byUser), n, len(want))
		}
	}
	x.put(key(1), &xconn{user: "a"})
	x.put(key(2), &xconn{user: "a"})
	x.put(key(3), &xconn{user: "a"})
	x.put(key(4), &xconn{user: "b"})
	check("put", map[string][]uint16{"a": {1, 2, 3}, "b": {4}})
	x.drop("a", key(2))
	check("the middle one dropped", map[string][]uint16{"a": {1, 3}, "b": {4}})
	x.drop("b", key(1))
	check("a drop naming another user", map[string][]uint16{"a": {1, 3}, "b": {4}})
	x.put(key(3), &xconn{user: "b"})
	check("a key put again for another user", map[string][]uint16{"a": {1}, "b": {3, 4}})
	x.drop("a", key(1))
	check("a user's last one dropped", map[string][]uint16{"b": {3, 4}})
	if c := x.of("b", key(3)); c == nil || c.user != "b" {
		t.Errorf("of(b, 3) = %+v", c)
	}
	if c := x.of("a", key(3)); c != nil {
		t.Errorf("of(a, 3) = %+v, want none: it is b's", c)
	}
	for u := range x.changed {
		if u != "a" && u != "b" {
			t.Errorf("changed names %q", u)
		}
	}
}

// TestXconnSocket: a tied connection names its socket for Destroy as the
// listing had it, from its key's client and what it keeps of the socket:
// IPv4, IPv6, and IPv4 on a dual-stack socket (mapped there, unmapped in
// the key).
func TestXconnSocket(t *testing.T) {
	for _, s := range []sockkill.Conn{
		{Local: netip.MustParseAddrPort("10.0.0.1:443"), Remote: netip.MustParseAddrPort("192.0.2.1:5000"), Cookie: 7},
		{Local: netip.MustParseAddrPort("[::ffff:10.0.0.1]:443"), Remote: netip.MustParseAddrPort("[::ffff:192.0.2.1]:5000"), Cookie: 8, Interface: 3},
		{Local: netip.MustParseAddrPort("[2001:db8::1]:443"), Remote: netip.MustParseAddrPort("[2001:db8::2]:5000"), Cookie: 9},
	} {
		c := &xconn{key: xconnKey{client: netip.AddrPortFrom(s.Remote.Addr().Unmap(), s.Remote.Port()), port: s.Local.Port()}}
		c.tie(s)
		if got := c.socket(); got != (sockkill.Conn{Local: s.Local, Remote: s.Remote, Cookie: s.Cookie, Interface: s.Interface}) {
			t.Errorf("socket of %v: %v", s, got)
		}
	}
}
