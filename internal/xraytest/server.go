package xraytest

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/myvpn/bwagent/xraystats"
)

// Server is a running Xray server whose config file has the users.
type Server struct {
	// API is the "host:port" of the server's gRPC API, on 127.0.0.1.
	API string
	// ConfigPath is the server's config file, which Xray runs on (`xray run
	// -c ConfigPath`), in Dir. Restart reads it again.
	ConfigPath string
	// Dir is the server's temp dir: the config file, and the logs of the
	// server (LogPath) and of the client Xrays.
	Dir string
	// LogPath is the file that the server's output goes to.
	LogPath string
	// Users are the users of the config, as given to StartServer.
	Users []User
	// Sink is the "host:port" of the TCP sink that the clients' traffic
	// goes to, through the server's freedom outbound.
	Sink string
	// AccessLogPath is the file of Xray's access log (log.access), in Dir,
	// with [AccessLog]; "" without: the server's access log then goes to
	// its output, LogPath.
	AccessLogPath string
	// CertFile and KeyFile are the PEM files, in Dir, of the self-signed
	// certificate (for [TLSServerName] and 127.0.0.1) of the server's TLS
	// inbounds; CertSHA256 is the hex SHA-256 of the certificate's DER, as
	// the clients pin it (tlsSettings.pinnedPeerCertSha256). All "" if no
	// inbound is a TLS one.
	CertFile, KeyFile, CertSHA256 string

	proc       *proc
	sink       *sink
	inbounds   []inbound
	inPorts    map[string]int    // inbound tag -> port
	ss2022Keys map[string]string // Shadowsocks 2022 inbound tag -> server key
	clients    map[userKey]*Client

	mu      sync.Mutex
	sources int     // source addresses given out to clients so far
	origin  *origin // the HTTPS origin, once started
}

// inbound is an inbound of the server config.
type inbound struct {
	tag, protocol string
	users         []User
	tls           bool // a user has a flow: VLESS over TLS
}

type userKey struct{ inbound, email string }

// Option configures [StartServer].
type Option func(*options)

type options struct {
	services  []string
	classic   bool
	accessLog bool
	cgroup    string
	noClient  bool
}

// Cgroup starts the server (and restarts it) in the cgroup v2 directory
// dir, so that the BPF programs attached there see its sockets: its
// listening sockets, and so the connections they accept, belong to it.
func Cgroup(dir string) Option {
	return func(o *options) { o.cgroup = dir }
}

// APIServices sets the services of the API (api.services); the default is
// HandlerService and StatsService.
func APIServices(services ...string) Option {
	return func(o *options) { o.services = services }
}

// ClassicAPI makes the config reach the API the classic way, as 3x-ui and
// older guides do, rather than by api.listen: a dokodemo-door inbound tagged
// "api" on 127.0.0.1 and a routing rule that sends it to the API.
func ClassicAPI() Option {
	return func(o *options) { o.classic = true }
}

// AccessLog makes the server write its access log to a file of its own,
// [Server.AccessLogPath] ("log": {"access": PATH, "loglevel": "info"}), as
// operators configure it.
func AccessLog() Option {
	return func(o *options) { o.accessLog = true }
}

