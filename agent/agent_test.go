package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/fleet"
	"github.com/myvpn/bwagent/internal/uidguard"
	"github.com/myvpn/bwagent/nft"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
	"github.com/myvpn/bwagent/view"
	"golang.org/x/sys/unix"
)

// fakeDP is the kernel data plane in miniature: per-UID counters that only
// move through send, which applies the policy the agent set exactly as the
// BPF programs do (blocked drops, a budget refuses the packet that would
// cross its ceiling).
type fakeDP struct {
	mu        sync.Mutex
	epoch     bpf.Epoch
	counters  map[uint32]bpf.Counters
	policies  map[uint32]bpf.Policy
	quotaUsed map[uint32]uint64
	detached  bool
	failNext  error
	failWrite error // every policy write fails while set (failWrites)
	moved     map[uint32]bool
	stats     bpf.Stats
}

// failWrites makes every policy write fail with err from now on, or none
// if err is nil.
func (f *fakeDP) failWrites(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.failWrite = err
}

func newFakeDP() *fakeDP {
	return &fakeDP{epoch: bpf.Epoch{Boot: "boot1", CounterMap: 7}, counters: map[uint32]bpf.Counters{}, policies: map[uint32]bpf.Policy{}, quotaUsed: map[uint32]uint64{}}
}

// send moves one packet of n bytes for uid (tx: from the user) and reports
// whether the kernel let it through.
func (f *fakeDP) send(uid uint32, n uint64, tx bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	p := f.policies[uid]
	if p.Blocked {
		return false
	}
	dir := bpf.Rx
	if tx {
		dir = bpf.Tx
	}
	if p.Quota&dir != 0 {
		if f.quotaUsed[uid]+n > p.Ceiling {
			return false
		}
		f.quotaUsed[uid] += n
	}
	if f.moved == nil {
		f.moved = map[uint32]bool{}
	}
	f.moved[uid] = true
	c := f.counters[uid]
	if tx {
		c.TxBytes += n
		c.TxPackets++
	} else {
		c.RxBytes += n
		c.RxPackets++
	}
	f.counters[uid] = c
	return true
}

// blast sends packets of size until total bytes passed or the kernel
// refuses one; it returns the bytes that passed.
func (f *fakeDP) blast(uid uint32, total, size uint64, tx bool) uint64 {
	var passed uint64
	for passed < total {
		n := min(size, total-passed)
		if !f.send(uid, n, tx) {
			break
		}
		passed += n
	}
	return passed
}

func (f *fakeDP) EnsureAttached() ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.detached {
		f.detached = false
		return []string{"ingress program re-attached"}, nil
	}
	return nil, nil
}
func (f *fakeDP) Epoch() (bpf.Epoch, error) { f.mu.Lock(); defer f.mu.Unlock(); return f.epoch, nil }
func (f *fakeDP) Stats() (bpf.Stats, error) { f.mu.Lock(); defer f.mu.Unlock(); return f.stats, nil }
func (f *fakeDP) EachCounter(fn func(uint32, bpf.Counters)) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.failNext; err != nil {
		f.failNext = nil
		return err
	}
	for k, v := range f.counters {
		fn(k, v)
	}
	return nil
}
func (f *fakeDP) EachMoved(fn func(uint32, bpf.Counters)) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.failNext; err != nil {
		f.failNext = nil
		return err
	}
	for uid := range f.moved {
		fn(uid, f.counters[uid])
	}
	clear(f.moved)
	return nil
}
func (f *fakeDP) ApplyPolicies(changes map[uint32]bpf.Policy) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWrite != nil {
		return f.failWrite
	}
	for uid, p := range changes {
		if (p == bpf.Policy{}) {
			delete(f.policies, uid)
			delete(f.quotaUsed, uid)
		} else {
			f.policies[uid] = p
		}
	}
	return nil
}
func (f *fakeDP) CountersOf(uid uint32) (bpf.Counters, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counters[uid], nil
}
func (f *fakeDP) QuotaUsed(uid uint32) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.quotaUsed[uid], nil
}
func (f *fakeDP) ReconcilePolicies(desired map[uint32]bpf.Policy) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failWrite != nil {
		return 0, f.failWrite
	}
	n := 0
	for uid, p := range desired {
		if f.policies[uid] != p {
			f.policies[uid] = p
			n++
		}
	}
	for uid := range f.policies {
		if _, ok := desired[uid]; !ok {
			delete(f.policies, uid)
			n++
		}
	}
	return n, nil
}
func (f *fakeDP) Protected(uid uint32) bool { return uidguard.New(nil).Has(uid) }

