package xrayaccess

import (
	"regexp"
	"strings"
)

// closedSegment matches a part of a rejected line's reason (Xray's error
// chain, parts joined by " > ") that holds no byte the client chose, so
// the line break after it is Xray's own: a message of Xray 26.3.27, after
// its package prefixes, or an I/O error of Go's. These are the answers to
// the usual probes (connect and close, an HTTP request, random bytes) of
// every inbound that logs them, and to a client with a wrong key. A
// message that holds the client's bytes, such as "invalid domain name: "
// and the domain, is not here: its line opens a window (see endLine).
var closedSegment = regexp.MustCompile(`^(?:[a-z0-9_]+(?:/[a-z0-9_]+)*: )*(?:` + strings.Join([]string{
	// common/drain
	`unable to drain connection`, `drained connection`,
	// proxy/shadowsocks
	`failed to read [0-9]+ bytes`, `failed to match an user`, `Not Found`, `failed iv check`,
	`failed to read IV`, `failed to read address`, `failed to initialize decoding stream`,
	// proxy/vmess
	`invalid user`, `user do not exist`, `failed to read request header`, `AEAD read failed`,
	`AEAD read failed, drain skipped`, `failed to read padding`, `failed to read checksum`,
	`invalid auth, but this is a AEAD request`, `invalid remote address`,
	`duplicated session id, possibly under replay attack, but this is a AEAD request`,
	// proxy/trojan
	`not trojan protocol`, `not a valid user`, `failed to read user hash`, `failed to read crlf`,
	`failed to read command`, `failed to read address and port`,
	// proxy/vless
	`invalid request version`, `failed to read request version`, `failed to read request user id`,
	`invalid request user id: [0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`,
	`failed to decode request header addons`, `failed to read addons protobuf length`,
	`failed to read addons protobuf value`, `failed to read request command`, `invalid request address`,
	// Go
	`EOF`, `unexpected EOF`,
	`(?:read|write) (?:tcp|tcp4|tcp6) [0-9A-Fa-f.:\[\]]+->[0-9A-Fa-f.:\[\]]+: (?:(?:read|write): )?` +
		`(?:connection reset by peer|broken pipe|connection timed out|i/o timeout|use of closed network connection|no route to host)`,
}, "|") + `)$`)

// closedReason tells whether a rejected line's reason is made only of
// closedSegment parts: a line that ends where Xray ended it, which no
// forged line can follow. The reason's first part cannot be the client's,
// and each later one follows Xray's " > ": a client's bytes would make one
// part, at least, not match.
func closedReason(reason string) bool {
	if reason == "" {
		return false
	}
	for seg := range strings.SplitSeq(reason, " > ") {
		if !closedSegment.MatchString(seg) {
			return false
		}
	}
	return true
}
