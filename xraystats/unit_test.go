package xraystats

import (
	"context"
	"errors"
	"maps"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/myvpn/bwagent/xraystats/internal/xraypb/handlercmdpb"
	"github.com/myvpn/bwagent/xraystats/internal/xraypb/shadowsockspb"
)

// TestClassify maps gRPC errors, with the texts that Xray 26.3.27 sends
// (seen in the tests against it), to the sentinel errors.
func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		code codes.Code
		msg  string
		want error
	}{
		{codes.Unknown, "proxy/vless: User alice not found.", ErrNotFound},
		{codes.Unknown, "proxy/vmess/inbound: User vmess-a not found.", ErrNotFound},
		{codes.Unknown, "proxy/trojan: User trojan-a not found.", ErrNotFound},
		{codes.Unknown, "proxy/shadowsocks: User ss-a not found.", ErrNotFound},
		{codes.Unknown, "proxy/shadowsocks_2022: User ss22-a not found.", ErrNotFound},
		{codes.Unknown, "app/proxyman/command: failed to get handler: nope-in > app/proxyman/inbound: handler not found: nope-in", ErrNotFound},
		{codes.Unknown, "proxy/vless: User alice2 already exists.", ErrExists},
		{codes.Unknown, "proxy/vmess/inbound: User vmess-b already exists.", ErrExists},
		{codes.Unknown, "proxy/trojan: User trojan-b already exists.", ErrExists},
		{codes.Unknown, "proxy/shadowsocks_2022: User ss22-b already exists.", ErrExists},
		{codes.Unknown, "app/proxyman/command: failed to parse user > proxy/vless: failed to parse ID > common/uuid: invalid UUID: x", ErrInvalid},
		{codes.Unknown, "proxy/vless: Email must not be empty.", ErrInvalid},
		{codes.Unknown, "proxy is not a UserManager", nil},
		{codes.NotFound, "user>>>bob>>>online not found.", ErrNotFound},
		{codes.Unimplemented, "unknown service xray.app.stats.command.StatsService", ErrUnsupported},
		{codes.Unimplemented, "unknown method GetStatsOnlineIpList for service xray.app.stats.command.StatsService", ErrUnsupported},
		{codes.Unavailable, "connection error", ErrUnavailable},
		{codes.DeadlineExceeded, "context deadline exceeded", ErrUnavailable},
		{codes.Canceled, "grpc: the client connection is closing", ErrClosed},
		{codes.Internal, "boom", nil},
	} {
		err := wrapErr(context.Background(), "op", status.Error(tc.code, tc.msg))
		if tc.want != nil && !errors.Is(err, tc.want) {
			t.Errorf("%v %q: %v, want %v", tc.code, tc.msg, err, tc.want)
		}
		for _, s := range []error{ErrUnavailable, ErrNotFound, ErrExists, ErrUnsupported, ErrInvalid, ErrClosed} {
			if s != tc.want && errors.Is(err, s) {
				t.Errorf("%v %q: %v is also %v", tc.code, tc.msg, err, s)
			}
		}
		// The gRPC status stays reachable.
		if got := status.Code(err); got != tc.code {
			t.Errorf("%v %q: status.Code of %v is %v", tc.code, tc.msg, err, got)
		}
	}

	// The caller's own cancellation wins over what it caused.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := wrapErr(ctx, "op", status.Error(codes.Canceled, "context canceled"))
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrClosed) {
		t.Errorf("canceled by the caller: %v", err)
	}
}