// fakeFW is the nftables set.
type fakeFW struct {
	mu      sync.Mutex
	set     []uint32
	flushed bool
	calls   int
}

func (f *fakeFW) Reconcile(desired []uint32) (nft.Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	res := nft.Result{Recreated: f.flushed || f.set == nil}
	f.set, f.flushed = slices.Clone(desired), false
	if f.set == nil {
		f.set = []uint32{}
	}
	return res, nil
}

func (f *fakeFW) has(uid uint32) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Contains(f.set, uid)
}

// env is one test's agent over fakes, with real files in a temp dir.
type env struct {
	t         *testing.T
	dir       string
	cfg       config.Config
	dp        *fakeDP
	fw        *fakeFW
	clock     time.Time
	a         *Agent
	logs      *strings.Builder
	xray      Xray
	xk        XrayKernel
	socks     Sockets          // nil: sockkill's
	clockFn   func() time.Time // nil: the test's clock
	observers []Observer
	fleet     *fleet.Client // nil: no fleet
}

const passwd = `root:x:0:0:root:/root:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
john:x:1001:1001::/home/john:/bin/false
mary:x:1002:1002::/home/mary:/usr/sbin/nologin
a..b:x:1003:1003::/:/bin/false
+nis::::::
sys:x:999:999::/:/bin/false
`

func newEnv(t *testing.T) *env {
	t.Helper()
	e := newEnvFiles(t)
	e.start()
	return e
}

// newEnvFiles is newEnv before the agent starts: its configuration and
// passwd.
func newEnvFiles(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	cfg := config.Default()
	cfg.TimeZone, cfg.TimeZoneName = time.UTC, "UTC"
	cfg.Paths.Limits = filepath.Join(dir, "bw-limit.conf")
	cfg.Paths.UsageDir = filepath.Join(dir, "usage")
	cfg.Paths.MarkerDir = filepath.Join(dir, "blocked_users")
	cfg.Paths.BlockLog = filepath.Join(dir, "blocked.log")
	cfg.Paths.StateDB = filepath.Join(dir, "state.db")
	cfg.Paths.Passwd = filepath.Join(dir, "passwd")
	cfg.Paths.Socket = filepath.Join(dir, "bwagent.sock")
	cfg.Xray.Configs = []string{filepath.Join(dir, "xray.json")}
	e := &env{t: t, dir: dir, cfg: cfg, dp: newFakeDP(), fw: &fakeFW{},
		clock: time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC)}
	e.write("passwd", passwd)
	return e
}

func (e *env) write(name, data string) {
	e.t.Helper()
	if err := os.WriteFile(filepath.Join(e.dir, name), []byte(data), 0o644); err != nil {
		e.t.Fatal(err)
	}
}

// startWithClock is start with another clock.
func (e *env) startWithClock(now func() time.Time) {
	e.t.Helper()
	e.clockFn = now
	e.start()
}

// start opens the store and builds an agent, as a restarted bwagent would.
func (e *env) start() {
	e.t.Helper()
	now := e.clockFn
	if now == nil {
		now = func() time.Time { return e.clock }
	}
	st, err := store.Open(e.cfg.Paths.StateDB)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { st.Close() })
	e.logs = &strings.Builder{}
	a, err := New(Options{Config: e.cfg, Dataplane: e.dp, Firewall: e.fw, Store: st, Xray: e.xray, XrayKernel: e.xk, Sockets: e.socks, Fleet: e.fleet,
		Log: slog.New(slog.NewTextHandler(syncWriter{b: e.logs}, nil)), Now: now, Observers: e.observers})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { a.Close() })
	a.inline = true // commands run on the test's goroutine, with a tick
	e.a = a
}

type syncWriter struct{ b *strings.Builder }

var logMu sync.Mutex

func (w syncWriter) Write(p []byte) (int, error) {
	logMu.Lock()
	defer logMu.Unlock()
	return w.b.Write(p)
}

// step advances the clock by d and runs one tick, flushing the files.
func (e *env) step(d time.Duration) {
	e.t.Helper()
	e.stepRows(d, nil)
}

// stepRows is step, returning the rows of the tick's commit that keep
// selects (none if keep is nil).
func (e *env) stepRows(d time.Duration, keep func(store.Baseline) bool) []store.Baseline {
	e.t.Helper()
	e.clock = e.clock.Add(d)
	e.a.tick()
	var rows []store.Baseline
	if keep != nil {
		e.a.commits.mu.Lock()
		if b := e.a.commits.pending; b != nil {
			for _, bl := range b.Baselines {
				if keep(bl) {
					rows = append(rows, bl)
				}
			}
		}
		e.a.commits.mu.Unlock()
	}
	e.a.commits.flush()
	e.a.files.flush()
	return rows
}

