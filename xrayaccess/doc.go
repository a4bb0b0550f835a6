// Package xrayaccess follows Xray-core's access log and tells which user
// each connection of Xray's inbounds belongs to: for every connection Xray
// accepts as a user, the address it came from (the server socket's remote
// address), the inbound's tag and the user's email. That attribution is
// what counting Xray users' connections in the kernel needs, as Xray's own
// counters miss XTLS Vision's spliced bytes until the connection closes.
//
// Xray writes the access log when "log": {"access": PATH} names a file
// (xrayconf.Config.AccessLog). [Parse] reads one line; a [Follower] tails
// the file and returns the attributions: the accepted lines with an email
// that passes quota.ValidName, like every user name of the project.
//
// # What Xray writes (checked against Xray 26.3.27's source and binary)
//
//   - One line per connection, when Xray dispatches it: right after the
//     protocol's handshake (after TLS and the VLESS header for Vision), so
//     bytes of the handshake move before the line is written. A mux or
//     XUDP connection writes a line per sub-connection, each with the
//     source of the one client connection. See [Parse] for the forms.
//   - Lines can be lost: Xray's log writer drops a message when 128 are
//     waiting (common/log/logger.go, Handle). A lost line leaves a
//     connection unattributed, never misattributed.
//   - The time is Xray's wall clock in its own time zone, to the
//     microsecond; with "maskAddress" set the addresses are masked and the
//     lines cannot be used (xrayconf.Config.LogMaskAddress).
//   - Xray opens the file again only after its log writer had nothing to
//     write for a minute: a renamed log (logrotate without copytruncate)
//     goes on growing on a busy server, which the Follower reads on (see
//     Options.Grace). With copytruncate the file is truncated in place;
//     Xray's writes (O_APPEND) continue at the new end.
//
// # Forged lines
//
// The access log is not authenticated, and some of its lines carry bytes
// that the client chose, line breaks included: a Trojan or Shadowsocks
// user who sends a destination domain with bytes Xray refuses gets a
// rejected line that ends with "invalid domain name: " and the domain, up
// to 255 raw bytes (common/protocol/address.go; the tests show a Trojan
// user writing a whole "accepted ... email: SOMEONE-ELSE" line this way).
// So a line that starts less than 256 bytes after the end of a line that
// may hold such bytes is never returned: such accepted lines are counted in
// Stats.Suspect. The lines that may are all but the accepted lines and the
// rejected lines whose reason is made only of messages known to hold none
// (what Xray answers to the usual probes: connect and close, an HTTP
// request, random bytes, a wrong key or UUID; see closedSegment): DNS
// lines, malformed and over-long lines, and rejected lines with any other
// reason. The accepted lines themselves carry no bytes of the client's but
// its destination, which Xray 26 checks before it dispatches (a domain of
// letters, digits, '-', '.' and '_'; Go's isDomainName for Shadowsocks
// 2022); Parse checks the same. The cost: an accepted line written just
// after such a line is skipped too, and its connection stays unattributed:
// a client can cause that on purpose, but cannot have a connection
// attributed to someone else. A caller should still believe a line no more than the
// kernel confirms: a live socket from that source on the inbound's port,
// attributed once (the first line wins), whose user the config has in
// that inbound.
//
// # How the Follower reads
//
// It opens the path with O_NOFOLLOW (a symbolic link there is refused, as
// is anything but a regular file: [ErrUnsafeFile]) and reads with pread,
// 64 KiB at a time, at most 1 MiB per file per [Follower.Poll]. A line
// longer than Options.MaxLine (4 KiB) is skipped as it streams by, never
// buffered. It polls (Options.Interval, 100 ms, in [Follower.Next]) rather
// than watching with inotify: a poll is an lstat of the path and an fstat
// of each open file, and it sees a rotation (another file at the path), a
// truncation (a file shorter than the offset, or whose bytes before the
// offset changed) and a file that appears alike, on any file system,
// where inotify would need a watch on the directory and on each file,
// re-armed at every rotation. Lines are returned at most an interval
// late. [Follower.Position] is a place to resume from after a restart.
//
// The package never logs; errors wrap [ErrMalformed], [ErrNotConnection],
// [ErrBadEmail], [ErrUnsafeFile] or [ErrClosed] where one applies.
package xrayaccess
