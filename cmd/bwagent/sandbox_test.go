package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/sshtest"
)

// unitFile is the systemd unit, the one source of both installs.
const unitFile = "../../scripts/bwagent.service"

// unitService returns the values of each key of the unit's [Service]
// section, in order.
func unitService(t *testing.T) map[string][]string {
	t.Helper()
	f, err := os.Open(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	keys := map[string][]string{}
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "["):
			section = line
		case section == "[Service]":
			k, v, _ := strings.Cut(line, "=")
			keys[k] = append(keys[k], v)
		}
	}
	return keys
}

// capNumbers are the capabilities a unit of ours might name.
var capNumbers = map[string]int{
	"CAP_BPF": unix.CAP_BPF, "CAP_NET_ADMIN": unix.CAP_NET_ADMIN, "CAP_PERFMON": unix.CAP_PERFMON,
	"CAP_SYS_ADMIN": unix.CAP_SYS_ADMIN, "CAP_SYS_RESOURCE": unix.CAP_SYS_RESOURCE, "CAP_NET_RAW": unix.CAP_NET_RAW,
	"CAP_DAC_OVERRIDE": unix.CAP_DAC_OVERRIDE, "CAP_DAC_READ_SEARCH": unix.CAP_DAC_READ_SEARCH,
	"CAP_CHOWN": unix.CAP_CHOWN, "CAP_FOWNER": unix.CAP_FOWNER, "CAP_KILL": unix.CAP_KILL,
	"CAP_SYS_PTRACE": unix.CAP_SYS_PTRACE,
}

// unitCaps returns the unit's CapabilityBoundingSet.
func unitCaps(t *testing.T) []string {
	t.Helper()
	sets := unitService(t)["CapabilityBoundingSet"]
	if len(sets) != 1 {
		t.Fatalf("CapabilityBoundingSet= %q: want one line", sets)
	}
	caps := strings.Fields(sets[0])
	for _, c := range caps {
		if _, ok := capNumbers[c]; !ok {
			t.Fatalf("capability %s: add it to capNumbers", c)
		}
	}
	return caps
}

// setpriv returns the command that runs a program as root with only caps,
// as systemd runs the unit: bounding set reduced to caps, no inheritable
// or ambient capabilities, no new privileges.
func setpriv(t *testing.T, caps []string) []string {
	t.Helper()
	exe, err := exec.LookPath("setpriv") // util-linux
	if err != nil {
		t.Fatalf("setpriv (util-linux): %v", err)
	}
	set := "-all"
	for _, c := range caps {
		set += ",+" + strings.ToLower(strings.TrimPrefix(c, "CAP_"))
	}
	return []string{exe, "--bounding-set=" + set, "--inh-caps=-all", "--ambient-caps=-all", "--no-new-privs", "--"}
}

// syncBuffer is a bytes.Buffer for a process's output.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// The users of agentJob: john moves data past his 1 MiB limit, mary gets a
// limit through the control socket.
const (
	jobJohn, jobServer, jobMary = 2761, 2762, 2763
)

