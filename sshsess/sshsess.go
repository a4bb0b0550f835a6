// Package sshsess finds the sessions of a host's SSH servers (OpenSSH,
// Dropbear) and has the kernel count each session's connection for the user
// who logged in on it.
//
// An SSH server accepts a client's connection in its root listener, so the
// session's socket belongs to UID 0 and per-UID accounting never sees it:
// a user's shell output, scp and sftp moved uncounted, and Dropbear before
// 2025.89, whose session process forwards tunnels as root, hid its users'
// tunnels too. A Tracker
//
//   - finds the server processes by their executable (Config.Programs),
//     never by a name a user can give a process, and registers them with the
//     kernel (Kernel.AddServers), whose sock_create program then tags every
//     socket they open as a user as a forwarded connection: enforced for the
//     user, counted on the session instead;
//   - learns each session process's user: the UID it runs as (OpenSSH's
//     session process, Dropbear 2025.89 and later), or, for a session process
//     that stays root (older Dropbear), the login its server logged (see
//     AuthLog and Journal), checked against the session's client address;
//   - takes the session's connection from the process (pidfd_getfd) and
//     attributes it to the user (Kernel.Attribute) as the server's end of
//     the user's connection (bpf.Attribution.Server: what it sends is the
//     user's download): from its next packet on it
//     is counted, budgeted and blocked as the user's; the bytes it moved
//     before (the authentication, the start of the session) are returned as
//     a credit, from the socket's own TCP counters.
//
// So every byte of a user's SSH session is counted once, on the wire between
// server and client: shell, scp, sftp and tunnels alike, with SSH's own
// overhead. Tunnel bytes cross the forwarded socket too, which is why those
// are tagged and not counted.
package sshsess

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/myvpn/bwagent/bpf"
)

// DefaultPrograms are the SSH servers' executables on Debian: OpenSSH's
// listener, its session program (OpenSSH 9.8 and later) and Dropbear.
var DefaultPrograms = []string{"/usr/sbin/sshd", "/usr/lib/openssh/sshd-session", "/usr/sbin/dropbear"}

// Kernel is the part of bpf.Datapath a Tracker drives.
type Kernel interface {
	Attribute(fd int, owner uint32, a bpf.Attribution) (moved bpf.Counters, err error)
	Untag(fd int) error
	SetSSHPorts(ports []uint16) error
	SocketAttribution(fd int) (a bpf.Attribution, ok bool, err error)
	SupportsServerTagging() bool
	AddServers(pids ...uint32) error
	RemoveServers(pids ...uint32) error
	Servers() ([]uint32, error)
}

// ErrNotAbsolute is returned by New for a program path that is not absolute.
var ErrNotAbsolute = errors.New("SSH server program must be an absolute path")

// Config says which programs are SSH servers and whose sessions count.
type Config struct {
	// Programs are the servers' executables, absolute paths; programs that
	// are not installed are skipped. Nil means DefaultPrograms.
	Programs []string
	// Now is the clock; nil is time.Now.
	Now func() time.Time
	// User reports whether sessions of uid count (an SSH user of the
	// agent's). Sessions of other UIDs (OpenSSH's privilege separation
	// user before authentication, system accounts) are left alone.
	User func(uid uint32) bool
	// Proc is the proc filesystem; "" means /proc.
	Proc string
}

// Session is one SSH connection attributed to a user.
type Session struct {
	// PID is the server process whose connection it is.
	PID int
	// UID is the user's.
	UID uint32
	// Local is the server's end (its listening address and port), Remote
	// the client's.
	Local, Remote netip.AddrPort
	// Start is when the session process started: for OpenSSH the login,
	// for Dropbear the connection. Zero if /proc/stat could not be read.
	Start time.Time
}

// Attributed is a session attributed by this Scan.
type Attributed struct {
	Session
	// Credit is what the connection moved before it was attributed, in
	// the user's directions (RxBytes: what the server sent the client, the
	// user's download; TxBytes: what it received from it): as the kernel counted it
	// while the connection was pending (bpf.Attribution.Pending), or, for a
	// connection accepted before the agent knew the server's port, the TCP
	// payload it sent (bytes_sent: retransmissions included, as the kernel
	// counts packets) and received so far; less what the session's
	// forwarded connections had
	// already counted for the user before they were tagged.
	Credit bpf.Counters
}

