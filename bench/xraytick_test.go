package bench

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/agent"
	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/xraytest"
	"github.com/myvpn/bwagent/nft"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
	"github.com/myvpn/bwagent/view"
	"github.com/myvpn/bwagent/xrayconf"
	"github.com/myvpn/bwagent/xraystats"
)

// Parameters of BenchmarkTickXray.
const (
	xrayWarmup    = 2               // ticks run before each measured phase
	xrayMeasured  = 10              // ticks measured per phase
	xrayInterval  = 2 * time.Second // the agent's interval, as in production
	xrayMoveEvery = 10              // 1 user in 10 moves bytes between two ticks
	xrayMoveBytes = 4096            // what a moving user sends, and receives
	// xrayMovePause is how long a moving user's connection waits after its
	// request before it moves its bytes: the access log line that claims
	// it for the kernel comes within the follower's 10 ms polls, so its
	// bytes are the kernel's to count, as a real user's are.
	xrayMovePause = 30 * time.Millisecond
	xrayWorkers   = 128 // connections the driver has open at a time
	xrayLimit     = 10 * quota.GiB
	xrayChildEnv  = "BWBENCH_XRAY_RESULT"
	xrayDriverEnv = "BWBENCH_XRAY_DRIVER"
	// xrayProfileEnv, if set, is where the N-user agent's idle and moving
	// phases write their CPU profiles (see phaseProfile), and it has the
	// process's memory sampled (see sampleMemory).
	xrayProfileEnv = "BWBENCH_XRAY_PROFILE"
	// xrayJSONEnv, if set, is the agents' json_interval (a Go duration):
	// how often a moving user's usage file is written (5 s by default),
	// to tell the files' share of the agent's work.
	xrayJSONEnv = "BWBENCH_XRAY_JSON_INTERVAL"
	// xrayTicksEnv, if set, is how many ticks each phase measures instead
	// of xrayMeasured: more average out more of the VM's noise (a tenth
	// from run to run at 10,000 users moving, with 10).
	xrayTicksEnv  = "BWBENCH_XRAY_TICKS"
	xrayChildWait = 20 * time.Minute
	// xraySettleWait bounds the wait for the first start to settle; the
	// phases run after it in any case.
	xraySettleWait = 90 * time.Second
)

// xrayTickSizes are the sizes BenchmarkTickXray runs, with the issue's
// targets: the tick with a tenth of the users moving, the idle tick, and
// the agent's CPU time as a share of one core (0: no target).
var xrayTickSizes = []struct {
	users              int
	moving, idle       time.Duration
	cpuMoving, cpuIdle float64
}{
	{1_000, 0, 0, 0, 0},
	{10_000, 10 * time.Millisecond, 0, 0.04, 0},
	{50_000, 100 * time.Millisecond, 50 * time.Millisecond, 0, 0.08},
}

// BenchmarkTickXray measures a real agent with N Xray users (1,000, 10,000
// and 50,000 VLESS clients in the config of a real Xray 26.3.27, run by
// internal/xraytest, every one with a limit and with counters from a real
// connection), beside one with 0 Xray users, in the same process.
//
// Each agent runs as bwagent runs it: Run, on the real clock, with the
// default 2 s interval, over its own data plane (cgroup and pins), nftables
// table (in a namespace of its own) and state database, with the SSH side
// off, counting the Xray users' connections in the kernel from the access
// log (xray.connections, the default) where the kernel can (Linux 6.0).
// The Xray server runs in the agent's cgroup.
//
// The traffic comes from a helper process (TestXrayTrafficDriver, this
// test binary run again), so that the measured process holds the agents
// alone: it starts both Xray servers, connects once as every user (their
// counters exist from then on), and between two ticks, when told, moves
// 4 KiB each way on a new connection of each of a tenth of the users
// (a different tenth each tick; the request first, the bytes 30 ms later,
// so the kernel counts them once the access log has claimed the
// connection). The users connect from addresses of their own (127.1.x.y).
//
// Phases, each of 10 ticks after 2 warm-up ticks: the empty agent idle,
// the empty agent while the traffic runs (against the other Xray, so the
// machine is as busy), then the agent with N users: its first start (the
// first tick, and the time until every usage file is written and the
// first commit is done), idle (nothing moves), and moving, after 10
// unmeasured ticks in which every user moved once and the few in which
// their usage files were written. Per phase:
//
//   - ms/tick (median) and ms/tick-max: view.Health.TickDuration, the
//     loop's work, which includes waiting for Xray's answers;
//   - ms-cpu/tick and %cpu: the process's CPU time (user and system,
//     every goroutine: the loop, the committer, the usage files, the
//     access log follower, gRPC, the collector) from one tick to the next,
//     per tick and as a share of one core over the wall time;
//   - KiB-alloc/tick, allocs/tick and gc/tick: heap bytes and objects
//     allocated, and collections, from one tick to the next.
//
// Then, with the agents stopped: ms/query (one xraystats UserTraffic, as
// the agent reads Xray's counters) and its allocations, and ms/conf-read
// (xrayconf.Load of Xray's config, 3 MB at 50,000 users, which the agent
// reads again only when it changed) and its allocations.
//
// MiB-rss-peak is the process's peak resident set (VmHWM) from just
// before the N-user agent starts (built: agent.New, with its store empty)
// to its end, after the empty agent stopped and released what it held
// (its datapath's mapped BPF maps, its store); each size runs in a fresh
// process (the test binary again, for that size alone), so it is its
// own. It includes the test binary's pages. MiB-rss-file is the
// file-backed part of the resident set at the end, MiB-rss-bpf-maps the
// part of that which is the agent's mapped BPF maps (the slot counters,
// the moved marks, the slots' windows).
//
// With $BWBENCH_XRAY_PROFILE set, the N-user agent's idle and moving
// phases write CPU profiles, and heap profiles are written before and
// after the moving phase (see phaseProfile and heapProfile).
//
// The 50,000 size takes about four minutes; the whole benchmark about
// eight.
func BenchmarkTickXray(b *testing.B) {
	nettest.RequireRoot(b)
	root, err := bpf.CgroupV2Root()
	if err != nil {
		b.Skipf("needs cgroup v2: %v", err)
	}
	xraytest.Bin(b)
	for _, sz := range xrayTickSizes {
		b.Run("users="+strconv.Itoa(sz.users), func(b *testing.B) {
			var runs []tickResult
			for range b.N {
				if os.Getenv(xrayChildEnv) == "" && !profiling() {
					runs = append(runs, freshChild(b, "BenchmarkTickXray", sz.users, xrayChildEnv, xrayChildWait))
				} else {
					runs = append(runs, runXrayTick(b, root, sz.users))
				}
			}
			reportRuns(b, runs, xrayChildEnv)
			res := runs[len(runs)-1]
			if sz.moving > 0 {
				fmt.Printf("  target: a tick with a tenth moving <= %v: %.2fx\n", sz.moving, res.Metrics["ms/tick-moving"]/ms(sz.moving))
			}
			if sz.idle > 0 {
				fmt.Printf("  target: an idle tick <= %v: %.2fx\n", sz.idle, res.Metrics["ms/tick-idle"]/ms(sz.idle))
			}
			if sz.cpuMoving > 0 {
				fmt.Printf("  target: CPU with a tenth moving <= %.0f%% of one core: %.2fx\n", 100*sz.cpuMoving, res.Metrics["%cpu-moving"]/(100*sz.cpuMoving))
			}
			if sz.cpuIdle > 0 {
				fmt.Printf("  target: CPU idle <= %.0f%% of one core: %.2fx\n", 100*sz.cpuIdle, res.Metrics["%cpu-idle"]/(100*sz.cpuIdle))
			}
		})
	}
}

