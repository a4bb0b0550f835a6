// Package xraytest runs real Xray-core processes for the project's tests: an
// Xray server with its gRPC API enabled and VLESS, VMess, Trojan,
// Shadowsocks and Shadowsocks 2022 inbounds, configured by a config file such
// as an operator would write (see [StartServer]); a client Xray that reaches
// each of the server's users through a SOCKS inbound of its own, sending
// from its own loopback address (127.0.0.2, 127.0.0.3, ...); and a TCP sink
// behind the server's freedom outbound that the users' traffic goes to (see
// [Client]).
//
// XTLS Vision: a VLESS user with a flow ([NewVisionUser]) makes its inbound
// VLESS over TLS, with a self-signed certificate made in the test's temp dir
// that the user's client pins by its SHA-256 (pinnedPeerCertSha256: Xray
// 26 refuses allowInsecure). Inside the tunnel, an HTTPS origin (TLS 1.3,
// a certificate of its own) serves paced downloads ([Client.Download],
// [Client.HTTPClient]), which Vision splices. [Client.ServerSockets] reads
// the kernel's byte counters (tcp_info) of the server's sockets that face a
// client, and [AccessLog] has the server write its access log to a file.
//
// The Xray binary is $XRAY_BIN, or /usr/local/bin/xray as installed by
// scripts/install-xray.sh; without it tests are skipped, except in CI (see
// [Bin]). Ports are chosen free at run time and reserved for the rest of the
// test (see [FreePort]). Everything is stopped and removed in t.Cleanup, and
// the Xray logs of a failed test are logged.
package xraytest

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/xraystats"
)

// Bin returns the Xray binary that the tests run: $XRAY_BIN, or
// /usr/local/bin/xray. Without it the test is skipped, except in CI
// (CI=true), where that is a failure.
func Bin(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("XRAY_BIN")
	if bin == "" {
		bin = "/usr/local/bin/xray"
	}
	if _, err := os.Stat(bin); err != nil {
		msg := fmt.Sprintf("no Xray binary at %s (set XRAY_BIN, or run scripts/install-xray.sh): %v", bin, err)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return bin
}

// FreePort reserves a TCP port of 127.0.0.1 for the rest of the test and
// returns it. The reservation is a socket bound to the port, with
// SO_REUSEADDR and SO_REUSEPORT, that never listens: connections to the port
// are refused until Xray listens on it, which Xray can, as it sets
// SO_REUSEPORT too; and no other program that asks the kernel for a free
// port can get it meanwhile, also while Xray is stopped. (Xray's listeners
// share ports with SO_REUSEPORT, so a port that some other Xray took too
// would not make Xray fail to start: connections would silently go to
// either. Processes started here check that they are alone on their ports.)
func FreePort(t testing.TB) int {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	for _, opt := range []int{unix.SO_REUSEADDR, unix.SO_REUSEPORT} {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt, 1); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return sa.(*unix.SockaddrInet4).Port
}

// The protocols of [User].
const (
	VLESS           = "vless"
	VMess           = "vmess"
	Trojan          = "trojan"
	Shadowsocks     = "shadowsocks"     // a classic AEAD cipher per user
	Shadowsocks2022 = "shadowsocks2022" // a multi-user 2022-blake3-aes-128-gcm inbound
)

// SS2022Method is the method of the Shadowsocks 2022 inbounds.
const SS2022Method = "2022-blake3-aes-128-gcm"

// User is one client of one inbound of the server.
type User struct {
	// Email is the client's email: its name in Xray's stats and API.
	Email string
	// Protocol is one of [VLESS], [VMess], [Trojan], [Shadowsocks] and
	// [Shadowsocks2022]. All users of one inbound have the same.
	Protocol string
	// Inbound is the tag of the server inbound the user is a client of.
	Inbound string
	// Account is the user's [xraystats.VLESS], [xraystats.VMess],
	// [xraystats.Trojan], [xraystats.Shadowsocks] or
	// [xraystats.Shadowsocks2022] (a value, not a pointer), as written in
	// the server's config and as xraystats.Client.AddUser takes it.
	Account xraystats.Account
	// Level is the client's "level" in the config. The config's policy
	// counts the traffic of level 0 only.
	Level uint32
}

// DefaultInbound returns the inbound tag that [NewUser] and [DefaultUsers]
// give users of the protocol: "vless-in", "vmess-in", "trojan-in", "ss-in"
// or "ss22-in".
func DefaultInbound(protocol string) string {
	switch protocol {
	case VLESS:
		return "vless-in"
	case VMess:
		return "vmess-in"
	case Trojan:
		return "trojan-in"
	case Shadowsocks:
		return "ss-in"
	case Shadowsocks2022:
		return "ss22-in"
	}
	panic(fmt.Sprintf("xraytest: unknown protocol %q", protocol))
}

// NewUser returns a user of the protocol's default inbound (see
// [DefaultInbound]) with a fresh random account; a Shadowsocks user's
// method is aes-256-gcm.
func NewUser(email, protocol string) User {
	u := User{Email: email, Protocol: protocol, Inbound: DefaultInbound(protocol)}
	switch protocol {
	case VLESS:
		u.Account = xraystats.VLESS{ID: NewUUID()}
	case VMess:
		u.Account = xraystats.VMess{ID: NewUUID()}
	case Trojan:
		u.Account = xraystats.Trojan{Password: rand.Text()}
	case Shadowsocks:
		u.Account = xraystats.Shadowsocks{Method: "aes-256-gcm", Password: rand.Text()}
	case Shadowsocks2022:
		u.Account = xraystats.Shadowsocks2022{Key: NewSS2022Key()}
	}
	return u
}

// DefaultUsers returns two users of each protocol, each pair in the
// protocol's default inbound, with fresh accounts: alice and alice2 (VLESS;
// one's name is a prefix of the other's), vmess-a and vmess-b, trojan-a and
// trojan-b, ss-a (aes-256-gcm) and ss-b (chacha20-ietf-poly1305), ss22-a
// and ss22-b.
func DefaultUsers() []User {
	ssB := NewUser("ss-b", Shadowsocks)
	ssB.Account = xraystats.Shadowsocks{Method: "chacha20-ietf-poly1305", Password: rand.Text()}
	return []User{
		NewUser("alice", VLESS),
		NewUser("alice2", VLESS),
		NewUser("vmess-a", VMess),
		NewUser("vmess-b", VMess),
		NewUser("trojan-a", Trojan),
		NewUser("trojan-b", Trojan),
		NewUser("ss-a", Shadowsocks),
		ssB,
		NewUser("ss22-a", Shadowsocks2022),
		NewUser("ss22-b", Shadowsocks2022),
	}
}

// NewUUID returns a random (version 4) UUID, as VLESS and VMess accounts
// take.
func NewUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// NewSS2022Key returns a random 16-byte key, base64-encoded, as
// [SS2022Method] takes for the server key and the users' keys.
func NewSS2022Key() string {
	var b [16]byte
	rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}
