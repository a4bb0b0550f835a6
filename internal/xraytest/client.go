package xraytest

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/myvpn/bwagent/xraystats"
)

// Client is a user's way into the server: a SOCKS5 inbound of a client
// Xray, whose outbound connects to the server as the user, from the
// Client's own source address. Its methods are safe for concurrent use;
// each opens a connection of its own.
type Client struct {
	// User is the user that the client connects as.
	User User
	// SOCKS is the "host:port" of the client Xray's SOCKS5 inbound (no
	// authentication) for the user.
	SOCKS string
	// Source is the local IPv4 address that the client Xray's connections
	// to the server come from (its outbound's sendThrough), e.g.
	// "127.0.0.2": unique to the user among the server's clients, it is the
	// address that the server sees and xraystats.Client.OnlineIPs and
	// OnlineUsers list.
	Source string

	sink string
	srv  *Server
}

// Client returns the client of u. For one of s.Users it is a SOCKS inbound
// of the client Xray that StartServer started for all of them, the same
// Client every time. For another user (one to be added through the API,
// say) each call starts a client Xray of its own, stopped in t.Cleanup; its
// inbound must be one of the server's.
func (s *Server) Client(t testing.TB, u User) *Client {
	t.Helper()
	if c, ok := s.clients[userKey{u.Inbound, u.Email}]; ok && c.User == u {
		return c
	}
	if err := checkAccount(u); err != nil {
		t.Fatal(err)
	}
	if s.inPorts[u.Inbound] == 0 {
		t.Fatalf("xraytest: user %q: the server has no inbound %q", u.Email, u.Inbound)
	}
	c := &Client{User: u, Source: s.nextSource(), sink: s.sink.addr, srv: s}
	s.startClients(t, "client-"+c.Source, []*Client{c})
	return c
}

// ClientFrom starts a client Xray of its own for u, whose connections to
// the server come from source, a loopback address such as "127.0.0.4" that
// other clients may have too (users behind one NAT, or a user's devices
// behind one address), and returns it; it is stopped in t.Cleanup. u's
// inbound must be one of the server's.
func (s *Server) ClientFrom(t testing.TB, u User, source string) *Client {
	t.Helper()
	if err := checkAccount(u); err != nil {
		t.Fatal(err)
	}
	if s.inPorts[u.Inbound] == 0 {
		t.Fatalf("xraytest: user %q: the server has no inbound %q", u.Email, u.Inbound)
	}
	c := &Client{User: u, Source: source, sink: s.sink.addr, srv: s}
	s.startClients(t, "client-"+u.Email+"-"+source, []*Client{c})
	return c
}

// nextSource returns the next unused loopback address: 127.0.0.2,
// 127.0.0.3, ..., 127.0.0.254, 127.0.1.2, ...
func (s *Server) nextSource() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.sources
	s.sources++
	return fmt.Sprintf("127.0.%d.%d", n/253, n%253+2)
}

// startClients starts a client Xray named name with a SOCKS inbound for
// each of cs, on fresh ports, and sets their SOCKS addresses.
func (s *Server) startClients(t testing.TB, name string, cs []*Client) {
	t.Helper()
	cfgPath := filepath.Join(s.Dir, name+".json")
	retry(t, func() (*proc, error) {
		var ports []int
		for _, c := range cs {
			port := FreePort(t)
			c.SOCKS = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
			ports = append(ports, port)
		}
		writeConfig(t, cfgPath, s.clientConfig(cs))
		return runXray(t, name, cfgPath, filepath.Join(s.Dir, name+".log"), ports)
	})
}

// clientConfig is the config of a client Xray for cs.
func (s *Server) clientConfig(cs []*Client) map[string]any {
	var inbounds, outbounds, rules []any
	for i, c := range cs {
		_, port, _ := net.SplitHostPort(c.SOCKS)
		p, _ := strconv.Atoi(port)
		in, out := fmt.Sprintf("in-%d", i), fmt.Sprintf("out-%d", i)
		inbounds = append(inbounds, map[string]any{
			"tag":      in,
			"listen":   "127.0.0.1",
			"port":     p,
			"protocol": "socks",
			"settings": map[string]any{"auth": "noauth", "udp": false},
		})
		ob := s.outboundJSON(c)
		ob["tag"] = out
		outbounds = append(outbounds, ob)
		rules = append(rules, map[string]any{
			"type":        "field",
			"inboundTag":  []string{in},
			"outboundTag": out,
		})
	}
	return map[string]any{
		"log":       map[string]any{"loglevel": "info"},
		"inbounds":  inbounds,
		"outbounds": outbounds,
		"routing":   map[string]any{"rules": rules},
	}
}