// wantTotals checks name's totals since the last reset.
func (e *env) wantTotals(name, what string, up, down uint64) {
	e.t.Helper()
	if v := e.user(name); v.Upload != up || v.Download != down {
		e.t.Errorf("%s: %s %d up, %d down; want %d, %d", what, name, v.Upload, v.Download, up, down)
	}
}

func (e *env) user(name string) view.User {
	e.t.Helper()
	v, err := e.a.User(context.Background(), name)
	if err != nil {
		e.t.Fatal(err)
	}
	return v
}

func (e *env) usage(name string) opsfiles.Usage {
	e.t.Helper()
	data, err := os.ReadFile(filepath.Join(e.cfg.Paths.UsageDir, name+".json"))
	if err != nil {
		e.t.Fatal(err)
	}
	var u opsfiles.Usage
	if err := json.Unmarshal(data, &u); err != nil {
		e.t.Fatalf("%s.json: %v\n%s", name, err, data)
	}
	return u
}

func (e *env) logLines() []string {
	data, _ := os.ReadFile(e.cfg.Paths.BlockLog)
	return strings.Split(strings.TrimSpace(string(data)), "\n")
}

// TestLimitCrossing: counted, warned, blocked within one tick with every
// record agreeing, and a reset lets the user back.
func TestLimitCrossing(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "# limits\njohn 10 # MiB\nmary unlimited\n")
	e.step(0)
	if v := e.user("john"); v.Status != quota.Active || v.Limit != 10*quota.MiB || v.UID != 1001 {
		t.Fatalf("john at start: %+v", v)
	}
	if _, err := e.a.User(context.Background(), "a..b"); !errors.Is(err, quota.ErrBadName) {
		t.Errorf("unsafe passwd name: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.cfg.Paths.UsageDir, "-evil.json")); !os.IsNotExist(err) {
		t.Errorf("unsafe name reached the disk: %v", err)
	}

	e.dp.blast(1001, 4*quota.MiB, 1500, true)
	e.dp.blast(1001, 4*quota.MiB, 1500, false)
	e.dp.blast(1002, 50*quota.MiB, 64*1024, false)
	e.step(2 * time.Second)
	v := e.user("john")
	if v.Upload != 4*quota.MiB || v.Download != 4*quota.MiB || v.Status != quota.Warning {
		t.Fatalf("john after 8 MiB: %+v", v)
	}
	if m := e.user("mary"); m.Download != 50*quota.MiB || m.Status != quota.Unlimited {
		t.Errorf("mary: %+v", m)
	}
	if p := e.dp.policies[1001]; p.Quota != bpf.Both || p.Blocked {
		t.Errorf("john's kernel policy %+v, want a budget", p)
	}
	if _, ok := e.dp.policies[1002]; ok {
		t.Error("unlimited mary has a kernel policy")
	}

	// The kernel budget lets exactly the remaining 2 MiB through.
	passed := e.dp.blast(1001, 10*quota.MiB, 1500, true)
	if passed > 2*quota.MiB || passed < 2*quota.MiB-1500 {
		t.Errorf("budget let %d bytes through, want 2 MiB - <1 packet", passed)
	}
	e.step(2 * time.Second)
	v = e.user("john")
	if v.Status != quota.Blocked || v.Reason != quota.ReasonLimit || v.Used > 10*quota.MiB {
		t.Fatalf("john over the limit: %+v", v)
	}
	if !e.dp.policies[1001].Blocked || !e.fw.has(1001) || e.fw.has(1002) {
		t.Errorf("enforcement: policy %+v, nft set %v", e.dp.policies[1001], e.fw.set)
	}
	j := e.usage("john")
	if !j.Blocked || j.BlockReason != quota.ReasonLimit || j.BlockTime != "2026-11-29 10:00:04" || j.Status != "BLOCKED" ||
		j.TotalLimit != 10*quota.MiB || j.TotalUsage != v.Used || j.Remaining == nil || *j.Remaining != 0 || j.Protocol != "ssh" {
		t.Errorf("john.json: %+v", j)
	}
	if lines := e.logLines(); len(lines) != 1 || lines[0] != "2026-11-29 10:00:04 | ssh | john | Bandwidth Limit Reached" {
		t.Errorf("block log: %q", lines)
	}
	if e.dp.send(1001, 100, false) {
		t.Error("blocked user received a packet")
	}

	if err := e.a.Reset(context.Background(), "john"); err != nil {
		t.Fatal(err)
	}
	e.a.files.flush()
	v = e.user("john")
	if v.Status != quota.Active || v.Used != 0 || !v.LastReset.Equal(e.clock) {
		t.Errorf("after reset: %+v", v)
	}
	if e.fw.has(1001) || e.dp.policies[1001].Blocked {
		t.Error("reset did not lift the block")
	}
	if !e.dp.send(1001, 1500, true) {
		t.Error("kernel still drops after reset")
	}
	if j := e.usage("john"); j.Blocked || j.LastReset != "2026-11-29 10:00:04" || j.TotalUsage != 0 {
		t.Errorf("john.json after reset: %+v", j)
	}
	lines := e.logLines()
	if len(lines) != 3 || !strings.HasSuffix(lines[1], "| ssh | john | Usage reset") || !strings.Contains(lines[2], "Unblocked") {
		t.Errorf("block log after reset: %q", lines)
	}
}