// xrayEmail is the email of the benchmark's i-th Xray user.
func xrayEmail(i int) string { return fmt.Sprintf("x%05d", i) }

// xraySource is the address the i-th user connects from.
func xraySource(i int) string { return fmt.Sprintf("127.1.%d.%d", i/250, i%250+1) }

// runXrayTick measures one size in this process.
func runXrayTick(b *testing.B, root string, users int) tickResult {
	b.Helper()
	if os.Getenv("GOMEMLIMIT") == "" {
		defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
		// As bwagent's main does: the soft limit follows the live heap
		// and the allocation rate, every second.
		var ml agent.MemoryLimiter
		ml.Update(time.Now())
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		go func() {
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case now := <-t.C:
					ml.Update(now)
				}
			}
		}()
	}
	bigCg, emptyCg := nettest.NewCgroup(b, root), nettest.NewCgroup(b, root)
	drv := startXrayDriver(b, users, bigCg, emptyCg)
	var sb strings.Builder
	m := map[string]float64{}
	fmt.Fprintf(&sb, "tick xray users=%d: driver set up %d users in %.1f s (%d connections failed)",
		users, users, drv.ready.SetupSeconds, drv.ready.Failed)
	if v := os.Getenv(xrayJSONEnv); v != "" {
		fmt.Fprintf(&sb, "; json_interval %s", v)
	}
	sb.WriteString("\n")

	// The agent with 0 Xray users, idle and while the traffic runs.
	empty := newXrayAgent(b, 0, emptyCg, drv.ready.EmptyConfig, drv.ready.EmptyAPI)
	empty.start(b)
	empty.ticks(b, xrayWarmup, nil)
	eIdle := empty.phase(b, nil)
	eMoving := empty.phase(b, drv)
	empty.release(b)
	runtime.GC() // its heap free for the N-user agent's, not on top of it

	// The agent with N users: its first start, idle, moving.
	big := newXrayAgent(b, users, bigCg, drv.ready.Config, drv.ready.API)
	hwm := resetPeakRSS()
	mem := sampleMemory()
	start := time.Now()
	big.start(b)
	first := <-big.watch.marks
	policies := big.accountPolicies(b)
	settle, settled := big.settle(b, start)
	rssStart := peakRSS(b)
	big.ticks(b, xrayWarmup, nil)
	stopProfile := phaseProfile(b, users, "idle")
	idle := big.phase(b, nil)
	stopProfile()
	rssIdle := peakRSS(b)
	big.ticks(b, 1, nil)
	// A round in which every user moves once, not measured: the moving
	// phase is measured as on a server that has run a while, where each
	// moving user's usage file has its spare (see opsfiles.WriteBatch).
	// Then the ticks in which the round's last usage files are written
	// (by the next JSON interval, up to 10 ticks): in the measured ticks,
	// their spares' creation (an inode each) took most of the files' time.
	big.phase(b, drv)
	big.ticks(b, min(int(big.cfg.JSONInterval/big.cfg.Interval)+2, 10), nil)
	heapProfile(b, users, "before-moving")
	stopProfile = phaseProfile(b, users, "moving")
	moving := big.phase(b, drv)
	stopProfile()
	big.ticks(b, 1, nil) // the last round's bytes
	rssMoving := peakRSS(b)
	heapProfile(b, users, "heap")
	live := agent.LiveHeap()
	claimed := big.a.Health().Kernel.XrayClaimed
	big.stop(b)
	rss, rssFile, rssMaps := peakRSS(b), statusMiB(b, "RssFile"), mappedMiB(b, bpfMapMapping)
	peak := mem.stop()
	big.verify(b, drv)
	query, queryAlloc := timeQuery(b, big.api)
	conf, confAlloc, confSize := timeConfRead(b, drv.ready.Config)
	drv.stop(b)

	for _, p := range []struct {
		name string
		r    phaseResult
	}{{"idle", idle}, {"moving", moving}, {"empty-idle", eIdle}, {"empty-moving", eMoving}} {
		m["ms/tick-"+p.name] = p.r.tick
		m["ms/tick-max-"+p.name] = p.r.tickMax
		m["ms-cpu/tick-"+p.name] = p.r.cpu
		m["%cpu-"+p.name] = p.r.share * 100
		m["KiB-alloc/tick-"+p.name] = p.r.allocBytes / 1024
		m["allocs/tick-"+p.name] = p.r.allocObjects
		m["gc/tick-"+p.name] = p.r.gcs
		m["ms-cpu-gc/tick-"+p.name] = p.r.gcCPU
		m["xray-failed/ticks-"+p.name] = float64(p.r.xrayErrs)
	}
	m["moved/tick"] = moving.moved
	m["x-empty-tick-idle"] = idle.tick / eIdle.tick
	m["x-empty-tick-moving"] = moving.tick / eMoving.tick
	m["ms/first-tick"] = ms(first.tick)
	m["s/settle"] = settle.Seconds()
	m["MiB-rss-peak"] = rss
	m["MiB-rss-file"] = rssFile
	m["MiB-rss-bpf-maps"] = rssMaps
	m["MiB-heap-live"] = float64(live) / (1 << 20)
	m["ms/query"] = ms(query)
	m["KiB-alloc/query"] = queryAlloc / 1024
	m["ms/conf-read"] = ms(conf)
	m["KiB-alloc/conf-read"] = confAlloc / 1024

	line := func(name string, r, e phaseResult) {
		fmt.Fprintf(&sb, "  %-6s tick median %.2f ms (max %.2f; %.1fx the empty agent's %.2f ms), CPU %.1f ms a tick = %.2f%% of one core (empty %.2f%%), %.0f KiB and %.0f objects allocated a tick (empty %.0f KiB), %.2f GCs a tick (collector ≈ %.1f ms of CPU: the runtime's estimate, idle-time marking included)",
			name, r.tick, r.tickMax, r.tick/e.tick, e.tick, r.cpu, r.share*100, e.share*100, r.allocBytes/1024, r.allocObjects, e.allocBytes/1024, r.gcs, r.gcCPU)
		if r.xrayErrs > 0 {
			fmt.Fprintf(&sb, "; Xray's API failed (timed out) in %d of %d ticks", r.xrayErrs, r.ticks)
		}
		sb.WriteString("\n")
	}
	line("idle", idle, eIdle)
	line("moving", moving, eMoving)
	fmt.Fprintf(&sb, "  moving: %.0f users moved a tick (of %d a round; %d rounds skipped while the last ran, %.0f ms a round); %d connections claimed in the kernel\n",
		moving.moved, users/xrayMoveEvery, moving.skipped, moving.roundMS, claimed)
	if settled {
		fmt.Fprintf(&sb, "  first start: first tick %.1f ms, every account's budget written in it (%d of %d); settled (every usage file written, first commit done) after %.1f s\n",
			ms(first.tick), policies, users, settle.Seconds())
	} else {
		m["s/settle"] = -1
		fmt.Fprintf(&sb, "  first start: first tick %.1f ms, every account's budget written in it (%d of %d); NOT settled after %.0f s: usage files still being written\n",
			ms(first.tick), policies, users, settle.Seconds())
	}
	fmt.Fprintf(&sb, "  peak RSS %.1f MiB%s (%.1f after the first start, %.1f after idle, %.1f after moving; %.1f of the resident set file-backed at the end: the binary's pages, and %.1f of the BPF maps the agent maps), live heap %.1f MiB; one UserTraffic %.1f ms, %.0f KiB allocated; Xray's config (%.1f MB) read in %.1f ms, %.0f KiB allocated\n",
		rss, hwm, rssStart, rssIdle, rssMoving, rssFile, rssMaps, float64(live)/(1<<20), ms(query), queryAlloc/1024, float64(confSize)/1e6, ms(conf), confAlloc/1024)
	if peak != nil {
		sb.WriteString("  " + peak.String() + "\n")
	}
	return tickResult{Metrics: m, Summary: sb.String()}
}

