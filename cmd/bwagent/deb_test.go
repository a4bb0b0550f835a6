package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/nettest"
)

// debPaths are what the package installs.
var debPaths = []string{
	"/usr/sbin/bwagent", "/usr/bin/bwctl", "/usr/bin/cek-bw-limit", "/lib/systemd/system/bwagent.service",
	"/etc/bwagent/bwagent.toml.example", "/usr/share/doc/bwagent/README.md",
	"/usr/share/bash-completion/completions/bwctl", "/usr/share/zsh/vendor-completions/_bwctl",
	"/usr/share/fish/vendor_completions.d/bwctl.fish",
}

// debDirs are the directories postinst creates (ProtectSystem=strict
// leaves only existing paths writable); the operators' ones stay after a
// purge.
var debDirs = []string{"/etc/myvpn", "/etc/myvpn/usage", "/etc/myvpn/blocked_users", "/etc/xray", "/var/lib/bwagent"}

// makeDeb runs make deb for version with its build in dir, and returns the
// package.
func makeDeb(t *testing.T, dir, version string) string {
	t.Helper()
	cmd := exec.Command("make", "-C", "../..", "deb", "BIN="+filepath.Join(dir, "bin-"+version),
		"DEB_OUT="+dir, "VERSION="+version)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make deb: %v\n%s", err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(dir, "bwagent_"+version+"_*.deb"))
	if len(debs) != 1 {
		t.Fatalf("make deb VERSION=%s made %q", version, debs)
	}
	return debs[0]
}

// dpkg runs dpkg with args and fails the test if it fails.
func dpkg(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("dpkg", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("dpkg %v: %v\n%s", args, err, out)
	}
	return string(out)
}

// installed reports whether the bwagent package is installed.
func installed() bool {
	out, _ := exec.Command("dpkg-query", "-W", "-f=${Status}", "bwagent").Output()
	return strings.HasSuffix(string(out), " installed")
}

