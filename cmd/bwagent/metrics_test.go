package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/promtest"
	"github.com/myvpn/bwagent/quota"
)

// scrape GETs the agent's /metrics at addr from inside the agent's network
// namespace, and parses and lints it (promlint: the checks of `promtool
// check metrics`; promtool itself too when it is installed).
func (e *agentEnv) scrape(t *testing.T, addr string) *promtest.Scrape {
	t.Helper()
	var conn net.Conn
	err := nettest.Do(e.pair.A, func() (err error) {
		conn, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("connect to the metrics: %v", err)
	}
	var once sync.Once
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(context.Context, string, string) (net.Conn, error) {
		var c net.Conn
		once.Do(func() { c = conn })
		if c == nil {
			return nil, errors.New("one connection per scrape")
		}
		return c, nil
	}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("http://" + addr + "/metrics")
	if err != nil {
		conn.Close()
		t.Fatalf("scrape: %v", err)
	}
	s, err := promtest.Read(resp)
	if err != nil {
		t.Fatal(err)
	}
	problems, err := s.Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s", p)
	}
	if promtool, err := exec.LookPath("promtool"); err == nil {
		cmd := exec.Command(promtool, "check", "metrics")
		cmd.Stdin = bytes.NewReader(s.Text)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
		}
	}
	return s
}

