package main

import (
	"context"
	"log/slog"
	"os"
	"reflect"
	"sync"
	"time"

	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/notify"
	"github.com/myvpn/bwagent/store"
	"github.com/myvpn/bwagent/view"
)

// notifications runs the notifier beside the agent. It is opened before the
// agent's first tick, so that a channel configured for the first time is
// sent that tick's events; it delivers once the agent is ready, is rebuilt
// when a reload changes [notify], and stops, its progress saved, before the
// state database closes. Events it could not deliver wait in the database
// for the next start.
//
// A notifier that cannot be built is logged, and the agent runs without
// it: enforcement never waits for notifications.
type notifications struct {
	st  *store.Store
	log *slog.Logger

	mu     sync.Mutex // protects the following
	cfg    config.Notify
	n      *notify.Notifier // nil: none
	ctx    context.Context  // the agent's, once started
	cancel context.CancelFunc
	done   chan struct{}
}

func openNotifications(cfg config.Config, st *store.Store, log *slog.Logger) *notifications {
	ns := &notifications{st: st, log: log, cfg: cfg.Notify}
	ns.n = ns.build(cfg.Notify)
	return ns
}

// build returns a notifier of c's channels, or nil (logged).
func (ns *notifications) build(c config.Notify) *notify.Notifier {
	chans := notify.Channels(c)
	if len(chans) == 0 {
		return nil
	}
	node := c.Node
	if node == "" {
		node, _ = os.Hostname()
	}
	n, err := notify.New(notify.Options{Store: ns.st, Channels: chans, Node: node, MaxAge: c.MaxAge,
		Report: func(channel string, err error, next time.Time) {
			if err != nil {
				ns.log.Warn("notification not delivered; retrying", "channel", channel, "err", err, "next_try", next.Format(time.DateTime))
			} else {
				ns.log.Info("notification channel works again", "channel", channel)
			}
		}})
	if err != nil {
		ns.log.Error("notifications off: the notifier could not start", "err", err)
		return nil
	}
	return n
}

// start delivers until ctx is done.
func (ns *notifications) start(ctx context.Context) {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	ns.ctx = ctx
	ns.run()
}

// run starts the notifier, if any; mu is held.
func (ns *notifications) run() {
	if ns.n == nil || ns.ctx == nil {
		return
	}
	ctx, cancel := context.WithCancel(ns.ctx)
	done := make(chan struct{})
	go func(n *notify.Notifier) {
		defer close(done)
		n.Run(ctx)
	}(ns.n)
	ns.cancel, ns.done = cancel, done
}

// halt stops the running notifier and waits for it; mu is held.
func (ns *notifications) halt() {
	if ns.cancel != nil {
		ns.cancel()
		<-ns.done
		ns.cancel, ns.done = nil, nil
	}
}

// reload rebuilds the notifier if c's [notify] differs from the running
// one's: events waiting for a channel that stays go on where they were.
func (ns *notifications) reload(c config.Config) {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	if reflect.DeepEqual(ns.cfg, c.Notify) {
		return
	}
	ns.halt()
	ns.cfg = c.Notify
	ns.n = ns.build(c.Notify)
	ns.run()
}

// wait stops delivering and waits until the progress is saved; a reload
// after it starts nothing.
func (ns *notifications) wait() {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	ns.halt()
	ns.ctx = nil
}

// status returns each channel's state.
func (ns *notifications) status() []view.NotifyChannel {
	ns.mu.Lock()
	n := ns.n
	ns.mu.Unlock()
	if n == nil {
		return nil
	}
	return n.Status()
}

// backend returns b with the channels' states in its Health, for bwctl
// status.
func (ns *notifications) backend(b control.Backend) control.Backend {
	return notifyBackend{Backend: b, ns: ns}
}

type notifyBackend struct {
	control.Backend
	ns *notifications
}

// Health is the agent's, with each notification channel's state.
func (b notifyBackend) Health() control.Health {
	h := b.Backend.Health()
	h.Notify = b.ns.status()
	return h
}
