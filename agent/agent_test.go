package agent

import (
	"bytes"
	"errors"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/nft"
)

func TestMain(m *testing.M) { nettest.Main(m) }

type fakeDataplane struct {
	attachErr error
	policies  map[uint32]bpf.Policy
	attaches  int
}

func (f *fakeDataplane) EnsureAttached() error { f.attaches++; return f.attachErr }
func (f *fakeDataplane) Policies() (map[uint32]bpf.Policy, error) {
	return f.policies, nil
}

type fakeFirewall struct {
	calls [][]uint32
	err   error
}

func (f *fakeFirewall) Reconcile(desired []uint32) (nft.Result, error) {
	f.calls = append(f.calls, slices.Clone(desired))
	return nft.Result{}, f.err
}

func TestCheckInterval(t *testing.T) {
	for _, tc := range []struct {
		in   time.Duration
		want time.Duration
		ok   bool
	}{
		{0, DefaultInterval, true},
		{time.Second, time.Second, true},
		{5 * time.Second, 5 * time.Second, true},
		{999 * time.Millisecond, 0, false},
		{6 * time.Second, 0, false},
		{-time.Second, 0, false},
	} {
		got, err := CheckInterval(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("CheckInterval(%v) = %v, %v", tc.in, got, err)
		}
		if err != nil && !errors.Is(err, ErrInterval) {
			t.Errorf("CheckInterval(%v) error %v is not ErrInterval", tc.in, err)
		}
	}
}

