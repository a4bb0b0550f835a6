package nettest

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TCPConn is a TCP socket as the kernel's sock_diag reports it, with the
// byte counters of its tcp_info: what the kernel itself counted on the
// socket, whoever holds it.
type TCPConn struct {
	// Local and Remote are the socket's addresses, IPv4-mapped IPv6 ones
	// unmapped (a dual-stack listener's IPv4 clients).
	Local, Remote netip.AddrPort
	// State is the TCP state, as the kernel numbers them (1: ESTABLISHED,
	// 10: LISTEN, ...).
	State uint8
	// BytesAcked is tcpi_bytes_acked: the payload bytes this socket sent
	// that the peer acknowledged. BytesReceived is tcpi_bytes_received:
	// the payload bytes it received in order. BytesSent is tcpi_bytes_sent,
	// retransmissions included.
	BytesAcked, BytesReceived, BytesSent uint64
}

// TCPConns lists the TCP sockets of the calling goroutine's network
// namespace, of both address families and in every state, with their
// tcp_info (one sock_diag dump per family). A dump that the kernel
// interrupted (sockets came or went meanwhile) is retried.
func TCPConns() ([]TCPConn, error) {
	// This thread's namespace: see listeners in package xraytest.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var conns []TCPConn
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		var resps []*netlink.InetDiagTCPInfoResp
		var err error
		for try := 0; try < 5; try++ {
			resps, err = netlink.SocketDiagTCPInfo(family)
			if !errors.Is(err, netlink.ErrDumpInterrupted) {
				break
			}
		}
		if err != nil {
			return nil, fmt.Errorf("sock_diag tcp_info: %w", err)
		}
		for _, r := range resps {
			m := r.InetDiagMsg
			if m == nil {
				continue
			}
			c := TCPConn{
				Local:  addrPort(m.ID.Source, m.ID.SourcePort),
				Remote: addrPort(m.ID.Destination, m.ID.DestinationPort),
				State:  m.State,
			}
			if i := r.TCPInfo; i != nil {
				c.BytesAcked, c.BytesReceived, c.BytesSent = i.Bytes_acked, i.Bytes_received, i.Bytes_sent
			}
			conns = append(conns, c)
		}
	}
	return conns, nil
}

func addrPort(ip net.IP, port uint16) netip.AddrPort {
	a, _ := netip.AddrFromSlice(ip)
	return netip.AddrPortFrom(a.Unmap(), port)
}
