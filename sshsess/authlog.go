package sshsess

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Login is a successful login that a server logged.
type Login struct {
	// PID is the session process that authenticated the user.
	PID int
	// User is the account name.
	User string
	// From is the client's address and port.
	From netip.AddrPort
}

// maxLine bounds a log line; a longer one is skipped (and counted), never
// buffered whole.
const maxLine = 4096

// dropbearLine matches a line of Dropbear's log, as syslog writes them
// ("... dropbear[PID]: MESSAGE") and as `dropbear -E` does ("[PID] Dec 04
// 21:49:34 MESSAGE"); the message of a login starts with "Password" or
// "Pubkey".
var dropbearLine = regexp.MustCompile(`(?:dropbear\[(\d+)\]:|^\[(\d+)\]) .*?\b((?:Password|Pubkey) auth succeeded .*)$`)

// ParseLogin parses one line of Dropbear's log; ok is false for any other
// line. The PID and address are checked for form only: a line can be
// forged by anyone who may write to the log, which is why a Tracker also
// checks the session's client address.
func ParseLogin(line string) (l Login, ok bool) {
	m := dropbearLine.FindStringSubmatch(line)
	if m == nil {
		return Login{}, false
	}
	pidText := m[1]
	if pidText == "" {
		pidText = m[2]
	}
	pid, err := strconv.Atoi(pidText)
	if err != nil {
		return Login{}, false
	}
	return ParseLoginMessage(pid, m[3])
}

// loginMessage matches the message of Dropbear's login line, without the
// syslog or -E prefix that names its PID.
var loginMessage = regexp.MustCompile(`^(?:Password|Pubkey) auth succeeded for '([^']*)' (?:with .* )?from (\S+)$`)

// ParseLoginMessage parses the message of a login line whose PID is known
// from elsewhere (the journal's _PID); ok is false for any other message.
func ParseLoginMessage(pid int, msg string) (l Login, ok bool) {
	m := loginMessage.FindStringSubmatch(msg)
	if m == nil || pid <= 0 || m[1] == "" || len(m[1]) > 32 {
		return Login{}, false
	}
	from, err := ParseAddrPort(m[2])
	if err != nil {
		return Login{}, false
	}
	return Login{PID: pid, User: m[1], From: from}, true
}

// ParseAddrPort parses an address and port as Dropbear logs them:
// "127.0.0.1:58164", and IPv6 without brackets ("::1:44738") or with them.
func ParseAddrPort(s string) (netip.AddrPort, error) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return netip.AddrPort{}, fmt.Errorf("no port in %q", s)
	}
	addr, err := netip.ParseAddr(strings.Trim(s[:i], "[]"))
	if err != nil {
		return netip.AddrPort{}, err
	}
	port, err := strconv.ParseUint(s[i+1:], 10, 16)
	if err != nil {
		return netip.AddrPort{}, err
	}
	return netip.AddrPortFrom(addr, uint16(port)), nil
}

// ErrNotRegular is returned by AuthLog.Read for a log that is not a
// regular file (a symbolic link, a FIFO, a directory).
var ErrNotRegular = errors.New("auth log is not a regular file")

// AuthLog follows a log file of SSH servers (/var/log/auth.log, or the file
// a server's stderr goes to) for logins. It starts at the file's end, reads
// what was appended at each Read, and starts over at the top of a file that
// was replaced (rotated) or truncated. It never follows a symbolic link.
type AuthLog struct {
	path    string
	f       *os.File
	dev     uint64
	ino     uint64
	off     int64
	partial []byte
	skipped int // over-long lines skipped
}

// NewAuthLog returns an AuthLog of path; the file need not exist yet.
func NewAuthLog(path string) *AuthLog { return &AuthLog{path: path, off: -1} }

// Skipped returns how many over-long lines were skipped.
func (a *AuthLog) Skipped() int { return a.skipped }

// Close closes the file.
func (a *AuthLog) Close() error {
	if a.f == nil {
		return nil
	}
	err := a.f.Close()
	a.f = nil
	return err
}

// Read returns the logins logged since the last Read. A missing file is no
// error (nothing logged yet).
func (a *AuthLog) Read() ([]Login, error) {
	var st unix.Stat_t
	if err := unix.Lstat(a.path, &st); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			a.Close()
			return nil, nil
		}
		return nil, fmt.Errorf("auth log %s: %w", a.path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		a.Close()
		return nil, fmt.Errorf("%w: %s", ErrNotRegular, a.path)
	}
	if a.f == nil || st.Dev != a.dev || st.Ino != a.ino {
		first := a.off < 0
		a.Close()
		f, err := os.OpenFile(a.path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
		if err != nil {
			return nil, fmt.Errorf("auth log: %w", err)
		}
		a.f, a.dev, a.ino, a.partial = f, st.Dev, st.Ino, nil
		a.off = 0
		if first { // the agent starts: only what comes from now on
			a.off = st.Size
		}
	}
	if st.Size < a.off { // truncated
		a.off, a.partial = 0, nil
	}
	var logins []Login
	buf := make([]byte, 64<<10)
	for {
		n, err := a.f.ReadAt(buf, a.off)
		a.off += int64(n)
		data := buf[:n]
		for len(data) > 0 {
			i := bytes.IndexByte(data, '\n')
			if i < 0 {
				if len(a.partial) > 0 && a.partial[0] == 0 {
					break // the rest of a line being skipped
				}
				a.partial = append(a.partial, data...)
				if len(a.partial) > maxLine {
					a.skipped++
					a.partial = []byte{0} // marks a line being skipped
				}
				break
			}
			line := append(a.partial, data[:i]...)
			data = data[i+1:]
			skip := len(a.partial) > 0 && a.partial[0] == 0
			a.partial = nil
			if skip {
				continue
			}
			if len(line) > maxLine {
				a.skipped++
				continue
			}
			if l, ok := ParseLogin(string(line)); ok {
				logins = append(logins, l)
			}
		}
		if err == io.EOF || n == 0 {
			return logins, nil
		}
		if err != nil {
			return logins, fmt.Errorf("auth log: %w", err)
		}
	}
}
