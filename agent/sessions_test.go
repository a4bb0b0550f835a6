package agent

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/store"

	"github.com/myvpn/bwagent/internal/sshtest"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/view"
)

// user returns name's row as the agent publishes it.
func (k *kernelEnv) user(t *testing.T, name string) view.User {
	t.Helper()
	v, err := k.a.User(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// run runs the agent's loop, ticking every second, until t's end or
// until the function it returns is called.
func (k *kernelEnv) run(t *testing.T) (stop func()) {
	t.Helper()
	k.a.inline = false
	k.a.interval.Store(int64(time.Second))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- k.a.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	k.stop = stop
	select {
	case <-k.a.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("agent not ready after 10 s")
	}
	return stop
}

// restart replaces the stopped agent by a new one over the same pins,
// database and configuration, as a restart of bwagent does, and runs it.
func (k *kernelEnv) restart(t *testing.T) {
	t.Helper()
	cfg := k.a.cfg
	if err := k.dp.Close(); err != nil {
		t.Fatal(err)
	}
	dp, err := bpf.Load(bpf.Config{CgroupPath: k.cg, PinPath: cfg.Kernel.PinPath})
	if err != nil {
		t.Fatal(err)
	}
	k.dp = dp
	st, err := store.Open(cfg.Paths.StateDB)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	k.a, err = New(Options{Config: cfg, Dataplane: dp, Sessions: dp, XrayKernel: dp, Firewall: k.fw, Store: st,
		Log: slog.New(slog.NewTextHandler(os.Stderr, nil))})
	if err != nil {
		t.Fatal(err)
	}
	a := k.a
	t.Cleanup(func() { a.Close() })
	k.run(t)
}

// waitFor waits up to timeout for cond.
func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not %s after %v", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

const mib = 1 << 20

// TestSSHSessions (issue 10): with OpenSSH and with Dropbear (2022.83 here,
// whose session process forwards as root), the agent's loop counts a user's
// SSH connection: a tunnel download paced at 4 MiB/s stops at the limit in
// the kernel, the user is BLOCKED in the view and the block log; a new
// login of the blocked user gets nothing through; after a reset their
// shell output and an scp download count, and the scp stops at the limit; an
// unlimited user of the same server streams on throughout.
func TestSSHSessions(t *testing.T) {
	for _, kind := range sshtest.Kinds {
		t.Run(string(kind), func(t *testing.T) {
			t.Parallel()
			lim, free := sshtest.NewAccount(t), sshtest.NewAccount(t)
			const limit = 12 * mib
			k := newKernelEnv(t, lim.PasswdLine()+"\n"+free.PasswdLine()+"\n", lim.Name+" 12\n")
			srv := sshtest.Start(t, kind, sshtest.Options{Cgroup: k.cg})
			k.a.cfg.SSH.AuthLogs = []string{srv.LogFile}
			k.run(t)
			sessions := func(n uint64) func() bool {
				return func() bool { return k.a.Health().Kernel.SSHSessions == n }
			}

			ft := srv.Tunnel(t, free, sshtest.ClientOptions{})
			fs := ft.Stream(t, 0, mib)
			tun := srv.Tunnel(t, lim, sshtest.ClientOptions{})
			waitFor(t, "two sessions counted", 5*time.Second, sessions(2))

			// A tunnel download paced at 4 MiB/s, stopped at the limit.
			ls := tun.Stream(t, 0, 4*mib)
			waitFor(t, lim.Name+" blocked", 15*time.Second, func() bool { return k.user(t, lim.Name).Status == quota.Blocked })
			if !ls.Stopped(time.Second, 5*time.Second) {
				t.Error("the blocked user's download goes on")
			}
			v := k.user(t, lim.Name)
			_, got := ls.Progress()
			t.Logf("blocked at %d counted bytes of %d (%d payload received)", v.Used, uint64(limit), got)
			if v.Used > limit {
				t.Errorf("counted %d bytes, over the limit %d", v.Used, uint64(limit))
			}
			if v.Used < limit-64<<10 {
				t.Errorf("blocked at %d bytes, more than a packet under the limit %d", v.Used, uint64(limit))
			}
			waitFor(t, "the block logged", 5*time.Second, func() bool {
				log, _ := os.ReadFile(k.cfg.Paths.BlockLog)
				return strings.Contains(string(log), lim.Name)
			})
			waitFor(t, "the usage file BLOCKED", 10*time.Second, func() bool {
				u, err := opsfiles.ReadUsage(filepath.Join(k.cfg.Paths.UsageDir, lim.Name+".json"))
				return err == nil && u.Status == "BLOCKED" && u.Blocked
			})
			if !fs.Flowing(2 * time.Second) {
				t.Error("the unlimited user's stream stopped")
			}

			// A new login while blocked gets nothing through: the
			// download starts as soon as the tunnel is up.
			if again, err := srv.TryTunnel(t, lim, sshtest.ClientOptions{}, 10*time.Second); err != nil {
				t.Logf("the blocked user's new login failed: %v", err)
			} else if _, n, err := again.Transfer(0, mib); err == nil || n > 1 {
				t.Errorf("a blocked user's new login moved %d bytes (%v)", n, err)
			}
			// What the login moved before the kernel knew whose it was
			// (its key exchange, at most the 64 KiB a login may move
			// unattributed) did cross the wire, and counts.
			if u := k.user(t, lim.Name).Used; u > limit+64<<10 {
				t.Errorf("counted %d bytes after the new login, over the limit and a login's allowance", u)
			}

			// Reset: back in, with the shell and scp counted and stopped.
			if err := k.a.Reset(context.Background(), lim.Name); err != nil {
				t.Fatal(err)
			}
			out, err := srv.Run(t, lim, sshtest.ClientOptions{}, "head -c 4194304 /dev/zero")
			if err != nil || len(out) == 0 {
				t.Fatalf("shell command after the reset: %v", err)
			}
			var shell uint64
			waitFor(t, "shell output counted", 5*time.Second, func() bool {
				shell = k.user(t, lim.Name).Used
				return shell >= 4*mib
			})
			time.Sleep(1500 * time.Millisecond) // a tick more: nothing more comes
			shell = k.user(t, lim.Name).Used
			t.Logf("4 MiB of shell output counted as %d bytes", shell)
			if shell > 4*mib+4*mib/10 {
				t.Errorf("4 MiB of shell output counted as %d bytes", shell)
			}
			// scp of a file larger than what is left: stopped at the limit.
			big := filepath.Join(lim.Home, "big")
			if err := os.WriteFile(big, make([]byte, 16*mib), 0o644); err != nil {
				t.Fatal(err)
			}
			os.Chown(big, int(lim.UID), int(lim.GID))
			if err := srv.Fetch(t, lim, sshtest.ClientOptions{}, "big", filepath.Join(t.TempDir(), "big")); err == nil {
				t.Error("scp of 16 MiB finished past the limit")
			} else {
				t.Logf("scp stopped: %v; %+v", err, k.user(t, lim.Name))
			}
			waitFor(t, lim.Name+" blocked by scp", 5*time.Second, func() bool { return k.user(t, lim.Name).Status == quota.Blocked })
			if u := k.user(t, lim.Name).Used; u > limit {
				t.Errorf("scp: counted %d bytes, over the limit %d", u, uint64(limit))
			}
			if !fs.Flowing(2 * time.Second) {
				t.Errorf("the unlimited user's stream stopped: %v; its tunnel: %v", fs.Err(), ft.Err())
			}
		})
	}
}

// TestSSHSessionsAcrossRestart: the kernel counts a session for its user
// while no agent runs, and the next agent finds the session attributed
// already (also a Dropbear one, whose login line it did not read): what
// the session moved is counted once, none of it credited twice.
func TestSSHSessionsAcrossRestart(t *testing.T) {
	for _, kind := range sshtest.Kinds {
		t.Run(string(kind), func(t *testing.T) {
			t.Parallel()
			acct := sshtest.NewAccount(t)
			k := newKernelEnv(t, acct.PasswdLine()+"\n", "")
			srv := sshtest.Start(t, kind, sshtest.Options{Cgroup: k.cg})
			k.a.cfg.SSH.AuthLogs = []string{srv.LogFile}
			stop := k.run(t)
			tun := srv.Tunnel(t, acct, sshtest.ClientOptions{})
			waitFor(t, "the session counted", 5*time.Second, func() bool { return k.a.Health().Kernel.SSHSessions == 1 })
			if _, got, err := tun.Transfer(0, 4*mib); err != nil || got != 4*mib+1 {
				t.Fatalf("download: %d, %v", got, err)
			}
			waitFor(t, "the download counted", 5*time.Second, func() bool { return k.user(t, acct.Name).Used >= 4*mib })
			stop()
			before := k.user(t, acct.Name).Used

			// No agent: the kernel goes on counting the session.
			if _, got, err := tun.Transfer(0, 4*mib); err != nil || got != 4*mib+1 {
				t.Fatalf("download while no agent runs: %d, %v", got, err)
			}
			k.restart(t)
			waitFor(t, "the session found again", 5*time.Second, func() bool { return k.a.Health().Kernel.SSHSessions == 1 })
			var used uint64
			waitFor(t, "the download without an agent counted", 5*time.Second, func() bool {
				used = k.user(t, acct.Name).Used
				return used >= before+4*mib
			})
			time.Sleep(1500 * time.Millisecond) // a tick more: nothing more comes
			used = k.user(t, acct.Name).Used
			t.Logf("before the restart %d bytes, after %d (4 MiB moved between)", before, used)
			if used > before+4*mib+4*mib/20 {
				t.Errorf("counted %d bytes for a 4 MiB download across the restart", used-before)
			}
		})
	}
}

// TestDropbearJournal: with `ssh.auth_logs = ["journal:NS"]` the agent reads
// Dropbear's logins from the journal (a journald of the test's own, as on a
// system that keeps its logs only there) and counts the session.
func TestDropbearJournal(t *testing.T) {
	j := sshtest.StartJournal(t)
	acct := sshtest.NewAccount(t)
	k := newKernelEnv(t, acct.PasswdLine()+"\n", "")
	srv := sshtest.Start(t, sshtest.Dropbear, sshtest.Options{Cgroup: k.cg, Journal: j})
	k.a.cfg.SSH.AuthLogs = []string{"journal:" + j.Namespace}
	k.run(t)
	tun := srv.Tunnel(t, acct, sshtest.ClientOptions{})
	waitFor(t, "the session counted", 5*time.Second, func() bool { return k.a.Health().Kernel.SSHSessions == 1 })
	if _, got, err := tun.Transfer(0, 4*mib); err != nil || got != 4*mib+1 {
		t.Fatalf("download: %d, %v", got, err)
	}
	waitFor(t, "the download counted", 5*time.Second, func() bool { return k.user(t, acct.Name).Used >= 4*mib })
}