// TestTypedNames: the TypedMessage type names are Xray's full proto names,
// which Xray looks the message types up by.
func TestTypedNames(t *testing.T) {
	for _, tc := range []struct {
		acct Account
		want string
	}{
		{VLESS{ID: "66ad4540-b58c-4ad2-9926-ea63445a9b57"}, "xray.proxy.vless.Account"},
		{&VLESS{ID: "66ad4540-b58c-4ad2-9926-ea63445a9b57"}, "xray.proxy.vless.Account"},
		{VMess{ID: "66ad4540-b58c-4ad2-9926-ea63445a9b57"}, "xray.proxy.vmess.Account"},
		{Trojan{Password: "p"}, "xray.proxy.trojan.Account"},
		{Shadowsocks{Method: "aes-256-gcm", Password: "p"}, "xray.proxy.shadowsocks.Account"},
		{Shadowsocks2022{Key: "k"}, "xray.proxy.shadowsocks_2022.Account"},
	} {
		m, err := accountMessage(tc.acct)
		if err != nil {
			t.Fatal(err)
		}
		tm, err := typed(m)
		if err != nil {
			t.Fatal(err)
		}
		if tm.GetType() != tc.want {
			t.Errorf("%T: type %q, want %q", tc.acct, tm.GetType(), tc.want)
		}
	}
	for m, want := range map[*handlercmdpb.AddUserOperation]string{{}: "xray.app.proxyman.command.AddUserOperation"} {
		tm, _ := typed(m)
		if tm.GetType() != want {
			t.Errorf("type %q, want %q", tm.GetType(), want)
		}
	}
	tm, _ := typed(&handlercmdpb.RemoveUserOperation{Email: "x"})
	if want := "xray.app.proxyman.command.RemoveUserOperation"; tm.GetType() != want {
		t.Errorf("type %q, want %q", tm.GetType(), want)
	}
}

func TestShadowsocksMethods(t *testing.T) {
	for method, want := range map[string]shadowsockspb.CipherType{
		"aes-128-gcm":            shadowsockspb.CipherType_AES_128_GCM,
		"AES-256-GCM":            shadowsockspb.CipherType_AES_256_GCM,
		"chacha20-ietf-poly1305": shadowsockspb.CipherType_CHACHA20_POLY1305,
		"chacha20-poly1305":      shadowsockspb.CipherType_CHACHA20_POLY1305,
		"xchacha20-poly1305":     shadowsockspb.CipherType_XCHACHA20_POLY1305,
		"none":                   shadowsockspb.CipherType_NONE,
	} {
		m, err := accountMessage(Shadowsocks{Method: method, Password: "p"})
		if err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		if got := m.(*shadowsockspb.Account).GetCipherType(); got != want {
			t.Errorf("%s: %v, want %v", method, got, want)
		}
	}
	for _, method := range []string{"", "rc4-md5", "2022-blake3-aes-128-gcm"} {
		if _, err := accountMessage(Shadowsocks{Method: method}); !errors.Is(err, ErrInvalid) {
			t.Errorf("%q: %v, want ErrInvalid", method, err)
		}
	}
}

// TestPlainIPs: the online maps' keys as Xray 26.3.27 writes them
// (common/net/address.go: IPv6 in brackets, IPv4-mapped as IPv4) come out
// in the form of netip.Addr.String, which netip.ParseAddr reads back.
func TestPlainIPs(t *testing.T) {
	got := plainIPs(map[string]int64{
		"192.0.2.1":              1,
		"[2001:db8::1]":          2,
		"[2001:0db8:0:0::2]":     3,
		"[::ffff:192.0.2.3]":     4,
		"not-an-ip":              5,
		"[fe80::1]":              6,
		"2001:db8::7":            7,
		"[2001:db8::7]":          8, // the same address twice: the latest
		"[2001:db8::unbalanced":  9,
		"[[2001:db8::10]]":       10,
		"127.0.0.2":              11,
		"[2001:db8:0:0:0:0:0:b]": 12,
	})
	want := map[string]int64{
		"192.0.2.1":             1,
		"2001:db8::1":           2,
		"2001:db8::2":           3,
		"192.0.2.3":             4,
		"not-an-ip":             5,
		"fe80::1":               6,
		"2001:db8::7":           8,
		"[2001:db8::unbalanced": 9,
		"[[2001:db8::10]]":      10,
		"127.0.0.2":             11,
		"2001:db8::b":           12,
	}
	if !maps.Equal(got, want) {
		t.Errorf("plainIPs = %v, want %v", got, want)
	}
	if m := plainIPs(nil); m == nil || len(m) != 0 {
		t.Errorf("plainIPs(nil) = %#v, want an empty map", m)
	}
}
