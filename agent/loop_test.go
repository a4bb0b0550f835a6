package agent

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/view"
)

// runEnv starts e's agent loop for real (its own ticker, the real clock)
// and stops it at cleanup.
func runEnv(t *testing.T, e *env) (stop func()) {
	t.Helper()
	if e.a.inline { // written only before any goroutine calls the agent
		e.a.inline = false
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.a.Run(ctx) }()
	select {
	case <-e.a.Ready():
	case err := <-done:
		t.Fatalf("Run: %v", err)
	}
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// realClockEnv is newEnv with the real clock, for tests of the running
// loop.
func realClockEnv(t *testing.T) *env {
	t.Helper()
	e := newEnv(t)
	e.clock = time.Time{}
	e.cfg.Interval = time.Second
	e.cfg.Xray.Timeout = 250 * time.Millisecond
	e.startWithClock(time.Now)
	return e
}

// TestReadsDoNotTick: reads are served from the published snapshot, so 50
// reads in a second add no tick: the tick count moves at the interval's
// pace.
func TestReadsDoNotTick(t *testing.T) {
	e := realClockEnv(t)
	e.write("bw-limit.conf", "john 10\n")
	runEnv(t, e)
	ctx := context.Background()
	start := e.a.Health().Ticks
	began := time.Now()
	for i := 0; i < 50; i++ {
		if _, err := e.a.Users(ctx); err != nil {
			t.Fatal(err)
		}
		if v, err := e.a.User(ctx, "john"); err != nil || v.Limit != 10*quota.MiB {
			t.Fatalf("User: %+v, %v", v, err)
		}
		if _, err := e.a.History(ctx, "john", "", ""); err != nil {
			t.Fatal(err)
		}
		_ = e.a.Health()
		time.Sleep(20 * time.Millisecond)
	}
	elapsed := time.Since(began)
	ticks := e.a.Health().Ticks - start
	// At a 1 s interval, elapsed/1s ticks, one more for a tick that was
	// under way; 50 reads running a tick each would add 50.
	if max := uint64(elapsed/time.Second) + 1; ticks > max {
		t.Errorf("%d ticks in %v of reads, want at most %d", ticks, elapsed, max)
	}
}

// TestCommandsWaitForTheLoop: before Run a command fails with ErrStarting
// and runs no tick (no concurrent tick on the loop's maps); a reload before
// Run likewise. Run under -race with calls racing the start.
func TestCommandsWaitForTheLoop(t *testing.T) {
	e := realClockEnv(t)
	e.a.inline = false
	ctx := context.Background()
	if err := e.a.Reset(ctx, "john"); !errors.Is(err, ErrStarting) {
		t.Errorf("Reset before Run: %v, want ErrStarting", err)
	}
	if err := e.a.Reload(ctx, e.cfg); !errors.Is(err, ErrStarting) {
		t.Errorf("Reload before Run: %v, want ErrStarting", err)
	}
	if n := e.a.Health().Ticks; n != 0 {
		t.Errorf("%d ticks before Run", n)
	}
	// Calls racing the start: each either fails with ErrStarting or is
	// applied by the loop; the race detector sees any shared map.
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Go(func() {
			for j := 0; j < 20; j++ {
				if err := e.a.Reload(ctx, e.cfg); err != nil && !errors.Is(err, ErrStarting) {
					t.Errorf("Reload: %v", err)
				}
				if _, err := e.a.Users(ctx); err != nil {
					t.Errorf("Users: %v", err)
				}
				time.Sleep(time.Millisecond)
			}
		})
	}
	runEnv(t, e)
	wg.Wait()
	if err := e.a.Reset(ctx, "john"); err != nil {
		t.Errorf("Reset while running: %v", err)
	}
	if err := e.a.Run(ctx); !errors.Is(err, ErrRunning) {
		t.Errorf("second Run: %v", err)
	}
}

// TestReloadNeedsRestart: a reload that changes a setting bound at start is
// refused as a whole, naming the keys; status keeps showing what is used.
func TestReloadNeedsRestart(t *testing.T) {
	e := newEnv(t)
	e.step(0)
	next := e.cfg
	next.Paths.StateDB = e.dir + "/other.db"
	next.NFT.Table = "other"
	next.WarningPercent = 50
	err := e.a.Reload(context.Background(), next)
	if !errors.Is(err, ErrNeedRestart) || !strings.Contains(err.Error(), "nft.table, paths.state_db") {
		t.Fatalf("Reload: %v", err)
	}
	if got := e.a.Health().Components["state database"]; !strings.Contains(got, e.cfg.Paths.StateDB) {
		t.Errorf("status shows %q, not the database in use", got)
	}
	if e.a.rules.Warning != 0.8 {
		t.Errorf("a refused reload applied warning_percent: %v", e.a.rules.Warning)
	}
}

