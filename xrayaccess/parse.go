package xrayaccess

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/myvpn/bwagent/quota"
)

// Sentinel errors; test with [errors.Is].
var (
	// ErrMalformed: the line is not one of Xray's access log lines.
	ErrMalformed = errors.New("not an xray access log line")
	// ErrNotConnection: the line is a line of Xray's access log, but not
	// about a connection: a DNS query's line (log.dnsLog).
	ErrNotConnection = errors.New("not a connection line")
	// ErrBadEmail: a connection's line whose email cannot be a bwagent user
	// name (it fails quota.ValidName, whose error it wraps too).
	ErrBadEmail = errors.New("email is not a valid user name")
	// ErrUnsafeFile: the access log's path is a symbolic link or not a
	// regular file; the follower does not open it.
	ErrUnsafeFile = errors.New("access log is not a regular file")
	// ErrClosed: the Follower was closed.
	ErrClosed = errors.New("follower closed")
)

// Status is what Xray did with a connection.
type Status uint8

// The statuses of a line.
const (
	Accepted Status = 1 + iota // "accepted": dispatched as the user
	Rejected                   // "rejected": refused (no user, a bad request, ...)
)

func (s Status) String() string {
	switch s {
	case Accepted:
		return "accepted"
	case Rejected:
		return "rejected"
	}
	return "Status(" + strconv.Itoa(int(s)) + ")"
}

// Entry is one line of Xray's access log about a connection.
type Entry struct {
	// Time is when Xray wrote the line (it dispatches an accepted
	// connection right after its handshake), to the microsecond, read in
	// the time zone that Xray runs in.
	Time time.Time
	// Source is the address the connection came from, as the server's
	// socket has it: its remote address (the client's local address), an
	// IPv4-mapped IPv6 address unmapped.
	Source netip.AddrPort
	Status Status
	// Network is the destination's network, "tcp" or "udp"; "" when the
	// line does not say (Shadowsocks 2022 inbounds write none).
	Network string
	// Dest is the destination the user asked for, "host:port" ("[v6]:port"
	// for IPv6); "" on rejected lines.
	Dest string
	// InboundTag and OutboundTag are the tags of the inbound that took the
	// connection and of the outbound it was routed to; "" when the line
	// has none (untagged handlers, rejected lines).
	InboundTag, OutboundTag string
	// Email is the user's email, a valid bwagent user name; "" if the line
	// has none (a client without email, rejected lines).
	Email string
	// Reason is why a rejected connection was refused, as Xray wrote it:
	// its text can hold bytes that the client sent.
	Reason string
}

// timeLayout is the prefix that Xray's log writer (Go's log package with
// Ldate|Ltime|Lmicroseconds) puts before every line, and the space after it.
const timeLayout = "2006/01/02 15:04:05.000000"

