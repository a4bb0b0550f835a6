// Package metrics exposes the agent's Prometheus metrics (names starting
// with bwagent_) over HTTP at /metrics.
//
// Two kinds of metric come from two places:
//
//   - What the agent does is counted as it happens: a *Metrics is an
//     agent.Observer (Tick, Charged, Event, Committed) and keeps the bytes
//     counted, the events, and the tick and commit durations. These count
//     from the agent's start.
//   - What the agent is, is read at each scrape from a Source (the agent's
//     last published snapshot and health): users by status and protocol,
//     each component's health, the kernel's own counters, Xray's
//     reachability, the ticks run and, with Options.PerUser, each user's
//     usage, limit and status.
//
// Per-user series are off by default: a label per user is what
// Prometheus's maintainers warn against for large user counts. With
// Options.PerUser at most Options.PerUserMax users (the first present users
// in name order) get series, up to 3 each; the others are left out and
// counted in bwagent_user_metrics_omitted.
//
// The Source is read only at a scrape, so it must be ready by the first
// one: serve only after the agent's first tick (agent.Agent.Ready). A
// scrape renders every user (Source.Users); see the README for its cost.
//
// The package does not log. A Source that fails makes the scrape report
// the error in place of the metrics that needed it (and count it in
// promhttp_metric_handler_errors_total); the rest is served.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/view"
)

// Source is what the scrape-time metrics are read from: *agent.Agent
// satisfies it. Both methods may be called from any goroutine, at any
// time after the agent's first tick.
type Source interface {
	// Users returns every known user as of the last tick, sorted by name.
	Users(ctx context.Context) ([]view.User, error)
	// Health returns the agent's state as of the last tick.
	Health() view.Health
}

// Options configure New.
type Options struct {
	// PerUser adds per-user series: used bytes, limit and status.
	PerUser bool
	// PerUserMax caps the users that get per-user series; the others are
	// counted in bwagent_user_metrics_omitted. 0 means DefaultPerUserMax.
	PerUserMax int
}

// DefaultPerUserMax is the cap on users with per-user series when
// Options.PerUserMax is 0.
const DefaultPerUserMax = 1000

// maxReasons bounds the reason label of bwagent_events_total: reasons past
// this many distinct ones are counted as "other".
const maxReasons = 64

// Metrics holds the agent's metrics. Its Observer methods may be called
// from any goroutine; they never block.
type Metrics struct {
	opts Options

	bytes     *prometheus.CounterVec
	events    *prometheus.CounterVec
	tickDur   prometheus.Histogram
	commitDur prometheus.Histogram
	commitErr prometheus.Counter
	buildInfo prometheus.Collector

	// byProto are the bytes counters of the known protocols, looked up
	// once: Charged runs for every user with traffic, every tick.
	byProto map[quota.Protocol]*[2]prometheus.Counter // upload, download

	mu      sync.Mutex // protects the following
	reasons map[string]bool
}

// protocols and statuses are the label values bwagent_users always has,
// so that a count of 0 is a series, not an absence.
var (
	protocols = []quota.Protocol{quota.SSH, quota.VMess, quota.VLESS, quota.Trojan, quota.Shadowsocks}
	statuses  = []quota.Status{quota.Unlimited, quota.Active, quota.Warning, quota.Throttled, quota.Blocked, quota.Disabled}
)

// New returns the agent's metrics. Pass it to agent.Options.Observers, then
// serve it with Serve or Handler.
func New(o Options) *Metrics {
	if o.PerUserMax <= 0 {
		o.PerUserMax = DefaultPerUserMax
	}
	m := &Metrics{
		opts: o,
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bwagent_counted_bytes_total",
			Help: "Bytes counted into users' usage since the agent started, by protocol and direction (upload: sent by the user).",
		}, []string{"protocol", "direction"}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "bwagent_events_total",
			Help: "Users' events since the agent started (block, unblock, reset, disable, enable), by protocol, action and reason.",
		}, []string{"protocol", "action", "reason"}),
		tickDur: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "bwagent_tick_duration_seconds",
			Help:    "How long each tick of the agent's loop took.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		commitDur: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "bwagent_commit_duration_seconds",
			Help:    "How long each commit of the state database took, failed ones included.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}),
		commitErr: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "bwagent_commit_errors_total",
			Help: "Commits of the state database that failed (each is retried with the next tick's).",
		}),
		buildInfo: newBuildInfo(),
		byProto:   make(map[quota.Protocol]*[2]prometheus.Counter, len(protocols)),
		reasons:   make(map[string]bool),
	}
	for _, p := range protocols {
		m.byProto[p] = &[2]prometheus.Counter{
			m.bytes.WithLabelValues(string(p), "upload"),
			m.bytes.WithLabelValues(string(p), "download"),
		}
	}
	return m
}

