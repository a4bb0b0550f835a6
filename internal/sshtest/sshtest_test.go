package sshtest_test

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/sshtest"
)

// TestServers: with each server, a password login opens a tunnel from the
// chosen source address, which the server logs (Dropbear with the PID of
// the session process that holds the connection) and through which 8 MiB
// arrive exactly; a command's output arrives, 16 MiB of it too; scp copies
// a file intact; a key logs in; a wrong password does not; a login that
// hangs is given up; stopping the server ends its sessions.
func TestServers(t *testing.T) {
	for _, kind := range sshtest.Kinds {
		t.Run(string(kind), func(t *testing.T) {
			t.Parallel()
			a := sshtest.NewAccount(t)
			srv := sshtest.Start(t, kind, sshtest.Options{})
			t.Logf("%s %s on %s", kind, srv.Version, srv.Addr)
			// Servers delay their answer to a wrong password (by 2 s and
			// more): that login runs beside the rest.
			wrong := *a
			wrong.Password = "not-" + a.Password
			refused := srv.Exec(t, &wrong, sshtest.ClientOptions{}, "true")

			tun := srv.Tunnel(t, a, sshtest.ClientOptions{Source: "127.0.0.2"})
			if want := netip.MustParseAddr("127.0.0.2"); tun.Local.Addr() != want {
				t.Errorf("tunnel's connection from %s, want %s", tun.Local, want)
			}
			login := tun.Login(t)
			t.Logf("login: %+v", login)
			if login.User != a.Name || login.Method != "password" || login.From != tun.Local {
				t.Errorf("login %+v, want %s by password from %s", login, a.Name, tun.Local)
			}
			pids := tun.ServerPIDs(t)
			switch kind {
			case sshtest.Dropbear:
				// The logged PID is the session process: the listener's
				// child, alone holding the connection.
				if len(pids) != 1 || pids[0] != login.PID || parent(t, login.PID) != srv.PID() {
					t.Errorf("connection held by %v, logged PID %d (parent %d), listener %d",
						pids, login.PID, parent(t, login.PID), srv.PID())
				}
			case sshtest.OpenSSH:
				// The privileged monitor (root) and the session process
				// (the user's).
				var uids []uint32
				for _, pid := range pids {
					uids = append(uids, uid(t, pid))
				}
				if len(pids) != 2 || uids[0] != 0 || uids[1] != a.UID {
					t.Errorf("connection held by %v with UIDs %v, want root's monitor and %d's session", pids, uids, a.UID)
				}
				srv.WaitLog(t, "Connection from 127.0.0.2 port "+strconv.Itoa(int(tun.Local.Port())), time.Second)
			}

			const size = 8 << 20
			if _, received, err := tun.Transfer(0, size); err != nil || received != 1+size {
				t.Errorf("download through the tunnel: %d bytes, %v; want %d", received, err, 1+size)
			}
			if sent, _, err := tun.Transfer(size, 0); err != nil || sent != 17+size {
				t.Errorf("upload through the tunnel: %d bytes, %v; want %d", sent, err, 17+size)
			}

			pull := srv.Exec(t, a, sshtest.ClientOptions{}, "head -c 16M /dev/zero")
			out, err := srv.Run(t, a, sshtest.ClientOptions{},
				"id -un; id -u; echo $SSH_CONNECTION; head -c 8M /dev/urandom > big && sha256sum big")
			want := fmt.Sprintf("%s\n%d\n127.0.0.1 ", a.Name, a.UID)
			if err != nil || !strings.HasPrefix(string(out), want) {
				t.Fatalf("command: %q, %v; want %q...", out, err, want)
			}
			local := filepath.Join(t.TempDir(), "big")
			if err := srv.Fetch(t, a, sshtest.ClientOptions{}, "big", local); err != nil {
				t.Fatalf("scp: %v", err)
			}
			b, err := os.ReadFile(local)
			if got := fmt.Sprintf("%x  big\n", sha256.Sum256(b)); err != nil || len(b) != 8<<20 || !strings.HasSuffix(string(out), got) {
				t.Errorf("scp copied %d bytes, %q; the server has %q (%v)", len(b), got, out, err)
			}
			if err := pull.Wait(20 * time.Second); err != nil || pull.Received() != 16<<20 {
				t.Errorf("16 MiB over the shell: %d bytes, %v", pull.Received(), err)
			}

			key := a.AuthorizeKey(t)
			k := srv.Tunnel(t, a, sshtest.ClientOptions{Identity: key, Source: "127.0.0.3"})
			if l := k.Login(t); l.Method != "publickey" || l.User != a.Name {
				t.Errorf("key login: %+v", l)
			}

			if err := refused.Wait(10 * time.Second); err == nil || !strings.Contains(err.Error(), "password was refused") {
				t.Errorf("wrong password: %v", err)
			}

			// A login that hangs (the server is stopped with SIGSTOP):
			// TryTunnel gives up in time.
			if err := syscall.Kill(srv.PID(), syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			_, err = srv.TryTunnel(t, a, sshtest.ClientOptions{}, 500*time.Millisecond)
			t.Logf("login to a frozen server: %v", err)
			if err == nil || time.Since(start) > 3*time.Second {
				t.Errorf("login to a frozen server: %v after %v", err, time.Since(start))
			}
			syscall.Kill(srv.PID(), syscall.SIGCONT)

			srv.Stop()
			for _, s := range []*sshtest.Session{tun, k} {
				select {
				case <-s.Done():
				case <-time.After(5 * time.Second):
					t.Errorf("session from %s still up 5 s after the server stopped", s.Local)
				}
			}
		})
	}
}

// TestNamespace: a server in a network namespace and under a cgroup of
// the test's: it runs in a cgroup of its own under that one, and a client
// run as the account's UID tunnels and runs commands through it.
func TestNamespace(t *testing.T) {
	for _, kind := range sshtest.Kinds {
		t.Run(string(kind), func(t *testing.T) {
			t.Parallel()
			nettest.RequireRoot(t)
			root, err := bpf.CgroupV2Root()
			if err != nil {
				t.Fatal(err)
			}
			cg := nettest.NewCgroup(t, root)
			ns := nettest.NewNetNS(t)
			a := sshtest.NewAccount(t)
			srv := sshtest.Start(t, kind, sshtest.Options{NS: ns, Cgroup: cg})
			if filepath.Dir(srv.Cgroup) != cg {
				t.Errorf("server's cgroup %s, want a child of %s", srv.Cgroup, cg)
			}
			if got := cgroupOf(t, srv.PID()); got != srv.Cgroup {
				t.Errorf("server in %s, want %s", got, srv.Cgroup)
			}
			tun := srv.Tunnel(t, a, sshtest.ClientOptions{UID: a.UID, Source: "127.0.0.5"})
			for _, pid := range procs(t, tun.Cgroup) {
				if got := uid(t, pid); got != a.UID {
					t.Errorf("client process %d runs as %d, want %d", pid, got, a.UID)
				}
			}
			if _, received, err := tun.Transfer(0, 1<<20); err != nil || received != 1+1<<20 {
				t.Errorf("download: %d bytes, %v", received, err)
			}
			if out, err := srv.Run(t, a, sshtest.ClientOptions{UID: a.UID}, "echo $SSH_CONNECTION"); err != nil ||
				!strings.HasSuffix(strings.TrimSpace(string(out)), fmt.Sprintf("127.0.0.1 %d", srv.Addr.Port())) {
				t.Errorf("command: %q, %v", out, err)
			}
		})
	}
}

// TestIPv6: a server on an IPv6 address in a network namespace of the
// test's; clients from two other addresses of its /64 log in, tunnel and
// copy with scp, and the server logs their addresses.
func TestIPv6(t *testing.T) {
	for _, kind := range sshtest.Kinds {
		t.Run(string(kind), func(t *testing.T) {
			t.Parallel()
			nettest.RequireRoot(t)
			ns := nettest.NewNetNS(t)
			server := netip.MustParseAddr("fd00:b1::1")
			sources := []netip.Addr{netip.MustParseAddr("fd00:b1::2"), netip.MustParseAddr("fd00:b1::3")}
			for _, a := range append([]netip.Addr{server}, sources...) {
				nettest.AddLoopbackAddrs(t, ns, a.String()+"/64")
			}

			a := sshtest.NewAccount(t)
			srv := sshtest.Start(t, kind, sshtest.Options{NS: ns, Addr: server})
			if srv.Addr.Addr() != server {
				t.Errorf("server on %s, want %s", srv.Addr, server)
			}
			for _, src := range sources {
				tun := srv.Tunnel(t, a, sshtest.ClientOptions{Source: src.String()})
				if tun.Local.Addr() != src {
					t.Errorf("tunnel from %s, want %s", tun.Local, src)
				}
				if l := tun.Login(t); l.From != tun.Local || l.User != a.Name {
					t.Errorf("login %+v, want %s from %s", l, a.Name, tun.Local)
				}
				if _, received, err := tun.Transfer(0, 1<<20); err != nil || received != 1+1<<20 {
					t.Errorf("download from %s: %d bytes, %v", src, received, err)
				}
			}
			if _, err := srv.Run(t, a, sshtest.ClientOptions{}, "echo hello > f"); err != nil {
				t.Fatal(err)
			}
			local := filepath.Join(t.TempDir(), "f")
			if err := srv.Fetch(t, a, sshtest.ClientOptions{Source: sources[1].String()}, "f", local); err != nil {
				t.Fatalf("scp: %v", err)
			}
			if b, err := os.ReadFile(local); err != nil || string(b) != "hello\n" {
				t.Errorf("scp copied %q, %v", b, err)
			}
		})
	}
}

// TestCleanup: once a test ends, its account (home included), servers,
// sessions, cgroups and temp dirs are gone.
func TestCleanup(t *testing.T) {
	var (
		name, home string
		pids       []int
		dirs       []string
	)
	t.Run("use", func(t *testing.T) {
		a := sshtest.NewAccount(t)
		name, home = a.Name, a.Home
		for _, kind := range sshtest.Kinds {
			srv := sshtest.Start(t, kind, sshtest.Options{})
			tun := srv.Tunnel(t, a, sshtest.ClientOptions{Source: "127.0.0.4"})
			cmd := srv.Exec(t, a, sshtest.ClientOptions{}, "sleep 60")
			tun.Stream(t, 0, 1<<20)
			srv.WaitLog(t, "", time.Second)
			pids = append(pids, srv.PID())
			pids = append(pids, tun.ServerPIDs(t)...)
			pids = append(pids, procs(t, tun.Cgroup)...)
			pids = append(pids, procs(t, cmd.Cgroup)...)
			dirs = append(dirs, srv.Dir, srv.Cgroup, tun.Cgroup, cmd.Cgroup)
		}
	})
	if _, err := user.Lookup(name); err == nil {
		t.Errorf("account %s still there", name)
	}
	for _, dir := range append(dirs, home) {
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still there: %v", dir, err)
		}
	}
	// Killed processes may be zombies for a moment, until their new
	// parent reaps them.
	deadline := time.Now().Add(2 * time.Second)
	for _, pid := range pids {
		for alive(pid) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if alive(pid) {
			t.Errorf("process %d still running", pid)
		}
	}
}

// alive tells whether process pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(b), ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

// parent returns the parent of process pid.
func parent(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		t.Fatal(err)
	}
	return ppid
}

// uid returns the effective UID of process pid.
func uid(t *testing.T, pid int) uint32 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			var real, effective uint32
			fmt.Sscan(rest, &real, &effective)
			return effective
		}
	}
	t.Fatalf("no Uid in /proc/%d/status", pid)
	return 0
}

// cgroupOf returns the cgroup v2 directory of process pid.
func cgroupOf(t *testing.T, pid int) string {
	t.Helper()
	root, err := bpf.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "0::"); ok {
			return filepath.Join(root, rest)
		}
	}
	t.Fatalf("process %d has no cgroup v2 line: %q", pid, b)
	return ""
}

// procs returns the processes of a cgroup.
func procs(t *testing.T, cgroup string) []int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(cgroup, "cgroup.procs"))
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		pid, err := strconv.Atoi(f)
		if err != nil {
			t.Fatal(err)
		}
		pids = append(pids, pid)
	}
	return pids
}