// StartServer writes a config with the users to a temp dir of t's and
// starts an Xray server on it, with fresh ports; if users is not empty, also
// one client Xray for all of them (see [Server.Client]) unless [NoClient].
// The server and the clients are stopped in t.Cleanup.
//
// The config is one that an operator could have, and that
// xrayconf.Load([]string{s.ConfigPath}, "") reads: an "api" object with
// tag "api", the services and api.listen on 127.0.0.1 (or, with
// [ClassicAPI], a dokodemo-door inbound and a routing rule); "stats";
// policy.levels."0" with statsUserUplink, statsUserDownlink and
// statsUserOnline, and policy.system with the inbound and outbound stats;
// one inbound on 127.0.0.1 per inbound tag of the users, in the order of
// their first users, with the users as clients (email, level and account);
// a Shadowsocks 2022 inbound has method [SS2022Method] and a random server
// key; and the outbounds "direct" (freedom) and "blocked" (blackhole).
// An inbound with a VLESS user that has a flow (see [NewVisionUser]) is a
// TLS inbound ("security": "tls") with a self-signed certificate made for
// the test (see [Server.CertFile]); its users' clients pin that certificate
// by its SHA-256, as this Xray refuses allowInsecure.
//
// Users of one inbound must have one protocol, and different emails.
// StartServer with no users starts a server with no inbounds but the API.
func StartServer(t testing.TB, users []User, opts ...Option) *Server {
	t.Helper()
	o := options{services: []string{"HandlerService", "StatsService"}}
	for _, opt := range opts {
		opt(&o)
	}
	dir := t.TempDir()
	s := &Server{
		ConfigPath: filepath.Join(dir, "config.json"),
		Dir:        dir,
		LogPath:    filepath.Join(dir, "server.log"),
		Users:      slices.Clone(users),
		ss2022Keys: map[string]string{},
		clients:    map[userKey]*Client{},
	}
	if err := s.plan(); err != nil {
		t.Fatal(err)
	}
	if o.accessLog {
		s.AccessLogPath = filepath.Join(dir, "access.log")
	}
	if slices.ContainsFunc(s.inbounds, func(in inbound) bool { return in.tls }) {
		cert := newSelfSigned(t, dir, "server")
		s.CertFile, s.KeyFile, s.CertSHA256 = cert.certFile, cert.keyFile, cert.sha256
	}
	for _, in := range s.inbounds {
		if in.protocol == Shadowsocks2022 {
			s.ss2022Keys[in.tag] = NewSS2022Key()
		}
	}
	s.sink = newSink(t)
	s.Sink = s.sink.addr

	s.proc = retry(t, func() (*proc, error) {
		apiPort := FreePort(t)
		ports := []int{apiPort}
		s.inPorts = map[string]int{}
		for _, in := range s.inbounds {
			s.inPorts[in.tag] = FreePort(t)
			ports = append(ports, s.inPorts[in.tag])
		}
		s.API = fmt.Sprintf("127.0.0.1:%d", apiPort)
		writeConfig(t, s.ConfigPath, s.config(apiPort, o))
		return runXrayIn(t, "server", s.ConfigPath, s.LogPath, ports, o.cgroup)
	})

	if len(s.Users) > 0 && !o.noClient {
		var cs []*Client
		for _, u := range s.Users {
			c := &Client{User: u, Source: s.nextSource(), sink: s.sink.addr, srv: s}
			s.clients[userKey{u.Inbound, u.Email}] = c
			cs = append(cs, c)
		}
		s.startClients(t, "client", cs)
	}
	return s
}

// plan checks the users and groups them by inbound.
func (s *Server) plan() error {
	seen := map[userKey]bool{}
	for _, u := range s.Users {
		switch {
		case u.Email == "" || u.Inbound == "":
			return fmt.Errorf("xraytest: user %+v: no email or inbound", u)
		case seen[userKey{u.Inbound, strings.ToLower(u.Email)}]:
			return fmt.Errorf("xraytest: inbound %q: two users %q", u.Inbound, u.Email)
		}
		seen[userKey{u.Inbound, strings.ToLower(u.Email)}] = true
		if err := checkAccount(u); err != nil {
			return err
		}
		i := slices.IndexFunc(s.inbounds, func(in inbound) bool { return in.tag == u.Inbound })
		if i < 0 {
			s.inbounds = append(s.inbounds, inbound{tag: u.Inbound, protocol: u.Protocol})
			i = len(s.inbounds) - 1
		}
		if in := &s.inbounds[i]; in.protocol != u.Protocol {
			return fmt.Errorf("xraytest: inbound %q: user %q is %s, user %q %s", u.Inbound, in.users[0].Email, in.protocol, u.Email, u.Protocol)
		}
		s.inbounds[i].users = append(s.inbounds[i].users, u)
		if a, ok := u.Account.(xraystats.VLESS); ok && a.Flow != "" {
			s.inbounds[i].tls = true
		}
	}
	return nil
}

// checkAccount checks that u's account is of u's protocol.
func checkAccount(u User) error {
	ok := false
	switch u.Account.(type) {
	case xraystats.VLESS:
		ok = u.Protocol == VLESS
	case xraystats.VMess:
		ok = u.Protocol == VMess
	case xraystats.Trojan:
		ok = u.Protocol == Trojan
	case xraystats.Shadowsocks:
		ok = u.Protocol == Shadowsocks
	case xraystats.Shadowsocks2022:
		ok = u.Protocol == Shadowsocks2022
	}
	if !ok {
		return fmt.Errorf("xraytest: user %q: protocol %q, account %T", u.Email, u.Protocol, u.Account)
	}
	return nil
}

