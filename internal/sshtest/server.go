package sshtest

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/xraytest"
	"github.com/myvpn/bwagent/sshsess"
)

// Kind is an SSH server program.
type Kind string

// The servers that Start runs.
const (
	// OpenSSH is OpenSSH's sshd (/usr/sbin/sshd), with PAM.
	OpenSSH Kind = "openssh"
	// Dropbear is Dropbear's dropbear.
	Dropbear Kind = "dropbear"
)

// Kinds are both kinds of server, for tests that run one scenario against
// each.
var Kinds = []Kind{OpenSSH, Dropbear}

// Options says where a server runs and how. The zero Options runs it on
// 127.0.0.1 in the test's network namespace, in a cgroup of its own under
// the cgroup v2 root.
type Options struct {
	// Addr is the address the server listens on, 127.0.0.1 if zero. It
	// must be an address of the server's network namespace, such as ::1
	// or one the test added to an interface there.
	Addr netip.Addr
	// NS is the network namespace that the server, its clients and its
	// sink run in; 0 for the test's own.
	NS netns.NsHandle
	// Cgroup is the cgroup v2 directory under which the server's own
	// cgroup is made (BPF programs attached to it see the server's
	// sockets); "" for the cgroup v2 root.
	Cgroup string
	// Args are more arguments for the server: sshd options such as
	// "-o", "MaxSessions=1", or dropbear flags such as "-j".
	Args []string
	// Journal, if not nil, is where a Dropbear server logs (through
	// syslog, as Debian's does) instead of its standard error: its log
	// ([Server.Log], [Server.Logins], [Server.LogFile]) then holds none of
	// its lines. Not for OpenSSH.
	Journal *Journal
}

// Server is a running SSH server that lets the accounts of
// [NewAccount] log in with their password or a key (see
// [Account.AuthorizeKey]) and forward TCP connections.
type Server struct {
	// Kind is the server program.
	Kind Kind
	// Version is the program's version: "OpenSSH_9.2" (sshd -V),
	// "2022.83" (dropbear -V).
	Version string
	// Addr is where the server listens: Options.Addr and a free port.
	Addr netip.AddrPort
	// NS is the server's network namespace, as in [Options].
	NS netns.NsHandle
	// Cgroup is the server's own cgroup v2 directory, a child of
	// Options.Cgroup. The server and its session processes are born in
	// it; every process in it is killed in t.Cleanup. A session process
	// that a test moves to another cgroup is the test's to kill, with
	// that cgroup (see nettest.NewCgroup).
	Cgroup string
	// Dir is the server's temp dir: its config, host key and PID file.
	Dir string
	// LogFile is a file in Dir that the server's output (its log) is
	// appended to, line by line, as a syslog file would have it: what an
	// agent reads as the servers' auth log.
	LogFile string
	// Sink is a TCP sink on 127.0.0.1 in the server's network
	// namespace: the destination of tunnels' connections (see
	// [Session.Transfer] and [Session.Stream]).
	Sink *xraytest.Sink

	place place

	mu      sync.Mutex
	log     *lineLog
	cmd     *exec.Cmd
	done    chan struct{} // closed when cmd.Wait returned
	stopped bool
}

// errExited means that the server exited while starting, or shares its
// port with another listener, likely because its port was taken
// meanwhile: Start retries with another port.
var errExited = errors.New("server exited while starting")

