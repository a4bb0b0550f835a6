package sshsess

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/sockkill"
)

// Scan looks at the server processes: it registers new ones with the
// kernel and forgets those that exited, and attributes every session whose
// user it can tell. logins are the logins the servers logged (AuthLog), by
// session process; only root session processes (Dropbear before 2025.89)
// need one, and uid resolves a login's user name. Errors of single
// processes are in Result.Problems; the error is for the scan as a whole.
func (t *Tracker) Scan(logins map[int]Login, uid func(name string) (uint32, bool)) (Result, error) {
	return t.scan(logins, uid, true)
}

// Refresh is Scan for the processes that appeared since the last Scan or
// Refresh only: it lists /proc but reads no entry of a process it has seen
// before, which makes it cheap enough for every tick of a caller that
// follows the process events (WatchProcesses: Adopt, Exec, Exited) and
// scans in full now and then. What it misses (a process seen before that
// ran a server program since without an exec event) the next Scan finds.
func (t *Tracker) Refresh(logins map[int]Login, uid func(name string) (uint32, bool)) (Result, error) {
	return t.scan(logins, uid, false)
}

// scan is Scan, or Refresh if full is false.
func (t *Tracker) scan(logins map[int]Login, uid func(name string) (uint32, bool), full bool) (Result, error) {
	var res Result
	ids, names := t.programs()
	dir, err := os.Open(t.cfg.Proc)
	if err != nil {
		return res, fmt.Errorf("list processes: %w", err)
	}
	entries, err := dir.Readdirnames(-1)
	dir.Close()
	if err != nil {
		return res, fmt.Errorf("list processes: %w", err)
	}
	seen := make(map[int]bool, len(t.procs))
	walked := make(map[int]struct{}, len(entries))
	for _, name := range entries {
		pid, err := strconv.Atoi(name)
		if err != nil || pid <= 0 {
			continue
		}
		walked[pid] = struct{}{}
		if _, before := t.walked[pid]; before && !full && t.procs[pid] == nil {
			continue // judged at an earlier walk: no server
		}
		if !full && t.procs[pid] != nil {
			seen[pid] = true // known: its events tell of it
			continue
		}
		comm, start, ok := t.stat(pid)
		if !ok {
			continue
		}
		p := t.procs[pid]
		if p != nil && (p.start != start || !t.isProgram(pid, ids)) {
			// The PID was reused, or the process runs another program.
			t.drop(pid, p)
			p = nil
		}
		if p == nil {
			if !names[comm] {
				continue
			}
			prog := t.programOf(pid, ids)
			if prog == "" {
				continue
			}
			t.newProc(pid, start, prog)
		}
		seen[pid] = true
	}
	t.walked = walked
	for pid := range t.procs {
		if _, alive := walked[pid]; !alive || full && !seen[pid] {
			t.forget(pid)
		}
	}
	res = t.attachAll(res, logins, uid, false)
	if err := t.register(); err != nil {
		return res, err
	}
	return res, nil
}

// Exited forgets a process that ended, and reports whether it was a
// listener: its replacement (a restarted server) is for a Scan to find.
func (t *Tracker) Exited(pid int) (listener bool) {
	p, ok := t.procs[pid]
	if !ok {
		return false
	}
	t.forget(pid)
	return len(p.listens) > 0
}

// Poll attributes the sessions of the server processes the Tracker knows
// (from Scan and Adopt) without looking for new ones: it is cheap enough to
// run every few milliseconds while a login is under way.
func (t *Tracker) Poll(logins map[int]Login, uid func(name string) (uint32, bool)) Result {
	return t.attachAll(Result{}, logins, uid, true)
}

// Adopt makes a process that a server process just forked (a new
// connection's session process) known at once, and registers it with the
// kernel, so the sockets it opens as a user are tagged from the first
// (see the package documentation). It reports whether pid is new and runs
// a server program.
func (t *Tracker) Adopt(pid int) (bool, error) {
	if _, ok := t.procs[pid]; ok {
		return false, nil
	}
	ids, _ := t.programs()
	_, start, ok := t.stat(pid)
	if !ok {
		return false, nil
	}
	prog := t.programOf(pid, ids)
	if prog == "" {
		return false, nil
	}
	t.newProc(pid, start, prog).adopted = true
	return true, nil
}

// newProc records a server process running program.
func (t *Tracker) newProc(pid int, start uint64, program string) *proc {
	uid, ok := t.uidOf(pid)
	p := &proc{seen: t.cfg.Now(), start: start, netns: t.netns(pid), root: ok && uid == 0,
		byLog: filepath.Base(program) == "dropbear"}
	t.gen++
	t.procs[pid] = p
	return p
}