// memSampleEvery is how often sampleMemory samples: each sample wakes the
// process, which costs 0.1-0.3 ms of CPU on these VMs.
const memSampleEvery = 50 * time.Millisecond

// memClasses are the Go runtime's memory classes a memSample keeps.
var memClasses = [...]string{
	"/memory/classes/total:bytes",
	"/memory/classes/heap/released:bytes",
	"/memory/classes/heap/objects:bytes",
	"/memory/classes/heap/free:bytes",
	"/memory/classes/heap/unused:bytes",
	"/memory/classes/heap/stacks:bytes",
	"/gc/heap/live:bytes",
	"/gc/heap/goal:bytes",
	"/gc/gomemlimit:bytes",
}

// A memSample is what the process held at one moment: its resident set
// by kind (/proc/self/status: anonymous, file-backed, and shared memory,
// which the mapped BPF maps are) and the Go runtime's memory classes
// (memClasses, in order).
type memSample struct {
	anon, file, shmem uint64
	classes           [len(memClasses)]uint64
}

// memSampler keeps the sample of the largest resident set.
type memSampler struct {
	quit chan struct{}
	done chan memSample
}

// sampleMemory starts sampling the process's memory every memSampleEvery,
// if $BWBENCH_XRAY_PROFILE is set (it adds about 3 ms of CPU a tick, which
// the CPU figures then include, as they include the profiler's), to tell
// what the peak resident set was made of; nil otherwise.
func sampleMemory() *memSampler {
	if os.Getenv(xrayProfileEnv) == "" {
		return nil
	}
	m := &memSampler{quit: make(chan struct{}), done: make(chan memSample, 1)}
	go func() {
		var peak memSample
		samples := make([]metrics.Sample, len(memClasses))
		for i, name := range memClasses {
			samples[i].Name = name
		}
		t := time.NewTicker(memSampleEvery)
		defer t.Stop()
		for {
			select {
			case <-m.quit:
				m.done <- peak
				return
			case <-t.C:
				s, ok := readResident()
				if !ok || s.anon+s.file+s.shmem <= peak.anon+peak.file+peak.shmem {
					continue
				}
				metrics.Read(samples)
				for i := range samples {
					if samples[i].Value.Kind() == metrics.KindUint64 {
						s.classes[i] = samples[i].Value.Uint64()
					}
				}
				peak = s
			}
		}
	}()
	return m
}

