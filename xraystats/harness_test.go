package xraystats

// The fixtures of the tests that run real Xray processes: an Xray server
// with one inbound per protocol, an Xray client that reaches each of the
// server's users through its own SOCKS inbound, and a TCP sink/source that
// the traffic goes to.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// xrayBin returns the Xray binary that the tests run: $XRAY_BIN, or
// /usr/local/bin/xray. Without it the test is skipped, except in CI
// (CI=true), where that is a failure.
func xrayBin(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("XRAY_BIN")
	if bin == "" {
		bin = "/usr/local/bin/xray"
	}
	if _, err := os.Stat(bin); err != nil {
		msg := fmt.Sprintf("no Xray binary at %s (set XRAY_BIN, or run scripts/install-xray.sh): %v", bin, err)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return bin
}

// freePort reserves a TCP port of 127.0.0.1 for the rest of the test and
// returns it. The reservation is a socket bound to the port, with
// SO_REUSEADDR and SO_REUSEPORT, that never listens: connections to the
// port are refused until Xray listens on it, which Xray can, as it sets
// SO_REUSEPORT too; and no other program that asks the kernel for a free
// port can get it meanwhile, also while Xray is stopped. (Xray's listeners
// share ports with SO_REUSEPORT, so a port that some other Xray took too
// would not make Xray fail to start: connections would silently go to
// either.)
func freePort(t *testing.T) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	for _, opt := range []int{unix.SO_REUSEADDR, unix.SO_REUSEPORT} {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt, 1); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return sa.(*unix.SockaddrInet4).Port
}

// xrayProc is a running Xray process.
type xrayProc struct {
	t       *testing.T
	name    string
	cmdline []string
	ports   []int // the TCP ports it listens on
	logPath string
	cmd     *exec.Cmd
	done    chan struct{} // closed when cmd.Wait returned
	mu      sync.Mutex
	stopped bool
}

// errBind means that Xray exited while starting, likely because one of its
// ports was taken meanwhile: the caller retries with other ports.
var errBind = errors.New("xray exited while starting")

// startXray writes cfg to dir/name.json and runs Xray on it until ports all
// accept connections. It is killed and waited for in t.Cleanup.
func startXray(t *testing.T, dir, name string, cfg any, ports []int) (*xrayProc, error) {
	t.Helper()
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, name+".json")
	if err := os.WriteFile(cfgPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	p := &xrayProc{
		t:       t,
		name:    name,
		cmdline: []string{xrayBin(t), "run", "-c", cfgPath},
		ports:   ports,
		logPath: filepath.Join(dir, name+".log"),
	}
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			if out, err := os.ReadFile(p.logPath); err == nil {
				t.Logf("%s log (%s):\n%s", name, p.logPath, tail(out, 12000))
			}
		}
	})
	return p, p.start()
}