// outboundJSON is the client Xray's outbound to the server for c's user.
func (s *Server) outboundJSON(c *Client) map[string]any {
	u := c.User
	var settings map[string]any
	server := map[string]any{"address": "127.0.0.1", "port": s.inPorts[u.Inbound]}
	switch a := u.Account.(type) {
	case xraystats.VLESS:
		user := map[string]any{"id": a.ID, "encryption": "none"}
		if a.Flow != "" {
			user["flow"] = a.Flow
		}
		server["users"] = []any{user}
		settings = map[string]any{"vnext": []any{server}}
	case xraystats.VMess:
		server["users"] = []any{map[string]any{"id": a.ID, "security": "aes-128-gcm"}}
		settings = map[string]any{"vnext": []any{server}}
	case xraystats.Trojan:
		server["password"] = a.Password
		settings = map[string]any{"servers": []any{server}}
	case xraystats.Shadowsocks:
		server["method"], server["password"] = a.Method, a.Password
		settings = map[string]any{"servers": []any{server}}
	case xraystats.Shadowsocks2022:
		server["method"], server["password"] = SS2022Method, s.ss2022Keys[u.Inbound]+":"+a.Key
		settings = map[string]any{"servers": []any{server}}
	}
	protocol := u.Protocol
	if protocol == Shadowsocks2022 {
		protocol = Shadowsocks
	}
	ob := map[string]any{
		"protocol":    protocol,
		"sendThrough": c.Source,
		"settings":    settings,
	}
	if s.isTLS(u.Inbound) {
		ob["streamSettings"] = map[string]any{
			"network":  "raw",
			"security": "tls",
			"tlsSettings": map[string]any{
				"serverName":           TLSServerName,
				"pinnedPeerCertSha256": s.CertSHA256,
			},
		}
	}
	return ob
}

// isTLS tells whether the server's inbound with this tag is a TLS one.
func (s *Server) isTLS(tag string) bool {
	i := slices.IndexFunc(s.inbounds, func(in inbound) bool { return in.tag == tag })
	return i >= 0 && s.inbounds[i].tls
}

// Dial opens a connection to addr, an IPv4 "host:port", through the
// client: through the client Xray, the server as the user, and the server's
// freedom outbound.
func (c *Client) Dial(addr string) (net.Conn, error) {
	return socks5Dial(c.SOCKS, addr)
}

// connect opens a connection to the sink.
func (c *Client) connect() (net.Conn, error) {
	return c.Dial(c.sink)
}

// Transfer sends up bytes to the sink and receives down bytes back, on one
// new connection, within 10 s. It returns the payload bytes that went each
// way, which is what Xray counts: sent includes the request's 17-byte
// header, and received the sink's one-byte answer to it.
func (c *Client) Transfer(up, down int64) (sent, received int64, err error) {
	return transfer(c.connect, up, down)
}