// Tick is agent.Observer's: it observes the tick's duration.
func (m *Metrics) Tick(h view.Health) { m.tickDur.Observe(h.TickDuration.Seconds()) }

// Charged is agent.Observer's: it counts the bytes of a usage delta.
func (m *Metrics) Charged(p quota.Protocol, d quota.Usage) {
	c, ok := m.byProto[p]
	if !ok {
		c = &[2]prometheus.Counter{m.bytes.WithLabelValues(string(p), "upload"), m.bytes.WithLabelValues(string(p), "download")}
	}
	if d.Up > 0 {
		c[0].Add(float64(d.Up))
	}
	if d.Down > 0 {
		c[1].Add(float64(d.Down))
	}
}

// Event is agent.Observer's: it counts a user's event.
func (m *Metrics) Event(p quota.Protocol, action, reason string) {
	m.events.WithLabelValues(string(p), action, m.reasonLabel(reason)).Inc()
}

// Committed is agent.Observer's: it observes a commit's duration and counts
// a failed one.
func (m *Metrics) Committed(d time.Duration, err error) {
	m.commitDur.Observe(d.Seconds())
	if err != nil {
		m.commitErr.Inc()
	}
}

// reasonLabel bounds the reason label: a manual unblock's duration, a
// scheduled reset's schedule and a device cut's address are left out, and
// reasons past maxReasons distinct ones are "other".
func (m *Metrics) reasonLabel(r string) string {
	switch {
	case strings.HasPrefix(r, "Unblocked manually"):
		r = "Unblocked manually"
	case quota.IsScheduledReset(r):
		r = "Usage reset (scheduled)"
	case strings.HasPrefix(r, quota.ReasonDevices):
		r = quota.ReasonDevices
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.reasons[r] {
		if len(m.reasons) >= maxReasons {
			return "other"
		}
		m.reasons[r] = true
	}
	return r
}

// Handler returns the HTTP handler of the metrics: those m observed, those
// read from src at each scrape, the Go runtime's and the process's (go_*,
// process_*) and the handler's own (promhttp_*). At most 4 scrapes run at
// once, each for at most 10 s.
func (m *Metrics) Handler(src Source) http.Handler {
	reg := prometheus.NewRegistry()
	if err := m.register(reg, src); err != nil {
		// Only a programming error: the metrics are fixed.
		panic(err)
	}
	h := promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorHandling:       promhttp.ContinueOnError,
		Registry:            reg,
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	})
	return promhttp.InstrumentMetricHandler(reg, h)
}

// register registers every collector of the metrics in reg.
func (m *Metrics) register(reg prometheus.Registerer, src Source) error {
	for _, c := range []prometheus.Collector{
		m.bytes, m.events, m.tickDur, m.commitDur, m.commitErr, m.buildInfo,
		&sourceCollector{src: src, opts: m.opts},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	} {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("register metrics: %w", err)
		}
	}
	return nil
}

// Serve serves Handler(src) at /metrics on ln until ctx is done, then
// shuts the server down, letting scrapes in flight finish for up to 5 s.
// It closes ln. It returns nil after ctx is done, and the error that
// stopped the server otherwise.
func (m *Metrics) Serve(ctx context.Context, ln net.Listener, src Source) error {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler(src))
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          discardLog, // the package does not log
	}
	served, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		select {
		case <-ctx.Done():
		case <-served: // failed on its own
			return
		}
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if srv.Shutdown(sctx) != nil {
			srv.Close()
		}
	}()
	err := srv.Serve(ln)
	close(served)
	<-stopped
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	srv.Close()
	return fmt.Errorf("metrics server: %w", err)
}

// newBuildInfo returns bwagent_build_info: the module version of the
// binary ("(devel)" when built from a checkout) and the Go version.
func newBuildInfo() prometheus.Collector {
	version := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		version = bi.Main.Version
	}
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "bwagent_build_info",
		Help:        "Always 1; the labels say which bwagent runs: its module version and the Go version it was built with.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
	}, func() float64 { return 1 })
}