// start runs the process and waits until it accepts connections on all of
// its ports, or fails with errBind if it exits first.
func (p *xrayProc) start() error {
	p.t.Helper()
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		p.t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(p.cmdline[0], p.cmdline[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Dies with the test binary, should that be killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		p.t.Fatalf("start %s: %v", p.name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	p.mu.Lock()
	p.cmd, p.done, p.stopped = cmd, done, false
	p.mu.Unlock()

	deadline := time.Now().Add(10 * time.Second)
	for _, port := range p.ports {
		for {
			c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
			if err == nil {
				c.Close()
				break
			}
			select {
			case <-done:
				out, _ := os.ReadFile(p.logPath)
				return fmt.Errorf("%w: %s: %s", errBind, p.name, tail(out, 2000))
			case <-time.After(20 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				p.t.Fatalf("%s: port %d not listening after 10s", p.name, port)
			}
		}
	}
	// Its ports are its own: see freePort.
	for _, port := range p.ports {
		if n := listeners(p.t, port); n != 1 {
			p.kill()
			return fmt.Errorf("%w: %s: %d listening sockets on port %d", errBind, p.name, n, port)
		}
	}
	return nil
}

// listeners counts the TCP sockets that listen on port, on any IPv4 or
// IPv6 address, per /proc/net.
func listeners(t *testing.T, port int) int {
	t.Helper()
	n := 0
	for _, path := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range bytes.Split(b, []byte("\n"))[1:] {
			// sl local_address rem_address st ...; addresses are HEX:PORT.
			f := bytes.Fields(line)
			if len(f) < 4 || string(f[3]) != "0A" { // TCP_LISTEN
				continue
			}
			_, hexPort, ok := bytes.Cut(f[1], []byte(":"))
			if p, err := strconv.ParseUint(string(hexPort), 16, 16); ok && err == nil && int(p) == port {
				n++
			}
		}
	}
	return n
}

// kill kills the process, if running, and waits for it to exit.
func (p *xrayProc) kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.stopped {
		return
	}
	p.cmd.Process.Signal(syscall.SIGCONT) // should a test have stopped it
	p.cmd.Process.Kill()
	<-p.done
	p.stopped = true
}

// stop freezes the process with SIGSTOP, as if it hung, and returns once
// all of its threads are stopped: the signal takes effect asynchronously.
func (p *xrayProc) stop() {
	p.t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		p.t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !p.allThreadsStopped() {
		if time.Now().After(deadline) {
			p.t.Fatalf("%s: not stopped 5s after SIGSTOP", p.name)
		}
		time.Sleep(time.Millisecond)
	}
}

// cont resumes the process after stop.
func (p *xrayProc) cont() {
	p.t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		p.t.Fatal(err)
	}
}

// allThreadsStopped tells whether every thread of the process is in state
// T (stopped), per /proc.
func (p *xrayProc) allThreadsStopped() bool {
	stats, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", p.cmd.Process.Pid))
	if err != nil || len(stats) == 0 {
		p.t.Fatalf("%s: no threads in /proc: %v", p.name, err)
	}
	for _, path := range stats {
		b, err := os.ReadFile(path)
		if err != nil {
			return false // a thread that just exited: look again
		}
		// "pid (comm) S ...": the state follows the last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 || i+2 >= len(b) || b[i+2] != 'T' {
			return false
		}
	}
	return true
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// testUser is one user of the server, reached through its own SOCKS inbound
// of the client Xray.
type testUser struct {
	email   string
	proto   string // vless, vmess, trojan, shadowsocks, shadowsocks2022
	inbound string // tag of its server inbound
	acct    Account
	// Client side: the source address of its connections to the server
	// (sendThrough), and the port of its SOCKS inbound.
	via       string
	socksPort int
}

// Server-wide Shadowsocks 2022 parameters.
const ss2022Method = "2022-blake3-aes-128-gcm"

// ss2022ServerKey is the server key (PSK) of the Shadowsocks 2022 inbound.
var ss2022ServerKey = key16()

// key16 returns a random 16-byte key, base64-encoded, as the 2022-blake3-
// aes-128-gcm method needs.
func key16() string {
	var b [16]byte
	rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}

func uuid() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// newUsers returns two users of each protocol; the VLESS ones are alice and
// alice2, whose names are prefixes of each other.
func newUsers() []*testUser {
	us := []*testUser{
		{email: "alice", proto: "vless", inbound: "vless-in", acct: VLESS{ID: uuid()}},
		{email: "alice2", proto: "vless", inbound: "vless-in", acct: VLESS{ID: uuid()}},
		{email: "vmess-a", proto: "vmess", inbound: "vmess-in", acct: VMess{ID: uuid()}},
		{email: "vmess-b", proto: "vmess", inbound: "vmess-in", acct: VMess{ID: uuid()}},
		{email: "trojan-a", proto: "trojan", inbound: "trojan-in", acct: Trojan{Password: rand.Text()}},
		{email: "trojan-b", proto: "trojan", inbound: "trojan-in", acct: Trojan{Password: rand.Text()}},
		{email: "ss-a", proto: "shadowsocks", inbound: "ss-in", acct: Shadowsocks{Method: "aes-256-gcm", Password: rand.Text()}},
		{email: "ss-b", proto: "shadowsocks", inbound: "ss-in", acct: Shadowsocks{Method: "chacha20-ietf-poly1305", Password: rand.Text()}},
		{email: "ss22-a", proto: "shadowsocks2022", inbound: "ss22-in", acct: Shadowsocks2022{Key: key16()}},
		{email: "ss22-b", proto: "shadowsocks2022", inbound: "ss22-in", acct: Shadowsocks2022{Key: key16()}},
	}
	for i, u := range us {
		u.via = fmt.Sprintf("127.0.0.%d", i+2)
	}
	return us
}

// clientJSON is the user's entry in its server inbound's "clients".
func (u *testUser) clientJSON() map[string]any {
	m := map[string]any{"email": u.email, "level": 0}
	switch a := u.acct.(type) {
	case VLESS:
		m["id"] = a.ID
	case VMess:
		m["id"] = a.ID
	case Trojan:
		m["password"] = a.Password
	case Shadowsocks:
		m["method"], m["password"] = a.Method, a.Password
	case Shadowsocks2022:
		m["password"] = a.Key
	}
	return m
}

// outboundJSON is the client Xray's outbound to the server for the user.
func (u *testUser) outboundJSON(serverPort int) map[string]any {
	var settings map[string]any
	server := map[string]any{"address": "127.0.0.1", "port": serverPort}
	switch a := u.acct.(type) {
	case VLESS:
		server["users"] = []any{map[string]any{"id": a.ID, "encryption": "none"}}
		settings = map[string]any{"vnext": []any{server}}
	case VMess:
		server["users"] = []any{map[string]any{"id": a.ID, "security": "aes-128-gcm"}}
		settings = map[string]any{"vnext": []any{server}}
	case Trojan:
		server["password"] = a.Password
		settings = map[string]any{"servers": []any{server}}
	case Shadowsocks:
		server["method"], server["password"] = a.Method, a.Password
		settings = map[string]any{"servers": []any{server}}
	case Shadowsocks2022:
		server["method"], server["password"] = ss2022Method, ss2022ServerKey+":"+a.Key
		settings = map[string]any{"servers": []any{server}}
	}
	proto := u.proto
	if proto == "shadowsocks2022" {
		proto = "shadowsocks"
	}
	return map[string]any{
		"tag":         "out-" + u.email,
		"protocol":    proto,
		"sendThrough": u.via,
		"settings":    settings,
	}
}

// lab is an Xray server, an Xray client in front of it, a sink, and an API
// client of the server.
type lab struct {
	t       *testing.T
	dir     string
	users   []*testUser
	byEmail map[string]*testUser
	server  *xrayProc
	client  *xrayProc
	inPorts map[string]int // server inbound tag -> port
	api     *Client
	apiAddr string
	sink    *sink
}

// apiTimeout is the per-call timeout of the tests' API clients.
const apiTimeout = 500 * time.Millisecond

// newLab starts a server, a client and a sink, with fresh ports, in a temp
// dir of t's. Everything is stopped in t.Cleanup.
func newLab(t *testing.T) *lab {
	t.Helper()
	l := &lab{t: t, dir: t.TempDir(), users: newUsers(), byEmail: map[string]*testUser{}}
	for _, u := range l.users {
		l.byEmail[u.email] = u
	}
	l.sink = newSink(t)

	var err error
	for try := 0; ; try++ {
		apiPort := freePort(t)
		inPorts := map[string]int{}
		ports := []int{apiPort}
		for _, u := range l.users {
			if _, ok := inPorts[u.inbound]; !ok {
				inPorts[u.inbound] = freePort(t)
				ports = append(ports, inPorts[u.inbound])
			}
		}
		l.server, err = startXray(t, l.dir, fmt.Sprintf("server%d", try), l.serverConfig(apiPort, inPorts), ports)
		if err == nil {
			l.apiAddr = fmt.Sprintf("127.0.0.1:%d", apiPort)
			l.inPorts = inPorts
			break
		}
		if try == 2 {
			t.Fatal(err)
		}
	}
	for try := 0; ; try++ {
		var ports []int
		for _, u := range l.users {
			u.socksPort = freePort(t)
			ports = append(ports, u.socksPort)
		}
		l.client, err = startXray(t, l.dir, fmt.Sprintf("client%d", try), l.clientConfig(), ports)
		if err == nil {
			break
		}
		if try == 2 {
			t.Fatal(err)
		}
	}
	l.api = l.dial()
	return l
}

// dial returns a new API client of the server, closed in t.Cleanup.
func (l *lab) dial() *Client {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, l.apiAddr, WithTimeout(apiTimeout))
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { c.Close() })
	return c
}