// config is the server's config.
func (s *Server) config(apiPort int, o options) map[string]any {
	api := map[string]any{"tag": "api", "services": o.services}
	var inbounds []any
	routing := map[string]any{"domainStrategy": "AsIs", "rules": []any{}}
	if o.classic {
		inbounds = append(inbounds, map[string]any{
			"tag":      "api",
			"listen":   "127.0.0.1",
			"port":     apiPort,
			"protocol": "dokodemo-door",
			"settings": map[string]any{"address": "127.0.0.1"},
		})
		routing["rules"] = []any{map[string]any{
			"type":        "field",
			"inboundTag":  []string{"api"},
			"outboundTag": "api",
		}}
	} else {
		api["listen"] = fmt.Sprintf("127.0.0.1:%d", apiPort)
	}
	for _, in := range s.inbounds {
		var clients []any
		for _, u := range in.users {
			clients = append(clients, clientJSON(u))
		}
		settings := map[string]any{"clients": clients}
		protocol := in.protocol
		switch protocol {
		case VLESS:
			settings["decryption"] = "none"
		case Shadowsocks:
			settings["network"] = "tcp"
		case Shadowsocks2022:
			protocol = Shadowsocks
			settings["network"] = "tcp"
			settings["method"] = SS2022Method
			settings["password"] = s.ss2022Keys[in.tag]
		}
		ib := map[string]any{
			"tag":      in.tag,
			"listen":   "127.0.0.1",
			"port":     s.inPorts[in.tag],
			"protocol": protocol,
			"settings": settings,
		}
		if in.tls {
			ib["streamSettings"] = map[string]any{
				"network":  "raw",
				"security": "tls",
				"tlsSettings": map[string]any{
					"certificates": []any{map[string]any{"certificateFile": s.CertFile, "keyFile": s.KeyFile}},
				},
			}
		}
		inbounds = append(inbounds, ib)
	}
	logCfg := map[string]any{"loglevel": "info"}
	if s.AccessLogPath != "" {
		logCfg["access"] = s.AccessLogPath
	}
	return map[string]any{
		"log":   logCfg,
		"api":   api,
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
		"inbounds": inbounds,
		"outbounds": []any{
			map[string]any{"tag": "direct", "protocol": "freedom"},
			map[string]any{"tag": "blocked", "protocol": "blackhole"},
		},
		"routing": routing,
	}
}

// clientJSON is u's entry in its inbound's "clients".
func clientJSON(u User) map[string]any {
	m := map[string]any{"email": u.Email, "level": u.Level}
	switch a := u.Account.(type) {
	case xraystats.VLESS:
		m["id"] = a.ID
		if a.Flow != "" {
			m["flow"] = a.Flow
		}
	case xraystats.VMess:
		m["id"] = a.ID
	case xraystats.Trojan:
		m["password"] = a.Password
	case xraystats.Shadowsocks:
		m["method"], m["password"] = a.Method, a.Password
	case xraystats.Shadowsocks2022:
		m["password"] = a.Key
	}
	return m
}

// InboundPort returns the port of the server's inbound with this tag; 0 if
// there is none.
func (s *Server) InboundPort(tag string) int { return s.inPorts[tag] }

// User returns the first of s.Users with this email; t fails if there is
// none.
func (s *Server) User(t testing.TB, email string) User {
	t.Helper()
	for _, u := range s.Users {
		if u.Email == email {
			return u
		}
	}
	t.Fatalf("xraytest: no user %q", email)
	return User{}
}

// Dial returns a new API client of the server, closed in t.Cleanup.
func (s *Server) Dial(t testing.TB, opts ...xraystats.Option) *xraystats.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := xraystats.Dial(ctx, s.API, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// PID returns the server's process ID; 0 while it is stopped.
func (s *Server) PID() int { return s.proc.pid() }

// Stop kills the server and waits for it to exit. Its ports stay reserved.
// Stopping a stopped server does nothing.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	s.proc.kill()
}

// Restart stops the server, if running, and starts it again on the same
// config file (as it is now) and ports, waiting until it listens on them.
// The client Xrays are not restarted: their new connections reach the new
// server.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.proc.kill()
	if err := s.proc.start(t); err != nil {
		t.Fatal(err)
	}
}

// Freeze stops the server with SIGSTOP, as if it hung: its ports still
// accept connections, but nothing answers. It returns once all of its
// threads are stopped.
func (s *Server) Freeze(t testing.TB) {
	t.Helper()
	s.proc.freeze(t)
}

// Thaw resumes the server after Freeze (SIGCONT).
func (s *Server) Thaw(t testing.TB) {
	t.Helper()
	s.proc.thaw(t)
}
