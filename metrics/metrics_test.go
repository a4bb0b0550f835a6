package metrics_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/myvpn/bwagent/internal/promtest"
	"github.com/myvpn/bwagent/metrics"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/view"
)

// fakeSource is a Source whose answers the test sets.
type fakeSource struct {
	mu       sync.Mutex
	users    []view.User
	usersErr error
	health   view.Health
}

func (f *fakeSource) Users(ctx context.Context) ([]view.User, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]view.User(nil), f.users...), f.usersErr
}

func (f *fakeSource) Health() view.Health {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.health
}

func healthyAgent() view.Health {
	return view.Health{
		LastTick: time.Unix(1_700_000_000, 500_000_000), TickDuration: 3 * time.Millisecond, Ticks: 42, Users: 3,
		Components: map[string]string{
			"kernel": "ok: programs attached", "nftables": "ok: 1 blocked UIDs",
			"state database": "ok: /var/lib/bwagent/state.db", "usage files": "ok: /etc/myvpn/usage",
			"xray": "ok: API 127.0.0.1:10085, 2 users",
		},
		Kernel: view.KernelStats{DroppedBlocked: 11, DroppedQuota: 22, DroppedRate: 55, CountersFull: 33, QuotaFull: 44,
			SSHSessions: 5, SSHHeld: 55, SSHUnattributed: 66, SSHNeverAttributed: 2,
			XrayClaimed: 7, XrayHeld: 77, XrayUnclaimed: 3},
	}
}

// scrape serves m for src, scrapes it once over HTTP and lints the
// result.
func scrape(t *testing.T, m *metrics.Metrics, src metrics.Source) *promtest.Scrape {
	t.Helper()
	s := fetch(t, m, src)
	problems, err := s.Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("lint: %s", p)
	}
	return s
}