// TestManualUnblockRule: a manual unblock holds over the limit until a
// reset, a raised limit or its duration ends.
func TestManualUnblockRule(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	e.write("bw-limit.conf", "john 1\n")
	e.step(0)
	e.dp.blast(1001, 2*quota.MiB, 1500, true)
	e.step(time.Second)
	if e.user("john").Status != quota.Blocked {
		t.Fatal("not blocked")
	}
	if err := e.a.Unblock(ctx, "mary", 0); !errors.Is(err, quota.ErrNotBlocked) {
		t.Errorf("unblock of an unblocked user: %v", err)
	}
	if err := e.a.Unblock(ctx, "john", time.Hour); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		e.dp.blast(1001, quota.MiB, 1500, true)
		e.step(2 * time.Second)
		if v := e.user("john"); v.Status == quota.Blocked || e.fw.has(1001) {
			t.Fatalf("re-blocked on tick %d while unblocked manually: %+v", i, v)
		}
	}
	if _, ok := e.dp.policies[1001]; ok {
		t.Errorf("an unblocked user over the limit keeps a kernel policy: %+v", e.dp.policies[1001])
	}
	e.step(time.Hour)
	if v := e.user("john"); v.Status != quota.Blocked || !e.fw.has(1001) {
		t.Errorf("duration over, not blocked again: %+v", v)
	}

	// Without a duration it lasts until the limit is raised, then the new
	// limit applies.
	if err := e.a.Unblock(ctx, "john", 0); err != nil {
		t.Fatal(err)
	}
	e.step(24 * time.Hour)
	if e.user("john").Status == quota.Blocked {
		t.Fatal("re-blocked after a day")
	}
	if err := e.a.SetLimit(ctx, "john", 2*quota.MiB); err != nil {
		t.Fatal(err)
	}
	if v := e.user("john"); v.Status != quota.Blocked || v.Override.Active {
		t.Errorf("raised limit still below usage: %+v", v)
	}
	data, _ := os.ReadFile(e.cfg.Paths.Limits)
	if string(data) != "john 2\n" {
		t.Errorf("limits file rewritten as %q", data)
	}
}

func TestDisableEnable(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	e.step(0)
	if err := e.a.Disable(ctx, "mary"); err != nil {
		t.Fatal(err)
	}
	if v := e.user("mary"); v.Status != quota.Disabled || v.Reason != quota.ReasonDisabled || !e.fw.has(1002) {
		t.Fatalf("disabled: %+v", v)
	}
	if err := e.a.Reset(ctx, "mary"); err != nil {
		t.Fatal(err)
	}
	e.step(time.Second)
	if e.user("mary").Status != quota.Disabled {
		t.Error("reset lifted a disable")
	}
	if err := e.a.Unblock(ctx, "mary", 0); !errors.Is(err, quota.ErrDisabled) {
		t.Errorf("unblock of a disabled user: %v", err)
	}
	if err := e.a.Enable(ctx, "mary"); err != nil {
		t.Fatal(err)
	}
	if v := e.user("mary"); v.Status != quota.Unlimited || e.fw.has(1002) {
		t.Errorf("enabled: %+v", v)
	}
	want := []string{"Disabled by administrator", "Usage reset", "Enabled by administrator"}
	lines := e.logLines()
	for i, w := range want {
		if i >= len(lines) || !strings.HasSuffix(lines[i], "| ssh | mary | "+w) {
			t.Errorf("log line %d = %q, want ...%s", i, lines, w)
		}
	}
	if err := e.a.Disable(ctx, "nosuch"); !errors.Is(err, ErrUnknownUser) {
		t.Errorf("unknown user: %v", err)
	}
}

