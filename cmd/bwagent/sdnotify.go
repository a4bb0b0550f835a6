package main

import (
	"context"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/myvpn/bwagent/agent"
	"github.com/myvpn/bwagent/internal/sdnotify"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/view"
)

// serviceManager tells systemd (Type=notify) how the agent is doing:
// READY=1 once the first tick has enforced, a STATUS= line when the
// summary changes, WATCHDOG=1 from the loop's ticks (a hung loop stops
// them, and systemd restarts the agent), STOPPING=1 when shutdown begins.
// Without $NOTIFY_SOCKET it sends nothing. Start-up that fails sends nothing
// either: systemd sees the process exit before READY.
//
// Tick runs on the loop and only pings and records the health; the STATUS
// line is rendered beside the loop.
type serviceManager struct {
	// Constant after newServiceManager.
	n        *sdnotify.Notifier // nil: no notify socket
	log      *slog.Logger
	pingGap  time.Duration // at most one WATCHDOG=1 per pingGap; 0: no watchdog
	recount  time.Duration // the blocked users are counted again at least this often
	kick     chan struct{} // a tick was recorded
	done     chan struct{} // closed by stopping
	stopOnce sync.Once

	lastPing time.Time // owned by the loop (Tick)
	readied  atomic.Bool
	events   atomic.Bool
	stopped  atomic.Bool
	failed   atomic.Bool // the last send failed (logged once)

	mu     sync.Mutex // protects health
	health *view.Health
}

var _ agent.Observer = (*serviceManager)(nil)

// newServiceManager reads $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID
// and unsets them, so no child process (a notification hook) speaks for the
// agent. A notify socket that cannot be used is logged, not fatal: the agent
// enforces without it.
func newServiceManager(log *slog.Logger, interval time.Duration) *serviceManager {
	s := &serviceManager{log: log, recount: 10 * time.Second, kick: make(chan struct{}, 1), done: make(chan struct{})}
	socket := os.Getenv("NOTIFY_SOCKET")
	watchdog, werr := sdnotify.Watchdog()
	for _, v := range []string{"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} {
		os.Unsetenv(v)
	}
	if socket == "" {
		return s
	}
	n, err := sdnotify.New(socket)
	if err != nil {
		log.Error("cannot tell systemd the agent's state", "err", err)
		return s
	}
	s.n = n
	switch {
	case werr != nil:
		log.Error("watchdog off", "err", werr)
	case watchdog > 0:
		// Several pings per period, at most one a second however often
		// commands make the loop tick.
		s.pingGap = min(time.Second, watchdog/4)
		if watchdog < 2*interval {
			log.Warn("the watchdog period is under two tick intervals: systemd may restart a healthy agent; "+
				"set WatchdogSec= to at least twice the interval", "watchdog", watchdog, "interval", interval)
		}
	}
	return s
}

// Tick pings the watchdog (once READY=1 is sent: systemd's watchdog starts
// there) and records the health for the STATUS line. It runs on the loop: a
// send never blocks (sdnotify).
func (s *serviceManager) Tick(h view.Health) {
	if s.n == nil || s.stopped.Load() {
		return
	}
	if now := time.Now(); s.pingGap > 0 && s.readied.Load() && now.Sub(s.lastPing) >= s.pingGap {
		s.lastPing = now
		s.send("WATCHDOG=1")
	}
	s.mu.Lock()
	s.health = &h
	s.mu.Unlock()
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// Event notes that a user's state changed, so the blocked users are counted
// again at the next STATUS line.
func (s *serviceManager) Event(quota.Protocol, string, string) { s.events.Store(true) }

// Charged is part of agent.Observer.
func (s *serviceManager) Charged(quota.Protocol, quota.Usage) {}

// Committed is part of agent.Observer.
func (s *serviceManager) Committed(time.Duration, error) {}

// ready sends READY=1 with the first STATUS line once the control socket
// answers (so that bwctl works when systemctl start returns; after 2 s
// without it, READY=1 is sent anyway: the agent enforces without its
// socket), starts the STATUS updates and sends STOPPING=1 when ctx ends.
func (s *serviceManager) ready(ctx context.Context, users func(context.Context) ([]view.User, error), socket string) {
	if s.n == nil {
		return
	}
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if c, err := net.DialTimeout("unix", socket, time.Second); err == nil {
			c.Close()
			break
		}
	}
	st := &statusLine{users: users, recount: s.recount}
	s.mu.Lock()
	h := s.health
	s.mu.Unlock()
	msg := []string{"READY=1"}
	if h != nil {
		s.events.Store(false)
		st.sent = st.render(*h, true)
		msg = append(msg, "STATUS="+st.sent)
	}
	s.send(msg...)
	s.readied.Store(true)
	go s.statusLoop(st)
	go func() {
		select {
		case <-ctx.Done():
			s.stopping()
		case <-s.done:
		}
	}()
}