// Result is what one Scan found.
type Result struct {
	// New are the sessions this scan attributed.
	New []Attributed
	// Problems are the errors of single processes (one vanished, a socket
	// that could not be taken, a logged login whose client is not the
	// session's), each process's first only; the scan went on.
	Problems []error
}

// programID identifies an executable file.
type programID struct{ dev, ino uint64 }

// New returns a Tracker for cfg.
func New(cfg Config, k Kernel) (*Tracker, error) {
	if cfg.Programs == nil {
		cfg.Programs = DefaultPrograms
	}
	if cfg.Proc == "" {
		cfg.Proc = "/proc"
	}
	if cfg.User == nil {
		cfg.User = func(uint32) bool { return true }
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	for _, p := range cfg.Programs {
		if !filepath.IsAbs(p) {
			return nil, fmt.Errorf("%w: %q", ErrNotAbsolute, p)
		}
	}
	return &Tracker{cfg: cfg, k: k, procs: make(map[int]*proc), sessions: make(map[int]Session),
		proven: make(map[uint16]bool)}, nil
}

// Tracker finds SSH sessions and attributes them. Its methods are for one
// goroutine at a time.
type Tracker struct {
	cfg      Config
	k        Kernel
	procs    map[int]*proc    // every server process, by PID
	sessions map[int]Session  // attributed sessions, by PID
	ports    []uint16         // the listening ports the kernel was given, sorted
	proven   map[uint16]bool  // ports a session was attributed on
	walked   map[int]struct{} // the PIDs in /proc at the last scan
	gen      uint64           // changes with procs: see Generation
	boot     time.Time        // the boot time (btime), once read: see startOf
}

// proc is what a Tracker knows of one server process.
type proc struct {
	seen  time.Time // when the Tracker first saw it
	start uint64    // start time, to tell a reused PID
	root  bool      // ran as root when first seen
	// byLog: a Dropbear process, whose session may stay root after the
	// login and is then told by its log line.
	byLog    bool
	adopted  bool // made known by Adopt: a fork of a server process
	reported bool // a problem of it is in a Result already
	// lookedBefore: its connection was looked at for an earlier agent's
	// attribution (attributedBefore).
	lookedBefore bool
	netns        uint64
	listens      map[uint16]bool // the ports it listens on, once looked at
	uid          uint32
	attached     bool // its session is attributed, or it has none to attribute
	session      bool // its session is attributed
	tagged       bool // its earlier sockets are tagged
}

// programs returns the identities and names of the installed programs.
func (t *Tracker) programs() (map[programID]string, map[string]bool) {
	ids := make(map[programID]string)
	names := make(map[string]bool)
	for _, p := range t.cfg.Programs {
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err != nil {
			continue
		}
		ids[programID{st.Dev, st.Ino}] = p
		// /proc/PID/stat's comm is the name cut to 15 bytes.
		name := filepath.Base(p)
		if len(name) > 15 {
			name = name[:15]
		}
		names[name] = true
	}
	return ids, names
}

// isProgram reports whether the process pid runs one of the programs: its
// executable is the same file, or (after a package upgrade replaced the
// file) was a file at the same path.
func (t *Tracker) isProgram(pid int, ids map[programID]string) bool {
	return t.programOf(pid, ids) != ""
}

// programOf returns which of the programs process pid runs, "" if none.
func (t *Tracker) programOf(pid int, ids map[programID]string) string {
	exe := filepath.Join(t.cfg.Proc, fmt.Sprint(pid), "exe")
	var st syscall.Stat_t
	if err := syscall.Stat(exe, &st); err == nil {
		if p, ok := ids[programID{st.Dev, st.Ino}]; ok {
			return p
		}
	}
	target, err := os.Readlink(exe)
	if err != nil {
		return ""
	}
	path, deleted := strings.CutSuffix(target, " (deleted)")
	if !deleted {
		return ""
	}
	for _, p := range ids {
		if p == path {
			return p
		}
	}
	return ""
}
