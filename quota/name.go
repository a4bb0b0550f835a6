// Package quota is the accounting core of bwagent: users, their limits and
// usage, the statuses derived from them, and the rules that move a user
// between statuses. It does no I/O and knows nothing of the kernel, Xray or
// the local disk, so the same rules can later run against a store shared by
// a fleet of servers: usage arrives as deltas, decisions leave as values.
package quota

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// MaxNameLen bounds a user name. Linux allows 32 bytes for account names;
// Xray emails are longer, so the bound is generous but keeps file names sane.
const MaxNameLen = 128

// ErrBadName is returned for a user name that cannot safely be a file name.
var ErrBadName = errors.New("invalid user name")

// ValidName reports whether name is safe to use as a file name under the
// usage and marker directories. It refuses empty names, names longer than
// MaxNameLen, a leading '-' or '.', '/', '\\', NUL, control characters,
// whitespace and invalid UTF-8. The error names the problem.
func ValidName(name string) error {
	bad := func(why string) error {
		return fmt.Errorf("%w %q: %s", ErrBadName, name, why)
	}
	switch {
	case name == "":
		return fmt.Errorf("%w: empty", ErrBadName)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%w %.20q...: longer than %d bytes", ErrBadName, name, MaxNameLen)
	case name[0] == '-':
		return bad("starts with '-'")
	case name[0] == '.':
		return bad("starts with '.'")
	case strings.Contains(name, ".."):
		return bad("contains '..'")
	case !utf8.ValidString(name):
		return bad("not valid UTF-8")
	}
	for _, r := range name {
		switch {
		case r == '/' || r == '\\':
			return bad("contains a path separator")
		case r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0):
			return bad("contains a control character")
		case r == ' ' || r == '\u00a0' || r == '\u2028' || r == '\u2029':
			return bad("contains whitespace")
		}
	}
	return nil
}

// Protocol is how a user connects.
type Protocol string

// Protocols. SSH users are Linux accounts counted by UID in the kernel; the
// others are clients of one Xray process, counted by Xray.
const (
	SSH         Protocol = "ssh"
	VMess       Protocol = "vmess"
	VLESS       Protocol = "vless"
	Trojan      Protocol = "trojan"
	Shadowsocks Protocol = "shadowsocks"
)

// ErrBadProtocol is returned by ParseProtocol.
var ErrBadProtocol = errors.New("unknown protocol")

// ParseProtocol accepts a protocol name in any case.
func ParseProtocol(s string) (Protocol, error) {
	switch p := Protocol(strings.ToLower(s)); p {
	case SSH, VMess, VLESS, Trojan, Shadowsocks:
		return p, nil
	}
	return "", fmt.Errorf("%w %q (want ssh, vmess, vless, trojan or shadowsocks)", ErrBadProtocol, s)
}

// Xray reports whether users of p are accounted by Xray.
func (p Protocol) Xray() bool { return p != SSH && p != "" }