// TestRestartKeepsEverything: a new agent over the same store continues the
// totals, neither losing nor double counting, and a counter that went down
// (a reboot) is counted from zero.
func TestRestartKeepsEverything(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 100\n")
	e.dp.blast(1001, 3000, 1000, true)
	e.step(0)
	if got := e.user("john").Upload; got != 3000 {
		t.Fatalf("upload %d", got)
	}
	// Traffic after the last tick, then a crash (no final commit): the next
	// agent counts it from the committed baseline.
	e.dp.blast(1001, 2000, 1000, true)
	e.start()
	e.step(time.Second)
	if got := e.user("john").Upload; got != 5000 {
		t.Errorf("after restart: upload %d, want 5000", got)
	}
	// A reboot: the counters start again from zero in a new epoch.
	e.dp.mu.Lock()
	e.dp.epoch, e.dp.counters = bpf.Epoch{Boot: "boot2", CounterMap: 3}, map[uint32]bpf.Counters{}
	e.dp.policies, e.dp.quotaUsed = map[uint32]bpf.Policy{}, map[uint32]uint64{}
	e.dp.mu.Unlock()
	e.start()
	e.dp.blast(1001, 700, 700, true)
	e.step(time.Second)
	if got := e.user("john").Upload; got != 5700 {
		t.Errorf("after reboot: upload %d, want 5700", got)
	}
	if p := e.dp.policies[1001]; p.Quota != bpf.Both {
		t.Errorf("budget not restored after reboot: %+v", p)
	}
}

// TestLimitsFileBadLines: each bad line is reported with its number and
// skipped; the others still apply.
func TestLimitsFileBadLines(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john abc\nmary 10\n../x 5\njohn 10X\n")
	e.step(0)
	if v := e.user("mary"); v.Limit != 10*quota.MiB {
		t.Errorf("mary: %+v", v)
	}
	if v := e.user("john"); v.Limit != 0 {
		t.Errorf("john with only bad lines has limit %d", v.Limit)
	}
	logs := e.logs.String()
	for _, want := range []string{"bw-limit.conf:1", "bw-limit.conf:3", "bw-limit.conf:4"} {
		if !strings.Contains(logs, want) {
			t.Errorf("log lacks %q:\n%s", want, logs)
		}
	}
	// Changes are picked up within one tick.
	e.write("bw-limit.conf", "john 1\n")
	e.step(time.Second)
	if v := e.user("john"); v.Limit != quota.MiB || e.user("mary").Limit != 0 {
		t.Errorf("edit not picked up: %+v", v)
	}
}

func TestDayRolloverAndHistory(t *testing.T) {
	e := newEnv(t)
	e.clock = time.Date(2026, 11, 29, 23, 59, 58, 0, time.UTC)
	e.dp.blast(1001, 1000, 1000, true)
	e.step(0)
	e.dp.blast(1001, 500, 500, false)
	e.step(3 * time.Second) // past midnight
	e.step(time.Second)
	v := e.user("john")
	if v.Today != 500 || v.Used != 1500 {
		t.Errorf("after midnight: today %d used %d", v.Today, v.Used)
	}
	h, err := e.a.History(context.Background(), "john", "", "")
	if err != nil {
		t.Fatal(err)
	}
	want := []view.Day{{Day: "2026-11-29", Up: 1000}, {Day: "2026-11-30", Down: 500}}
	if !slices.Equal(h, want) {
		t.Errorf("history %+v, want %+v", h, want)
	}
	if j := e.usage("john"); j.DailyUsage != 500 {
		t.Errorf("daily_usage %d", j.DailyUsage)
	}
}

