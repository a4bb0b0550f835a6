package sshtest

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/xraytest"
)

// ClientOptions says how a client logs in and where it runs. The zero
// ClientOptions logs in with the account's password, as root, from the
// kernel's choice of address, in a cgroup of its own under the cgroup v2
// root.
type ClientOptions struct {
	// Source is the local address that the client connects from (ssh's
	// BindAddress, as `ssh -b`), such as "127.0.0.2"; "" for the
	// kernel's choice (127.0.0.1 for a server on 127.0.0.1).
	Source string
	// Cgroup is the cgroup v2 directory under which the client's own
	// cgroup is made; "" for the cgroup v2 root. Clients run in the
	// server's network namespace.
	Cgroup string
	// UID is the user (and group) that ssh runs as. ssh refuses to run
	// as a UID without an account: 0 (root), an [Account]'s UID, or
	// 65534 (nobody).
	UID uint32
	// Identity is a private key file to log in with instead of the
	// password (see [Account.AuthorizeKey]); a client run as another UID
	// than root gets the key file chowned to it.
	Identity string
	// Args are more ssh options, such as "-o", "ServerAliveInterval=1".
	Args []string
}

// Session is a running OpenSSH client (ssh, under sshpass for a password)
// logged in to a [Server] as an [Account]: a SOCKS tunnel ([Server.Tunnel])
// or a command ([Server.Exec]). It runs in a cgroup of its own and is
// killed in t.Cleanup.
type Session struct {
	// Server is the server the client logs in to.
	Server *Server
	// Account is the account it logs in as.
	Account *Account
	// SOCKS is the "host:port" of a tunnel's SOCKS5 proxy (ssh -D) on
	// 127.0.0.1 in the server's network namespace; "" for a command.
	SOCKS string
	// Local is the client's end of a tunnel's SSH connection: the address
	// and port that the server sees and logs. Not known for a command.
	Local netip.AddrPort
	// Cgroup is the client's own cgroup v2 directory.
	Cgroup string

	place  place
	cmd    *exec.Cmd
	done   chan struct{} // closed when cmd.Wait returned
	err    error         // cmd.Wait's, set before done is closed
	stdout *countWriter
	stderr *tailWriter
}

// sshOptions are the options of every client: no config file, no host key
// checks, no known hosts file, no chatter.
var sshOptions = []string{
	"-F", "/dev/null",
	"-o", "StrictHostKeyChecking=no",
	"-o", "UserKnownHostsFile=/dev/null",
	"-o", "LogLevel=ERROR",
	"-o", "ConnectTimeout=5",
}

// argv returns the command line of program (ssh or scp) logging in to s as
// a, with o's options, followed by args, and its environment.
func (s *Server) argv(a *Account, o ClientOptions, program string, args ...string) (argv, env []string) {
	env = os.Environ()
	argv = append([]string{program}, sshOptions...)
	argv = append(argv, "-o", "Port="+strconv.Itoa(int(s.Addr.Port())), "-o", "User="+a.Name)
	if o.Source != "" {
		argv = append(argv, "-o", "BindAddress="+o.Source)
	}
	if o.Identity != "" {
		argv = append(argv, "-o", "IdentityFile="+o.Identity, "-o", "IdentitiesOnly=yes",
			"-o", "PreferredAuthentications=publickey", "-o", "BatchMode=yes")
	} else {
		argv = append([]string{"sshpass", "-e"}, argv...)
		// A refused password makes ssh ask again, which sshpass
		// answers with exit status 5.
		argv = append(argv, "-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no")
		env = append(env, "SSHPASS="+a.Password)
	}
	argv = append(argv, o.Args...)
	return append(argv, args...), env
}

// start starts a client of s as a with o's options: program and args as
// argv makes them.
func (s *Server) start(t testing.TB, a *Account, o ClientOptions, program string, args ...string) *Session {
	t.Helper()
	need(t, program)
	if o.Identity == "" {
		need(t, "sshpass")
	} else if o.UID != 0 {
		if err := os.Chown(o.Identity, int(o.UID), int(o.UID)); err != nil {
			t.Fatal(err)
		}
	}
	ss := &Session{
		Server:  s,
		Account: a,
		place:   newPlace(t, s.NS, o.Cgroup),
		done:    make(chan struct{}),
		stdout:  &countWriter{keep: 1 << 20},
		stderr:  &tailWriter{max: 4096},
	}
	ss.Cgroup = ss.place.cgroup
	argv, env := s.argv(a, o, program, args...)
	ss.cmd = exec.Command(argv[0], argv[1:]...)
	ss.cmd.Env = env
	ss.cmd.Stdout, ss.cmd.Stderr = ss.stdout, ss.stderr
	ss.cmd.WaitDelay = 2 * time.Second
	if err := ss.place.start(ss.cmd, o.UID); err != nil {
		t.Fatalf("start %s: %v", program, err)
	}
	go func() {
		ss.err = ss.cmd.Wait()
		close(ss.done)
	}()
	t.Cleanup(ss.Close)
	return ss
}