// statusLoop sends a STATUS line after each recorded tick whose summary
// differs from the last one sent.
func (s *serviceManager) statusLoop(st *statusLine) {
	for {
		select {
		case <-s.done:
			return
		case <-s.kick:
		}
		s.mu.Lock()
		h := *s.health
		s.mu.Unlock()
		if line := st.render(h, s.events.Swap(false)); line != st.sent {
			st.sent = line
			s.send("STATUS=" + line)
		}
	}
}

// stopping sends STOPPING=1 once and ends the STATUS updates.
func (s *serviceManager) stopping() {
	s.stopOnce.Do(func() {
		s.stopped.Store(true)
		close(s.done)
		s.send("STOPPING=1", "STATUS=stopping: committing the last counts")
	})
}

// close ends the updates and closes the socket.
func (s *serviceManager) close() {
	s.stopOnce.Do(func() { s.stopped.Store(true); close(s.done) })
	s.n.Close()
}

// send sends a message; a failure is logged once, until a send works again.
func (s *serviceManager) send(lines ...string) {
	err := s.n.Send(lines...)
	if err != nil && !s.failed.Swap(true) {
		s.log.Warn("cannot tell systemd the agent's state", "err", err)
	}
	if err == nil && s.failed.Swap(false) {
		s.log.Info("telling systemd the agent's state again")
	}
}

// statusLine renders the one-line summary systemctl status shows, such as
// "2,345 users, 12 blocked, last tick 3 ms". It is used by one goroutine.
type statusLine struct {
	users   func(context.Context) ([]view.User, error)
	recount time.Duration
	blocked int       // blocked and disabled users at the last count
	counted time.Time // zero: never counted
	sent    string
}

// render returns the summary for h. The blocked users are counted from the
// published users when something happened to a user (changed), or when the
// last count is older than recount: counting renders every user, so it is
// not done every tick.
func (st *statusLine) render(h view.Health, changed bool) string {
	if changed || st.counted.IsZero() || time.Since(st.counted) >= st.recount {
		if users, err := st.users(context.Background()); err == nil {
			st.blocked = 0
			for _, u := range users {
				if u.Status == quota.Blocked || u.Status == quota.Disabled {
					st.blocked++
				}
			}
			st.counted = time.Now()
		}
	}
	tick := "<1 ms"
	if ms := h.TickDuration.Milliseconds(); ms >= 1 {
		tick = thousands(int(ms)) + " ms"
	}
	users := thousands(h.Users) + " users"
	if h.Users == 1 {
		users = "1 user"
	}
	line := users + ", " + thousands(st.blocked) + " blocked, last tick " + tick
	if len(h.Errors) > 0 {
		line += "; failing: " + strings.Join(slices.Sorted(maps.Keys(h.Errors)), ", ") + " (bwctl status)"
	}
	return line
}

// thousands formats n with a comma every three digits: 2,345.
func thousands(n int) string {
	s := strconv.Itoa(n)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	if neg {
		b.WriteByte('-')
	}
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	return b.String()
}
