// Package sdnotify speaks the service manager's notification protocol
// (sd_notify(3)) without libsystemd: each message is one datagram of
// newline-separated "KEY=value" lines ("READY=1", "STATUS=...",
// "WATCHDOG=1", "STOPPING=1") sent to the Unix socket named by
// $NOTIFY_SOCKET, a path or, with a leading '@', an abstract socket.
//
// Sending never blocks: a manager that does not read its socket makes Send
// fail with EAGAIN instead of stalling the caller, so Send may be called from
// a loop that must not wait. Socket addresses other than Unix ones (systemd
// 254's "vsock:") are not supported.
package sdnotify

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Notifier sends messages to one notification socket. A nil *Notifier
// sends nothing, so callers need not check whether a manager listens. Send
// may be called from several goroutines at once.
type Notifier struct {
	fd     int
	socket string
}

// New returns a Notifier for socket, the value of $NOTIFY_SOCKET.
func New(socket string) (*Notifier, error) {
	if !strings.HasPrefix(socket, "/") && !strings.HasPrefix(socket, "@") {
		return nil, fmt.Errorf("notify socket %q: not a Unix socket path nor an abstract '@' name", socket)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	return &Notifier{fd: fd, socket: socket}, nil
}

// Send sends the lines as one message, such as Send("READY=1",
// "STATUS=running").
func (n *Notifier) Send(lines ...string) error {
	if n == nil {
		return nil
	}
	// x/sys/unix turns a leading '@' into the abstract namespace's NUL,
	// in the address's own buffer: one address per call.
	addr := &unix.SockaddrUnix{Name: n.socket}
	err := unix.Sendto(n.fd, []byte(strings.Join(lines, "\n")), unix.MSG_DONTWAIT|unix.MSG_NOSIGNAL, addr)
	if err != nil {
		return fmt.Errorf("notify %s: %w", n.socket, err)
	}
	return nil
}

// Close closes the Notifier's socket.
func (n *Notifier) Close() error {
	if n == nil {
		return nil
	}
	return unix.Close(n.fd)
}

// Watchdog returns the watchdog period the manager asks for: $WATCHDOG_USEC,
// when $WATCHDOG_PID is unset or names this process. It returns 0 when there
// is no watchdog, and an error for a value that is not a positive number.
func Watchdog() (time.Duration, error) {
	usec, pid := os.Getenv("WATCHDOG_USEC"), os.Getenv("WATCHDOG_PID")
	if usec == "" || (pid != "" && pid != strconv.Itoa(os.Getpid())) {
		return 0, nil
	}
	n, err := strconv.ParseUint(usec, 10, 63)
	if err != nil || n == 0 || n > uint64(1<<63-1)/uint64(time.Microsecond) {
		return 0, errors.New("WATCHDOG_USEC=" + usec + ": not a positive number of microseconds")
	}
	return time.Duration(n) * time.Microsecond, nil
}