// agentJob runs the agent with prefix before the real binary (setpriv,
// strace) and makes it do its whole job: start (READY=1), attach and pin
// the programs, count a user's traffic and block him at his limit in the
// kernel and the nft set, write the usage file and the block log, rewrite
// the limits file for a control call, report no failing component, and
// commit his usage at SIGTERM. It returns the agent's effective
// capabilities while it ran (when prefix execs it) and what it failed to
// do.
func agentJob(t *testing.T, bin string, prefix []string) (capEff uint64, problems []string) {
	t.Helper()
	tunneler := sshtest.NewAccount(t)
	e := newAgentEnv(t, fmt.Sprintf("john:x:%d:%d::/:/bin/false\nmary:x:%d:%d::/:/bin/false\n%s\n",
		jobJohn, jobJohn, jobMary, jobMary, tunneler.PasswdLine()), "john 1\n")
	srv := nettest.Start(t, nettest.Spec{NS: e.pair.B, Cgroup: e.cg, UID: jobServer}, "tcp-serve",
		net.JoinHostPort(e.pair.B4.String(), "0"))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]

	sock := newSdNotifySocket(t)
	stderr := &syncBuffer{}
	argv := append(slices.Clone(prefix), bin, "--config", e.conf)
	p := startRealAgent(t, e.pair.A, []string{"NOTIFY_SOCKET=" + sock.path}, stderr, argv...)
	defer func() {
		if len(problems) > 0 {
			t.Logf("%v:\n%s", argv, stderr.String())
		}
	}()
	ready := make(chan bool, 1)
	go func() {
		for m := range sock.msgs {
			if strings.HasPrefix(m, "READY=1") {
				ready <- true
				return
			}
		}
	}()
	select {
	case <-ready:
	case <-p.done:
		return 0, []string{fmt.Sprintf("exited before READY=1 (%v): %s", p.err, lastLine(stderr.String()))}
	case <-time.After(30 * time.Second):
		return 0, []string{"no READY=1 within 30 s"}
	}
	if status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.pid(bin))); err == nil {
		if m := regexp.MustCompile(`(?m)^CapEff:\s+([0-9a-f]+)$`).FindSubmatch(status); m != nil {
			capEff, _ = strconv.ParseUint(string(m[1]), 16, 64)
		}
	}
	for _, pin := range []string{"bw_hash_counts", "bw_policy"} {
		if _, err := os.Stat(filepath.Join(e.pin, pin)); err != nil {
			problems = append(problems, "pin: "+err.Error())
		}
	}

	ctx := context.Background()
	c, err := control.Dial(ctx, filepath.Join(e.dir, "bwagent.sock"))
	if err != nil {
		return capEff, append(problems, "control socket: "+err.Error())
	}
	defer c.Close()
	nettest.Start(t, nettest.Spec{NS: e.pair.A, Cgroup: e.cg, UID: jobJohn}, "tcp-client", addr, "inf", "inf", "30s")
	var john control.User
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if john, err = c.User(ctx, "john"); err == nil && john.Status == "BLOCKED" {
			break
		}
	}
	if john.Status != "BLOCKED" || john.Used < 900<<10 {
		problems = append(problems, fmt.Sprintf("john not counted and blocked at 1 MiB: %+v, %v", john, err))
	}
	if err := c.SetLimit(ctx, "mary", 5<<20); err != nil {
		problems = append(problems, "set mary's limit: "+err.Error())
	}
	if data, _ := os.ReadFile(filepath.Join(e.dir, "bw-limit.conf")); string(data) != "john 1\nmary 5\n" {
		problems = append(problems, fmt.Sprintf("limits file %q", data))
	}
	// An SSH session (OpenSSH, in the agent's network namespace): found,
	// its connection taken from sshd and counted for its user.
	sshd := sshtest.Start(t, sshtest.OpenSSH, sshtest.Options{NS: e.pair.A, Cgroup: e.cg})
	tun := sshd.Tunnel(t, tunneler, sshtest.ClientOptions{})
	var h control.Health
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if h, err = c.Status(ctx); err == nil && h.Kernel.SSHSessions == 1 {
			break
		}
	}
	if h.Kernel.SSHSessions != 1 {
		problems = append(problems, fmt.Sprintf("SSH session not counted: %q, %v", h.Components["ssh sessions"], err))
	} else if _, got, err := tun.Transfer(0, 2<<20); err != nil || got != 1+2<<20 {
		problems = append(problems, fmt.Sprintf("download through the SSH tunnel: %d bytes, %v", got, err))
	} else {
		var u control.User
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			if u, err = c.User(ctx, tunneler.Name); err == nil && u.Used >= 2<<20 {
				break
			}
		}
		if u.Used < 2<<20 {
			problems = append(problems, fmt.Sprintf("the SSH tunnel's 2 MiB not counted: %+v, %v", u, err))
		}
	}
	if h, err := c.Status(ctx); err != nil || len(h.Errors) > 0 {
		problems = append(problems, fmt.Sprintf("failing: %v %v", h.Errors, err))
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		usage, _ := os.ReadFile(filepath.Join(e.dir, "usage", "john.json"))
		log, _ := os.ReadFile(filepath.Join(e.dir, "blocked.log"))
		if bytes.Contains(usage, []byte(`"status": "BLOCKED"`)) && bytes.Contains(log, []byte("| ssh | john | Bandwidth Limit Reached")) {
			break
		}
		if time.Now().After(deadline) {
			problems = append(problems, fmt.Sprintf("john.json %q, block log %q", usage, log))
			break
		}
	}

	p.signal(t, bin, syscall.SIGTERM)
	if err := p.wait(10 * time.Second); err != nil {
		problems = append(problems, fmt.Sprintf("exit after SIGTERM: %v", err))
	}
	if saved := e.saved(t, "john"); saved.Up+saved.Down < 900<<10 {
		problems = append(problems, fmt.Sprintf("john's usage not saved: %+v", saved))
	}
	return capEff, problems
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// TestCapabilities: as root with only the unit's CapabilityBoundingSet the
// real agent does its whole job (agentJob) with exactly those capabilities
// in effect; without any one of them it fails part of it, so none can go.
func TestCapabilities(t *testing.T) {
	nettest.RequireRoot(t)
	bin := buildRealAgent(t)
	caps := unitCaps(t)
	var want uint64
	for _, c := range caps {
		want |= 1 << capNumbers[c]
	}
	capEff, problems := agentJob(t, bin, setpriv(t, caps))
	if len(problems) > 0 {
		t.Errorf("with %v: %s", caps, strings.Join(problems, "; "))
	}
	if capEff != want {
		t.Errorf("effective capabilities %#x, want %#x (%v)", capEff, want, caps)
	}
	for _, drop := range caps {
		fewer := slices.DeleteFunc(slices.Clone(caps), func(c string) bool { return c == drop })
		t.Run("without "+drop, func(t *testing.T) {
			_, problems := agentJob(t, bin, setpriv(t, fewer))
			if len(problems) == 0 {
				t.Errorf("the agent does its whole job without %s: drop it from the unit", drop)
			}
			t.Logf("without %s: %s", drop, strings.Join(problems, "; "))
		})
	}
}

