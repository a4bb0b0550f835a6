package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/sshsess"
)

// SessionKernel is the data plane's part for SSH sessions: attributing a
// session's connection to its user (package sshsess) and crediting what it
// moved before. *bpf.Datapath is one; nil in Options leaves SSH sessions
// uncounted.
type SessionKernel interface {
	sshsess.Kernel
	Credit(uid uint32, c bpf.Counters) error
}

// loginTTL is how long a logged login waits for its session process to be
// seen: a login whose process never shows (another host's log, a forged
// line) is dropped after it.
const loginTTL = 10 * time.Minute

// sessionSide is the SSH sessions' part of the loop: a source (each
// session's connection, attributed to its user in the kernel, and the
// credit of what it moved before) and an enforcer (a blocked user's
// sessions are cut). Their bytes then reach usage through the kernel's
// counters, as the UIDs' own sockets' do.
type sessionSide struct {
	// Shared with the process watcher (watchProcesses): the server
	// processes it reports forks, execs and exits of, and where it reports
	// them; whether it is receiving events, and whether it dropped one
	// (the loop was behind): then the next tick looks at every process.
	known    atomic.Pointer[map[uint32]bool]
	events   chan sshsess.ProcEvent
	watching atomic.Bool
	lost     atomic.Bool

	// Owned by the loop.
	k        SessionKernel
	tr       *sshsess.Tracker
	servers  []string               // the programs tr was made for
	logs     map[string]loginSource // by ssh.auth_logs entry
	logins   map[int]loggedLogin
	scanIn   int    // ticks to the next look at every process, while the watcher works
	held     uint64 // the kernel's count of held login packets at the last tick
	knownGen uint64 // the Tracker's generation of the known map published
}

// sessionScanTicks is how often a tick looks at every process on the host
// for SSH server processes while the process events tell of new ones (each
// look reads every process's /proc entry: about 15 µs a process here);
// between, a tick only attributes among the processes it knows.
const sessionScanTicks = 30

// loginSource is one entry of ssh.auth_logs: a log file or the journal.
type loginSource interface {
	Read() ([]sshsess.Login, error)
	Close() error
}

// newLoginSource returns the source an ssh.auth_logs entry names.
func newLoginSource(entry string) loginSource {
	if entry == "journal" {
		return sshsess.NewJournal("")
	}
	if ns, ok := strings.CutPrefix(entry, "journal:"); ok {
		return sshsess.NewJournal(ns)
	}
	return sshsess.NewAuthLog(entry)
}

type loggedLogin struct {
	sshsess.Login
	at time.Time
}

// sampleSessions reads the servers' logs, finds the sessions and
// attributes the new ones, crediting what they moved before; a new session
// of a user who is blocked is cut at once.
func (a *Agent) sampleSessions(now time.Time) error {
	s := &a.sess
	if s.k == nil || !a.cfg.SSH.Enabled || !a.cfg.SSH.Sessions {
		return a.stopSessions()
	}
	if s.tr == nil || !slices.Equal(s.servers, a.cfg.SSH.Servers) {
		tr, err := sshsess.New(sshsess.Config{
			Programs: a.cfg.SSH.Servers,
			User:     func(uid uint32) bool { return a.byUID[uid] != nil },
		}, s.k)
		if err != nil {
			return err
		}
		s.tr, s.servers = tr, slices.Clone(a.cfg.SSH.Servers)
	}
	var errs []error
	errs = append(errs, a.readAuthLogs(now))
	logins := make(map[int]sshsess.Login, len(s.logins))
	for pid, l := range s.logins {
		logins[pid] = l.Login
	}
	var res sshsess.Result
	var err error
	// Logins held in the kernel that no known process attributes: a
	// server the watcher did not tell of (started by a process that is
	// none of ours, such as systemd restarting sshd).
	held := a.kernel.stats.SSHHeld != s.held && s.tr.Pending() == 0
	s.held = a.kernel.stats.SSHHeld
	if s.scanIn--; s.scanIn <= 0 || held || !s.watching.Load() || s.lost.Swap(false) {
		res, err = s.tr.Scan(logins, a.sshUID)
		s.scanIn = sessionScanTicks
	} else {
		res, err = s.tr.Refresh(logins, a.sshUID)
	}
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	return errors.Join(append(errs, a.takeSessions(res))...)
}

// sshUID returns the UID of the SSH user name.
func (a *Agent) sshUID(name string) (uint32, bool) {
	u := a.users[name]
	if u == nil || !u.r.ssh {
		return 0, false
	}
	return u.r.uid, true
}

