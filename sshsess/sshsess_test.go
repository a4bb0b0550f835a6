package sshsess_test

import (
	"net/netip"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/sshtest"
	"github.com/myvpn/bwagent/sshsess"
)

func TestMain(m *testing.M) { nettest.Main(m) }

// fixture is one test's data plane, SSH server and tracker.
type fixture struct {
	cg   string // the data plane's cgroup, the server's parent
	dp   *bpf.Datapath
	srv  *sshtest.Server
	tr   *sshsess.Tracker
	log  loginSource
	acct map[string]*sshtest.Account

	logins map[int]sshsess.Login
}

// loginSource is where a fixture reads the servers' logins: an AuthLog or
// a Journal.
type loginSource interface {
	Read() ([]sshsess.Login, error)
	Close() error
}

func newFixture(t *testing.T, kind sshtest.Kind, addr netip.Addr) *fixture {
	t.Helper()
	return newFixtureWith(t, kind, sshtest.Options{Addr: addr})
}

// newFixtureWith is newFixture with the server's options o (its cgroup is
// the fixture's); a server that logs to a journal has its logins read from
// it.
func newFixtureWith(t *testing.T, kind sshtest.Kind, o sshtest.Options) *fixture {
	t.Helper()
	nettest.RequireRoot(t)
	root, err := bpf.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	cg := nettest.NewCgroup(t, root)
	pin := filepath.Join("/sys/fs/bpf", nettest.Name("bwsess-"))
	t.Cleanup(func() { bpf.Uninstall(pin) })
	dp, err := bpf.Load(bpf.Config{CgroupPath: cg, PinPath: pin})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dp.Close() })
	o.Cgroup = cg
	srv := sshtest.Start(t, kind, o)
	f := &fixture{cg: cg, dp: dp, srv: srv, acct: make(map[string]*sshtest.Account), logins: make(map[int]sshsess.Login)}
	var programs []string
	for _, name := range []string{"sshd", "dropbear"} {
		if p, err := exec.LookPath(name); err == nil {
			programs = append(programs, p)
		}
	}
	if p, err := exec.LookPath("/usr/sbin/sshd"); err == nil {
		programs = append(programs, p)
	}
	f.tr, err = sshsess.New(sshsess.Config{
		Programs: programs,
		User:     func(uid uint32) bool { return uid >= sshtest.FirstUID && uid <= sshtest.LastUID },
	}, dp)
	if err != nil {
		t.Fatal(err)
	}
	f.log = sshsess.NewAuthLog(srv.LogFile)
	if o.Journal != nil {
		f.log = sshsess.NewJournal(o.Journal.Namespace)
	}
	t.Cleanup(func() { f.log.Close() })
	if _, err := f.log.Read(); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *fixture) account(t *testing.T) *sshtest.Account {
	a := sshtest.NewAccount(t)
	f.acct[a.Name] = a
	return a
}

