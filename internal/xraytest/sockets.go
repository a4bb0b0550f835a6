package xraytest

import (
	"net/netip"
	"testing"

	"github.com/myvpn/bwagent/internal/nettest"
)

// ServerSockets lists the server's TCP sockets that face c, with the
// kernel's byte counters (tcp_info): those on the port of c's inbound whose
// remote address is c.Source, in any state but LISTEN. Their Remote is the
// local address of the client Xray's socket, as the server (and its access
// log) sees it; BytesAcked counts what the server sent the client, as the
// kernel counted it.
func (c *Client) ServerSockets(t testing.TB) []nettest.TCPConn {
	t.Helper()
	port := uint16(c.srv.inPorts[c.User.Inbound])
	src := netip.MustParseAddr(c.Source)
	return tcpConns(t, func(k nettest.TCPConn) bool {
		return k.Local.Port() == port && k.Remote.Addr() == src
	})
}

// ClientSockets lists the client Xray's TCP sockets to the server for c:
// from c.Source to the port of c's inbound, in any state. Their Local is
// the address the server sees the connection come from.
func (c *Client) ClientSockets(t testing.TB) []nettest.TCPConn {
	t.Helper()
	port := uint16(c.srv.inPorts[c.User.Inbound])
	src := netip.MustParseAddr(c.Source)
	return tcpConns(t, func(k nettest.TCPConn) bool {
		return k.Remote.Port() == port && k.Local.Addr() == src
	})
}

// tcpConns lists the TCP sockets that keep selects, but listeners.
func tcpConns(t testing.TB, keep func(nettest.TCPConn) bool) []nettest.TCPConn {
	t.Helper()
	all, err := nettest.TCPConns()
	if err != nil {
		t.Fatal(err)
	}
	var conns []nettest.TCPConn
	for _, k := range all {
		if k.State != tcpListen && keep(k) {
			conns = append(conns, k)
		}
	}
	return conns
}

// tcpListen is the kernel's TCP_LISTEN state.
const tcpListen = 10