// Start starts a server of the kind as o says, with a host key of its own
// made in a temp dir (ssh-keygen, dropbearkey), and returns once it
// listens. Its output, with each login, is kept: see [Server.Log] and
// [Server.Logins]. In t.Cleanup every process of the server, sessions
// included, is killed, and the end of its log is logged if t failed.
//
// OpenSSH runs as `sshd -D -e -f CONFIG`, where CONFIG allows password
// (through PAM) and public key logins, TCP forwarding and sftp, and logs at
// level VERBOSE. Dropbear runs as `dropbear -F -E -r HOSTKEY -p ADDR:PORT
// -P PIDFILE`, its defaults otherwise.
//
// t is skipped if the server's program is not installed, except in CI
// (CI=true), where that is a failure.
func Start(t testing.TB, kind Kind, o Options) *Server {
	t.Helper()
	nettest.RequireRoot(t)
	var bin string
	switch kind {
	case OpenSSH:
		bin = need(t, "/usr/sbin/sshd")
		need(t, "ssh-keygen")
	case Dropbear:
		bin = need(t, "dropbear")
		need(t, "dropbearkey")
	default:
		t.Fatalf("sshtest: unknown server kind %q", kind)
	}
	if o.Journal != nil && kind != Dropbear {
		t.Fatalf("sshtest: only Dropbear logs to a journal here, not %s", kind)
	}
	s := &Server{Kind: kind, NS: o.NS, Dir: t.TempDir()}
	s.LogFile = filepath.Join(s.Dir, "server.log")
	s.place = newPlace(t, o.NS, o.Cgroup)
	s.Cgroup = s.place.cgroup
	t.Cleanup(func() {
		s.Stop()
		if t.Failed() {
			lines := s.Log()
			t.Logf("%s log (last %d of %d lines):\n%s", kind, min(len(lines), 60), len(lines),
				strings.Join(lines[max(0, len(lines)-60):], "\n"))
		}
	})
	s.Version = version(t, kind, bin)
	l, err := s.place.listen()
	if err != nil {
		t.Fatalf("sink: %v", err)
	}
	s.Sink = xraytest.ServeSink(t, l)

	key := s.hostKey(t)
	for try := 0; ; try++ {
		addr := o.Addr
		if !addr.IsValid() {
			addr = netip.AddrFrom4([4]byte{127, 0, 0, 1})
		}
		s.Addr = netip.AddrPortFrom(addr, uint16(s.place.freePort(t, addr)))
		var argv []string
		switch kind {
		case OpenSSH:
			argv = []string{bin, "-D", "-e", "-f", s.sshdConfig(t, key)}
		case Dropbear:
			argv = []string{bin, "-F", "-E", "-r", key, "-p", s.Addr.String(), "-P", filepath.Join(s.Dir, "dropbear.pid")}
			if o.Journal != nil {
				argv = o.Journal.syslogArgv(filepath.Join(s.Dir, "syslog"), slices.Delete(argv, 2, 3))
			}
		}
		err := s.run(append(argv, o.Args...))
		if err == nil {
			return s
		}
		if try == 2 || !errors.Is(err, errExited) {
			t.Fatal(err)
		}
		t.Logf("retrying with another port: %v", err)
	}
}

// version returns the version of the server program bin.
func version(t testing.TB, kind Kind, bin string) string {
	t.Helper()
	// Both print their version to stderr: "OpenSSH_9.2, OpenSSL 3.0.19
	// 27 Jan 2026", "Dropbear v2022.83".
	out, err := exec.Command(bin, "-V").CombinedOutput()
	f := strings.Fields(strings.ReplaceAll(string(out), ",", " "))
	switch {
	case err != nil:
	case kind == OpenSSH && len(f) > 0 && strings.HasPrefix(f[0], "OpenSSH_"):
		return f[0]
	case kind == Dropbear && len(f) > 1 && strings.HasPrefix(f[1], "v"):
		return strings.TrimPrefix(f[1], "v")
	}
	t.Fatalf("%s -V: %v: %q", bin, err, out)
	return ""
}

// hostKey makes the server's host key and returns its file.
func (s *Server) hostKey(t testing.TB) string {
	t.Helper()
	var cmd *exec.Cmd
	var key string
	switch s.Kind {
	case OpenSSH:
		key = filepath.Join(s.Dir, "ssh_host_ed25519_key")
		cmd = exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
	case Dropbear:
		key = filepath.Join(s.Dir, "dropbear_ed25519_host_key")
		cmd = exec.Command("dropbearkey", "-t", "ed25519", "-f", key)
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("host key: %v: %s", err, out)
	}
	return key
}