// Parse parses one line of Xray's access log, without its line break, in
// the formats that Xray 26.3.27 writes (common/log/access.go,
// AccessMessage.String; the detour from app/dispatcher/default.go):
//
//	2026/12/04 10:00:00.123456 from 127.0.0.1:54321 accepted tcp:example.com:443 [vless-in >> direct] email: alice
//	2026/12/04 10:00:00.123456 from [::1]:54321 accepted udp:1.1.1.1:53 [vmess-in -> direct] email: bob
//	2026/12/04 10:00:00.123456 from 10.0.0.2:54321 accepted 127.0.0.1:443 [ss22-in >> direct] email: carol
//	2026/12/04 10:00:00.123456 from tcp:10.0.0.2:54321 accepted tcp:example.com:443 [vless-in ==> direct]
//	2026/12/04 10:00:00.123456 from 10.0.0.3:5555 rejected  proxy/trojan: not a valid user
//
// The detour is "[IN >> OUT]" (the default outbound), "[IN -> OUT]" (a
// routing rule), "[IN ==> OUT]", or "[OUT]" for an untagged inbound; a
// Shadowsocks 2022 inbound writes its destination without "tcp:" or "udp:";
// a source with such a prefix is a mux sub-connection's. Times are read in
// loc (time.Local if nil), as Xray writes them in its own time zone. An
// email that is not a valid user name ([quota.ValidName]) is an error
// wrapping [ErrBadEmail]; the entry is returned with the email cleared. A
// DNS line (log.dnsLog) is [ErrNotConnection], anything else that is not
// one of these lines [ErrMalformed].
func Parse(line []byte, loc *time.Location) (Entry, error) {
	if loc == nil {
		loc = time.Local
	}
	line = bytes.TrimSuffix(line, []byte("\r"))
	if len(line) < len(timeLayout)+1 || line[len(timeLayout)] != ' ' {
		return Entry{}, malformed("no time")
	}
	t, err := time.ParseInLocation(timeLayout, string(line[:len(timeLayout)]), loc)
	if err != nil {
		return Entry{}, malformed("bad time")
	}
	rest, ok := strings.CutPrefix(string(line[len(timeLayout)+1:]), "from ")
	if !ok {
		// "SERVER got answer: DOMAIN -> [IPs] 23ms", "... cache HIT: ...".
		if strings.Contains(rest, " -> [") {
			return Entry{}, ErrNotConnection
		}
		return Entry{}, malformed("no \"from\"")
	}
	e := Entry{Time: t}
	src, rest, _ := strings.Cut(rest, " ")
	if e.Source, err = parseSource(src); err != nil {
		return Entry{}, err
	}
	switch {
	case strings.HasPrefix(rest, "accepted "):
		e.Status = Accepted
		rest = rest[len("accepted "):]
	case strings.HasPrefix(rest, "rejected "):
		// "rejected " + destination (always empty in Xray 26) + " " +
		// reason: the reason is free text, the client's bytes among it.
		e.Status = Rejected
		to, reason, _ := strings.Cut(rest[len("rejected "):], " ")
		if to != "" {
			if e.Network, e.Dest, err = parseDest(to); err != nil {
				return Entry{}, err
			}
		}
		e.Reason = reason
		return e, nil
	default:
		return Entry{}, malformed("neither accepted nor rejected")
	}
	to, rest, _ := strings.Cut(rest, " ")
	if e.Network, e.Dest, err = parseDest(to); err != nil {
		return Entry{}, err
	}
	// What is left: "", "[DETOUR]", "email: EMAIL" or "[DETOUR] email:
	// EMAIL". An email has no spaces (quota.ValidName), so it follows the
	// last "email: ".
	var email string
	if r, ok := strings.CutPrefix(rest, "email: "); ok {
		email, rest = r, ""
	} else if i := strings.LastIndex(rest, " email: "); i >= 0 {
		email, rest = rest[i+len(" email: "):], rest[:i]
	}
	if rest != "" {
		if len(rest) < 3 || rest[0] != '[' || rest[len(rest)-1] != ']' {
			return Entry{}, malformed("bad detour")
		}
		detour := rest[1 : len(rest)-1]
		e.InboundTag, e.OutboundTag = splitDetour(detour)
	}
	if email != "" {
		if err := quota.ValidName(email); err != nil {
			return e, fmt.Errorf("xrayaccess: %w: %w", ErrBadEmail, err)
		}
		e.Email = email
	}
	return e, nil
}

// malformed is an ErrMalformed error saying why.
func malformed(why string) error {
	return fmt.Errorf("xrayaccess: %w: %s", ErrMalformed, why)
}

// parseSource parses the address after "from": "IP:PORT", "[IPv6]:PORT",
// or either after "tcp:" or "udp:" (a net.Destination's String, as mux
// sub-connections have it).
func parseSource(s string) (netip.AddrPort, error) {
	if r, ok := strings.CutPrefix(s, "tcp:"); ok {
		s = r
	} else if r, ok := strings.CutPrefix(s, "udp:"); ok {
		s = r
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return netip.AddrPort{}, malformed("bad source address")
	}
	return netip.AddrPortFrom(ap.Addr().Unmap().WithZone(""), ap.Port()), nil
}

// parseDest parses a destination: "tcp:HOST:PORT", "udp:HOST:PORT" or
// "HOST:PORT", whose host is an IP address ("[v6]" for IPv6) or a domain
// name as Xray accepts them (letters, digits, '-', '.', '_').
func parseDest(s string) (network, dest string, err error) {
	if r, ok := strings.CutPrefix(s, "tcp:"); ok {
		network, s = "tcp", r
	} else if r, ok := strings.CutPrefix(s, "udp:"); ok {
		network, s = "udp", r
	}
	i := strings.LastIndexByte(s, ':')
	if i <= 0 {
		return "", "", malformed("bad destination")
	}
	host, port := s[:i], s[i+1:]
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return "", "", malformed("bad destination port")
	}
	if h, ok := strings.CutPrefix(host, "["); ok {
		h, ok = strings.CutSuffix(h, "]")
		if a, err := netip.ParseAddr(h); !ok || err != nil || !a.Is6() {
			return "", "", malformed("bad destination address")
		}
		return network, s, nil
	}
	if len(host) > 255 || strings.IndexFunc(host, notDomainRune) >= 0 {
		return "", "", malformed("bad destination host")
	}
	return network, s, nil
}

// notDomainRune is a rune that Xray refuses in a domain name
// (common/protocol/address.go, isValidDomain).
func notDomainRune(r rune) bool {
	return !('0' <= r && r <= '9' || 'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || r == '-' || r == '.' || r == '_')
}

// splitDetour splits a detour into the inbound's and the outbound's tags.
func splitDetour(d string) (in, out string) {
	for _, sep := range []string{" >> ", " -> ", " ==> "} {
		if in, out, ok := strings.Cut(d, sep); ok {
			return in, out
		}
	}
	return "", d
}