// TestSSHTurnedOff: ssh.enabled = false at run time lifts every SSH block
// and budget from the kernel and the nft set.
func TestSSHTurnedOff(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 1\nmary 10\n")
	e.step(0)
	e.dp.blast(1001, 2*quota.MiB, 64*quota.KiB, false)
	e.step(2 * time.Second)
	if !e.fw.has(1001) || len(e.dp.policies) != 2 {
		t.Fatalf("before: nft %v, policies %v", e.fw.set, e.dp.policies)
	}
	next := e.cfg
	next.SSH.Enabled = false
	if err := e.a.Reload(context.Background(), next); err != nil {
		t.Fatal(err)
	}
	e.step(2 * time.Second)
	if len(e.fw.set) != 0 || len(e.dp.policies) != 0 {
		t.Errorf("after ssh.enabled = false: nft %v, policies %v", e.fw.set, e.dp.policies)
	}
	if v := e.user("john"); v.Present || v.Used == 0 {
		t.Errorf("john: %+v (kept, not present)", v)
	}
}

// TestRetention: a user gone from passwd keeps usage and status for the
// retention, then is dropped from memory and from the users and baselines
// tables, while their per-day history stays.
func TestRetention(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 6\n") // 5 MiB of 6: past the 80% notice
	e.step(0)
	e.dp.blast(1001, 5*quota.MiB, 64*quota.KiB, false)
	e.step(2 * time.Second)
	e.step(24 * time.Hour) // a finished day in the history
	e.write("passwd", strings.Replace(passwd, "john:x:1001:1001::/home/john:/bin/false\n", "", 1))
	e.step(2 * time.Second)
	if v := e.user("john"); v.Present || v.Download < 5*quota.MiB {
		t.Fatalf("john just gone: %+v", v)
	}
	if _, noted := e.a.notes.threshold["john"]; !noted {
		t.Fatal("no threshold notice remembered for john")
	}
	e.step(89 * 24 * time.Hour)
	if v := e.user("john"); v.Download < 5*quota.MiB || v.Limit != 6*quota.MiB {
		t.Errorf("john within the retention: %+v", v)
	}
	e.step(2 * 24 * time.Hour)
	if _, err := e.a.User(context.Background(), "john"); !errors.Is(err, ErrUnknownUser) {
		t.Errorf("john after the retention: %v, want ErrUnknownUser", err)
	}
	rows, err := e.a.store.Users()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rows {
		if r.Name == "john" {
			t.Error("john's row is still in the users table")
		}
	}
	hist, err := e.a.store.History("john", "", "")
	if err != nil || len(hist) == 0 {
		t.Errorf("john's history: %v, %v (must stay)", hist, err)
	}
	if _, kept := e.a.notes.threshold["john"]; kept {
		t.Error("john's threshold notice is still remembered")
	}
	if !strings.Contains(e.logs.String(), "user forgotten") {
		t.Errorf("no log line for the drop:\n%s", e.logs)
	}
	// A restart does not bring him back.
	e.start()
	e.step(2 * time.Second)
	if _, err := e.a.User(context.Background(), "john"); !errors.Is(err, ErrUnknownUser) {
		t.Errorf("john after a restart: %v", err)
	}
}

// TestSmallLimit: the slack that counts "within one packet of the limit" as
// reaching it scales with the limit, so a 100 KiB limit is not blocked at
// 36 KiB, and a user stuck just under it is blocked.
func TestSmallLimit(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 100K\n")
	e.step(0)
	passed := e.dp.blast(1001, 40*quota.KiB, 1400, false)
	e.step(2 * time.Second)
	if v := e.user("john"); v.Status == quota.Blocked || passed != 40*quota.KiB {
		t.Fatalf("john at 40 KiB of 100: %+v (passed %d)", v, passed)
	}
	// Segments of one MSS creep up to the limit; the kernel refuses the one
	// that would cross it.
	passed += e.dp.blast(1001, 100*quota.KiB, 1400, false)
	e.step(2 * time.Second)
	v := e.user("john")
	if passed > 100*quota.KiB || v.Status != quota.Blocked {
		t.Errorf("john: passed %d of 102400, status %s", passed, v.Status)
	}
	if got := kernelSlack(100 * quota.KiB); got != 6400 {
		t.Errorf("kernelSlack(100 KiB) = %d", got)
	}
	if got := kernelSlack(10 * quota.GiB); got != 64*quota.KiB {
		t.Errorf("kernelSlack(10 GiB) = %d", got)
	}
}