// bpfMapMapping is how /proc/PID/smaps names a mapping of a BPF map.
const bpfMapMapping = "anon_inode:bpf-map"

// mappedMiB returns the resident part of the process's mappings named
// name in /proc/self/smaps, in MiB.
func mappedMiB(b *testing.B, name string) float64 {
	b.Helper()
	data, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		b.Fatal(err)
	}
	var kb uint64
	in := false
	for line := range strings.Lines(string(data)) {
		f := strings.Fields(line)
		switch {
		case len(f) >= 5 && strings.Contains(f[0], "-") && !strings.HasSuffix(f[0], ":"):
			in = len(f) == 6 && f[5] == name // a mapping's first line: range perms offset dev inode [name]
		case in && len(f) == 3 && f[0] == "Rss:":
			v, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil {
				b.Fatalf("smaps: %q: %v", line, err)
			}
			kb += v
		}
	}
	return float64(kb) / 1024
}

// readResident reads the resident set by kind from /proc/self/status.
func readResident() (s memSample, ok bool) {
	sizes, err := statusSizes("RssAnon", "RssFile", "RssShmem")
	if err != nil {
		return s, false
	}
	s.anon, s.file, s.shmem = sizes[0], sizes[1], sizes[2]
	return s, true
}

// stop ends the sampling and returns the peak's sample; nil if m is.
func (m *memSampler) stop() *memSample {
	if m == nil {
		return nil
	}
	close(m.quit)
	s := <-m.done
	return &s
}

// String says what the sample's resident set was made of.
func (s *memSample) String() string {
	mib := func(v uint64) float64 { return float64(v) / (1 << 20) }
	c := s.classes
	goHeld := c[0] - c[1] // mapped by the runtime, less what it gave back (some of it maybe never touched)
	return fmt.Sprintf("at the largest sampled resident set, %.1f MiB: file-backed %.1f (the binary, and the BPF maps the agent maps), shared memory %.1f, anonymous %.1f; the Go runtime holds %.1f (heap objects %.1f, live as of the last GC %.1f, GC goal %.1f, soft limit %.1f; free heap %.1f, unused %.1f, stacks %.1f, the rest its own), so about %.1f of the anonymous memory is outside it (SQLite's C heap; 0 when the runtime's count, which includes pages never touched, is the larger)",
		mib(s.anon+s.file+s.shmem), mib(s.file), mib(s.shmem), mib(s.anon), mib(goHeld), mib(c[2]), mib(c[6]), mib(c[7]), mib(c[8]), mib(c[3]), mib(c[4]), mib(c[5]), max(0, mib(s.anon)-mib(goHeld)))
}

// phaseProfile writes a CPU profile of the N-user agent's phase to
// $BWBENCH_XRAY_PROFILE-USERS-PHASE.prof, if that variable is set, until
// the function it returns is called.
func phaseProfile(b *testing.B, users int, phase string) func() {
	b.Helper()
	prefix := os.Getenv(xrayProfileEnv)
	if prefix == "" {
		return func() {}
	}
	f, err := os.Create(fmt.Sprintf("%s-%d-%s.prof", prefix, users, phase))
	if err != nil {
		b.Fatal(err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		b.Fatal(err)
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}

// heapProfile writes a heap profile, after a collection, to
// $BWBENCH_XRAY_PROFILE-USERS-NAME.prof, if that variable is set.
func heapProfile(b *testing.B, users int, name string) {
	b.Helper()
	prefix := os.Getenv(xrayProfileEnv)
	if prefix == "" {
		return
	}
	f, err := os.Create(fmt.Sprintf("%s-%d-%s.prof", prefix, users, name))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	runtime.GC()
	if err := pprof.WriteHeapProfile(f); err != nil {
		b.Fatal(err)
	}
}

// xrayAgent is one agent under measurement, with its own cgroup (where its
// Xray runs), pins, nftables table, state database and files.
type xrayAgent struct {
	users int
	cfg   config.Config
	a     *agent.Agent
	dp    *bpf.Datapath
	watch *tickWatch
	log   *errorLog
	api   string // Xray's API address

	cancel context.CancelFunc
	done   chan error
	// closers release what newXrayAgent made, last first (see release).
	closers []func()
}

// onRelease makes release call f.
func (e *xrayAgent) onRelease(f func()) { e.closers = append(e.closers, f) }

// release stops the agent and releases what it holds: its datapath (the
// BPF maps it mapped), firewall table and store. The empty agent is
// released before the N-user agent starts, so that the N-user agent's
// peak RSS holds nothing of the empty one's (its mapped maps took 4 MiB).
func (e *xrayAgent) release(b *testing.B) {
	b.Helper()
	e.stop(b)
	for i := len(e.closers) - 1; i >= 0; i-- {
		e.closers[i]()
	}
	e.closers = nil
	e.a, e.dp = nil, nil
}

// newXrayAgent builds an agent for the Xray config at xrayConfig, whose
// users x00000... each get a 10 GiB limit, and whose API is at api.
func newXrayAgent(b *testing.B, users int, cg, xrayConfig, api string) *xrayAgent {
	b.Helper()
	dir := b.TempDir()
	cfg := config.Default()
	cfg.TimeZone, cfg.TimeZoneName = time.UTC, "UTC"
	cfg.Interval = xrayInterval
	if v := os.Getenv(xrayJSONEnv); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			b.Fatalf("%s: %v", xrayJSONEnv, err)
		}
		cfg.JSONInterval = d
	}
	cfg.SSH.Enabled = false
	cfg.Xray.Configs = []string{xrayConfig}
	cfg.Kernel.Cgroup = cg
	cfg.Kernel.PinPath = filepath.Join("/sys/fs/bpf", nettest.Name("bwbench-"))
	cfg.Kernel.MaxUIDs = tickMaxUIDs
	cfg.NFT.Table = nettest.Name("bwbench")
	cfg.Metrics.Listen = ""
	for p, name := range map[*string]string{&cfg.Paths.Limits: "bw-limit.conf", &cfg.Paths.UsageDir: "usage",
		&cfg.Paths.MarkerDir: "blocked_users", &cfg.Paths.BlockLog: "blocked.log", &cfg.Paths.StateDB: "state.db",
		&cfg.Paths.Passwd: "passwd", &cfg.Paths.Socket: "bwagent.sock"} {
		*p = filepath.Join(dir, name)
	}
	limits := []byte("# generated by BenchmarkTickXray\n")
	for i := range users {
		limits = fmt.Appendf(limits, "%s %d\n", xrayEmail(i), xrayLimit/quota.MiB)
	}
	if err := os.WriteFile(cfg.Paths.Limits, limits, 0o644); err != nil {
		b.Fatal(err)
	}
	e := &xrayAgent{users: users, cfg: cfg, log: &errorLog{}, api: api, watch: newTickWatch()}
	b.Cleanup(func() { e.release(b) })
	e.onRelease(func() { bpf.Uninstall(cfg.Kernel.PinPath) })
	var err error
	e.dp, err = bpf.Load(bpf.Config{CgroupPath: cg, PinPath: cfg.Kernel.PinPath, MaxUIDs: tickMaxUIDs})
	if err != nil {
		b.Fatal(err)
	}
	dp := e.dp
	e.onRelease(func() {
		if err := dp.Uninstall(); err != nil {
			b.Error(err)
		}
	})
	ns := nettest.NewNetNS(b)
	fw, err := nft.New(nft.Config{Table: cfg.NFT.Table, NetNS: int(ns)})
	if err != nil {
		b.Fatal(err)
	}
	e.onRelease(func() {
		if err := fw.Remove(); err != nil {
			b.Error(err)
		}
		fw.Close()
	})
	st, err := store.Open(cfg.Paths.StateDB)
	if err != nil {
		b.Fatal(err)
	}
	e.onRelease(func() { st.Close() })
	var xk agent.XrayKernel
	if e.dp.SupportsServerTagging() {
		xk = e.dp
	}
	e.a, err = agent.New(agent.Options{Config: cfg, Dataplane: e.dp, Firewall: fw, Store: st, XrayKernel: xk,
		Log: slog.New(e.log), Observers: []agent.Observer{e.watch}})
	if err != nil {
		b.Fatal(err)
	}
	return e
}