// scan runs one scan and credits what it found, as the agent does.
func (f *fixture) scan(t *testing.T) sshsess.Result {
	t.Helper()
	logins, err := f.log.Read()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range logins {
		f.logins[l.PID] = l
	}
	res, err := f.tr.Scan(f.logins, func(name string) (uint32, bool) {
		a, ok := f.acct[name]
		if !ok {
			return 0, false
		}
		return a.UID, true
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range res.Problems {
		t.Log(p)
	}
	for _, a := range res.New {
		if err := f.dp.Credit(a.UID, a.Credit); err != nil {
			t.Fatal(err)
		}
	}
	return res
}

// waitSessions scans until uid has n sessions.
func (f *fixture) waitSessions(t *testing.T, uid uint32, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		res := f.scan(t)
		got := len(f.tr.Sessions(uid))
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("UID %d has %d attributed sessions, want %d (%+v)", uid, got, n, res)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (f *fixture) total(t *testing.T, uid uint32) uint64 {
	t.Helper()
	c := f.counters(t, uid)
	return c.RxBytes + c.TxBytes
}

func (f *fixture) counters(t *testing.T, uid uint32) bpf.Counters {
	t.Helper()
	c, err := f.dp.CountersOf(uid)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// downloaded checks that what a user's counters gained from before is a
// download of payload: RxBytes within payload and its overhead, TxBytes (the
// client's requests and ACKs) a small part of it. The session socket is the
// server's end: what it sends is the user's download.
func (f *fixture) downloaded(t *testing.T, what string, uid uint32, before bpf.Counters, payload uint64) {
	t.Helper()
	c := f.counters(t, uid)
	rx, tx := c.RxBytes-before.RxBytes, c.TxBytes-before.TxBytes
	within(t, what+" as the user's download", rx, payload)
	if tx > rx/10 {
		t.Errorf("%s: the user's upload counted %d bytes, for a download of %d", what, tx, rx)
	}
}

const mib = 1 << 20

// Every byte of a user's SSH session is counted once, for the user, on the
// session's connection: a tunnel's download (not again on its forwarded
// connection), and a shell command's output, with OpenSSH and with
// Dropbear (whose old versions forward as root). A blocked user's sessions
// are cut and carry nothing more. Over IPv4 and IPv6.
func TestSessionsCountedOnce(t *testing.T) {
	for _, kind := range sshtest.Kinds {
		for _, addr := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.IPv6Loopback()} {
			t.Run(string(kind)+"-"+addr.String(), func(t *testing.T) {
				t.Parallel()
				sessionsCountedOnce(t, kind, addr)
			})
		}
	}
}

func sessionsCountedOnce(t *testing.T, kind sshtest.Kind, addr netip.Addr) {
	f := newFixture(t, kind, addr)
	a := f.account(t)
	login := time.Now()
	tun := f.srv.Tunnel(t, a, sshtest.ClientOptions{})
	f.waitSessions(t, a.UID, 1)
	// The session's start is its process's: the login, to /proc's 10 ms.
	if s := f.tr.Sessions(a.UID)[0]; s.Start.Before(login.Add(-time.Second)) || s.Start.After(time.Now()) {
		t.Errorf("session started %v, logged in at %v", s.Start, login)
	}

	before := f.total(t, a.UID)
	beforeC := f.counters(t, a.UID)
	const down = 16 * mib
	if _, got, err := tun.Transfer(0, down); err != nil || got != down+1 { // +1: the sink's answer
		t.Fatalf("tunnel transfer: %d bytes, %v", got, err)
	}
	within(t, "tunnel download", f.total(t, a.UID)-before, down)
	f.downloaded(t, "tunnel download", a.UID, beforeC, down)

	// A shell command's output, over a second login.
	sh := f.srv.Exec(t, a, sshtest.ClientOptions{}, "sleep 1; head -c 16777216 /dev/zero")
	f.waitSessions(t, a.UID, 2)
	before = f.total(t, a.UID)
	beforeC = f.counters(t, a.UID)
	if err := sh.Wait(30 * time.Second); err != nil {
		t.Fatalf("shell command: %v", err)
	}
	if sh.Received() != 16*mib {
		t.Fatalf("shell command output %d bytes", sh.Received())
	}
	// The credit covered what moved before the scan.
	within(t, "shell output", f.total(t, a.UID)-before, 16*mib)
	f.downloaded(t, "shell output", a.UID, beforeC, 16*mib)

	// Blocked: the tunnel carries nothing and is cut.
	if err := f.dp.ApplyPolicies(map[uint32]bpf.Policy{a.UID: {Blocked: true}}); err != nil {
		t.Fatal(err)
	}
	// The tunnel's session cut alone (CutSession), then whatever else
	// the user has (Cut: the shell's ended already).
	pid := 0
	for _, s := range f.tr.Sessions(a.UID) {
		if s.Remote == tun.Local {
			pid = s.PID
		}
	}
	if ok, err := f.tr.CutSession(pid); err != nil || !ok {
		t.Fatalf("cut of the tunnel's session (process %d): %v, %v", pid, ok, err)
	}
	if ok, err := f.tr.CutSession(pid); err != nil || ok {
		t.Errorf("second cut of the tunnel's session: %v, %v", ok, err)
	}
	if n, err := f.tr.Cut(a.UID); err != nil {
		t.Fatalf("cut: %d sessions, %v", n, err)
	}
	before = f.total(t, a.UID)
	if _, got, err := tun.Transfer(0, mib); err == nil || got > 1 {
		t.Errorf("blocked user's tunnel moved %d bytes", got)
	}
	if after := f.total(t, a.UID); after != before {
		t.Errorf("blocked user counted %d more bytes", after-before)
	}
}

// within checks that counted (wire bytes: SSH and TCP/IP overhead on top)
// is payload plus at most 10%.
func within(t *testing.T, what string, counted, payload uint64) {
	t.Helper()
	t.Logf("%s: %d payload bytes, %d counted (%+.2f%%)", what, payload, counted, 100*(float64(counted)/float64(payload)-1))
	if counted < payload || counted > payload+payload/10 {
		t.Errorf("%s: counted %d bytes for %d of payload, want payload to payload+10%%", what, counted, payload)
	}
}

// A Dropbear that logs only to the journal (syslog, as Debian's does, into
// a journald of the test's own): its sessions are attributed from the
// journal's entries, whose PID the journal took from the kernel.
func TestDropbearLoginsFromJournal(t *testing.T) {
	j := sshtest.StartJournal(t)
	f := newFixtureWith(t, sshtest.Dropbear, sshtest.Options{Journal: j})
	a := f.account(t)
	tun := f.srv.Tunnel(t, a, sshtest.ClientOptions{})
	f.waitSessions(t, a.UID, 1)
	before := f.total(t, a.UID)
	const down = 4 * mib
	if _, got, err := tun.Transfer(0, down); err != nil || got != down+1 {
		t.Fatalf("tunnel transfer: %d bytes, %v", got, err)
	}
	within(t, "tunnel download", f.total(t, a.UID)-before, down)
}

// What a session moved before it was attributed is credited in the user's
// directions: a shell command's output, all sent before the first scan (the
// first login on a server: credited from the socket's TCP counters), and
// one whose first 64 KiB a held login moved (credited from its pending
// entry), are the user's download.
func TestCreditIsTheUsersDownload(t *testing.T) {
	for _, kind := range sshtest.Kinds {
		t.Run(string(kind), func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, kind, netip.MustParseAddr("127.0.0.1"))
			a := f.account(t)
			const out = 4 * mib
			cmd := "head -c 4194304 /dev/zero; sleep 3"

			// Before any scan: nothing is attributed, no port held.
			sh := f.srv.Exec(t, a, sshtest.ClientOptions{}, cmd)
			deadline := time.Now().Add(10 * time.Second)
			for sh.Received() < out && time.Now().Before(deadline) {
				time.Sleep(20 * time.Millisecond)
			}
			if sh.Received() != out {
				t.Fatalf("shell output %d bytes before the scan", sh.Received())
			}
			before := f.counters(t, a.UID)
			f.waitSessions(t, a.UID, 1)
			f.downloaded(t, "output sent before the attribution", a.UID, before, out)

			// The next scan holds the port: then a login waits for its scan.
			f.scan(t)
			before = f.counters(t, a.UID)
			sh2 := f.srv.Exec(t, a, sshtest.ClientOptions{}, cmd)
			time.Sleep(1500 * time.Millisecond)
			if got := sh2.Received(); got >= out {
				t.Fatalf("a held login's output came whole (%d bytes) before its scan", got)
			}
			f.waitSessions(t, a.UID, 2)
			if err := sh2.Wait(30 * time.Second); err != nil {
				t.Fatalf("shell command: %v", err)
			}
			f.downloaded(t, "a held login's output", a.UID, before, out)
		})
	}
}