// takeSessions credits what a scan or poll attributed, cuts the new
// sessions of blocked users and tells the process watcher which processes
// to report.
func (a *Agent) takeSessions(res sshsess.Result) error {
	s := &a.sess
	var errs []error
	for _, p := range res.Problems { // one per process at most
		a.log.Warn("SSH session not attributed", "err", p)
	}
	cut := make(map[uint32]bool)
	for _, n := range res.New {
		delete(s.logins, n.PID)
		if err := s.k.Credit(n.UID, n.Credit); err != nil {
			errs = append(errs, err)
		}
		name := ""
		if u := a.byUID[n.UID]; u != nil {
			name = u.r.name
			// The credit is usage the kernel's charged total lacks: the
			// budget is granted anew from the usage with it.
			u.hasAnchor = false
		}
		a.log.Info("SSH session attributed", "user", name, "pid", n.PID, "client", n.Remote,
			"credited", n.Credit.RxBytes+n.Credit.TxBytes)
		if a.kernel.policy[n.UID].Blocked {
			cut[n.UID] = true
		}
	}
	for uid := range cut {
		errs = append(errs, a.cutSessions(uid))
	}
	a.publishKnown()
	return errors.Join(errs...)
}

// publishKnown gives the process watcher the server processes, when they
// changed.
func (a *Agent) publishKnown() {
	s := &a.sess
	if g := s.tr.Generation(); g != s.knownGen || s.known.Load() == nil {
		known := s.tr.Known()
		s.known.Store(&known)
		s.knownGen = g
	}
}

// pollInterval is how often the sessions of logins under way are looked
// for between ticks; pollBatch logins under way each add as much again, so
// that a flood of connections (password guessers) costs about
// pollBatch/pollInterval process reads a second at most.
const (
	pollInterval = 20 * time.Millisecond
	pollBatch    = 25
)

// pollSessions looks for the sessions of the logins under way, between
// ticks: a session is attributed (and, if its user is blocked, cut) within
// milliseconds of the login, while the kernel holds its connection.
func (a *Agent) pollSessions(now time.Time) {
	s := &a.sess
	if s.tr == nil {
		return
	}
	err := a.readAuthLogs(now)
	logins := make(map[int]sshsess.Login, len(s.logins))
	for pid, l := range s.logins {
		logins[pid] = l.Login
	}
	res := s.tr.Poll(logins, a.sshUID)
	err = errors.Join(err, a.takeSessions(res))
	if len(res.New) > 0 {
		// A credit is usage the kernel's budget did not charge: grant the
		// budgets anew now, not at the next tick.
		for _, n := range res.New {
			if u := a.byUID[n.UID]; u != nil {
				a.updatePolicy(u)
			}
		}
		err = errors.Join(err, a.enforceKernel())
		// A login from a refused device, or one too many: cut now.
		for _, n := range res.New {
			if u := a.byUID[n.UID]; u != nil {
				a.limitUserDevices(u, now)
			}
		}
	}
	if err != nil { // the tick's report clears it once it works again
		a.logs.report("ssh sessions", err)
	}
}

// sessionProcess handles a process event the watcher reported: a fork of
// a root server process (a new connection's session process), an exec or
// an exit of a server process.
func (a *Agent) sessionProcess(ev sshsess.ProcEvent, now time.Time) {
	s := &a.sess
	if s.tr == nil {
		return
	}
	var err error
	switch {
	case ev.Exit:
		if s.tr.Exited(int(ev.PID)) {
			s.lost.Store(true) // a server stopped: look for its next listener
		}
		return
	case ev.Exec:
		err = s.tr.Exec(int(ev.PID))
	default:
		_, err = s.tr.Adopt(int(ev.PID))
		a.publishKnown()
	}
	if err != nil {
		a.log.Warn("SSH server process not followed", "pid", ev.PID, "err", err)
	}
	a.pollSessions(now)
}

// polling returns a channel that fires when the sessions should be polled
// next: soon while logins are under way, never otherwise.
func (a *Agent) polling() <-chan time.Time {
	if a.sess.tr == nil {
		return nil
	}
	n := a.sess.tr.Pending()
	if n == 0 {
		return nil
	}
	return time.After(pollInterval * time.Duration(1+n/pollBatch))
}

// watchProcesses reports forks, execs and exits of the server processes to
// the loop (netlink's process events), until ctx ends; without them (no
// permission, no CONFIG_PROC_EVENTS) sessions are found at each tick only.
func (a *Agent) watchProcesses(ctx context.Context) {
	for ctx.Err() == nil {
		err := a.watchOnce(ctx)
		a.sess.watching.Store(false)
		a.sess.lost.Store(true)
		if ctx.Err() != nil {
			return
		}
		a.log.Warn("process events lost; SSH sessions are found at each tick until they are back", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Second):
		}
	}
}