// Exec re-checks a known process that ran a new program: one that is no
// server program any more is forgotten, and the sockets it had tagged as a
// session's forwarded connections count for their owner again.
func (t *Tracker) Exec(pid int) error {
	p := t.procs[pid]
	if p == nil {
		return nil
	}
	ids, _ := t.programs()
	if t.isProgram(pid, ids) {
		return nil
	}
	return t.drop(pid, p)
}

// drop forgets a process that no longer runs a server program and undoes
// what it was given: its registration, its forwarded connections' tags.
func (t *Tracker) drop(pid int, p *proc) error {
	t.forget(pid)
	if p.uid == 0 {
		return nil
	}
	var errs []error
	if t.k.SupportsServerTagging() {
		errs = append(errs, t.k.RemoveServers(uint32(pid)))
	}
	socks, err := t.borrowAll(pid)
	errs = append(errs, err)
	for _, s := range socks {
		if a, ok, err := t.k.SocketAttribution(s.fd); err == nil && ok && a.Forward {
			errs = append(errs, t.k.Untag(s.fd))
		}
		unix.Close(s.fd)
	}
	return errors.Join(errs...)
}

// rootGrace is how long a new OpenSSH process may stay root before it is
// taken for a monitor or a listener rather than a session process about to
// take its user's UID.
const rootGrace = 2 * time.Second

// pollWindow is how long after a server process appears Poll looks at it:
// most logins are done by then (a password typed, a key offered), and a
// flood of connections that never log in (password guessers) costs polls
// for this long each, not for as long as they last. A later login is found
// by the next Scan.
const pollWindow = 10 * time.Second

// Pending reports how many server processes seen within pollWindow are not
// attributed: logins under way (and, for a while after it is first seen, a
// Dropbear listener), worth a Poll every few milliseconds.
func (t *Tracker) Pending() int {
	n := 0
	now := t.cfg.Now()
	for _, p := range t.procs {
		if !p.attached && now.Sub(p.seen) < pollWindow {
			n++
		}
	}
	return n
}

// attachAll gives the kernel the listening ports whose sessions it has
// attributed before, and attributes every session it can.
//
// A port's logins are held until attributed only once a session on it was:
// a server whose sessions cannot be told (a Dropbear that stays root, with
// no auth log to read) must not have every login stall for the hold.
//
// A poll looks only at processes seen within pollWindow: older ones wait
// for the next Scan.
func (t *Tracker) attachAll(res Result, logins map[int]Login, uid func(name string) (uint32, bool), poll bool) Result {
	now := t.cfg.Now()
	ports := make(map[uint64]map[uint16]bool)
	all := make(map[uint16]bool)
	for pid, p := range t.procs {
		if p.listens == nil && !p.adopted {
			// A process just forked holds its listener's sockets until
			// it closes them: only those found by a scan are looked at.
			p.listens = t.listening(pid)
		}
		if ports[p.netns] == nil {
			ports[p.netns] = make(map[uint16]bool)
		}
		for port := range p.listens {
			ports[p.netns][port] = true
			if t.proven[port] {
				all[port] = true
			}
		}
	}
	if list := slices.Sorted(maps.Keys(all)); !slices.Equal(list, t.ports) {
		if err := t.k.SetSSHPorts(list); err != nil {
			res.Problems = append(res.Problems, err)
		} else {
			t.ports = list
		}
	}
	for pid, p := range t.procs {
		if p.attached || poll && now.Sub(p.seen) >= pollWindow {
			continue
		}
		a, done, err := t.attach(pid, p, ports[p.netns], logins, uid, poll)
		if err != nil && !p.reported { // once a process: polls retry it every few ms
			p.reported = true
			res.Problems = append(res.Problems, fmt.Errorf("SSH session process %d: %w", pid, err))
		}
		p.attached = done
		if a != nil {
			res.New = append(res.New, *a)
		}
	}
	return res
}

// forget drops a process that exited (or whose PID another took).
func (t *Tracker) forget(pid int) {
	delete(t.procs, pid)
	delete(t.sessions, pid)
	t.gen++
}