func (l *lab) serverConfig(apiPort int, inPorts map[string]int) map[string]any {
	clients := map[string][]any{}
	proto := map[string]string{}
	for _, u := range l.users {
		clients[u.inbound] = append(clients[u.inbound], u.clientJSON())
		proto[u.inbound] = u.proto
	}
	var inbounds []any
	for _, tag := range []string{"vless-in", "vmess-in", "trojan-in", "ss-in", "ss22-in"} {
		settings := map[string]any{"clients": clients[tag]}
		p := proto[tag]
		switch p {
		case "vless":
			settings["decryption"] = "none"
		case "shadowsocks":
			settings["network"] = "tcp"
		case "shadowsocks2022":
			p = "shadowsocks"
			settings["network"] = "tcp"
			settings["method"] = ss2022Method
			settings["password"] = ss2022ServerKey
		}
		inbounds = append(inbounds, map[string]any{
			"tag":      tag,
			"listen":   "127.0.0.1",
			"port":     inPorts[tag],
			"protocol": p,
			"settings": settings,
		})
	}
	return map[string]any{
		"log": map[string]any{"loglevel": "info"},
		"api": map[string]any{
			"tag":      "api",
			"listen":   fmt.Sprintf("127.0.0.1:%d", apiPort),
			"services": []string{"HandlerService", "StatsService"},
		},
		"stats": map[string]any{},
		"policy": map[string]any{
			"levels": map[string]any{"0": map[string]any{
				"statsUserUplink":   true,
				"statsUserDownlink": true,
				"statsUserOnline":   true,
			}},
			"system": map[string]any{
				"statsInboundUplink":    true,
				"statsInboundDownlink":  true,
				"statsOutboundUplink":   true,
				"statsOutboundDownlink": true,
			},
		},
		"inbounds":  inbounds,
		"outbounds": []any{map[string]any{"tag": "direct", "protocol": "freedom"}},
	}
}