// watchOnce runs one subscription to the process events.
//
// A fork of a root server process is a new connection's process; so are
// that one's own forks (OpenSSH's monitor forks the process that runs as
// the user), which can come before the loop has made the first one known:
// the watcher follows that one step itself.
func (a *Agent) watchOnce(ctx context.Context) error {
	forwarded := make(map[uint32]bool) // forks forwarded: new connections' processes
	return sshsess.WatchProcesses(ctx, func(ev sshsess.ProcEvent) {
		a.sess.watching.Store(true)
		known := a.sess.known.Load()
		if known == nil {
			return
		}
		switch {
		case ev.Exit:
			delete(forwarded, ev.PID)
			if _, ok := (*known)[ev.PID]; !ok {
				return
			}
		case ev.Exec:
			if _, ok := (*known)[ev.PID]; !ok {
				return
			}
		case (*known)[ev.Parent]:
			if len(forwarded) >= 1<<16 {
				clear(forwarded) // exits lost: start over
			}
			forwarded[ev.PID] = true
		case forwarded[ev.Parent]:
			// one step further only: not the shells of sessions
		default:
			return
		}
		select {
		case a.sess.events <- ev:
		default: // the loop is behind: the next tick looks at every process
			a.sess.lost.Store(true)
		}
	})
}

// stopSessions stops following SSH sessions (turned off, or the agent
// stops): the kernel no longer holds logins for an attribution that would
// not come. Sessions attributed so far go on counting for their users.
func (a *Agent) stopSessions() error {
	s := &a.sess
	s.known.Store(nil)
	for path, l := range s.logs {
		l.Close()
		delete(s.logs, path)
	}
	if s.tr == nil {
		return nil
	}
	s.tr = nil
	return s.k.SetSSHPorts(nil)
}

// readAuthLogs adds the logins logged since the last read and forgets those
// older than loginTTL.
func (a *Agent) readAuthLogs(now time.Time) error {
	s := &a.sess
	if s.logs == nil {
		s.logs = make(map[string]loginSource)
		s.logins = make(map[int]loggedLogin)
	}
	for path, l := range s.logs {
		if !slices.Contains(a.cfg.SSH.AuthLogs, path) {
			l.Close()
			delete(s.logs, path)
		}
	}
	var errs []error
	for _, path := range a.cfg.SSH.AuthLogs {
		l := s.logs[path]
		if l == nil {
			l = newLoginSource(path)
			s.logs[path] = l
		}
		logins, err := l.Read()
		if err != nil {
			errs = append(errs, err)
		}
		for _, in := range logins {
			if _, dup := s.logins[in.PID]; !dup { // the first line of a process stands
				s.logins[in.PID] = loggedLogin{Login: in, at: now}
			}
		}
	}
	for pid, l := range s.logins {
		if now.Sub(l.at) > loginTTL {
			delete(s.logins, pid)
		}
	}
	return errors.Join(errs...)
}

// enforceSessions cuts the sessions of every blocked user that has one.
func (a *Agent) enforceSessions() error {
	var errs []error
	done := make(map[uint32]bool)
	if a.sess.tr == nil {
		return nil
	}
	a.sess.tr.EachSession(func(s sshsess.Session) {
		if a.kernel.policy[s.UID].Blocked {
			done[s.UID] = true
		}
	})
	for uid := range done {
		errs = append(errs, a.cutSessions(uid))
	}
	return errors.Join(errs...)
}

// cutSessions ends uid's SSH sessions.
func (a *Agent) cutSessions(uid uint32) error {
	n, err := a.sess.tr.Cut(uid)
	if n > 0 {
		name := ""
		if u := a.byUID[uid]; u != nil {
			name = u.r.name
		}
		a.log.Info("blocked user's SSH sessions cut", "user", name, "sessions", n)
	}
	return err
}

// sessionCount returns how many SSH sessions are counted for their users.
func (a *Agent) sessionCount() int {
	if a.sess.tr == nil {
		return 0
	}
	return a.sess.tr.SessionCount()
}

// sessionsComponent describes the SSH sessions for Health.
func (a *Agent) sessionsComponent() string {
	s := &a.sess
	switch {
	case !a.cfg.SSH.Enabled:
		return "disabled (ssh.enabled = false)"
	case !a.cfg.SSH.Sessions:
		return "disabled (ssh.sessions = false)"
	case s.k == nil:
		return "not available"
	}
	servers := 0
	if s.tr != nil {
		servers = s.tr.ServerCount()
	}
	msg := fmt.Sprintf("ok: %d sessions counted, %d server processes", a.sessionCount(), servers)
	if !s.k.SupportsServerTagging() {
		msg += "; logins are not held until attributed and forwarded connections are tagged late (needs Linux 6.0)"
	}
	if n := len(s.logins); n > 0 {
		msg += fmt.Sprintf("; %d logged logins waiting for their session", n)
	}
	return msg
}