// start runs the agent's loop.
func (e *xrayAgent) start(b *testing.B) {
	b.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	e.cancel, e.done = cancel, make(chan error, 1)
	go func() { e.done <- e.a.Run(ctx) }()
	b.Cleanup(func() { e.stop(b) })
}

// stop stops the loop (a last tick, the pending commit and files) and
// checks that it logged no error.
func (e *xrayAgent) stop(b *testing.B) {
	b.Helper()
	if e.cancel == nil {
		return
	}
	e.cancel()
	e.cancel = nil
	if err := <-e.done; err != nil {
		b.Fatalf("run: %v", err)
	}
	e.checkLog(b)
}

// checkLog fails the benchmark if the agent logged an error, but for a
// failed read of Xray's API (a timeout when Xray or the agent are slow),
// which the phases count (tickMark.xrayErr) and report.
func (e *xrayAgent) checkLog(b *testing.B) {
	b.Helper()
	errs := slices.DeleteFunc(e.log.take(), func(msg string) bool { return strings.HasPrefix(msg, "xray api failed") })
	if len(errs) > 0 {
		b.Fatalf("agent with %d xray users logged errors:\n%s", e.users, strings.Join(errs, "\n"))
	}
}

// next returns the next tick's mark.
func (e *xrayAgent) next(b *testing.B) tickMark {
	b.Helper()
	select {
	case m := <-e.watch.marks:
		e.checkLog(b)
		return m
	case <-time.After(5 * xrayInterval):
		b.Fatalf("agent with %d xray users: no tick in %v", e.users, 5*xrayInterval)
	case err := <-e.done:
		b.Fatalf("agent with %d xray users stopped: %v", e.users, err)
	}
	return tickMark{}
}

// ticks waits for n ticks, calling after(i) after the i-th.
func (e *xrayAgent) ticks(b *testing.B, n int, after func(int)) []tickMark {
	b.Helper()
	var ms []tickMark
	for i := range n {
		ms = append(ms, e.next(b))
		if after != nil {
			after(i)
		}
	}
	return ms
}

// phaseResult is what one phase measured, per tick.
type phaseResult struct {
	tick, tickMax                        float64 // ms
	cpu, share                           float64 // ms a tick; share of one core
	allocBytes, allocObjects, gcs, moved float64
	gcCPU                                float64 // ms a tick: the collector's share of cpu (the runtime's estimate)
	skipped, xrayErrs                    int
	roundMS                              float64
	ticks                                int // measured
}