func (l *lab) clientConfig() map[string]any {
	var inbounds, outbounds, rules []any
	for _, u := range l.users {
		inbounds = append(inbounds, map[string]any{
			"tag":      "in-" + u.email,
			"listen":   "127.0.0.1",
			"port":     u.socksPort,
			"protocol": "socks",
			"settings": map[string]any{"auth": "noauth", "udp": false},
		})
		outbounds = append(outbounds, u.outboundJSON(l.inPorts[u.inbound]))
		rules = append(rules, map[string]any{
			"type":        "field",
			"inboundTag":  []string{"in-" + u.email},
			"outboundTag": "out-" + u.email,
		})
	}
	return map[string]any{
		"log":       map[string]any{"loglevel": "info"},
		"inbounds":  inbounds,
		"outbounds": outbounds,
		"routing":   map[string]any{"rules": rules},
	}
}

// restartServer kills the server and starts it again on the same config and
// ports.
func (l *lab) restartServer() {
	l.t.Helper()
	l.server.kill()
	if err := l.server.start(); err != nil {
		l.t.Fatal(err)
	}
}

// connect opens a connection to the sink through u's SOCKS inbound: through
// the client Xray, the server Xray as u, and the server's freedom outbound.
func (l *lab) connect(u *testUser) (net.Conn, error) {
	return socks5Dial(fmt.Sprintf("127.0.0.1:%d", u.socksPort), l.sink.addr)
}