func TestStepMirrorsBlockedUIDs(t *testing.T) {
	dp := &fakeDataplane{policies: map[uint32]bpf.Policy{
		1003: {Blocked: true},
		1001: {Blocked: true, Quota: bpf.Both, Ceiling: 10},
		1002: {Quota: bpf.Tx, Ceiling: 5}, // budgeted, not blocked
	}}
	fw := &fakeFirewall{}
	var logs bytes.Buffer
	a, err := New(time.Second, dp, fw, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	a.tick(time.Now())
	if dp.attaches != 1 {
		t.Errorf("attachment not checked")
	}
	if len(fw.calls) != 1 || !slices.Equal(fw.calls[0], []uint32{1001, 1003}) {
		t.Errorf("firewall got %v, want [[1001 1003]]", fw.calls)
	}

	// A failing firewall is reported once, not every tick, and recovery
	// is reported too; the attachment check still runs every tick.
	fw.err = errors.New("netlink: boom")
	for range 3 {
		a.tick(time.Now())
	}
	if n := strings.Count(logs.String(), "netlink: boom"); n != 1 {
		t.Errorf("error logged %d times, want once:\n%s", n, logs.String())
	}
	fw.err = nil
	a.tick(time.Now())
	if !strings.Contains(logs.String(), "tick recovered") {
		t.Errorf("recovery not logged:\n%s", logs.String())
	}
	if dp.attaches != 5 {
		t.Errorf("attachment checked %d times in 5 ticks", dp.attaches)
	}
}

// TestStepEnforcesAndRepairsRealKernel runs the step against the real data
// plane and nftables: a UID blocked in the kernel map is in the nft set after
// one step, cannot open or use connections while another UID streams on, and
// a flushed ruleset or a detached program is back after the next step.
func TestStepEnforcesAndRepairsRealKernel(t *testing.T) {
	nettest.RequireRoot(t)
	root, err := bpf.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	cg := nettest.NewCgroup(t, root)
	pair := nettest.NewPair(t)
	pin := filepath.Join("/sys/fs/bpf", nettest.Name("bwtest-"))
	dp, err := bpf.Load(bpf.Config{CgroupPath: cg, PinPath: pin})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := dp.Uninstall(); err != nil {
			t.Error(err)
		}
	})
	table := nettest.Name("bwtest")
	fw, err := nft.New(nft.Config{Table: table, NetNS: int(pair.A)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw.Remove(); fw.Close() })
	a, err := New(time.Second, dp, fw, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.step(time.Now()); err != nil {
		t.Fatal(err)
	}

	const victim, bystander, server = 2501, 2502, 2503
	start := func(ns bool, uid uint32, mode string, args ...string) *nettest.Proc {
		spec := nettest.Spec{NS: pair.A, Cgroup: cg, UID: uid}
		if ns {
			spec.NS = pair.B
		}
		return nettest.Start(t, spec, mode, args...)
	}
	srv := start(true, server, "tcp-serve", net.JoinHostPort(pair.B6.String(), "0"))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	v := start(false, victim, "tcp-client", addr, "inf", "inf")
	b := start(false, bystander, "tcp-client", addr, "inf", "inf")
	v.Expect(t, "CONNECTED", 5*time.Second)
	b.Expect(t, "CONNECTED", 5*time.Second)

	if err := dp.Block(victim); err != nil {
		t.Fatal(err)
	}
	if err := a.step(time.Now()); err != nil {
		t.Fatal(err)
	}
	if got, _ := fw.Blocked(); !slices.Equal(got, []uint32{victim}) {
		t.Fatalf("nft set after one step: %v", got)
	}
	vs1, vr1 := v.Progress(t, 500*time.Millisecond)
	_, br1 := b.Progress(t, 10*time.Millisecond)
	vs2, vr2 := v.Progress(t, time.Second)
	_, br2 := b.Progress(t, 10*time.Millisecond)
	if vr2 != vr1 || vs2-vs1 > 4<<20 {
		t.Errorf("blocked stream moved: sent %d->%d received %d->%d", vs1, vs2, vr1, vr2)
	}
	if br2 <= br1 {
		t.Errorf("bystander stalled: %d -> %d", br1, br2)
	}
	// nft drops the SYN in OUTPUT: the connection never opens.
	c := start(false, victim, "tcp-client", addr, "1", "0")
	if err := c.Wait(10 * time.Second); err == nil {
		t.Errorf("blocked UID connected: %q", c.Last())
	}
	if pk, _, err := fw.DropCounter(); err != nil || pk == 0 {
		t.Errorf("nft drop counter: %d, %v", pk, err)
	}

	// An operator flushes the whole ruleset: the next step restores it.
	nftCmd := exec.Command("nft", "flush", "ruleset")
	if err := nettest.Do(pair.A, nftCmd.Run); err != nil {
		t.Fatal(err)
	}
	if got, _ := fw.Blocked(); len(got) != 0 {
		t.Fatalf("flush did not take: %v", got)
	}
	if err := a.step(time.Now()); err != nil {
		t.Fatal(err)
	}
	if got, _ := fw.Blocked(); !slices.Equal(got, []uint32{victim}) {
		t.Errorf("nft set after flush and one step: %v", got)
	}

	// Someone detaches our egress program: the next step re-attaches it.
	l, err := link.LoadPinnedLink(filepath.Join(pin, "link_egress"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Detach(); err != nil {
		t.Fatal(err)
	}
	l.Close()
	if err := a.step(time.Now()); err != nil {
		t.Fatal(err)
	}
	if ids, err := dp.AttachedPrograms(ebpf.AttachCGroupInetEgress); err != nil || len(ids) != 1 {
		t.Errorf("egress programs after repair: %v %v", ids, err)
	}

	// Unblock: one step lets the UID connect again.
	if err := dp.Unblock(victim); err != nil {
		t.Fatal(err)
	}
	if err := a.step(time.Now()); err != nil {
		t.Fatal(err)
	}
	if got, _ := fw.Blocked(); len(got) != 0 {
		t.Errorf("nft set after unblock: %v", got)
	}
	ok := start(false, victim, "tcp-client", addr, "1000", "1000")
	if line := ok.Expect(t, "DONE", 10*time.Second); line != "DONE 1000 1000" {
		t.Errorf("after unblock: %q", line)
	}
}