// measuredTicks is how many ticks a phase measures: xrayMeasured, or
// $BWBENCH_XRAY_TICKS.
func measuredTicks(b *testing.B) int {
	v := os.Getenv(xrayTicksEnv)
	if v == "" {
		return xrayMeasured
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > 1000 {
		b.Fatalf("%s=%q: want a number of ticks from 1 to 1000", xrayTicksEnv, v)
	}
	return n
}

// phase measures measuredTicks ticks, from the end of the next one (the
// start mark) on. With drv, a tenth of the users move after each tick.
func (e *xrayAgent) phase(b *testing.B, drv *xrayDriver) phaseResult {
	b.Helper()
	n := measuredTicks(b)
	var after func(int)
	round := 0
	if drv != nil {
		drv.resetCounts()
		after = func(i int) {
			if i < n { // a round between each two marks
				drv.round(b, round)
				round++
			}
		}
	}
	marks := e.ticks(b, n+1, after)
	r := phaseResult{ticks: n}
	var ticks []float64
	for _, m := range marks[1:] {
		ticks = append(ticks, ms(m.tick))
		if m.xrayErr {
			r.xrayErrs++
		}
	}
	if drv != nil {
		drv.take(b, true) // the last round's answer
	}
	first, last := marks[0], marks[len(marks)-1]
	nf := float64(n)
	r.tick, r.tickMax = median(ticks), slices.Max(ticks)
	r.cpu = ms(last.cpu-first.cpu) / nf
	r.share = float64(last.cpu-first.cpu) / float64(last.at.Sub(first.at))
	r.allocBytes = float64(last.allocBytes-first.allocBytes) / nf
	r.allocObjects = float64(last.allocObjects-first.allocObjects) / nf
	r.gcs = float64(last.gcs-first.gcs) / nf
	r.gcCPU = (last.gcCPU - first.gcCPU) * 1000 / nf
	if drv != nil {
		ok, skipped, roundMS := drv.counts()
		r.moved, r.skipped, r.roundMS = float64(ok)/nf, skipped, roundMS
	}
	return r
}

// settle waits until the agent has written every user's usage file,
// committed once and stopped writing files (the usage directory unchanged
// for two intervals), and returns how long after start the last file was
// written; ok is false if that did not happen within xraySettleWait.
func (e *xrayAgent) settle(b *testing.B, start time.Time) (d time.Duration, ok bool) {
	b.Helper()
	var last time.Time
	quiet := time.Now()
	for {
		// The marks queue up meanwhile: take them.
		for len(e.watch.marks) > 0 {
			e.next(b)
		}
		fi, err := os.Stat(e.cfg.Paths.UsageDir)
		if err == nil && !fi.ModTime().Equal(last) {
			last, quiet = fi.ModTime(), time.Now()
		}
		if time.Since(quiet) >= 2*xrayInterval && countFiles(b, e.cfg.Paths.UsageDir) >= e.users && e.watch.commits.Load() > 0 {
			return last.Sub(start), true
		}
		if time.Since(start) > xraySettleWait {
			return time.Since(start), false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// accountPolicies counts the kernel policies of accounts (Xray users)
// that have a budget, without building a map of them.
func (e *xrayAgent) accountPolicies(b *testing.B) int {
	b.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(e.cfg.Kernel.PinPath, "bw_policy"), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	var key uint32
	val := make([]byte, m.ValueSize())
	n := 0
	it := m.Iterate()
	for it.Next(&key, &val) {
		if key >= bpf.AccountBase {
			n++
		}
	}
	if err := it.Err(); err != nil {
		b.Fatal(err)
	}
	return n
}

// verify checks, untimed, that the agent counted what moved: every user's
// usage at least the payload Xray carried for them (the kernel counts the
// wire, a little more), and no user blocked.
func (e *xrayAgent) verify(b *testing.B, drv *xrayDriver) {
	b.Helper()
	us, err := e.a.Users(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	var used uint64
	for _, u := range us {
		if u.Status == quota.Blocked {
			b.Fatalf("%s blocked: %+v", u.Name, u)
		}
		used += u.Upload + u.Download
	}
	if len(us) != e.users {
		b.Fatalf("%d users, want %d", len(us), e.users)
	}
	payload := drv.payload()
	if used < payload {
		b.Fatalf("counted %d bytes, Xray carried %d: lost some", used, payload)
	}
	fmt.Printf("  counted %d bytes for %d of payload (%.3fx: the kernel counts the wire)\n", used, payload, float64(used)/float64(payload))
}

// countFiles counts the .json files in dir without building a list.
func countFiles(b *testing.B, dir string) int {
	b.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0
	}
	defer unix.Close(fd)
	buf := make([]byte, 64<<10)
	n := 0
	for {
		got, err := unix.Getdents(fd, buf)
		if err != nil {
			b.Fatal(err)
		}
		if got == 0 {
			return n
		}
		// struct linux_dirent64: ino (8), off (8), reclen (2), type (1), name.
		for off := 0; off < got; {
			reclen := int(binary.NativeEndian.Uint16(buf[off+16:]))
			name := buf[off+19 : off+reclen]
			if i := slices.Index(name, 0); i >= 0 {
				name = name[:i]
			}
			if strings.HasSuffix(string(name), ".json") {
				n++
			}
			off += reclen
		}
	}
}

// timeQuery times one UserTraffic call against Xray's API (the median of
// five) and what it allocates.
func timeQuery(b *testing.B, addr string) (time.Duration, float64) {
	b.Helper()
	ctx := context.Background()
	c, err := xraystats.Dial(ctx, addr, xraystats.WithTimeout(5*time.Second))
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	var ds []float64
	var alloc float64
	for range 5 {
		a0 := heapAllocs()
		start := time.Now()
		if _, err := c.UserTraffic(ctx); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, float64(time.Since(start)))
		alloc = float64(heapAllocs() - a0)
	}
	return time.Duration(median(ds)), alloc
}

// timeConfRead times xrayconf.Load of Xray's config (the median of three)
// and what it allocates, and returns the config's size.
func timeConfRead(b *testing.B, path string) (time.Duration, float64, int64) {
	b.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		b.Fatal(err)
	}
	var ds []float64
	var alloc float64
	for range 3 {
		a0 := heapAllocs()
		start := time.Now()
		if _, err := xrayconf.Load([]string{path}, ""); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, float64(time.Since(start)))
		alloc = float64(heapAllocs() - a0)
	}
	return time.Duration(median(ds)), alloc, fi.Size()
}

// tickWatch is an agent.Observer that marks each tick with the process's
// CPU time and allocations.
type tickWatch struct {
	marks   chan tickMark
	commits atomic.Int64
	samples []metrics.Sample // of watchMetrics; Tick runs on the loop alone
}

// tickMark is the state of the process after one tick.
type tickMark struct {
	tick                     time.Duration // the tick's own duration
	at                       time.Time
	cpu                      time.Duration // the process's CPU time so far
	allocBytes, allocObjects uint64        // heap allocations so far
	gcs                      uint64        // collections so far
	gcCPU                    float64       // the collector's CPU time so far, seconds (the runtime's estimate)
	xrayErr                  bool          // the tick could not read Xray's API
}

func newTickWatch() *tickWatch {
	w := &tickWatch{marks: make(chan tickMark, 256)}
	for _, name := range []string{"/gc/heap/allocs:bytes", "/gc/heap/allocs:objects", "/gc/cycles/total:gc-cycles", "/cpu/classes/gc/total:cpu-seconds"} {
		w.samples = append(w.samples, metrics.Sample{Name: name})
	}
	return w
}

func (w *tickWatch) Tick(h view.Health) {
	m := tickMark{tick: h.TickDuration, at: time.Now(), cpu: processCPU(), xrayErr: h.Errors["xray api"] != ""}
	s := w.samples
	metrics.Read(s)
	m.allocBytes, m.allocObjects, m.gcs = s[0].Value.Uint64(), s[1].Value.Uint64(), s[2].Value.Uint64()
	m.gcCPU = s[3].Value.Float64()
	select {
	case w.marks <- m:
	default:
	}
}

func (w *tickWatch) Charged(quota.Protocol, quota.Usage)  {}
func (w *tickWatch) Event(quota.Protocol, string, string) {}
func (w *tickWatch) Committed(_ time.Duration, err error) {
	if err == nil {
		w.commits.Add(1)
	}
}

// processCPU returns the CPU time the process used so far, user and
// system.
func processCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// heapAllocs returns the heap bytes allocated so far.
func heapAllocs() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// xrayDriver is the helper process that runs the two Xray servers and
// their users' connections.
type xrayDriver struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	ready driverReady
	done  chan driverRound

	busy                  bool
	ok, skipped           int
	roundMS               []float64
	totalOK               int // every round's, the set-up's too
	stopped, readerExited chan struct{}
}