// TestSyscalls runs the agent's whole job (agentJob) under strace and
// checks every system call it made against the unit's SystemCallFilter=
// (expanded by systemd-analyze syscall-filter), every socket's family
// against RestrictAddressFamilies=, and that no mapping was made writable
// and executable (MemoryDenyWriteExecute=). systemd itself does not run
// here, so this is the check of the filter short of running under it.
func TestSyscalls(t *testing.T) {
	nettest.RequireRoot(t)
	strace, err := exec.LookPath("strace")
	if err != nil {
		t.Fatalf("strace (make test-deps installs it): %v", err)
	}
	allowed := syscallFilter(t, unitService(t)["SystemCallFilter"])
	trace := filepath.Join(t.TempDir(), "trace")
	bin := buildRealAgent(t)
	if _, problems := agentJob(t, bin, []string{strace, "-f", "-qq", "-s", "0", "-e", "signal=none", "-o", trace}); len(problems) > 0 {
		t.Fatalf("the agent's job under strace: %s", strings.Join(problems, "; "))
	}
	data, err := os.ReadFile(trace)
	if err != nil {
		t.Fatal(err)
	}
	called := map[string]int{}
	families := map[string]bool{}
	var wx []string
	call := regexp.MustCompile(`^\d+\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]`)
	for _, line := range strings.Split(string(data), "\n") {
		m := call.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		called[m[1]]++
		if m[1] == "socket" {
			if f := regexp.MustCompile(`socket\((AF_[A-Z0-9]+)`).FindStringSubmatch(line); f != nil {
				families[f[1]] = true
			}
		}
		if (m[1] == "mmap" || m[1] == "mprotect") && strings.Contains(line, "PROT_WRITE") && strings.Contains(line, "PROT_EXEC") {
			wx = append(wx, line)
		}
	}
	if called["bpf"] == 0 || called["sendmsg"]+called["sendto"] == 0 || len(called) < 30 {
		t.Fatalf("the trace misses the agent's calls: %v", called)
	}
	var denied []string
	for name := range called {
		if !allowed[name] && name != "execve" { // strace's exec of the agent
			denied = append(denied, name)
		}
	}
	slices.Sort(denied)
	if len(denied) > 0 {
		t.Errorf("system calls outside SystemCallFilter=: %v", denied)
	}
	okFamilies := strings.Fields(strings.Join(unitService(t)["RestrictAddressFamilies"], " "))
	for f := range families {
		if !slices.Contains(okFamilies, f) {
			t.Errorf("socket family %s outside RestrictAddressFamilies=%v", f, okFamilies)
		}
	}
	if len(wx) > 0 {
		t.Errorf("writable and executable mappings (MemoryDenyWriteExecute=): %q", wx)
	}
	t.Logf("%d system calls, all allowed: %v; socket families %v", len(called), slices.Sorted(maps.Keys(called)), slices.Sorted(maps.Keys(families)))
}

// syscallFilter expands the unit's SystemCallFilter= lines (allow lists;
// a deny list "~..." after them removes calls) with the groups
// systemd-analyze knows.
func syscallFilter(t *testing.T, lines []string) map[string]bool {
	t.Helper()
	out, err := exec.Command("systemd-analyze", "syscall-filter").Output()
	if err != nil {
		t.Fatalf("systemd-analyze syscall-filter (the systemd package; make test-deps installs it): %v", err)
	}
	groups := map[string][]string{}
	group := ""
	for _, line := range strings.Split(string(out), "\n") {
		switch {
		case strings.HasPrefix(line, "@"):
			group = strings.TrimSpace(line)
		case strings.HasPrefix(line, "    ") && group != "":
			if item := strings.TrimSpace(line); !strings.HasPrefix(item, "#") {
				groups[group] = append(groups[group], item)
			}
		case strings.TrimSpace(line) == "":
			group = ""
		}
	}
	var expand func(item string, into map[string]bool)
	expand = func(item string, into map[string]bool) {
		if !strings.HasPrefix(item, "@") {
			into[item] = true
			return
		}
		members, ok := groups[item]
		if !ok {
			t.Fatalf("unknown system call group %s", item)
		}
		for _, m := range members {
			expand(m, into)
		}
	}
	allowed := map[string]bool{}
	for _, line := range lines {
		deny := strings.HasPrefix(line, "~")
		set := map[string]bool{}
		for _, item := range strings.Fields(strings.TrimPrefix(line, "~")) {
			expand(item, set)
		}
		for name := range set {
			allowed[name] = !deny
		}
	}
	if !allowed["bpf"] || !allowed["read"] {
		t.Fatalf("SystemCallFilter=%q does not expand as expected: %d calls", lines, len(allowed))
	}
	return allowed
}