// TestDebianPackage builds the package with make deb (two versions),
// installs it on this machine with dpkg and runs the agent from
// /usr/sbin/bwagent, started directly (systemd is not PID 1 here) with the
// test's own configuration, pins and namespace, while a user moves data:
// the files are where the package says, the binaries know their version,
// the installed unit passes systemd-analyze verify; dpkg -r stops the agent
// (prerm) and the kernel counts on; a reinstall, then an upgrade over the
// running agent and its restart keep every byte: at the end the saved
// totals equal the kernel's counters to the byte. dpkg --purge runs
// `bwagent uninstall` (pins gone) and leaves the operators' files.
//
// It installs the package on the machine for real and purges it in the
// end, also when it fails, removing the directories postinst created. It
// skips on a machine without dpkg, and where the package or one of its
// files is already installed, so as never to replace them.
func TestDebianPackage(t *testing.T) {
	nettest.RequireRoot(t)
	if _, err := exec.LookPath("dpkg"); err != nil {
		t.Skip("not a Debian machine: no dpkg")
	}
	if installed() {
		t.Skip("the bwagent package is installed here: this test would replace and purge it")
	}
	for _, p := range debPaths {
		if _, err := os.Lstat(p); err == nil {
			t.Skipf("%s exists (make install?): this test would replace and then remove it", p)
		}
	}
	const conf = "/etc/bwagent/bwagent.toml"
	_, err := os.Lstat(conf)
	ownConf := errors.Is(err, os.ErrNotExist)

	dir := t.TempDir()
	const v1, v2 = "0.0.1~bwtest1", "0.0.2~bwtest1"
	deb1, deb2 := makeDeb(t, dir, v1), makeDeb(t, dir, v2)

	const john, server = 2781, 2782
	e := newAgentEnv(t, fmt.Sprintf("john:x:%d:%d::/:/bin/false\n", john, john), "")
	srv := nettest.Start(t, nettest.Spec{NS: e.pair.B, Cgroup: e.cg, UID: server}, "tcp-serve",
		net.JoinHostPort(e.pair.B4.String(), "0"))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]

	var created []string // by dpkg or postinst, removed after the purge if empty
	for _, d := range append([]string{"/etc/bwagent"}, debDirs...) {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
			created = append(created, d)
		}
	}
	t.Cleanup(func() {
		if installed() || dpkgState() != "" {
			if out, err := exec.Command("dpkg", "--purge", "bwagent").CombinedOutput(); err != nil {
				t.Errorf("dpkg --purge: %v\n%s", err, out)
			}
		}
		if ownConf {
			os.Remove(conf)
		}
		for _, d := range slices.Backward(created) {
			if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("remove %s, made by postinst: %v", d, err)
			}
		}
	})

	dpkg(t, "-i", deb1)
	for _, p := range debPaths {
		if fi, err := os.Stat(p); err != nil || fi.Size() == 0 {
			t.Errorf("installed %s: %v", p, err)
		}
	}
	for _, d := range debDirs {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("postinst: %v", err)
		}
	}
	for bin, want := range map[string]string{"/usr/sbin/bwagent": "bwagent " + v1, "/usr/bin/bwctl": "bwctl " + v1} {
		if out, err := exec.Command(bin, "version").Output(); strings.TrimSpace(string(out)) != want {
			t.Errorf("%s version: %q, %v; want %q", bin, out, err, want)
		}
	}
	if _, err := exec.LookPath("systemd-analyze"); err == nil {
		// The installed unit as it is: its ExecStart= now exists.
		if out, err := exec.Command("systemd-analyze", "verify", "/lib/systemd/system/bwagent.service").CombinedOutput(); err != nil || len(out) > 0 {
			t.Errorf("systemd-analyze verify of the installed unit: %v\n%s", err, out)
		}
	}

	start := func() *realProc {
		t.Helper()
		sock := newSdNotifySocket(t)
		p := startRealAgent(t, e.pair.A, []string{"NOTIFY_SOCKET=" + sock.path}, nil, "/usr/sbin/bwagent", "--config", e.conf)
		sock.expect(t, "READY=1", 20*time.Second)
		return p
	}
	sock := filepath.Join(e.dir, "bwagent.sock")
	// used asks the packaged bwctl for john's usage until it passes atLeast.
	used := func(atLeast uint64) uint64 {
		t.Helper()
		var u struct{ Used uint64 }
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(200 * time.Millisecond) {
			out, err := exec.Command("/usr/bin/bwctl", "--socket", sock, "-o", "json", "usage", "john").Output()
			if err == nil && json.Unmarshal(out, &u) == nil && u.Used > atLeast {
				return u.Used
			}
			if time.Now().After(deadline) {
				t.Fatalf("bwctl usage john: %s %v; want more than %d", out, err, atLeast)
			}
		}
	}

	a := start()
	client := nettest.Start(t, nettest.Spec{NS: e.pair.A, Cgroup: e.cg, UID: john}, "tcp-client", addr, "inf", "inf")
	client.Expect(t, "CONNECTED", 5*time.Second)
	counted := used(4 << 20)

	dpkg(t, "-r", "bwagent")
	if err := a.wait(30 * time.Second); err != nil {
		t.Fatalf("the agent after dpkg -r: %v (prerm stops it with SIGTERM)", err)
	}
	if _, err := os.Stat("/usr/sbin/bwagent"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("/usr/sbin/bwagent after dpkg -r: %v", err)
	}
	saved := e.saved(t, "john")
	if saved.Up+saved.Down < counted {
		t.Errorf("saved at removal %d bytes, counted before %d", saved.Up+saved.Down, counted)
	}
	time.Sleep(time.Second) // no agent: the kernel counts on

	dpkg(t, "-i", deb1)
	a = start()
	counted = used(saved.Up + saved.Down + 4<<20)

	dpkg(t, "-i", deb2) // over the running agent
	select {
	case <-a.done:
		t.Fatalf("the running agent stopped at the upgrade: %v", a.err)
	default:
	}
	if out, _ := exec.Command("/usr/sbin/bwagent", "version").Output(); strings.TrimSpace(string(out)) != "bwagent "+v2 {
		t.Errorf("after the upgrade: %q", out)
	}
	// What systemd's restart in postinst does: the new binary takes over
	// the pins.
	a.signal(t, "/usr/sbin/bwagent", syscall.SIGTERM)
	if err := a.wait(10 * time.Second); err != nil {
		t.Fatalf("exit after SIGTERM: %v", err)
	}
	a = start()
	used(counted + 4<<20)

	client.Cmd.Process.Kill()
	client.Wait(5 * time.Second)
	time.Sleep(1500 * time.Millisecond) // the last bytes and FIN settle
	a.signal(t, "/usr/sbin/bwagent", syscall.SIGTERM)
	if err := a.wait(10 * time.Second); err != nil {
		t.Fatalf("exit after SIGTERM: %v", err)
	}
	want, got := e.counters(t, john), e.saved(t, "john")
	if got.Up != want.TxBytes || got.Down != want.RxBytes {
		t.Errorf("saved up/down %d/%d, kernel counted %d/%d", got.Up, got.Down, want.TxBytes, want.RxBytes)
	}
	t.Logf("%d bytes up, %d down across dpkg -r, -i and an upgrade", got.Up, got.Down)

	// Purge with this test's configuration as the machine's: its pins go.
	if ownConf {
		data, err := os.ReadFile(e.conf)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(conf, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	dpkg(t, "--purge", "bwagent")
	if s := dpkgState(); s != "" {
		t.Errorf("after purge: %q", s)
	}
	if _, err := os.Stat("/var/lib/bwagent"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("/var/lib/bwagent after purge: %v", err)
	}
	for _, d := range []string{"/etc/myvpn/usage", "/etc/xray"} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("the operators' %s after purge: %v", d, err)
		}
	}
	if ownConf {
		if _, err := os.Stat(e.pin); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pins after purge (bwagent uninstall): %v", err)
		}
		if _, err := os.Stat(conf); err != nil {
			t.Errorf("the operator's configuration after purge: %v", err)
		}
	}
}

// dpkgState is what dpkg knows of the bwagent package ("" for nothing: not
// even its configuration files).
func dpkgState() string {
	out, err := exec.Command("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "bwagent").Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}