// driverParams are what the driver is asked for.
type driverParams struct {
	Users       int    `json:"users"`
	Cgroup      string `json:"cgroup"`
	EmptyCgroup string `json:"empty_cgroup"`
}

// driverReady is the driver's answer once the servers run and every user
// connected once.
type driverReady struct {
	Config       string  `json:"config"`
	API          string  `json:"api"`
	EmptyConfig  string  `json:"empty_config"`
	EmptyAPI     string  `json:"empty_api"`
	SetupSeconds float64 `json:"setup_seconds"`
	OK           int     `json:"ok"`
	Failed       int     `json:"failed"`
}

// driverRound is the driver's answer to a round.
type driverRound struct {
	Round, OK, Failed int
	MS                float64
}

// startXrayDriver starts the driver for users, its Xray servers in the
// cgroups big and empty, and waits until it is ready.
func startXrayDriver(b *testing.B, users int, big, empty string) *xrayDriver {
	b.Helper()
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	params, _ := json.Marshal(driverParams{Users: users, Cgroup: big, EmptyCgroup: empty})
	r, w, err := os.Pipe()
	if err != nil {
		b.Fatal(err)
	}
	logPath := filepath.Join(b.TempDir(), "driver.log")
	logf, err := os.Create(logPath)
	if err != nil {
		b.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(exe, "-test.run=^TestXrayTrafficDriver$", "-test.count=1", "-test.v", "-test.timeout=60m")
	cmd.Env = append(os.Environ(), xrayDriverEnv+"="+string(params))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	in, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	// On a thread that lives as long as this process: see nettest.Spawn.
	if err := nettest.Spawn(cmd.Start); err != nil {
		b.Fatal(err)
	}
	w.Close()
	d := &xrayDriver{cmd: cmd, in: in, done: make(chan driverRound, 16), stopped: make(chan struct{}), readerExited: make(chan struct{})}
	b.Cleanup(func() { d.stop(b) })
	readyc := make(chan error, 1)
	go func() {
		defer close(d.readerExited)
		defer r.Close()
		sc := bufio.NewScanner(r)
		if !sc.Scan() {
			readyc <- fmt.Errorf("driver exited before it was ready: %v", sc.Err())
			return
		}
		readyc <- json.Unmarshal(sc.Bytes(), &d.ready)
		for sc.Scan() {
			var dr driverRound
			if _, err := fmt.Sscanf(sc.Text(), "done %d %d %d %g", &dr.Round, &dr.OK, &dr.Failed, &dr.MS); err == nil {
				d.done <- dr
			}
		}
	}()
	select {
	case err := <-readyc:
		if err != nil {
			out, _ := os.ReadFile(logPath)
			b.Fatalf("%v\n%s", err, tail(out, 8000))
		}
	case <-time.After(15 * time.Minute):
		b.Fatal("driver not ready after 15 minutes")
	}
	if d.ready.Failed > users/100 {
		out, _ := os.ReadFile(logPath)
		b.Fatalf("driver: %d of %d users failed to connect\n%s", d.ready.Failed, users, tail(out, 8000))
	}
	d.totalOK = d.ready.OK
	return d
}

// take collects the answers of finished rounds.
func (d *xrayDriver) take(b *testing.B, wait bool) {
	b.Helper()
	for {
		var dr driverRound
		if wait && d.busy {
			select {
			case dr = <-d.done:
			case <-time.After(time.Minute):
				b.Fatal("driver: a round did not end within a minute")
			}
		} else {
			select {
			case dr = <-d.done:
			default:
				return
			}
		}
		d.busy = false
		d.ok += dr.OK
		d.totalOK += dr.OK
		d.roundMS = append(d.roundMS, dr.MS)
		if dr.Failed > 0 {
			b.Fatalf("driver: %d connections of round %d failed", dr.Failed, dr.Round)
		}
	}
}

// round asks for a round of traffic (users round mod 10), unless the last
// one still runs.
func (d *xrayDriver) round(b *testing.B, round int) {
	b.Helper()
	d.take(b, false)
	if d.busy {
		d.skipped++
		return
	}
	if _, err := fmt.Fprintf(d.in, "round %d\n", round); err != nil {
		b.Fatal(err)
	}
	d.busy = true
}

func (d *xrayDriver) resetCounts() { d.ok, d.skipped, d.roundMS = 0, 0, nil }

// counts returns the connections of the rounds done since resetCounts
// (waiting for the last), the rounds skipped and a round's median time.
func (d *xrayDriver) counts() (ok, skipped int, roundMS float64) {
	return d.ok, d.skipped, median(d.roundMS)
}

// payload returns the payload of every connection so far, both ways, as
// Xray counts it: the 17-byte request and the 1-byte answer besides the
// bytes.
func (d *xrayDriver) payload() uint64 {
	return uint64(d.totalOK) * (2*xrayMoveBytes + 18)
}

// stop ends the driver, which stops its servers.
func (d *xrayDriver) stop(b *testing.B) {
	b.Helper()
	select {
	case <-d.stopped:
		return
	default:
	}
	d.take(b, true)
	close(d.stopped)
	d.in.Close()
	errc := make(chan error, 1)
	go func() { errc <- d.cmd.Wait() }()
	select {
	case err := <-errc:
		if err != nil {
			b.Errorf("driver: %v", err)
		}
	case <-time.After(time.Minute):
		d.cmd.Process.Kill()
		b.Error("driver did not stop within a minute")
	}
	<-d.readerExited
}

// TestXrayTrafficDriver is no test: it is the helper process of
// BenchmarkTickXray, which runs it with xrayDriverEnv set (else it is
// skipped). It starts an Xray server with the users x00000... (VLESS,
// without a client Xray, an access log, in the given cgroup) and one with
// none, connects once as every user, writes the servers' config files as
// one JSON line to file descriptor 3, then runs a round of traffic for
// each "round R" line on its standard input (the users whose index is R
// mod 10) and answers "done R OK FAILED MS" on descriptor 3, until its
// input ends.
func TestXrayTrafficDriver(t *testing.T) {
	arg := os.Getenv(xrayDriverEnv)
	if arg == "" {
		t.Skip("the helper process of BenchmarkTickXray")
	}
	var p driverParams
	if err := json.Unmarshal([]byte(arg), &p); err != nil {
		t.Fatal(err)
	}
	out := os.NewFile(3, "results")
	users := make([]xraytest.User, p.Users)
	for i := range users {
		users[i] = xraytest.NewUser(xrayEmail(i), xraytest.VLESS)
	}
	start := time.Now()
	srv := xraytest.StartServer(t, users, xraytest.NoClient(), xraytest.AccessLog(), xraytest.Cgroup(p.Cgroup))
	empty := xraytest.StartServer(t, nil, xraytest.AccessLog(), xraytest.Cgroup(p.EmptyCgroup))
	t.Logf("servers started in %v", time.Since(start))
	ok, failed := move(t, srv, users, 0, 1, 0)
	ready, _ := json.Marshal(driverReady{Config: srv.ConfigPath, API: srv.API, EmptyConfig: empty.ConfigPath, EmptyAPI: empty.API,
		SetupSeconds: time.Since(start).Seconds(), OK: ok, Failed: failed})
	fmt.Fprintf(out, "%s\n", ready)
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		var r int
		if _, err := fmt.Sscanf(sc.Text(), "round %d", &r); err != nil {
			t.Fatalf("driver: %q: %v", sc.Text(), err)
		}
		start := time.Now()
		ok, failed := move(t, srv, users, r%xrayMoveEvery, xrayMoveEvery, xrayMovePause)
		fmt.Fprintf(out, "done %d %d %d %.1f\n", r, ok, failed, ms(time.Since(start)))
	}
}