func TestImportFromEarlierInstall(t *testing.T) {
	dir := t.TempDir()
	usage := filepath.Join(dir, "usage")
	os.MkdirAll(usage, 0o755)
	os.WriteFile(filepath.Join(usage, "john.json"), []byte(`{"username":"john","total_usage":1073741824,"daily_usage":104857600,
"total_limit":10737418240,"blocked":true,"block_reason":"Bandwidth Limit Reached","block_time":"2024-12-07 14:30:45","last_reset":"2024-12-01 00:00:00"}`), 0o644)
	os.WriteFile(filepath.Join(usage, "mary.json"), []byte(`{"username": "mary", "total_usage": `), 0o644)
	e := &env{t: t, dir: dir, dp: newFakeDP(), fw: &fakeFW{}, clock: time.Date(2026, 11, 29, 10, 0, 0, 0, time.UTC)}
	e.cfg = config.Default()
	e.cfg.TimeZone = time.UTC
	e.cfg.Paths.UsageDir = usage
	e.cfg.Xray.Configs = []string{filepath.Join(dir, "xray.json")}
	for k, p := range map[*string]string{&e.cfg.Paths.Limits: "bw-limit.conf", &e.cfg.Paths.MarkerDir: "m", &e.cfg.Paths.BlockLog: "log",
		&e.cfg.Paths.StateDB: "state.db", &e.cfg.Paths.Passwd: "passwd"} {
		*k = filepath.Join(dir, p)
	}
	e.write("passwd", passwd)
	e.start()
	e.step(0)
	v := e.user("john")
	if v.Upload != quota.GiB || v.LastReset.Format(opsfiles.TimeLayout) != "2024-12-01 00:00:00" {
		t.Errorf("imported john: %+v", v)
	}
	// No limit in the limits file: the imported block is lifted by the rules.
	if v.Status != quota.Unlimited {
		t.Errorf("john's status %s", v.Status)
	}
	matches, _ := filepath.Glob(filepath.Join(usage, "mary.json.corrupt-*"))
	if len(matches) != 1 {
		t.Errorf("corrupt file not moved aside: %v", matches)
	}
	if !strings.Contains(e.logs.String(), "mary.json") {
		t.Errorf("corrupt file not reported:\n%s", e.logs)
	}
	if e.usage("mary").TotalUsage != 0 {
		t.Error("mary's fresh file")
	}
	// Only once: a second start does not import again.
	e.start()
	e.step(time.Second)
	if got := e.user("john").Upload; got != quota.GiB {
		t.Errorf("imported twice: %d", got)
	}
}

// TestRepairsEveryTick: a flushed nft set and lost kernel policies are
// restored on the next tick.
func TestRepairsEveryTick(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 1\n")
	e.step(0)
	e.dp.blast(1001, 2*quota.MiB, 1500, true)
	e.step(time.Second)
	e.fw.mu.Lock()
	e.fw.set, e.fw.flushed = nil, true
	e.fw.mu.Unlock()
	e.dp.mu.Lock()
	delete(e.dp.policies, 1001)
	e.dp.mu.Unlock()
	e.step(time.Second)
	if !e.fw.has(1001) || !e.dp.policies[1001].Blocked {
		t.Error("not repaired in one tick")
	}
	if !strings.Contains(e.logs.String(), "rebuilt") {
		t.Error("repair not logged")
	}
}

// TestCountersErrorLoggedOnce: a failing part is logged once per change and
// the rest of the tick still runs.
func TestCountersErrorLoggedOnce(t *testing.T) {
	e := newEnv(t)
	e.step(0)
	for i := 0; i < 3; i++ {
		e.dp.failNext = fmt.Errorf("map gone")
		e.step(time.Second)
	}
	e.step(time.Second)
	logs := e.logs.String()
	if n := strings.Count(logs, "map gone"); n != 2 { // the error, then "recovered after"
		t.Errorf("error logged %d times:\n%s", n, logs)
	}
	if !strings.Contains(logs, "kernel counters recovered") {
		t.Errorf("no recovery line:\n%s", logs)
	}
}

// TestUnwritableUsageDir: with the usage directory read-only the agent keeps
// counting and enforcing, reports the error once, and writes every file
// once the directory is writable again.
func TestUnwritableUsageDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a read-only bind mount")
	}
	e := newEnv(t)
	e.write("bw-limit.conf", "john 1\n")
	e.step(0)
	dir := e.cfg.Paths.UsageDir
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	mounted := true
	unmount := func() {
		if mounted {
			if err := unix.Unmount(dir, 0); err != nil {
				t.Error(err)
			}
			mounted = false
		}
	}
	t.Cleanup(unmount)
	if err := unix.Mount("", dir, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, ""); err != nil {
		t.Fatal(err)
	}
	e.dp.blast(1001, 2*quota.MiB, 1500, true)
	for i := 0; i < 3; i++ {
		e.step(2 * time.Second)
	}
	if v := e.user("john"); v.Status != quota.Blocked || !e.fw.has(1001) {
		t.Errorf("not enforced while the usage dir is read-only: %+v", v)
	}
	if h := e.a.Health(); !strings.Contains(h.Errors["usage files"], "read-only") {
		t.Errorf("health does not report the usage files: %+v", h.Errors)
	}
	if n := strings.Count(e.logs.String(), "usage files failed"); n != 1 {
		t.Errorf("usage file error logged %d times:\n%s", n, e.logs)
	}
	if j := e.usage("john"); j.Blocked {
		t.Fatal("the read-only directory was written")
	}
	unmount()
	e.step(time.Second) // the writer catches up after this tick
	e.step(time.Second) // and this tick sees it recovered
	if j := e.usage("john"); !j.Blocked || j.Status != "BLOCKED" {
		t.Errorf("not caught up: %+v", j)
	}
	if !strings.Contains(e.logs.String(), "usage files recovered") {
		t.Errorf("recovery not logged:\n%s", e.logs)
	}
}