// register makes the kernel's set of server processes the session
// processes that run as a user of ours (only their sockets are tagged).
func (t *Tracker) register() error {
	if !t.k.SupportsServerTagging() {
		return nil
	}
	have, err := t.k.Servers()
	if err != nil {
		return err
	}
	in := make(map[uint32]bool, len(have))
	var gone []uint32
	for _, pid := range have {
		in[pid] = true
		if p := t.procs[int(pid)]; p == nil || p.uid == 0 {
			gone = append(gone, pid)
		}
	}
	var add []uint32
	for pid, p := range t.procs {
		if p.uid != 0 && !in[uint32(pid)] {
			add = append(add, uint32(pid))
		}
	}
	if err := t.k.RemoveServers(gone...); err != nil {
		return err
	}
	return t.k.AddServers(add...)
}

// stat returns a process's command name and start time (in clock ticks
// since boot) from /proc/PID/stat.
func (t *Tracker) stat(pid int) (comm string, start uint64, ok bool) {
	b, err := os.ReadFile(filepath.Join(t.cfg.Proc, strconv.Itoa(pid), "stat"))
	if err != nil {
		return "", 0, false
	}
	// "PID (COMM) S PPID ...": COMM may hold spaces and parentheses.
	open, close := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if open < 0 || close < open {
		return "", 0, false
	}
	fields := strings.Fields(string(b[close+1:]))
	// Field 22 of the line, starttime, is the 20th after COMM.
	if len(fields) < 20 {
		return "", 0, false
	}
	start, err = strconv.ParseUint(fields[19], 10, 64)
	return string(b[open+1 : close]), start, err == nil
}

// clockTicks is USER_HZ, the unit of /proc's process start times: 100 on
// every Linux architecture.
const clockTicks = 100

// startOf returns when process p started, from its start time and the
// boot time (/proc/stat's btime); the zero time if that cannot be read.
func (t *Tracker) startOf(p *proc) time.Time {
	if t.boot.IsZero() {
		b, err := os.ReadFile(filepath.Join(t.cfg.Proc, "stat"))
		if err != nil {
			return time.Time{}
		}
		for line := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(line, "btime "); ok {
				if sec, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil {
					t.boot = time.Unix(sec, 0)
				}
			}
		}
		if t.boot.IsZero() {
			return time.Time{}
		}
	}
	return t.boot.Add(time.Duration(p.start) * time.Second / clockTicks)
}

// uidOf returns a process's real UID (/proc/PID/status).
func (t *Tracker) uidOf(pid int) (uint32, bool) {
	f, err := os.Open(filepath.Join(t.cfg.Proc, strconv.Itoa(pid), "status"))
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "Uid:"); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				return 0, false
			}
			n, err := strconv.ParseUint(f[0], 10, 32)
			return uint32(n), err == nil
		}
	}
	return 0, false
}

// netns returns the inode of a process's network namespace, 0 if unknown.
func (t *Tracker) netns(pid int) uint64 {
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join(t.cfg.Proc, strconv.Itoa(pid), "ns", "net"), &st); err != nil {
		return 0
	}
	return st.Ino
}