// move opens a connection as every step-th user from the first, which
// sends its request, waits pause, then sends xrayMoveBytes and receives as
// many back, xrayWorkers at a time. It returns how many connections
// worked and failed, logging the first failures.
func move(t *testing.T, srv *xraytest.Server, users []xraytest.User, first, step int, pause time.Duration) (ok, failed int) {
	var okN, failN atomic.Int64
	idx := make(chan int)
	var wg sync.WaitGroup
	for range xrayWorkers {
		wg.Go(func() {
			for i := range idx {
				if err := moveOne(srv, users[i], xraySource(i), pause); err != nil {
					if failN.Add(1) <= 5 {
						t.Logf("%s: %v", users[i].Email, err)
					}
					continue
				}
				okN.Add(1)
			}
		})
	}
	for i := first; i < len(users); i += step {
		idx <- i
	}
	close(idx)
	wg.Wait()
	return int(okN.Load()), int(failN.Load())
}

// moveOne is one user's connection to the sink ('T' mode: the sink
// answers the request with one byte, reads the bytes and sends as many).
func moveOne(srv *xraytest.Server, u xraytest.User, source string, pause time.Duration) error {
	c, err := srv.DialVLESS(u, source, srv.Sink)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	var req [17]byte
	req[0] = 'T'
	binary.BigEndian.PutUint64(req[1:], xrayMoveBytes)
	binary.BigEndian.PutUint64(req[9:], xrayMoveBytes)
	if _, err := c.Write(req[:]); err != nil {
		return err
	}
	buf := make([]byte, xrayMoveBytes+1)
	if _, err := io.ReadFull(c, buf[:1]); err != nil {
		return fmt.Errorf("answer: %w", err)
	}
	time.Sleep(pause)
	if _, err := c.Write(buf[:xrayMoveBytes]); err != nil {
		return err
	}
	if _, err := io.ReadFull(c, buf[:xrayMoveBytes]); err != nil {
		return fmt.Errorf("receive: %w", err)
	}
	return nil
}

// tail returns the last n bytes of b.
func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