// transfer is Transfer on a connection to the sink that connect opens.
func transfer(connect func() (net.Conn, error), up, down int64) (sent, received int64, err error) {
	conn, err := connect()
	if err != nil {
		return 0, 0, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	var hdr [17]byte
	hdr[0] = 'T'
	binary.BigEndian.PutUint64(hdr[1:], uint64(up))
	binary.BigEndian.PutUint64(hdr[9:], uint64(down))
	// The header alone first, answered by the sink: Xray's Trojan client
	// fails with "buffer is full" when its first read of the payload is
	// large, and real clients start with a small message too.
	if _, err := conn.Write(hdr[:]); err != nil {
		return 0, 0, fmt.Errorf("send header: %w", err)
	}
	var ack [1]byte
	if _, err := io.ReadFull(conn, ack[:]); err != nil {
		return 0, 0, fmt.Errorf("receive ack: %w", err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := io.CopyN(conn, zeroReader{}, up)
		errc <- err
	}()
	// Not until EOF: Xray passes the sink's close on only after its
	// uplinkOnly/downlinkOnly timeouts.
	n, rerr := io.CopyN(io.Discard, conn, down)
	if rerr != nil {
		conn.Close() // unblocks the writer
	}
	werr := <-errc
	if rerr != nil {
		return 0, 0, fmt.Errorf("receive: got %d of %d bytes: %w", n, down, rerr)
	}
	if werr != nil {
		return 0, 0, fmt.Errorf("send: %w", werr)
	}
	return int64(len(hdr)) + up, 1 + down, nil
}

// Probe tells whether a new connection gets through to the sink. It sends
// one byte, which the sink answers; without an answer within 300 ms it
// sends 64 KiB more, as Xray's VMess and Shadowsocks servers read (drain) up
// to some KiB of a connection they refuse before they close it, and waits
// 5 s for the answer or the close. It returns nil when the answer came, and
// else the error that the connection ended with.
func (c *Client) Probe() error {
	conn, err := c.connect()
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := conn.Write([]byte{'P'}); err != nil {
		return err
	}
	var ack [1]byte
	conn.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	_, err = io.ReadFull(conn, ack[:])
	if err == nil {
		return nil
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	errc := make(chan error, 1)
	go func() { _, err := io.CopyN(conn, zeroReader{}, 64<<10); errc <- err }()
	_, err = io.ReadFull(conn, ack[:])
	conn.Close()
	<-errc
	return err
}

// Echo is a connection to the sink, which echoes what it gets.
type Echo struct{ net.Conn }

// Echo opens an Echo connection, within 5 s. Its opening carries one byte
// up and one down.
func (c *Client) Echo() (*Echo, error) {
	conn, err := c.connect()
	if err != nil {
		return nil, err
	}
	// Wait for the sink's answer: see Transfer.
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	var ack [1]byte
	if _, err := conn.Write([]byte{'E'}); err != nil {
		conn.Close()
		return nil, err
	}
	if _, err := io.ReadFull(conn, ack[:]); err != nil {
		conn.Close()
		return nil, err
	}
	return &Echo{conn}, nil
}

// RoundTrip sends n random bytes and reads them back, within 5 s.
func (e *Echo) RoundTrip(n int) error {
	e.SetDeadline(time.Now().Add(5 * time.Second))
	msg := make([]byte, n)
	rand.Read(msg)
	errc := make(chan error, 1)
	go func() { _, err := e.Write(msg); errc <- err }()
	got := make([]byte, n)
	_, rerr := io.ReadFull(e, got)
	if err := <-errc; err != nil {
		return err
	}
	if rerr != nil {
		return rerr
	}
	if !bytes.Equal(got, msg) {
		return errors.New("echo mismatch")
	}
	return nil
}

// DialSOCKS5 connects to target, an IPv4 "host:port", through the SOCKS5
// proxy at proxyAddr (no authentication), within 5 s: as [Client.Dial]
// does through a client Xray, and as other proxies' harnesses (package
// sshtest, through `ssh -D`) do.
func DialSOCKS5(proxyAddr, target string) (net.Conn, error) {
	return socks5Dial(proxyAddr, target)
}

// socks5Dial connects to target (an IPv4 "host:port") through the SOCKS5
// proxy at proxyAddr, without authentication.
func socks5Dial(proxyAddr, target string) (net.Conn, error) {
	host, portStr, err := net.SplitHostPort(target)
	if err != nil {
		return nil, err
	}
	ip := net.ParseIP(host).To4()
	port, err := strconv.Atoi(portStr)
	if ip == nil || err != nil {
		return nil, fmt.Errorf("socks5: bad target %q", target)
	}
	c, err := net.DialTimeout("tcp", proxyAddr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fail := func(err error) (net.Conn, error) {
		c.Close()
		return nil, fmt.Errorf("socks5 %s: %w", proxyAddr, err)
	}
	// Greeting: version 5, one method, "no authentication".
	if _, err := c.Write([]byte{5, 1, 0}); err != nil {
		return fail(err)
	}
	var b [10]byte
	if _, err := io.ReadFull(c, b[:2]); err != nil {
		return fail(err)
	}
	if b[0] != 5 || b[1] != 0 {
		return fail(fmt.Errorf("method refused: % x", b[:2]))
	}
	// CONNECT to an IPv4 address.
	req := append([]byte{5, 1, 0, 1}, ip...)
	req = binary.BigEndian.AppendUint16(req, uint16(port))
	if _, err := c.Write(req); err != nil {
		return fail(err)
	}
	// Reply: version, status, reserved, address type, then the bound
	// address: we expect IPv4 (10 bytes in all).
	if _, err := io.ReadFull(c, b[:4]); err != nil {
		return fail(err)
	}
	if b[1] != 0 {
		return fail(fmt.Errorf("connect refused: status %d", b[1]))
	}
	var rest int
	switch b[3] {
	case 1:
		rest = 4 + 2
	case 4:
		rest = 16 + 2
	default:
		return fail(fmt.Errorf("unexpected address type %d", b[3]))
	}
	if _, err := io.CopyN(io.Discard, c, int64(rest)); err != nil {
		return fail(err)
	}
	c.SetDeadline(time.Time{})
	return c, nil
}