// Tunnel logs in as a and opens a SOCKS5 proxy into the server (`ssh -N
// -D 127.0.0.1:PORT`), and returns once the proxy accepts connections and
// the server's session process for it runs; t fails if the login fails or
// that takes over 10 s. See [Server.TryTunnel] for a login that may fail.
func (s *Server) Tunnel(t testing.TB, a *Account, o ClientOptions) *Session {
	t.Helper()
	ss, err := s.TryTunnel(t, a, o, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return ss
}

// TryTunnel is [Server.Tunnel] for a login that may fail or hang, such as
// a blocked user's: if the tunnel is not open within timeout, it kills the
// client and returns why.
func (s *Server) TryTunnel(t testing.TB, a *Account, o ClientOptions, timeout time.Duration) (*Session, error) {
	t.Helper()
	port := s.place.freePort(t, netip.Addr{})
	ss := s.start(t, a, o, "ssh", "-N", "-o", "ExitOnForwardFailure=yes",
		"-D", "127.0.0.1:"+strconv.Itoa(port), s.Addr.Addr().String())
	if err := ss.open(port, time.Now().Add(timeout)); err != nil {
		ss.Close()
		return nil, fmt.Errorf("%s: tunnel as %s: %w", s.Kind, a.Name, err)
	}
	return ss, nil
}

// open waits until the tunnel's proxy listens on port and the server's
// session process runs, and sets SOCKS and Local.
func (ss *Session) open(port int, deadline time.Time) error {
	// ssh opens its forwarding port once logged in.
	for !slices.ContainsFunc(ss.place.pids(), func(pid int) bool { return listeners(pid, port) == 1 }) {
		select {
		case <-ss.done:
			return fmt.Errorf("ended: %w", ss.Err())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			if msg := ss.stderr.String(); msg != "" {
				return fmt.Errorf("not open in time: %s", msg)
			}
			return errors.New("not open in time")
		}
	}
	ss.SOCKS = "127.0.0.1:" + strconv.Itoa(port)

	srv := ss.Server
	conns, err := connections(srv.NS, srv.Addr.Addr(), 0)
	if err != nil {
		return err
	}
	inodes := map[uint64]bool{}
	for _, pid := range ss.place.pids() {
		for ino := range socketInodes(pid) {
			inodes[ino] = true
		}
	}
	for _, c := range conns {
		if c.Remote == srv.Addr && inodes[c.Inode] {
			ss.Local = c.Local
		}
	}
	if !ss.Local.IsValid() {
		return fmt.Errorf("no connection to %s among the client's sockets", srv.Addr)
	}
	// sshd forks the session process that serves the user (and runs as
	// them) only after it told the client that the login succeeded.
	for {
		pids, err := ss.serverPIDs()
		if err != nil {
			return err
		}
		if slices.ContainsFunc(pids, func(pid int) bool {
			uids, _ := uidsOf(pid)
			return srv.Kind == Dropbear || uids[1] == ss.Account.UID
		}) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no session process in time (server processes %v)", pids)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Exec logs in as a and runs command on the server with the account's
// shell (`ssh ADDR COMMAND`), such as "head -c 16M /dev/zero", and
// returns at once. What the command writes to its stdout is counted (see
// [Session.Received]) and its first MiB kept ([Session.Output]).
func (s *Server) Exec(t testing.TB, a *Account, o ClientOptions, command string) *Session {
	t.Helper()
	return s.start(t, a, o, "ssh", s.Addr.Addr().String(), command)
}

// Run runs command as [Server.Exec] does and waits up to 30 s for it to
// end. It returns the command's output (its first MiB) and its error,
// which says what ssh (or sshpass) wrote to stderr.
func (s *Server) Run(t testing.TB, a *Account, o ClientOptions, command string) ([]byte, error) {
	t.Helper()
	ss := s.Exec(t, a, o, command)
	err := ss.Wait(30 * time.Second)
	return ss.Output(), err
}

// Fetch copies the file remote (relative to the account's home) from the
// server to the file local with scp, logged in as a, and waits up to 60 s
// for it. Its error says what scp (or sshpass) wrote to stderr. OpenSSH's
// scp uses the SFTP protocol (both servers run sftp-server for it).
func (s *Server) Fetch(t testing.TB, a *Account, o ClientOptions, remote, local string) error {
	t.Helper()
	host := s.Addr.Addr().String()
	if s.Addr.Addr().Is6() {
		host = "[" + host + "]"
	}
	ss := s.start(t, a, o, "scp", "-q", host+":"+remote, local)
	return ss.Wait(60 * time.Second)
}

// Dial opens a connection to addr, an IPv4 "host:port", through the
// tunnel's SOCKS proxy: from the server, as the account.
func (ss *Session) Dial(addr string) (net.Conn, error) {
	if ss.SOCKS == "" {
		return nil, fmt.Errorf("sshtest: session of %s is no tunnel", ss.Account.Name)
	}
	var c net.Conn
	err := ss.Server.place.do(func() (err error) {
		c, err = xraytest.DialSOCKS5(ss.SOCKS, addr)
		return err
	})
	return c, err
}

// Transfer sends up bytes to the server's sink and receives down bytes
// back through the tunnel, on one new connection, within 10 s, as
// xraytest's Sink.Transfer does: sent includes the 17-byte request and
// received the sink's 1-byte answer.
func (ss *Session) Transfer(up, down int64) (sent, received int64, err error) {
	return ss.Server.Sink.Transfer(ss.Dial, up, down)
}

// Stream opens a transfer through the tunnel to the server's sink that
// sends up and receives down bytes a second until it is cut or closed (see
// xraytest.Stream), closed in t.Cleanup.
func (ss *Session) Stream(t testing.TB, up, down int64) *xraytest.Stream {
	t.Helper()
	return ss.Server.Sink.Stream(t, ss.Account.Name, ss.Dial, up, down)
}

// Login waits up to 5 s for the server to log the tunnel's login (from
// [Session.Local]) and returns it.
func (ss *Session) Login(t testing.TB) Login {
	t.Helper()
	if !ss.Local.IsValid() {
		t.Fatal("sshtest: Login of a session whose connection is not known (a command)")
	}
	return ss.Server.WaitLogin(t, ss.Local, 5*time.Second)
}

// ServerPIDs returns the server processes that hold the server's end of
// the tunnel's SSH connection, in increasing order: Dropbear's session
// process; with OpenSSH, the privileged monitor (root) and the session
// process that runs as the user.
func (ss *Session) ServerPIDs(t testing.TB) []int {
	t.Helper()
	if !ss.Local.IsValid() {
		t.Fatal("sshtest: ServerPIDs of a session whose connection is not known (a command)")
	}
	pids, err := ss.serverPIDs()
	if err != nil {
		t.Fatal(err)
	}
	if len(pids) == 0 {
		t.Fatalf("%s: no server process holds the connection from %s", ss.Server.Kind, ss.Local)
	}
	return pids
}

// serverPIDs is ServerPIDs, empty if no process holds the server's end.
func (ss *Session) serverPIDs() ([]int, error) {
	conns, err := connections(ss.Server.NS, ss.Local.Addr(), ss.Server.Addr.Port())
	if err != nil {
		return nil, err
	}
	for _, c := range conns {
		if c.Remote == ss.Local && c.Inode != 0 {
			pids := holders(c.Inode)
			slices.Sort(pids)
			return pids, nil
		}
	}
	return nil, nil
}

// Received returns the bytes that the remote command has written to its
// stdout so far.
func (ss *Session) Received() int64 { return ss.stdout.n.Load() }

// Output returns the first MiB that the remote command wrote to its
// stdout so far.
func (ss *Session) Output() []byte { return ss.stdout.kept() }

// Done is closed when the client has exited: its command ended, its
// tunnel was cut, or it was closed.
func (ss *Session) Done() <-chan struct{} { return ss.done }

// Err returns nil while the client runs or if it exited with status 0,
// and else why it exited, with the end of what it wrote to stderr.
func (ss *Session) Err() error {
	select {
	case <-ss.done:
	default:
		return nil
	}
	if ss.err == nil {
		return nil
	}
	msg := ss.stderr.String()
	if ss.cmd.Args[0] == "sshpass" && exitCode(ss.err) == 5 {
		msg = "the password was refused (sshpass exit 5); " + msg
	}
	return fmt.Errorf("%s as %s: %w: %s", ss.cmd.Args[0], ss.Account.Name, ss.err, msg)
}

// Wait waits up to timeout for the client to exit and returns [Session.Err];
// on timeout it kills the client and says so.
func (ss *Session) Wait(timeout time.Duration) error {
	select {
	case <-ss.done:
		return ss.Err()
	case <-time.After(timeout):
		ss.Close()
		return fmt.Errorf("%s as %s: killed after %v: %s", ss.cmd.Args[0], ss.Account.Name, timeout, ss.stderr)
	}
}

// Close kills the client (the client's kernel closes its connection, as
// when a user's device drops off) and waits for it to exit. Closing a
// closed session does nothing.
func (ss *Session) Close() {
	ss.place.kill()
	<-ss.done
}

// countWriter counts the bytes written to it and keeps the first keep.
type countWriter struct {
	n    atomic.Int64
	keep int
	mu   sync.Mutex
	b    []byte
}

func (w *countWriter) Write(p []byte) (int, error) {
	w.n.Add(int64(len(p)))
	w.mu.Lock()
	defer w.mu.Unlock()
	if room := w.keep - len(w.b); room > 0 {
		w.b = append(w.b, p[:min(room, len(p))]...)
	}
	return len(p), nil
}

func (w *countWriter) kept() []byte {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.b)
}