// transfer sends up bytes to the sink as u, and receives down bytes back,
// on one new connection. It returns the payload bytes that went each way:
// sent includes the request header, and recvd the sink's one-byte answer.
func (l *lab) transfer(u *testUser, up, down int64) (sent, recvd int64, err error) {
	c, err := l.connect(u)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var hdr [17]byte
	hdr[0] = 'T'
	binary.BigEndian.PutUint64(hdr[1:], uint64(up))
	binary.BigEndian.PutUint64(hdr[9:], uint64(down))
	// The header alone first, answered by the sink: Xray's Trojan client
	// fails with "buffer is full" when its first read of the payload is
	// large, and real clients start with a small message too.
	if _, err := c.Write(hdr[:]); err != nil {
		return 0, 0, fmt.Errorf("send header: %w", err)
	}
	var ack [1]byte
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		return 0, 0, fmt.Errorf("receive ack: %w", err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := io.CopyN(c, zeroReader{}, up)
		errc <- err
	}()
	// Not until EOF: Xray passes the sink's close on only after its
	// uplinkOnly/downlinkOnly timeouts.
	n, rerr := io.CopyN(io.Discard, c, down)
	if rerr != nil {
		c.Close() // unblocks the writer
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

// probe tells whether a new connection as u gets through to the sink. It
// sends one byte, which the sink answers; without an answer within 300 ms
// it sends 64 KiB more, as Xray's VMess and Shadowsocks servers read (drain)
// up to some KiB of a connection they refuse before they close it, and
// waits 5 s for the answer or the close. It returns nil when the answer
// came, and else the error that the connection ended with.
func (l *lab) probe(u *testUser) error {
	c, err := l.connect(u)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := c.Write([]byte{'P'}); err != nil {
		return err
	}
	var ack [1]byte
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	_, err = io.ReadFull(c, ack[:])
	if err == nil {
		return nil
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		return err
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	errc := make(chan error, 1)
	go func() { _, err := io.CopyN(c, zeroReader{}, 64<<10); errc <- err }()
	_, err = io.ReadFull(c, ack[:])
	c.Close()
	<-errc
	return err
}

// echoConn is a connection on which the sink echoes what it gets.
type echoConn struct{ net.Conn }

// openEcho opens an echo connection to the sink as u.
func (l *lab) openEcho(u *testUser) (*echoConn, error) {
	c, err := l.connect(u)
	if err != nil {
		return nil, err
	}
	// Wait for the sink's answer: see transfer.
	c.SetDeadline(time.Now().Add(5 * time.Second))
	var ack [1]byte
	if _, err := c.Write([]byte{'E'}); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		c.Close()
		return nil, err
	}
	return &echoConn{c}, nil
}

// roundTrip sends n bytes and reads them back, within 5 s.
func (e *echoConn) roundTrip(n int) error {
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

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// sink is the destination of the tests' traffic, on 127.0.0.1. A
// connection starts with a mode byte: 'T' then two big-endian uint64s, up
// and down: it answers with one byte, reads up bytes, writes down bytes and
// closes; 'E': it answers with one byte and echoes everything; 'P': it
// answers with one byte and reads all the rest.
type sink struct {
	addr string
	l    net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	open map[net.Conn]struct{}
}

func newSink(t *testing.T) *sink {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &sink{addr: l.Addr().String(), l: l, open: map[net.Conn]struct{}{}}
	s.wg.Add(1)
	go s.serve()
	t.Cleanup(s.close)
	return s
}

func (s *sink) serve() {
	defer s.wg.Done()
	for {
		c, err := s.l.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.open[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				s.mu.Lock()
				delete(s.open, c)
				s.mu.Unlock()
				c.Close()
			}()
			s.handle(c)
		}()
	}
}

func (s *sink) handle(c net.Conn) {
	c.SetDeadline(time.Now().Add(time.Minute))
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	switch mode[0] {
	case 'T':
		var hdr [16]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		up := int64(binary.BigEndian.Uint64(hdr[:8]))
		down := int64(binary.BigEndian.Uint64(hdr[8:]))
		if _, err := c.Write([]byte{'K'}); err != nil {
			return
		}
		if n, err := io.CopyN(io.Discard, c, up); err != nil || n != up {
			return
		}
		io.CopyN(c, zeroReader{}, down)
	case 'E':
		if _, err := c.Write([]byte{'K'}); err != nil {
			return
		}
		io.Copy(c, c)
	case 'P':
		if _, err := c.Write([]byte{'K'}); err != nil {
			return
		}
		io.Copy(io.Discard, c)
	}
}

func (s *sink) close() {
	s.l.Close()
	s.mu.Lock()
	for c := range s.open {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
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

// within fails t unless d <= limit.
func within(t *testing.T, what string, d, limit time.Duration) {
	t.Helper()
	if d > limit {
		t.Errorf("%s took %v, more than %v", what, d, limit)
	}
}