// TestMetrics: the running agent's /metrics, scraped over HTTP and parsed
// with the Prometheus client library's own parser, after real traffic of
// two SSH users (one unlimited, one downloading until the kernel stops him
// at his 4 MiB limit), his block and his reset. Each value is checked
// against what the agent's control API says or what must have happened.
func TestMetrics(t *testing.T) {
	const john, mary, server = 2751, 2752, 2753
	e := newAgentEnv(t, fmt.Sprintf("john:x:%d:%d::/:/bin/false\nmary:x:%d:%d::/:/bin/false\n", john, john, mary, mary), "john 4\n")
	f, err := os.OpenFile(e.conf, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(f, "\n[metrics]\nlisten = \"127.0.0.1:0\"\nper_user = true\n")
	f.Close()

	a := nettest.Start(t, nettest.Spec{NS: e.pair.A}, "bwagent", "--config", e.conf)
	line := a.Expect(t, `level=INFO msg="metrics served"`, 20*time.Second)
	addr := logValue(t, line, "addr")
	a.Expect(t, `level=INFO msg="bwagent running"`, 10*time.Second)
	ctx := context.Background()
	c := e.dial(t)

	srv := nettest.Start(t, nettest.Spec{NS: e.pair.B, Cgroup: e.cg, UID: server}, "tcp-serve",
		net.JoinHostPort(e.pair.B4.String(), "0"))
	srvAddr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]

	// mary moves 1 MiB up and 3 MiB down; john downloads until stopped.
	m := nettest.Start(t, nettest.Spec{NS: e.pair.A, Cgroup: e.cg, UID: mary}, "tcp-client", srvAddr, "1048576", "3145728")
	if _, recv, err := nettest.ParseDone(m.Expect(t, "DONE", 30*time.Second)); err != nil || recv != 3<<20 {
		t.Fatalf("mary's transfer: %d bytes received, %v", recv, err)
	}
	j := nettest.Start(t, nettest.Spec{NS: e.pair.A, Cgroup: e.cg, UID: john}, "tcp-client", srvAddr, "0", "inf", "60s")
	j.Expect(t, "CONNECTED", 5*time.Second)
	eventually(t, 30*time.Second, "john blocked", func() error {
		u, err := c.User(ctx, "john")
		if err != nil || u.Status != quota.Blocked {
			return fmt.Errorf("john %+v, %v", u, err)
		}
		return nil
	})
	// The server's retransmissions to his stalled stream are dropped for
	// the block (his own packets nft drops first, before the programs).
	eventually(t, 20*time.Second, "drops for the block", func() error {
		if v, _ := e.scrape(t, addr).Value("bwagent_kernel_dropped_packets_total", "reason", "blocked"); v == 0 {
			return errors.New("no packet dropped for the block yet")
		}
		return nil
	})
	j.Cmd.Process.Kill()
	// A new connection of his fails (nft drops its SYNs).
	j = nettest.Start(t, nettest.Spec{NS: e.pair.A, Cgroup: e.cg, UID: john}, "tcp-client", srvAddr, "0", "1")
	if err := j.Wait(10 * time.Second); err == nil {
		t.Error("blocked john connected")
	}

	// Blocked. The counted bytes equal the users' totals once a scrape
	// and a listing see the same tick (the reads are not atomic).
	var s *promtest.Scrape
	eventually(t, 20*time.Second, "metrics after the block", func() error {
		s = e.scrape(t, addr)
		users, err := c.ListUsers(ctx, "")
		if err != nil {
			return err
		}
		var up, down uint64
		for _, u := range users {
			up, down = up+u.Upload, down+u.Download
			if err := samples(s,
				sample{float64(u.Used), "bwagent_user_used_bytes", []string{"user", u.Name, "protocol", "ssh"}},
				sample{1, "bwagent_user_status", []string{"user", u.Name, "protocol", "ssh", "status", string(u.Status)}},
			); err != nil {
				return err
			}
		}
		// mary's 3 MiB down and 1 MiB up, and john's 4 MiB but the slack
		// (64 KiB) and his ACKs, with the headers of all of it.
		if down < 6<<20 || up < 1<<20 {
			return fmt.Errorf("users' totals %d up, %d down: less than moved", up, down)
		}
		if err := samples(s,
			sample{float64(up), "bwagent_counted_bytes_total", []string{"protocol", "ssh", "direction", "upload"}},
			sample{float64(down), "bwagent_counted_bytes_total", []string{"protocol", "ssh", "direction", "download"}},
		); err != nil {
			return err
		}
		// The kernel stopped john at his budget before the tick blocked him.
		if v, _ := s.Value("bwagent_kernel_dropped_packets_total", "reason", "quota"); v == 0 {
			return errors.New("no packet dropped for the budget")
		}
		return nil
	})
	if err := samples(s,
		sample{1, "bwagent_users", []string{"protocol", "ssh", "status", "BLOCKED"}},
		sample{1, "bwagent_users", []string{"protocol", "ssh", "status", "UNLIMITED"}},
		sample{0, "bwagent_users", []string{"protocol", "ssh", "status", "ACTIVE"}},
		sample{0, "bwagent_users", []string{"protocol", "vless", "status", "UNLIMITED"}},
		sample{0, "bwagent_departed_users", nil},
		sample{1, "bwagent_events_total", []string{"protocol", "ssh", "action", "block", "reason", quota.ReasonLimit}},
		sample{4 << 20, "bwagent_user_limit_bytes", []string{"user", "john", "protocol", "ssh"}},
		sample{0, "bwagent_user_metrics_omitted", nil},
		sample{1, "bwagent_component_healthy", []string{"component", "kernel"}},
		sample{1, "bwagent_component_healthy", []string{"component", "nftables"}},
		sample{1, "bwagent_component_healthy", []string{"component", "state database"}},
		sample{1, "bwagent_component_healthy", []string{"component", "usage files"}},
		sample{1, "bwagent_component_healthy", []string{"component", "xray"}}, // disabled
		sample{0, "bwagent_failing_subjects", nil},
		sample{0, "bwagent_kernel_no_room_packets_total", []string{"map", "counters"}},
		sample{0, "bwagent_kernel_no_room_packets_total", []string{"map", "quota"}},
		sample{0, "bwagent_commit_errors_total", nil},
	); err != nil {
		t.Error(err)
	}
	if s.Metric("bwagent_user_limit_bytes", "user", "mary", "protocol", "ssh") != nil {
		t.Error("unlimited mary has a limit series")
	}
	if s.Families["bwagent_xray_up"] != nil {
		t.Error("bwagent_xray_up served with xray.enabled = false")
	}
	if s.Families["bwagent_events_total"].GetMetric() == nil || s.Series("bwagent_events_total") != 1 {
		t.Errorf("events other than john's block: %v", s.Families["bwagent_events_total"])
	}
	ticks, _ := s.Value("bwagent_ticks_total")
	tickCount, _, _ := s.Histogram("bwagent_tick_duration_seconds")
	commits, _, _ := s.Histogram("bwagent_commit_duration_seconds")
	if ticks < 2 || uint64(ticks) != tickCount || commits < 1 {
		t.Errorf("%v ticks, %d in the tick histogram, %d commits", ticks, tickCount, commits)
	}
	last, _ := s.Value("bwagent_last_tick_timestamp_seconds")
	if age := time.Since(time.Unix(int64(last), 0)); age < -time.Second || age > 5*time.Second {
		t.Errorf("last tick %v ago", age)
	}
	if v, _ := s.Value("bwagent_build_info", "version", buildLabel(s, "version"), "goversion", runtime.Version()); v != 1 {
		t.Errorf("build info %v", s.Families["bwagent_build_info"])
	}
	downBefore, _ := s.Value("bwagent_counted_bytes_total", "protocol", "ssh", "direction", "download")

	// Reset: counted as a reset and an unblock; john is active again.
	if err := c.Reset(ctx, "john"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "metrics after the reset", func() error {
		s = e.scrape(t, addr)
		u, err := c.User(ctx, "john")
		if err != nil {
			return err
		}
		return samples(s,
			sample{float64(u.Used), "bwagent_user_used_bytes", []string{"user", "john", "protocol", "ssh"}},
			sample{1, "bwagent_user_status", []string{"user", "john", "protocol", "ssh", "status", "ACTIVE"}},
		)
	})
	if err := samples(s,
		sample{1, "bwagent_events_total", []string{"protocol", "ssh", "action", "reset", "reason", "Usage reset"}},
		sample{1, "bwagent_events_total", []string{"protocol", "ssh", "action", "unblock", "reason", "Unblocked: no longer over the limit"}},
		sample{1, "bwagent_events_total", []string{"protocol", "ssh", "action", "block", "reason", quota.ReasonLimit}},
		sample{0, "bwagent_users", []string{"protocol", "ssh", "status", "BLOCKED"}},
		sample{1, "bwagent_users", []string{"protocol", "ssh", "status", "ACTIVE"}},
	); err != nil {
		t.Error(err)
	}
	if down, _ := s.Value("bwagent_counted_bytes_total", "protocol", "ssh", "direction", "download"); down < downBefore {
		t.Errorf("counted download went from %v to %v: a reset zeroes usage, not the counter", downBefore, down)
	}

	a.Cmd.Process.Signal(syscall.SIGTERM)
	if err := a.Wait(10 * time.Second); err != nil {
		t.Errorf("agent exit: %v", err)
	}
}