// TestUsageFilesRepaired: a usage file someone deletes or edits is written
// again at the next tick, and so is a deleted directory.
func TestUsageFilesRepaired(t *testing.T) {
	e := newEnv(t)
	e.step(0)
	e.step(time.Second)
	path := filepath.Join(e.cfg.Paths.UsageDir, "john.json")
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(path)
	os.WriteFile(filepath.Join(e.cfg.Paths.UsageDir, "mary.json"), []byte(`{"blocked": false}`), 0o644)
	e.step(time.Second)
	if got, err := os.ReadFile(path); err != nil || !strings.Contains(string(got), `"username": "john"`) {
		t.Errorf("deleted file not restored: %s, %v (was %s)", got, err, want)
	}
	if e.usage("mary").Username != "mary" {
		t.Error("edited file not restored")
	}
	os.RemoveAll(e.cfg.Paths.UsageDir)
	e.step(time.Second)
	e.step(time.Second)
	if e.usage("john").Username != "john" || e.usage("mary").Username != "mary" {
		t.Error("deleted directory not restored")
	}
}

// TestScheduleExpiryAndResetAll: a daily reset schedule from the limits file
// resets at local midnight, an expiry date blocks with reason Expired, and
// reset --all resets everyone.
func TestScheduleExpiryAndResetAll(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 1 reset=daily\nmary 100 expires=2026-11-30\n")
	e.clock = time.Date(2026, 11, 29, 23, 59, 0, 0, time.UTC)
	e.step(0)
	e.dp.blast(1001, 2*quota.MiB, 1500, true)
	e.dp.blast(1002, 5*quota.MiB, 1500, true)
	e.step(time.Second)
	if v := e.user("john"); v.Status != quota.Blocked || v.NextReset.Format(time.DateTime) != "2026-11-30 00:00:00" {
		t.Fatalf("john before midnight: %+v", v)
	}
	e.step(time.Minute)
	if v := e.user("john"); v.Status != quota.Active || v.Used != 0 {
		t.Errorf("john after the scheduled reset: %+v", v)
	}
	if v := e.user("mary"); v.Status != quota.Blocked || v.Reason != quota.ReasonExpired || !e.fw.has(1002) {
		t.Errorf("mary after her expiry day began: %+v", v)
	}
	if !strings.Contains(strings.Join(e.logLines(), "\n"), "| ssh | mary | Expired") {
		t.Errorf("expiry not logged: %q", e.logLines())
	}
	n, err := e.a.ResetAll(context.Background())
	if err != nil || n != 2 {
		t.Fatalf("reset all: %d, %v", n, err)
	}
	if v := e.user("mary"); v.Used != 0 || v.Reason != quota.ReasonExpired {
		t.Errorf("mary after reset all (still expired): %+v", v)
	}
}