// attach tries to attribute the session of process pid. done is true once
// there is nothing more to do for it: its session is attributed, or it is
// no session of a user of ours.
//
// A Dropbear session process that stays root and has no logged login may
// have been attributed by an earlier agent (whose log lines this one did
// not read): a scan (not a poll, it costs the process's sockets) takes its
// session's attribution from the kernel.
func (t *Tracker) attach(pid int, p *proc, ports map[uint16]bool, logins map[int]Login, uidOf func(string) (uint32, bool), poll bool) (*Attributed, bool, error) {
	uid, ok := t.uidOf(pid)
	if !ok {
		return nil, true, nil // gone
	}
	var login *Login
	switch {
	case uid == 0 && !p.byLog:
		// OpenSSH's root processes (the listener, each connection's
		// monitor): the session is found through the process that runs
		// as the user. That one is forked as root too and takes the
		// user's UID within milliseconds: a root process is left alone
		// only once it has been root for rootGrace.
		return nil, t.cfg.Now().Sub(p.seen) > rootGrace, nil
	case uid != 0 && !t.cfg.User(uid):
		// OpenSSH's unprivileged pre-authentication process, or a
		// system account's session.
		return nil, true, nil
	case uid == 0:
		l, ok := logins[pid]
		if !ok && !poll && !p.lookedBefore {
			// Once: an earlier agent's attribution is there from the
			// start or not at all.
			p.lookedBefore = true
			return t.attributedBefore(pid, p, ports)
		}
		if !ok {
			return nil, false, nil // not logged in yet
		}
		u, ok := uidOf(l.User)
		if !ok || !t.cfg.User(u) {
			return nil, true, nil
		}
		uid, login = u, &l
	}
	p.uid = uid
	if uid != 0 && t.k.SupportsServerTagging() {
		// From now on the kernel tags what it opens; what it opened
		// before is tagged below.
		if err := t.k.AddServers(uint32(pid)); err != nil {
			return nil, false, err
		}
	}

	socks, err := t.borrowAll(pid)
	if err != nil {
		return nil, false, err
	}
	defer closeAll(socks)
	var sess *sock
	for i := range socks {
		s := &socks[i]
		if sess == nil && s.sessionOn(ports) {
			sess = s
		}
	}
	if sess == nil {
		return nil, false, nil
	}
	if login != nil && !sameAddrPort(login.From, sess.remote) {
		// The log names another connection: a forged line, or a log of
		// another server. The process stays pending.
		return nil, false, fmt.Errorf("logged login of %q from %s, but the session's client is %s", login.User, login.From, sess.remote)
	}
	s := Session{PID: pid, UID: uid, Local: sess.local, Remote: sess.remote, Start: t.startOf(p)}
	cur, tagged, err := t.k.SocketAttribution(sess.fd)
	if err != nil {
		return nil, false, err
	}
	if tagged && !cur.Pending { // attributed before (an earlier agent)
		t.sessions[pid] = s
		p.session = true
		return nil, true, nil
	}
	// Forwarded connections opened before the process was registered
	// (or on a kernel without tagging) were counted for their owner,
	// the user: they are tagged now, and what they moved comes off the
	// session's credit, which carries the same bytes.
	var fwd bpf.Counters
	if uid != 0 && !p.tagged {
		for i := range socks {
			f := &socks[i]
			if f == sess || f.listening || f.owner != uid {
				continue
			}
			if _, ok, err := t.k.SocketAttribution(f.fd); err != nil || ok {
				continue
			}
			if _, err := t.k.Attribute(f.fd, f.owner, bpf.Attribution{UID: uid, Forward: true}); err != nil {
				continue
			}
			fwd.RxBytes += f.info.Bytes_received
			fwd.TxBytes += f.info.Bytes_sent
		}
		p.tagged = true
	}
	// The session socket is the server's end of the user's connection:
	// what it sends is the user's download (Server swaps the directions in
	// the kernel, and in what Attribute returns).
	moved, err := t.k.Attribute(sess.fd, sess.owner, bpf.Attribution{UID: uid, Server: true})
	if err != nil {
		if errors.Is(err, bpf.ErrAttributed) {
			t.sessions[pid] = s
			p.session = true
			return nil, true, nil
		}
		return nil, false, err
	}
	t.sessions[pid] = s
	p.session = true
	t.proven[s.Local.Port()] = true
	if !tagged {
		// Accepted before the kernel knew the port: its TCP counters, in
		// the user's directions. What it sent, not what was acknowledged:
		// the packets in flight left before the attribution and are
		// counted nowhere else (a CI run missed 90 KB of a 4 MiB output
		// read with bytes_acked); the kernel's counters count packets as
		// they are sent, retransmissions included, and so does
		// bytes_sent.
		moved = bpf.Counters{RxBytes: sess.info.Bytes_sent, TxBytes: sess.info.Bytes_received}
	}
	// The user's download is what the session socket sent, of which the
	// forwarded sockets' received bytes were counted already (for the
	// user, their owner); their upload is what it received, of which the
	// forwarded sockets' sent bytes were.
	credit := bpf.Counters{
		RxBytes: sub(moved.RxBytes, fwd.RxBytes),
		TxBytes: sub(moved.TxBytes, fwd.TxBytes),
	}
	return &Attributed{Session: s, Credit: credit}, true, nil
}

// attributedBefore records the session of process pid if its connection
// has an attribution already (an earlier agent's).
func (t *Tracker) attributedBefore(pid int, p *proc, ports map[uint16]bool) (*Attributed, bool, error) {
	socks, err := t.borrowAll(pid)
	if err != nil {
		return nil, false, err
	}
	defer closeAll(socks)
	for _, so := range socks {
		if !so.sessionOn(ports) {
			continue
		}
		a, ok, err := t.k.SocketAttribution(so.fd)
		if err != nil || !ok || a.Pending || a.Forward {
			return nil, false, err
		}
		p.uid, p.session = a.UID, true
		t.sessions[pid] = Session{PID: pid, UID: a.UID, Local: so.local, Remote: so.remote, Start: t.startOf(p)}
		return nil, true, nil
	}
	return nil, false, nil
}