// TestLimitsBadLineLoggedOnce: a bad line is logged once, not again at each
// rewrite of the file by bwctl set.
func TestLimitsBadLineLoggedOnce(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 10\nmary abc\n")
	e.step(0)
	for i := 0; i < 20; i++ {
		if err := e.a.SetLimit(context.Background(), "john", uint64(i+1)*quota.MiB); err != nil {
			t.Fatal(err)
		}
	}
	if n := strings.Count(e.logs.String(), "bad line skipped"); n != 1 {
		t.Errorf("bad line logged %d times:\n%s", n, e.logs)
	}
	e.write("bw-limit.conf", "john 10\nmary abc\nbob xyz\n")
	e.step(2 * time.Second)
	if n := strings.Count(e.logs.String(), "bad line skipped"); n != 2 {
		t.Errorf("a new bad line: logged %d times in all, want 2", n)
	}
}

// TestUIDChangesOwner: when the first of two accounts sharing a UID is
// deleted, the second takes the UID over, and the log says so.
func TestUIDChangesOwner(t *testing.T) {
	e := newEnv(t)
	e.write("passwd", passwd+"johnny:x:1001:1001::/:/bin/false\n")
	e.step(0)
	if !strings.Contains(e.logs.String(), "two accounts share a UID or a name") {
		t.Errorf("shared UID not logged:\n%s", e.logs)
	}
	e.write("passwd", strings.Replace(passwd, "john:x:1001:1001::/home/john:/bin/false\n", "", 1)+"johnny:x:1001:1001::/:/bin/false\n")
	e.step(2 * time.Second)
	if !strings.Contains(e.logs.String(), "UID changed owner") || !strings.Contains(e.logs.String(), "to=johnny") {
		t.Errorf("change of owner not logged:\n%s", e.logs)
	}
	if v := e.user("johnny"); !v.Present || v.UID != 1001 {
		t.Errorf("johnny: %+v", v)
	}
}

// TestKernelStatsReported: the data plane's drop and no-room counters are
// in Health; a full counter map is an error saying what to raise.
func TestKernelStatsReported(t *testing.T) {
	e := newEnv(t)
	e.dp.mu.Lock()
	e.dp.stats = bpf.Stats{DroppedBlocked: 5, CountersFull: 3}
	e.dp.mu.Unlock()
	e.step(0)
	h := e.a.Health()
	if h.Kernel.DroppedBlocked != 5 || h.Kernel.CountersFull != 3 {
		t.Errorf("Health.Kernel = %+v", h.Kernel)
	}
	if got := h.Components["kernel"]; !strings.Contains(got, "kernel.max_uids") {
		t.Errorf("kernel component %q does not say what to raise", got)
	}
	e.dp.mu.Lock()
	e.dp.detached = true
	e.dp.mu.Unlock()
	e.step(2 * time.Second)
	if !strings.Contains(e.logs.String(), "ingress program re-attached") {
		t.Errorf("repair not logged:\n%s", e.logs)
	}
}

// recObserver records what the agent tells its observers.
type recObserver struct {
	mu      sync.Mutex
	ticks   int
	charged map[quota.Protocol]quota.Usage
	events  []string
	commits int
}

func (r *recObserver) Tick(view.Health) { r.mu.Lock(); r.ticks++; r.mu.Unlock() }
func (r *recObserver) Charged(p quota.Protocol, d quota.Usage) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.charged[p] = r.charged[p].Add(d)
}
func (r *recObserver) Event(p quota.Protocol, action, reason string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, string(p)+" "+action+" "+reason)
}
func (r *recObserver) Committed(time.Duration, error) { r.mu.Lock(); r.commits++; r.mu.Unlock() }

// TestObservers: each tick, charge, event and commit reaches the observers.
func TestObservers(t *testing.T) {
	e := newEnv(t)
	obs := &recObserver{charged: map[quota.Protocol]quota.Usage{}}
	e.observers = []Observer{obs}
	e.start()
	e.write("bw-limit.conf", "john 1\n")
	e.step(0)
	e.dp.blast(1001, 2*quota.MiB, 64*quota.KiB, false)
	e.step(2 * time.Second)
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if obs.ticks != 2 || obs.commits < 2 {
		t.Errorf("ticks %d, commits %d", obs.ticks, obs.commits)
	}
	if got := obs.charged[quota.SSH]; got.Down < quota.MiB-kernelSlack(quota.MiB) || got.Down > quota.MiB {
		t.Errorf("charged %+v", got)
	}
	if len(obs.events) != 1 || obs.events[0] != "ssh block Bandwidth Limit Reached" {
		t.Errorf("events %q", obs.events)
	}
}

// TestFlushIfIdle: the loop's own commit never waits for one running.
func TestFlushIfIdle(t *testing.T) {
	c := newCommitter(nil, "", time.UTC, nil)
	c.commitMu.Lock() // a commit running
	if err := c.flushIfIdle(); !errors.Is(err, errCommitBusy) {
		t.Errorf("flushIfIdle during a commit = %v, want errCommitBusy", err)
	}
	c.commitMu.Unlock()
	if err := c.flushIfIdle(); err != nil {
		t.Errorf("flushIfIdle with nothing pending = %v", err)
	}
}