// TestMetricsListenError: an address the agent cannot listen on is logged
// and the agent goes on, control socket included.
func TestMetricsListenError(t *testing.T) {
	e := newAgentEnv(t, "john:x:2761:2761::/:/bin/false\n", "")
	f, err := os.OpenFile(e.conf, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprint(f, "\n[metrics]\nlisten = \"192.0.2.1:9477\"\n") // no such address in the namespace
	f.Close()
	a := nettest.Start(t, nettest.Spec{NS: e.pair.A}, "bwagent", "--config", e.conf)
	line := a.Expect(t, `level=ERROR msg="metrics not served; the agent goes on without them"`, 20*time.Second)
	if !strings.Contains(line, "listen=192.0.2.1:9477") || !strings.Contains(line, "cannot assign requested address") {
		t.Errorf("listen error: %s", line)
	}
	a.Expect(t, `level=INFO msg="bwagent running"`, 10*time.Second)
	if _, err := e.dial(t).User(context.Background(), "john"); err != nil {
		t.Errorf("control socket after the metrics failed: %v", err)
	}
	a.Cmd.Process.Signal(syscall.SIGTERM)
	if err := a.Wait(10 * time.Second); err != nil {
		t.Errorf("agent exit: %v", err)
	}
}

// sample is a value expected of one series.
type sample struct {
	v      float64
	name   string
	labels []string
}

// samples checks each sample, returning the first that differs.
func samples(s *promtest.Scrape, want ...sample) error {
	for _, w := range want {
		got, ok := s.Value(w.name, w.labels...)
		if !ok {
			return fmt.Errorf("%s%v: no sample", w.name, w.labels)
		}
		if got != w.v {
			return fmt.Errorf("%s%v = %v, want %v", w.name, w.labels, got, w.v)
		}
	}
	return nil
}

// eventually retries check until it returns nil, failing the test with its
// last error after timeout.
func eventually(t *testing.T, timeout time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// logValue returns the value of key in a log line of slog's text handler.
func logValue(t *testing.T, line, key string) string {
	t.Helper()
	for _, f := range strings.Fields(line) {
		if v, ok := strings.CutPrefix(f, key+"="); ok {
			return v
		}
	}
	t.Fatalf("no %s in %q", key, line)
	return ""
}

// buildLabel returns a label of bwagent_build_info.
func buildLabel(s *promtest.Scrape, name string) string {
	for _, m := range s.Families["bwagent_build_info"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == name {
				return l.GetValue()
			}
		}
	}
	return ""
}
