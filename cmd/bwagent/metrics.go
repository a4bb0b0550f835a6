package main

import (
	"context"
	"log/slog"
	"net"

	"github.com/myvpn/bwagent/agent"
	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/metrics"
)

// metricsServer is the agent's Prometheus endpoint ([metrics]): its
// Observer goes to agent.New, its HTTP server opens once the first tick
// has enforced.
type metricsServer struct {
	m      *metrics.Metrics // nil when [metrics] listen is ""
	listen string
}

// The agent's readers are the scrape-time source of the metrics.
var _ metrics.Source = (*agent.Agent)(nil)

func newMetricsServer(cfg config.Metrics) *metricsServer {
	if cfg.Listen == "" {
		return &metricsServer{}
	}
	return &metricsServer{
		m:      metrics.New(metrics.Options{PerUser: cfg.PerUser, PerUserMax: int(cfg.PerUserMax)}),
		listen: cfg.Listen,
	}
}

// observers returns what agent.Options.Observers gets: the metrics, if on.
func (s *metricsServer) observers() []agent.Observer {
	if s.m == nil {
		return nil
	}
	return []agent.Observer{s.m}
}

// start serves the metrics of src until ctx is done. An address that cannot
// be listened on is logged and the agent goes on without metrics. The
// returned channel is closed when the server has stopped.
func (s *metricsServer) start(ctx context.Context, src metrics.Source, log *slog.Logger) <-chan struct{} {
	done := make(chan struct{})
	if s.m == nil {
		close(done)
		return done
	}
	ln, err := net.Listen("tcp", s.listen)
	if err != nil {
		log.Error("metrics not served; the agent goes on without them", "listen", s.listen, "err", err)
		close(done)
		return done
	}
	log.Info("metrics served", "addr", ln.Addr().String(), "path", "/metrics")
	go func() {
		defer close(done)
		if err := s.m.Serve(ctx, ln, src); err != nil {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	return done
}