// sshdConfig writes sshd's config file for s.Addr and returns its path.
func (s *Server) sshdConfig(t testing.TB, key string) string {
	t.Helper()
	// sshd's privilege separation directory, which a machine whose sshd
	// never ran may lack. Shared with the machine's sshd: never removed.
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(s.Dir, "sshd_config")
	cfg := fmt.Sprintf(`# sshtest: a test server of the bwagent tests
ListenAddress %s
HostKey %s
PidFile %s
PasswordAuthentication yes
PubkeyAuthentication yes
KbdInteractiveAuthentication no
UsePAM yes
PermitRootLogin no
AllowTcpForwarding yes
PrintMotd no
LogLevel VERBOSE
Subsystem sftp /usr/lib/openssh/sftp-server
`, s.Addr, key, filepath.Join(s.Dir, "sshd.pid"))
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// run starts the server process and waits until it listens on s.Addr,
// alone, or fails with errExited if it exits first.
func (s *Server) run(argv []string) error {
	copyTo, err := os.OpenFile(s.LogFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	log, w, err := newLineLog(copyTo)
	if err != nil {
		copyTo.Close()
		return err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = w, w
	err = s.place.start(cmd, 0)
	w.Close() // the server and its sessions hold it
	if err != nil {
		return fmt.Errorf("start %s: %w", s.Kind, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	s.mu.Lock()
	s.log, s.cmd, s.done, s.stopped = log, cmd, done, false
	s.mu.Unlock()

	port := int(s.Addr.Port())
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := listeners(cmd.Process.Pid, port)
		if n == 1 {
			return nil
		}
		select {
		case <-done:
			lines, _, _ := log.snapshot()
			return fmt.Errorf("%w: %s %q: %s", errExited, s.Kind, argv, strings.Join(lines, "\n"))
		case <-time.After(10 * time.Millisecond):
		}
		if n > 1 { // its port is not its own: see freePort
			s.Stop()
			return fmt.Errorf("%w: %s: %d listening sockets on port %d", errExited, s.Kind, n, port)
		}
		if time.Now().After(deadline) {
			s.Stop()
			return fmt.Errorf("%s: not listening on %s after 10 s", s.Kind, s.Addr)
		}
	}
}

// PID returns the process ID of the server's listening process; 0 once
// it is stopped.
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.stopped {
		return 0
	}
	return s.cmd.Process.Pid
}

// Stop kills the listening process and every process in the server's
// cgroup, session processes included (their clients see their connections
// end), and waits for the listening process to exit. Stopping a stopped
// server does nothing.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.stopped {
		return
	}
	s.place.kill()
	s.cmd.Process.Kill() // should it have left its cgroup
	<-s.done
	s.stopped = true
}

// Log returns the lines that the server and its session processes have
// written to their stderr so far. Dropbear's (-E) start with the writing
// process's PID: "[1234] Dec 04 21:49:26 Password auth succeeded for
// 'bwsh-0a1b2c3d' from 127.0.0.1:34574"; sshd's (-e) have no PID and no
// time.
func (s *Server) Log() []string {
	lines, _, _ := s.lineLog().snapshot()
	return lines
}

// lineLog returns the log of the server's current run.
func (s *Server) lineLog() *lineLog {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log
}

// WaitLog waits up to timeout for a log line that contains substr and
// returns the first; t fails if none comes.
func (s *Server) WaitLog(t testing.TB, substr string, timeout time.Duration) string {
	t.Helper()
	line, ok := s.lineLog().wait(func(line string) bool { return strings.Contains(line, substr) }, timeout)
	if !ok {
		t.Fatalf("%s: no log line with %q within %v", s.Kind, substr, timeout)
	}
	return line
}

// Login is a successful login as the server logs it.
type Login struct {
	// User is the account's name.
	User string
	// Method is "password" or "publickey".
	Method string
	// From is the client's address and port: the client end of the SSH
	// connection.
	From netip.AddrPort
	// PID is Dropbear's session process: the one that forked for the
	// connection, authenticated the user and forwards its connections.
	// 0 with OpenSSH, whose log (-e) has no PIDs; see
	// [Session.ServerPIDs].
	PID int
	// Line is the log line.
	Line string
}

var (
	// "[17106] Dec 04 21:49:34 Password auth succeeded for 'bwexp1' from 127.0.0.1:58164"
	// "[17106] Dec 04 21:49:34 Pubkey auth succeeded for 'bwexp1' with ssh-ed25519 key SHA256:... from 127.0.0.1:58164"
	dropbearLogin = regexp.MustCompile(`^\[(\d+)\] .*\b(Password|Pubkey) auth succeeded for '(.*)' (?:with .* )?from (\S+)$`)
	// "Accepted password for bwexp1 from 127.0.0.1 port 50848 ssh2"
	// "Accepted publickey for bwexp1 from 127.0.0.1 port 50848 ssh2: ED25519 SHA256:..."
	opensshLogin = regexp.MustCompile(`^Accepted (password|publickey) for (\S+) from (\S+) port (\d+) ssh2`)
)

// parseLogin parses a log line of a server of the kind.
func parseLogin(kind Kind, line string) (Login, bool) {
	switch kind {
	case Dropbear:
		m := dropbearLogin.FindStringSubmatch(line)
		if m == nil {
			return Login{}, false
		}
		pid, err1 := strconv.Atoi(m[1])
		from, err2 := sshsess.ParseAddrPort(m[4])
		if err1 != nil || err2 != nil {
			return Login{}, false
		}
		method := "password"
		if m[2] == "Pubkey" {
			method = "publickey"
		}
		return Login{User: m[3], Method: method, From: from, PID: pid, Line: line}, true
	case OpenSSH:
		m := opensshLogin.FindStringSubmatch(line)
		if m == nil {
			return Login{}, false
		}
		addr, err1 := netip.ParseAddr(m[3])
		port, err2 := strconv.ParseUint(m[4], 10, 16)
		if err1 != nil || err2 != nil {
			return Login{}, false
		}
		return Login{User: m[2], Method: m[1], From: netip.AddrPortFrom(addr, uint16(port)), Line: line}, true
	}
	return Login{}, false
}

// Logins returns the logins in the log so far, in order.
func (s *Server) Logins() []Login {
	var logins []Login
	for _, line := range s.Log() {
		if l, ok := parseLogin(s.Kind, line); ok {
			logins = append(logins, l)
		}
	}
	return logins
}

// WaitLogin waits up to timeout for the log line of a login from the
// client address from, and returns it; t fails if none comes.
func (s *Server) WaitLogin(t testing.TB, from netip.AddrPort, timeout time.Duration) Login {
	t.Helper()
	line, ok := s.lineLog().wait(func(line string) bool {
		l, ok := parseLogin(s.Kind, line)
		return ok && l.From == from
	}, timeout)
	if !ok {
		t.Fatalf("%s: no login from %s logged within %v", s.Kind, from, timeout)
	}
	l, _ := parseLogin(s.Kind, line)
	return l
}

// ForwardsAsUser tells whether the server's session process that opens a
// client's forwarded connections runs as the logged-in user, so that those
// sockets belong to the user's UID: always with OpenSSH; with Dropbear
// from 2025.89 on, which drops its privileges after authentication (its
// fix of CVE-2025-14282). Older Dropbear keeps the session process as root.
func (s *Server) ForwardsAsUser() bool {
	if s.Kind != Dropbear {
		return true
	}
	year, minor, ok := strings.Cut(s.Version, ".")
	y, err1 := strconv.Atoi(year)
	m, err2 := strconv.Atoi(minor)
	if !ok || err1 != nil || err2 != nil {
		return false
	}
	return y > 2025 || y == 2025 && m >= 89
}