// TestFailedCommitRetried: a commit that fails keeps its batch, merged with
// the next tick's, and nothing is lost once the database works again.
func TestFailedCommitRetried(t *testing.T) {
	b1 := &store.Batch{Users: []store.User{{Name: "a", Up: 1}, {Name: "b", Up: 1}},
		Baselines: []store.Baseline{{Source: quota.UIDSource(1), Tx: 1}}, Events: []store.Event{{Name: "a", Action: "block"}}}
	b2 := &store.Batch{Users: []store.User{{Name: "a", Up: 2}},
		Baselines: []store.Baseline{{Source: quota.UIDSource(1), Tx: 2}, {Source: quota.UIDSource(2), Tx: 5}}, Events: []store.Event{{Name: "a", Action: "reset"}}}
	m := mergeBatch(b1, b2)
	if len(m.Users) != 2 || m.Users[0].Name != "b" || m.Users[1].Up != 2 {
		t.Errorf("users %+v", m.Users)
	}
	if len(m.Baselines) != 2 || m.Baselines[0].Tx != 2 || m.Baselines[1].Tx != 5 {
		t.Errorf("baselines %+v", m.Baselines)
	}
	if len(m.Events) != 2 || m.Events[0].Action != "block" {
		t.Errorf("events %+v", m.Events)
	}
	// A user dropped after an upsert that is still waiting: the store
	// applies drops first, so the older upsert must not survive the merge;
	// an upsert after a drop stays.
	b3 := &store.Batch{DropUsers: []string{"a"}, DropBaselines: []quota.Source{quota.UIDSource(2)}}
	m = mergeBatch(m, b3)
	for _, u := range m.Users {
		if u.Name == "a" {
			t.Errorf("dropped user a still upserted: %+v", m.Users)
		}
	}
	for _, b := range m.Baselines {
		if b.Source == quota.UIDSource(2) {
			t.Errorf("dropped baseline still upserted: %+v", m.Baselines)
		}
	}
	m = mergeBatch(m, &store.Batch{Users: []store.User{{Name: "a", Up: 9}}})
	if len(m.DropUsers) != 1 || m.Users[len(m.Users)-1].Name != "a" {
		t.Errorf("upsert after a drop: %+v %+v", m.DropUsers, m.Users)
	}

	// Rows rendered from records (the loop's batches) merge the same way,
	// and a newer row of either kind replaces an older row of the other.
	rec := func(name string, up uint64) userRef {
		return userRef{r: &record{name: name, total: quota.Usage{Up: up}, t: noTerms}, at: new(time.Time)}
	}
	m = mergeBatch(m, &store.Batch{UserRows: userRows{rec("b", 3), rec("c", 1)}})
	m = mergeBatch(m, &store.Batch{Users: []store.User{{Name: "c", Up: 2}}, UserRows: userRows{rec("a", 10)}})
	m = mergeBatch(m, &store.Batch{DropUsers: []string{"d"}, UserRows: userRows{rec("d", 1)}})
	got := map[string]uint64{}
	for _, u := range m.Users {
		got[u.Name] = u.Up
	}
	for _, r := range m.UserRows.(userRows) {
		if _, dup := got[r.r.name]; dup {
			t.Errorf("%s both a row and a record", r.r.name)
		}
		got[r.r.name] = r.r.total.Up
	}
	if want := map[string]uint64{"a": 10, "b": 3, "c": 2, "d": 1}; !maps.Equal(got, want) {
		t.Errorf("merged rows %v, want %v", got, want)
	}
	m = mergeBatch(m, &store.Batch{DropUsers: []string{"b"}})
	for _, r := range m.UserRows.(userRows) {
		if r.r.name == "b" {
			t.Errorf("dropped user b still upserted: %+v", m.UserRows)
		}
	}

	e := newEnv(t)
	e.dp.blast(1001, 1000, 1000, true)
	e.step(0)
	dbPath := e.cfg.Paths.StateDB
	// The database becomes unwritable: the ticks go on, the error is kept.
	if err := e.a.store.Close(); err != nil {
		t.Fatal(err)
	}
	e.dp.blast(1001, 500, 500, true)
	e.step(time.Second)
	if h := e.a.Health(); h.Errors["state database"] == "" {
		e.step(time.Second)
	}
	if h := e.a.Health(); h.Errors["state database"] == "" {
		t.Errorf("closed database not reported: %+v", h.Errors)
	}
	if e.a.commits.pending == nil {
		t.Fatal("failed batch dropped")
	}
	// Reads answer from memory meanwhile; they neither wait for nor report
	// the failed commit.
	if v, err := e.a.User(context.Background(), "john"); err != nil || v.Upload != 1500 {
		t.Errorf("User while commits fail: %+v, %v", v, err)
	}
	if us, err := e.a.Users(context.Background()); err != nil || len(us) == 0 {
		t.Errorf("Users while commits fail: %d, %v", len(us), err)
	}
	// Reopened (as after a fix): the kept batch goes in with the next.
	st, err := store.Open(dbPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	e.a.store, e.a.commits.st = st, st
	e.step(time.Second)
	users, _ := st.Users()
	found := false
	for _, u := range users {
		if u.Name == "john" {
			found = true
			if u.Up != 1500 {
				t.Errorf("john saved with %d bytes up, want 1500", u.Up)
			}
		}
	}
	if !found {
		t.Error("john not saved")
	}
}
