package control

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of the connection limits in Options.
const (
	DefaultMaxConnsPerUID = 8   // Options.MaxConnsPerUID
	DefaultMaxConns       = 128 // Options.MaxConns
	// DefaultFDReserve is the least Options.FDReserve: the default is the
	// larger of this and an eighth of RLIMIT_NOFILE's soft limit.
	DefaultFDReserve = 64
	// DefaultHandshakeTimeout is Options.HandshakeTimeout's default.
	DefaultHandshakeTimeout = 5 * time.Second
)

// Why a connection was closed at accept, as Options.ConnRefused is told.
var (
	// ErrUIDConns: the caller's UID already holds Options.MaxConnsPerUID
	// connections.
	ErrUIDConns = errors.New("too many connections from this UID; close some (each bwctl holds one)")
	// ErrConns: non-root callers together hold Options.MaxConns
	// connections.
	ErrConns = errors.New("too many connections from non-root users")
	// ErrFDReserve: the process's open descriptors reached RLIMIT_NOFILE's
	// soft limit minus Options.FDReserve, which is kept for the agent's own
	// files and for root.
	ErrFDReserve = errors.New("open files near the limit; what is left is kept for the agent and root")
)

// connLimits is the accounting behind the listener: the live connections
// of each non-root UID and of all of them. Root is not counted.
type connLimits struct {
	// constant after construction
	perUID int // MaxConnsPerUID
	total  int // MaxConns
	fdMax  int // non-root is refused when more descriptors are open

	mu      sync.Mutex // protects the following
	byUID   map[uint32]int
	nonRoot int
}

func newConnLimits(perUID, total, fdMax int) *connLimits {
	return &connLimits{perUID: perUID, total: total, fdMax: fdMax, byUID: map[uint32]int{}}
}

// admit counts a new connection of uid, or says why it must be closed.
// open is the number of descriptors the process has open counting the new
// one, or a lower bound; it is asked for only when the caps let a
// non-root connection in.
func (l *connLimits) admit(uid uint32, open func() int) error {
	if uid == 0 {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.byUID[uid] >= l.perUID:
		return ErrUIDConns
	case l.nonRoot >= l.total:
		return ErrConns
	case open() > l.fdMax:
		return ErrFDReserve
	}
	l.byUID[uid]++
	l.nonRoot++
	return nil
}

// release uncounts a connection admit let in.
func (l *connLimits) release(uid uint32) {
	if uid == 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.byUID[uid]--; l.byUID[uid] <= 0 {
		delete(l.byUID, uid)
	}
	l.nonRoot--
}

// listener reads the peer credentials of each connection right after
// accept and closes at once, before gRPC sees it, a connection over the
// limits. Accept errors (EMFILE included) are returned as they are: gRPC's
// Serve retries temporary ones with a backoff up to 1s.
type listener struct {
	*net.UnixListener
	limits  *connLimits
	openFDs func() int          // the process's open descriptors; 0 if unknown
	refused func(Caller, error) // Options.ConnRefused; may be nil
}

func (l *listener) Accept() (net.Conn, error) {
	for {
		c, err := l.UnixListener.AcceptUnix()
		if err != nil {
			return nil, err
		}
		cred, fd, err := peerCred(c)
		if err == nil {
			// The kernel hands out the lowest free descriptor, so all
			// below fd are open: fd+1 is a lower bound of the count.
			err = l.limits.admit(cred.UID, func() int { return max(l.openFDs(), fd+1) })
		}
		if err != nil {
			if l.refused != nil {
				l.refused(Caller{PID: cred.PID, UID: cred.UID, GID: cred.GID}, err)
			}
			c.Close()
			continue
		}
		return &conn{UnixConn: c, cred: cred, limits: l.limits}, nil
	}
}

// conn is an admitted connection: its credentials, read at accept, are
// what peerCreds hands gRPC, and closing it frees its place.
type conn struct {
	*net.UnixConn
	cred   PeerCred
	limits *connLimits
	closed atomic.Bool
}

func (c *conn) Close() error {
	err := c.UnixConn.Close()
	if !c.closed.Swap(true) {
		c.limits.release(c.cred.UID)
	}
	return err
}

// openFDs returns the number of descriptors the process has open: the size
// of /proc/self/fd (Linux 6.2 and later; one stat), or 0 where that is not
// available, leaving the accepted descriptor's number as the only measure.
func openFDs() int {
	fi, err := os.Stat("/proc/self/fd")
	if err != nil {
		return 0
	}
	return int(fi.Size())
}
