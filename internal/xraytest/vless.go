package xraytest

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/myvpn/bwagent/xraystats"
)

// NoClient makes StartServer start no client Xray for the users: reach
// them with [Server.DialVLESS] (VLESS users), or with [Server.Client], which
// then starts a client Xray of its own for each user it is called for. A
// client Xray has a SOCKS inbound, and so a port, for each user: for
// thousands of users, start the server with NoClient.
func NoClient() Option {
	return func(o *options) { o.noClient = true }
}

// DialVLESS opens a connection to addr (an IPv4 "host:port") through the
// server as u, a VLESS user without a flow on an inbound without TLS,
// without a client Xray: the VLESS request header (version 0, u's ID, no
// addons, a TCP command to addr) is written on a TCP connection to u's
// inbound, and the response header is taken off the first bytes read. The
// connection comes from the local address source ("" lets the kernel
// choose); giving each user an address of its own (127.1.0.1,
// 127.1.0.2...) keeps many users' connections from running out of local
// ports. The header goes out with the first write, as a VLESS client sends
// it, so Xray sees the request (and logs it) only then.
func (s *Server) DialVLESS(u User, source, addr string) (net.Conn, error) {
	acct, ok := u.Account.(xraystats.VLESS)
	if !ok || acct.Flow != "" || s.isTLS(u.Inbound) {
		return nil, fmt.Errorf("xraytest: DialVLESS: user %q is not a VLESS user without a flow on an inbound without TLS", u.Email)
	}
	port := s.inPorts[u.Inbound]
	if port == 0 {
		return nil, fmt.Errorf("xraytest: DialVLESS: user %q: the server has no inbound %q", u.Email, u.Inbound)
	}
	id, err := hex.DecodeString(strings.ReplaceAll(acct.ID, "-", ""))
	if err != nil || len(id) != 16 {
		return nil, fmt.Errorf("xraytest: DialVLESS: user %q: bad ID %q", u.Email, acct.ID)
	}
	target, err := netip.ParseAddrPort(addr)
	if err != nil || !target.Addr().Is4() {
		return nil, fmt.Errorf("xraytest: DialVLESS: target %q is no IPv4 host:port", addr)
	}
	d := net.Dialer{Timeout: 5 * time.Second}
	if source != "" {
		src, err := netip.ParseAddr(source)
		if err != nil {
			return nil, fmt.Errorf("xraytest: DialVLESS: source %q: %w", source, err)
		}
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	}
	c, err := d.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		return nil, err
	}
	// Version, ID, no addons, command TCP (1), port, address type IPv4
	// (1), address: Xray's proxy/vless/encoding, port before address.
	hdr := make([]byte, 0, 26)
	hdr = append(hdr, 0)
	hdr = append(hdr, id...)
	hdr = append(hdr, 0, 1)
	hdr = binary.BigEndian.AppendUint16(hdr, target.Port())
	ip := target.Addr().As4()
	hdr = append(append(hdr, 1), ip[:]...)
	return &vlessConn{Conn: c, hdr: hdr}, nil
}

// vlessConn is a VLESS client connection: the request header goes with the
// first write, the response header (version, addons) comes off the first
// read.
type vlessConn struct {
	net.Conn
	hdr  []byte // the request header, until written
	resp bool   // the response header was read
}

func (c *vlessConn) Write(p []byte) (int, error) {
	if c.hdr != nil {
		buf := append(c.hdr, p...)
		c.hdr = nil
		n, err := c.Conn.Write(buf)
		return max(0, n-(len(buf)-len(p))), err
	}
	return c.Conn.Write(p)
}

func (c *vlessConn) Read(p []byte) (int, error) {
	if !c.resp {
		var h [2]byte
		if _, err := io.ReadFull(c.Conn, h[:]); err != nil {
			return 0, fmt.Errorf("vless response header: %w", err)
		}
		if h[0] != 0 {
			return 0, errors.New("vless response header: version is not 0")
		}
		if _, err := io.CopyN(io.Discard, c.Conn, int64(h[1])); err != nil {
			return 0, fmt.Errorf("vless response addons: %w", err)
		}
		c.resp = true
	}
	return c.Conn.Read(p)
}

// TransferVLESS is [Client.Transfer] for u without a client Xray: on a
// connection that [Server.DialVLESS] opens to the sink from source, it
// sends up bytes and receives down bytes, within 10 s, and returns the
// payload bytes that went each way (what Xray counts).
func (s *Server) TransferVLESS(u User, source string, up, down int64) (sent, received int64, err error) {
	return transfer(func() (net.Conn, error) { return s.DialVLESS(u, source, s.sink.addr) }, up, down)
}