func sub(a, b uint64) uint64 {
	if a < b {
		return 0
	}
	return a - b
}

func sameAddrPort(a, b netip.AddrPort) bool {
	return a.Port() == b.Port() && a.Addr().Unmap() == b.Addr().Unmap()
}

// listening returns the TCP ports process pid listens on.
func (t *Tracker) listening(pid int) map[uint16]bool {
	ports := make(map[uint16]bool)
	socks, err := t.borrowAll(pid)
	if err != nil {
		return ports
	}
	for _, s := range socks {
		if s.stream && s.listening {
			ports[s.local.Port()] = true
		}
		unix.Close(s.fd)
	}
	return ports
}

// Cut ends the SSH sessions of uid: each session's connection is
// destroyed (sock_diag's SOCK_DESTROY), which ends the server's session
// process and tells the client at once with a reset (the data plane lets
// resets through a block). It returns how many it cut.
func (t *Tracker) Cut(uid uint32) (int, error) {
	n := 0
	var errs []error
	for pid, s := range t.sessions {
		if s.UID != uid {
			continue
		}
		ok, err := t.CutSession(pid)
		if err != nil {
			errs = append(errs, err)
		}
		if ok {
			n++
		}
	}
	return n, errors.Join(errs...)
}

// CutSession ends the one SSH session of process pid, as Cut does, and
// reports whether it cut it: a session that ended meanwhile is forgotten,
// and a pid without a session is left alone.
func (t *Tracker) CutSession(pid int) (bool, error) {
	s, ok := t.sessions[pid]
	if !ok {
		return false, nil
	}
	cut, err := t.cut(pid, s)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH) {
		t.forget(pid) // ended since the last scan
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("SSH session process %d: %w", pid, err)
	}
	if cut {
		delete(t.sessions, pid) // its connection is gone: no session any more
	}
	return cut, nil
}

// cut destroys the connection of session s of process pid.
func (t *Tracker) cut(pid int, s Session) (bool, error) {
	socks, err := t.borrowAll(pid)
	if err != nil {
		return false, err
	}
	var conn *sockkill.Conn
	for _, so := range socks {
		if conn == nil && so.stream && !so.listening && sameAddrPort(so.local, s.Local) && sameAddrPort(so.remote, s.Remote) {
			if cookie, err := unix.GetsockoptUint64(so.fd, unix.SOL_SOCKET, unix.SO_COOKIE); err == nil {
				conn = &sockkill.Conn{Local: so.local, Remote: so.remote, Cookie: cookie}
			}
		}
		unix.Close(so.fd)
	}
	if conn == nil {
		return false, nil // closed meanwhile
	}
	// Always in the process's own network namespace: the agent's main
	// thread (what /proc/PID/ns/net shows of the agent) need not be in the
	// namespace of the thread a handle would be made on.
	ns, err := netns.GetFromPath(filepath.Join(t.cfg.Proc, strconv.Itoa(pid), "ns", "net"))
	if err != nil {
		return false, fmt.Errorf("network namespace: %w", err)
	}
	defer ns.Close()
	h, err := sockkill.NewHandleAt(ns)
	if err != nil {
		return false, err
	}
	defer h.Close()
	n, err := h.Destroy([]sockkill.Conn{*conn})
	return n > 0, err
}

// Generation changes whenever the set Known returns does.
func (t *Tracker) Generation() uint64 { return t.gen }

// Known returns the server processes the Tracker knows, by PID, whose execs
// it wants to hear of (Exec); those that run as root map to true: their
// forks are new connections' session processes (Adopt). A session
// process's own forks, its shell and its commands, are not.
func (t *Tracker) Known() map[uint32]bool {
	m := make(map[uint32]bool, len(t.procs))
	for pid, p := range t.procs {
		m[uint32(pid)] = p.root
	}
	return m
}

// ServerCount returns how many server processes the Tracker knows.
func (t *Tracker) ServerCount() int { return len(t.procs) }

// SessionCount returns how many live sessions are attributed.
func (t *Tracker) SessionCount() int { return len(t.sessions) }

// EachSession calls fn with every live attributed session.
func (t *Tracker) EachSession(fn func(Session)) {
	for _, s := range t.sessions {
		fn(s)
	}
}

// Sessions returns the attributed sessions of uid.
func (t *Tracker) Sessions(uid uint32) []Session {
	var out []Session
	for _, s := range t.sessions {
		if s.UID == uid {
			out = append(out, s)
		}
	}
	return out
}
