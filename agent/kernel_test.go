package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/sshtest"
	"github.com/myvpn/bwagent/nft"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

func TestMain(m *testing.M) { nettest.Main(m) }

// kernelEnv is an agent over the real data plane, nftables and store, with
// its own cgroup, pins, table, network namespaces and files.
type kernelEnv struct {
	cfg  config.Config
	cg   string
	pair *nettest.Pair
	dp   *bpf.Datapath
	fw   *nft.Firewall
	a    *Agent
	// stop stops the loop that run started.
	stop func()
}

func newKernelEnv(t *testing.T, passwdText, limits string) *kernelEnv {
	t.Helper()
	nettest.RequireRoot(t)
	root, err := bpf.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	k := &kernelEnv{cg: nettest.NewCgroup(t, root), pair: nettest.NewPair(t)}
	k.cfg = config.Default()
	k.cfg.Kernel.Cgroup = k.cg
	k.cfg.Kernel.PinPath = filepath.Join("/sys/fs/bpf", nettest.Name("bwtest-"))
	k.cfg.NFT.Table = nettest.Name("bwtest")
	for p, name := range map[*string]string{&k.cfg.Paths.Limits: "bw-limit.conf", &k.cfg.Paths.UsageDir: "usage",
		&k.cfg.Paths.MarkerDir: "blocked_users", &k.cfg.Paths.BlockLog: "blocked.log", &k.cfg.Paths.StateDB: "state.db",
		&k.cfg.Paths.Passwd: "passwd", &k.cfg.Paths.Socket: "bwagent.sock"} {
		*p = filepath.Join(dir, name)
	}
	k.cfg.Xray.Configs = []string{filepath.Join(dir, "xray.json")}
	os.WriteFile(k.cfg.Paths.Passwd, []byte(passwdText), 0o644)
	os.WriteFile(k.cfg.Paths.Limits, []byte(limits), 0o644)

	k.dp, err = bpf.Load(bpf.Config{CgroupPath: k.cg, PinPath: k.cfg.Kernel.PinPath})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := k.dp.Uninstall(); err != nil {
			t.Error(err)
		}
	})
	k.fw, err = nft.New(nft.Config{Table: k.cfg.NFT.Table, NetNS: int(k.pair.A)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.fw.Remove(); k.fw.Close() })
	st, err := store.Open(k.cfg.Paths.StateDB)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	k.a, err = New(Options{Config: k.cfg, Dataplane: k.dp, Sessions: k.dp, XrayKernel: k.dp, Firewall: k.fw, Store: st,
		Log: slog.New(slog.NewTextHandler(os.Stderr, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { k.a.Close() })
	k.a.inline = true
	return k
}

func (k *kernelEnv) step(t *testing.T) {
	t.Helper()
	if err := k.a.step(time.Now()); err != nil {
		t.Fatalf("step: %v", err)
	}
	k.a.publish(time.Now())
	if err := k.a.commits.flush(); err != nil {
		t.Fatal(err)
	}
	if err := k.a.files.flush(); err != nil {
		t.Fatal(err)
	}
}

func (k *kernelEnv) start(t *testing.T, inB bool, uid uint32, mode string, args ...string) *nettest.Proc {
	spec := nettest.Spec{NS: k.pair.A, Cgroup: k.cg, UID: uid}
	if inB {
		spec.NS = k.pair.B
	}
	return nettest.Start(t, spec, mode, args...)
}

// TestSSHUserRealKernel: a real process with the user's UID is counted, is
// stopped by the kernel at the limit and blocked within one tick (nft set,
// BPF map, JSON, log), a flushed ruleset is restored at the next tick, and a
// reset lets the user back.
func TestSSHUserRealKernel(t *testing.T) {
	const john, mary, server = 2601, 2602, 2603
	k := newKernelEnv(t, fmt.Sprintf("john:x:%d:%d::/:/bin/false\nmary:x:%d:%d::/:/bin/false\nsrv:x:%d:1::/:/bin/false\n",
		john, john, mary, mary, server), "john 4\n")
	k.cfg.SSH.UIDMin = 2600
	k.a.cfg.SSH.UIDMin = 2600
	k.step(t)
	if p, _ := k.dp.Policy(john); p.Quota != bpf.Both || p.Blocked {
		t.Fatalf("john's kernel budget: %+v", p)
	}

	srv := k.start(t, true, server, "tcp-serve", net.JoinHostPort(k.pair.B4.String(), "0"))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	// mary: 1 MiB up, 2 MiB down, unlimited.
	m := k.start(t, false, mary, "tcp-client", addr, "1048576", "2097152")
	if _, _, err := nettest.ParseDone(m.Expect(t, "DONE", 20*time.Second)); err != nil {
		t.Fatal(err)
	}
	// john: a stream far beyond his 4 MiB. The kernel budget stops it at the
	// limit, before any tick.
	j := k.start(t, false, john, "tcp-client", addr, "inf", "inf")
	j.Expect(t, "CONNECTED", 5*time.Second)
	// (Bytes written to the socket may sit in its buffer; received bytes
	// have passed the kernel.) A loaded machine may take more than the
	// first seconds to move 4 MiB (a CI run was 1,448 bytes short at 2 s):
	// the stream is watched until it stalls, up to 15 s, without a tick.
	_, jr1 := j.Progress(t, 2*time.Second)
	_, jr2 := j.Progress(t, time.Second)
	for deadline := time.Now().Add(15 * time.Second); jr2 != jr1 && time.Now().Before(deadline); {
		jr1 = jr2
		_, jr2 = j.Progress(t, time.Second)
	}
	if jr2 > 4*quota.MiB || jr2 != jr1 {
		t.Errorf("john received %d -> %d bytes past a 4 MiB budget", jr1, jr2)
	}
	k.step(t)

	c, _ := k.dp.CountersOf(john)
	v, err := k.a.User(context.Background(), "john")
	if err != nil {
		t.Fatal(err)
	}
	if v.Upload != c.TxBytes || v.Download != c.RxBytes || v.Used > 4*quota.MiB {
		t.Errorf("john's usage %d/%d, kernel counters %d/%d", v.Upload, v.Download, c.TxBytes, c.RxBytes)
	}
	if v.Status != quota.Blocked || v.Reason != quota.ReasonLimit {
		t.Errorf("john not blocked after one tick: %+v", v)
	}
	mv, _ := k.a.User(context.Background(), "mary")
	if mv.Upload < quota.MiB || mv.Download < 2*quota.MiB || mv.Upload+mv.Download > 3*quota.MiB*108/100+64*1024 || mv.Status != quota.Unlimited {
		t.Errorf("mary: %+v", mv)
	}
	if p, _ := k.dp.Policy(john); !p.Blocked {
		t.Errorf("BPF policy of john: %+v", p)
	}
	if got, _ := k.fw.Blocked(); !slices.Equal(got, []uint32{john}) {
		t.Errorf("nft set: %v", got)
	}
	data, err := os.ReadFile(filepath.Join(k.cfg.Paths.UsageDir, "john.json"))
	if err != nil || !strings.Contains(string(data), `"blocked": true`) || !strings.Contains(string(data), `"block_reason": "Bandwidth Limit Reached"`) {
		t.Errorf("john.json: %s, %v", data, err)
	}
	logData, _ := os.ReadFile(k.cfg.Paths.BlockLog)
	if !strings.HasSuffix(strings.TrimSpace(string(logData)), "| ssh | john | Bandwidth Limit Reached") {
		t.Errorf("block log: %q", logData)
	}

	// Someone flushes the whole ruleset: restored at the next tick.
	if err := nettest.Do(k.pair.A, exec.Command("nft", "flush", "ruleset").Run); err != nil {
		t.Fatal(err)
	}
	k.step(t)
	if got, _ := k.fw.Blocked(); !slices.Equal(got, []uint32{john}) {
		t.Errorf("nft set after flush and one tick: %v", got)
	}

	// A new connection fails while blocked; after a reset it works.
	if err := k.start(t, false, john, "tcp-client", addr, "1000", "0").Wait(10 * time.Second); err == nil {
		t.Error("blocked john connected")
	}
	// The stream stalled at the limit ends first: after the reset it
	// would take the new budget (4 MiB in a fraction of a second) before
	// the new connection's 200 KB, whenever its backoff lets it resume
	// first (seen once under load).
	j.Cmd.Process.Kill()
	j.Wait(5 * time.Second)
	if err := k.a.Reset(context.Background(), "john"); err != nil {
		t.Fatal(err)
	}
	if got, _ := k.fw.Blocked(); len(got) != 0 {
		t.Errorf("nft set after reset: %v", got)
	}
	r := k.start(t, false, john, "tcp-client", addr, "100000", "100000")
	if _, _, err := nettest.ParseDone(r.Expect(t, "DONE", 20*time.Second)); err != nil {
		t.Errorf("john after reset: %v", err)
	}
}

// TestSSHTunnelFailsFastWhenBlocked: a real OpenSSH server whose session
// process runs as the user: once the agent blocks the user, a new
// connection through their open tunnel fails at once (the connect hook
// refuses the session process's connect() with EPERM, so sshd answers the
// tunnel's request with a failure) instead of waiting out a timeout; the
// open tunnel carried traffic before.
func TestSSHTunnelFailsFastWhenBlocked(t *testing.T) {
	acct := sshtest.NewAccount(t)
	k := newKernelEnv(t, acct.PasswdLine()+"\n", acct.Name+" 100\n")
	k.step(t)
	srv := sshtest.Start(t, sshtest.OpenSSH, sshtest.Options{Cgroup: k.cg})
	tun := srv.Tunnel(t, acct, sshtest.ClientOptions{})
	if _, got, err := tun.Transfer(0, 1<<20); err != nil || got != 1+1<<20 {
		t.Fatalf("download through the tunnel before the block: %d bytes, %v", got, err)
	}
	if err := k.a.Disable(context.Background(), acct.Name); err != nil {
		t.Fatal(err)
	}
	if v, _ := k.a.User(context.Background(), acct.Name); v.Status != quota.Disabled {
		t.Fatalf("%s: %+v", acct.Name, v)
	}
	start := time.Now()
	c, err := tun.Dial(srv.Sink.Addr)
	took := time.Since(start)
	if err == nil {
		c.Close()
		t.Fatal("a blocked user opened a connection through the tunnel")
	}
	if took > 2*time.Second {
		t.Errorf("the blocked tunnel connection failed after %v (%v), want at once", took, err)
	}
	t.Logf("refused after %v: %v", took, err)
}

// TestKbases: a UID's baseline and an account's are kept apart from each
// other's IDs; an account far past the others goes to the map and moves
// into the slice when the slice reaches it, so each ID has one baseline.
func TestKbases(t *testing.T) {
	m := kbases{uids: make(map[uint32]kbase)}
	acct := func(i uint32) uint32 { return bpf.AccountBase + i }
	m.put(1000, kbase{up: 1})
	m.put(acct(0), kbase{up: 2})
	m.put(acct(2), kbase{up: 3})
	far := acct(2 + kbaseDense + 10)
	m.put(far, kbase{up: 4})
	check := func(what string, want map[uint32]uint64) {
		t.Helper()
		for id, up := range want {
			b, ok := m.get(id)
			if (up != 0) != ok || b.up != up {
				t.Errorf("%s: get(%#x) = %+v, %v; want up %d", what, id, b, ok, up)
			}
		}
	}
	check("put", map[uint32]uint64{1000: 1, acct(0): 2, acct(1): 0, acct(2): 3, far: 4, 1001: 0, acct(3): 0})
	if len(m.accts) != 3 || len(m.uids) != 2 {
		t.Errorf("%d accounts in the slice, %d IDs in the map; want 3 and 2 (the UID, the far account)", len(m.accts), len(m.uids))
	}
	// The slice grows to the far account, as the registry gives IDs out:
	// it moves in, and stays the one.
	for id := acct(3); id < far; id++ {
		m.put(id, kbase{up: 5})
	}
	check("grown", map[uint32]uint64{far: 4, far - 1: 5, acct(2): 3})
	m.put(far, kbase{up: 6})
	check("far again", map[uint32]uint64{far: 6})
	if _, ok := m.uids[far]; ok || len(m.uids) != 1 {
		t.Errorf("the map holds %v: want the UID alone", m.uids)
	}
}