// fetch is scrape without the lint (whose duplicate check is quadratic).
func fetch(t *testing.T, m *metrics.Metrics, src metrics.Source) *promtest.Scrape {
	t.Helper()
	srv := httptest.NewServer(m.Handler(src))
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	s, err := promtest.Read(resp)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// want checks one sample's value.
func want(t *testing.T, s *promtest.Scrape, v float64, name string, labels ...string) {
	t.Helper()
	got, ok := s.Value(name, labels...)
	if !ok {
		t.Errorf("%s%v: no sample", name, labels)
		return
	}
	if got != v {
		t.Errorf("%s%v = %v, want %v", name, labels, got, v)
	}
}

// absent checks that a sample is not served.
func absent(t *testing.T, s *promtest.Scrape, name string, labels ...string) {
	t.Helper()
	if m := s.Metric(name, labels...); m != nil {
		t.Errorf("%s%v served: %v", name, labels, m)
	}
}

// What the agent reports through the Observer is counted from the start:
// bytes by protocol and direction, events by action and reason, tick and
// commit durations, commit errors.
func TestObserved(t *testing.T) {
	m := metrics.New(metrics.Options{})
	m.Charged(quota.SSH, quota.Usage{Up: 100, Down: 1000})
	m.Charged(quota.SSH, quota.Usage{Up: 5, Down: 0})
	m.Charged(quota.VLESS, quota.Usage{Up: 0, Down: 7})
	m.Charged("future", quota.Usage{Up: 1, Down: 2}) // a protocol New does not know
	m.Event(quota.SSH, quota.ActBlock, quota.ReasonLimit)
	m.Event(quota.SSH, quota.ActBlock, quota.ReasonLimit)
	m.Event(quota.SSH, quota.ActUnblock, "Unblocked manually for 2h0m0s")
	m.Event(quota.SSH, quota.ActUnblock, "Unblocked manually")
	m.Event(quota.VMess, quota.ActReset, "Usage reset (scheduled monthly 1)")
	m.Event(quota.VMess, quota.ActReset, "Usage reset")
	m.Event(quota.SSH, quota.ActDisable, quota.ReasonDisabled)
	for _, d := range []time.Duration{2 * time.Millisecond, 30 * time.Millisecond, 3 * time.Second} {
		m.Tick(view.Health{TickDuration: d})
	}
	m.Committed(4*time.Millisecond, nil)
	m.Committed(time.Second, errors.New("disk full"))

	s := scrape(t, m, &fakeSource{health: healthyAgent()})
	want(t, s, 105, "bwagent_counted_bytes_total", "protocol", "ssh", "direction", "upload")
	want(t, s, 1000, "bwagent_counted_bytes_total", "protocol", "ssh", "direction", "download")
	want(t, s, 0, "bwagent_counted_bytes_total", "protocol", "vless", "direction", "upload")
	want(t, s, 7, "bwagent_counted_bytes_total", "protocol", "vless", "direction", "download")
	want(t, s, 0, "bwagent_counted_bytes_total", "protocol", "trojan", "direction", "download")
	want(t, s, 2, "bwagent_counted_bytes_total", "protocol", "future", "direction", "download")
	if s.Type("bwagent_counted_bytes_total") != "counter" {
		t.Errorf("bytes are a %s", s.Type("bwagent_counted_bytes_total"))
	}

	want(t, s, 2, "bwagent_events_total", "protocol", "ssh", "action", "block", "reason", "Bandwidth Limit Reached")
	want(t, s, 2, "bwagent_events_total", "protocol", "ssh", "action", "unblock", "reason", "Unblocked manually")
	want(t, s, 1, "bwagent_events_total", "protocol", "vmess", "action", "reset", "reason", "Usage reset (scheduled)")
	want(t, s, 1, "bwagent_events_total", "protocol", "vmess", "action", "reset", "reason", "Usage reset")
	want(t, s, 1, "bwagent_events_total", "protocol", "ssh", "action", "disable", "reason", "Disabled by administrator")
	if n := s.Series("bwagent_events_total"); n != 5 {
		t.Errorf("%d event series, want 5", n)
	}

	if n, sum, ok := s.Histogram("bwagent_tick_duration_seconds"); !ok || n != 3 || sum < 3.031 || sum > 3.033 {
		t.Errorf("tick histogram: %d ticks, %v s, %v", n, sum, ok)
	}
	if n, sum, ok := s.Histogram("bwagent_commit_duration_seconds"); !ok || n != 2 || sum < 1.003 || sum > 1.005 {
		t.Errorf("commit histogram: %d commits, %v s, %v", n, sum, ok)
	}
	want(t, s, 1, "bwagent_commit_errors_total")
	want(t, s, 1, "bwagent_build_info", "version", buildVersion(t, s), "goversion", runtime.Version())
	for _, name := range []string{"go_goroutines", "process_resident_memory_bytes", "promhttp_metric_handler_requests_total"} {
		if s.Families[name] == nil {
			t.Errorf("no %s", name)
		}
	}
}

// buildVersion returns the version label of bwagent_build_info (the test
// binary's module version), checking it is not empty.
func buildVersion(t *testing.T, s *promtest.Scrape) string {
	t.Helper()
	ms := s.Families["bwagent_build_info"].GetMetric()
	if len(ms) != 1 {
		t.Fatalf("%d build_info series", len(ms))
	}
	for _, l := range ms[0].GetLabel() {
		if l.GetName() == "version" && l.GetValue() != "" {
			return l.GetValue()
		}
	}
	t.Fatalf("build_info labels %v", ms[0].GetLabel())
	return ""
}

// The reason label stays bounded whatever reasons come.
func TestReasonCap(t *testing.T) {
	m := metrics.New(metrics.Options{})
	for i := range 100 {
		m.Event(quota.SSH, quota.ActBlock, fmt.Sprintf("reason %d", i))
	}
	m.Event(quota.SSH, quota.ActBlock, "reason 3") // known before the cap: kept
	s := scrape(t, m, &fakeSource{health: healthyAgent()})
	if n := s.Series("bwagent_events_total"); n != 65 {
		t.Errorf("%d event series, want 64 reasons and other", n)
	}
	want(t, s, 36, "bwagent_events_total", "protocol", "ssh", "action", "block", "reason", "other")
	want(t, s, 2, "bwagent_events_total", "protocol", "ssh", "action", "block", "reason", "reason 3")
}

// A device cut's reason carries the device's address: the label does not.
func TestDeviceReason(t *testing.T) {
	m := metrics.New(metrics.Options{})
	for i := range 100 {
		m.Event(quota.VLESS, quota.ActDevice, fmt.Sprintf("%s (192.0.2.%d)", quota.ReasonDevices, i))
	}
	s := scrape(t, m, &fakeSource{health: healthyAgent()})
	if n := s.Series("bwagent_events_total"); n != 1 {
		t.Errorf("%d event series, want 1", n)
	}
	want(t, s, 100, "bwagent_events_total", "protocol", "vless", "action", "device", "reason", quota.ReasonDevices)
}

// What the agent is, read from the Source at each scrape: users by
// protocol and status (every pair, zeros too), departed users, component
// health, failing subjects, ticks, the kernel's counters, Xray.
func TestFromSource(t *testing.T) {
	h := healthyAgent()
	h.Components["usage files"] = "usage files: open /etc/myvpn/usage/x.json: read-only file system"
	h.Errors = map[string]string{"usage files": "open /etc/myvpn/usage/x.json: read-only file system", "limits file": "line 3: bad"}
	src := &fakeSource{health: h, users: []view.User{
		{Name: "alice", Protocol: quota.SSH, Present: true, Status: quota.Blocked, Used: 10, Limit: 10},
		{Name: "bob", Protocol: quota.SSH, Present: true, Status: quota.Active, Used: 1, Limit: 10},
		{Name: "carol", Protocol: quota.SSH, Present: true, Status: quota.Blocked, Used: 20, Limit: 10},
		{Name: "dave", Protocol: quota.VLESS, Present: true, Status: quota.Unlimited, Used: 5},
		{Name: "gone", Protocol: quota.SSH, Present: false, Status: quota.Blocked},
	}}
	s := scrape(t, metrics.New(metrics.Options{}), src)

	want(t, s, 2, "bwagent_users", "protocol", "ssh", "status", "BLOCKED")
	want(t, s, 1, "bwagent_users", "protocol", "ssh", "status", "ACTIVE")
	want(t, s, 0, "bwagent_users", "protocol", "ssh", "status", "WARNING")
	want(t, s, 1, "bwagent_users", "protocol", "vless", "status", "UNLIMITED")
	want(t, s, 0, "bwagent_users", "protocol", "shadowsocks", "status", "DISABLED")
	if n := s.Series("bwagent_users"); n != 30 {
		t.Errorf("%d bwagent_users series, want 5 protocols x 6 statuses", n)
	}
	want(t, s, 1, "bwagent_departed_users")

	want(t, s, 1, "bwagent_component_healthy", "component", "kernel")
	want(t, s, 1, "bwagent_component_healthy", "component", "nftables")
	want(t, s, 1, "bwagent_component_healthy", "component", "state database")
	want(t, s, 0, "bwagent_component_healthy", "component", "usage files")
	want(t, s, 1, "bwagent_component_healthy", "component", "xray")
	want(t, s, 2, "bwagent_failing_subjects")
	want(t, s, 1, "bwagent_xray_up")

	want(t, s, 42, "bwagent_ticks_total")
	want(t, s, 1_700_000_000.5, "bwagent_last_tick_timestamp_seconds")
	want(t, s, 11, "bwagent_kernel_dropped_packets_total", "reason", "blocked")
	want(t, s, 22, "bwagent_kernel_dropped_packets_total", "reason", "quota")
	want(t, s, 55, "bwagent_kernel_dropped_packets_total", "reason", "speed")
	want(t, s, 33, "bwagent_kernel_no_room_packets_total", "map", "counters")
	want(t, s, 44, "bwagent_kernel_no_room_packets_total", "map", "quota")
	want(t, s, 5, "bwagent_ssh_sessions")
	want(t, s, 55, "bwagent_kernel_ssh_held_packets_total")
	want(t, s, 2, "bwagent_kernel_ssh_unattributed_total", "unit", "connections")
	want(t, s, 66, "bwagent_kernel_ssh_unattributed_total", "unit", "packets")
	want(t, s, 7, "bwagent_kernel_xray_connections_total", "state", "claimed")
	want(t, s, 3, "bwagent_kernel_xray_connections_total", "state", "unclaimed")
	want(t, s, 77, "bwagent_kernel_xray_held_packets_total")
	for name, typ := range map[string]string{
		"bwagent_users": "gauge", "bwagent_ticks_total": "counter", "bwagent_kernel_dropped_packets_total": "counter",
		"bwagent_kernel_no_room_packets_total": "counter", "bwagent_component_healthy": "gauge",
	} {
		if got := s.Type(name); got != typ {
			t.Errorf("%s is a %q, want %s", name, got, typ)
		}
	}
	// Without per_user there is no per-user series.
	for _, name := range []string{"bwagent_user_used_bytes", "bwagent_user_limit_bytes", "bwagent_user_status", "bwagent_user_metrics_omitted"} {
		if s.Families[name] != nil {
			t.Errorf("%s served without per_user", name)
		}
	}

	// A scrape reads the source again.
	src.mu.Lock()
	src.users[1].Status = quota.Warning
	src.health.Ticks = 43
	src.mu.Unlock()
	s = scrape(t, metrics.New(metrics.Options{}), src)
	want(t, s, 0, "bwagent_users", "protocol", "ssh", "status", "ACTIVE")
	want(t, s, 1, "bwagent_users", "protocol", "ssh", "status", "WARNING")
	want(t, s, 43, "bwagent_ticks_total")
}

// Each component state and what it makes of the component's health and of
// bwagent_xray_up.
func TestComponentsAndXray(t *testing.T) {
	for _, tc := range []struct {
		xray    string
		errs    map[string]string
		healthy float64
		up      float64 // -1: absent
	}{
		{"ok: API 127.0.0.1:10085, 2 users", nil, 1, 1},
		{"disabled (xray.enabled = false)", nil, 1, -1},
		{"no xray config found", nil, 0, 0},
		{"xray api: xray unavailable", map[string]string{"xray api": "xray unavailable"}, 0, 0},
		{"xray config: /etc/xray/config.json:3:1: bad", map[string]string{"xray config": "bad"}, 0, 0},
		{"xray config: bad", map[string]string{"xray config": "bad", "xray api": "unavailable"}, 0, 0},
		{"xray users: alter inbound: denied", map[string]string{"xray users": "alter inbound: denied"}, 0, 1},
	} {
		h := healthyAgent()
		h.Components["xray"], h.Errors = tc.xray, tc.errs
		s := scrape(t, metrics.New(metrics.Options{}), &fakeSource{health: h})
		if got, _ := s.Value("bwagent_component_healthy", "component", "xray"); got != tc.healthy {
			t.Errorf("%q: healthy %v, want %v", tc.xray, got, tc.healthy)
		}
		got, ok := s.Value("bwagent_xray_up")
		switch {
		case tc.up < 0 && ok:
			t.Errorf("%q: bwagent_xray_up %v, want none", tc.xray, got)
		case tc.up >= 0 && (!ok || got != tc.up):
			t.Errorf("%q: bwagent_xray_up %v (%v), want %v", tc.xray, got, ok, tc.up)
		}
	}
	h := healthyAgent()
	h.Components["kernel"], h.Components["nftables"] = "disabled (ssh.enabled = false)", "disabled (ssh.enabled = false)"
	h.Components["state database"] = "state database: commit: disk I/O error"
	s := scrape(t, metrics.New(metrics.Options{}), &fakeSource{health: h})
	want(t, s, 1, "bwagent_component_healthy", "component", "kernel")
	want(t, s, 0, "bwagent_component_healthy", "component", "state database")
}

// With per_user, each present user gets used bytes, limit (when limited)
// and status, for at most per_user_max users in name order; the others are
// counted as omitted.
func TestPerUser(t *testing.T) {
	src := &fakeSource{health: healthyAgent(), users: []view.User{
		{Name: "alice", Protocol: quota.SSH, Present: true, Status: quota.Blocked, Used: 10 << 20, Limit: 10 << 20},
		{Name: "bob", Protocol: quota.VMess, Present: true, Status: quota.Unlimited, Used: 123},
		{Name: "gone", Protocol: quota.SSH, Present: false, Status: quota.Active, Used: 1, Limit: 2},
		{Name: "zed", Protocol: quota.SSH, Present: true, Status: quota.Active, Used: 1, Limit: 2},
	}}
	s := scrape(t, metrics.New(metrics.Options{PerUser: true, PerUserMax: 2}), src)
	want(t, s, 10<<20, "bwagent_user_used_bytes", "user", "alice", "protocol", "ssh")
	want(t, s, 10<<20, "bwagent_user_limit_bytes", "user", "alice", "protocol", "ssh")
	want(t, s, 1, "bwagent_user_status", "user", "alice", "protocol", "ssh", "status", "BLOCKED")
	want(t, s, 123, "bwagent_user_used_bytes", "user", "bob", "protocol", "vmess")
	absent(t, s, "bwagent_user_limit_bytes", "user", "bob", "protocol", "vmess") // unlimited
	want(t, s, 1, "bwagent_user_status", "user", "bob", "protocol", "vmess", "status", "UNLIMITED")
	for _, name := range []string{"gone", "zed"} {
		absent(t, s, "bwagent_user_used_bytes", "user", name, "protocol", "ssh")
	}
	want(t, s, 1, "bwagent_user_metrics_omitted")
	if n := s.Series("bwagent_user_used_bytes") + s.Series("bwagent_user_limit_bytes") + s.Series("bwagent_user_status"); n != 5 {
		t.Errorf("%d per-user series, want 5", n)
	}

	// The default cap.
	src.users = nil
	for i := range metrics.DefaultPerUserMax + 7 {
		src.users = append(src.users, view.User{Name: fmt.Sprintf("u%05d", i), Protocol: quota.SSH, Present: true, Status: quota.Active, Limit: 1})
	}
	s = fetch(t, metrics.New(metrics.Options{PerUser: true}), src)
	want(t, s, 7, "bwagent_user_metrics_omitted")
	if n := s.Series("bwagent_user_status"); n != metrics.DefaultPerUserMax {
		t.Errorf("%d users with series, want %d", n, metrics.DefaultPerUserMax)
	}
	want(t, s, metrics.DefaultPerUserMax+7, "bwagent_users", "protocol", "ssh", "status", "ACTIVE")
}

// A source that cannot list its users fails those metrics only: the rest
// is served and the error counted.
func TestUsersError(t *testing.T) {
	m := metrics.New(metrics.Options{PerUser: true})
	srv := httptest.NewServer(m.Handler(&fakeSource{health: healthyAgent(), usersErr: context.Canceled}))
	defer srv.Close()
	get := func() *promtest.Scrape {
		resp, err := http.Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		s, err := promtest.Read(resp)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	s := get()
	if s.Families["bwagent_users"] != nil {
		t.Error("bwagent_users served although Users failed")
	}
	want(t, s, 42, "bwagent_ticks_total")
	s = get()
	want(t, s, 1, "promhttp_metric_handler_errors_total", "cause", "gathering") // the first scrape's error
}

// Serve serves /metrics on its listener until the context ends, then
// closes the listener and returns nil.
func TestServe(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	m := metrics.New(metrics.Options{})
	m.Charged(quota.SSH, quota.Usage{Down: 9})
	done := make(chan error, 1)
	go func() { done <- m.Serve(ctx, ln, &fakeSource{health: healthyAgent()}) }()
	base := "http://" + ln.Addr().String()

	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	s, err := promtest.Read(resp)
	if err != nil {
		t.Fatal(err)
	}
	want(t, s, 9, "bwagent_counted_bytes_total", "protocol", "ssh", "direction", "download")
	for path, code := range map[string]int{"/": 404, "/metrics/x": 404} {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != code {
			t.Errorf("GET %s: %s, want %d", path, resp.Status, code)
		}
	}
	resp, err = http.Post(base+"/metrics", "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /metrics: %s", resp.Status)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve after cancel: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	if c, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		c.Close()
		t.Error("listener still open after Serve returned")
	}
}

// Serve reports a listener that fails.
func TestServeClosedListener(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	err = metrics.New(metrics.Options{}).Serve(context.Background(), ln, &fakeSource{health: healthyAgent()})
	if err == nil || !errors.Is(err, net.ErrClosed) {
		t.Errorf("Serve on a closed listener: %v", err)
	}
}

// BenchmarkScrape100k: one scrape of an agent with 100,000 users (the
// source's rendering of its users is the fake's copy here), without
// per-user series.
func BenchmarkScrape100k(b *testing.B) {
	src := &fakeSource{health: healthyAgent()}
	for i := range 100_000 {
		src.users = append(src.users, view.User{Name: fmt.Sprintf("user%06d", i), Protocol: quota.SSH, Present: true, Status: quota.Active, Used: 1, Limit: 2})
	}
	h := metrics.New(metrics.Options{}).Handler(src)
	req := httptest.NewRequest("GET", "/metrics", nil)
	b.ReportAllocs()
	for b.Loop() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != 200 {
			b.Fatal(w.Code)
		}
	}
}

// A pedantic registry finds every metric described as collected, with and
// without per-user series, and the output of a scrape of each.
func TestPedantic(t *testing.T) {
	src := &fakeSource{health: healthyAgent(), users: []view.User{
		{Name: "alice", Protocol: quota.SSH, Present: true, Status: quota.Blocked, Used: 10, Limit: 10},
	}}
	for _, perUser := range []bool{false, true} {
		m := metrics.New(metrics.Options{PerUser: perUser})
		m.Event(quota.SSH, quota.ActBlock, quota.ReasonLimit)
		reg := prometheus.NewPedanticRegistry()
		if err := m.Register(reg, src); err != nil {
			t.Fatal(err)
		}
		fams, err := reg.Gather()
		if err != nil {
			t.Errorf("per_user %v: %v", perUser, err)
		}
		n := 0
		for _, f := range fams {
			if strings.HasPrefix(f.GetName(), "bwagent_") {
				n++
			}
		}
		if wantN := map[bool]int{false: 20, true: 24}[perUser]; n != wantN {
			t.Errorf("per_user %v: %d bwagent_ families, want %d", perUser, n, wantN)
		}
	}
}
