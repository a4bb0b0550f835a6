package xrayaccess

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/quota"
)

func TestParse(t *testing.T) {
	loc := time.FixedZone("test", 7*3600)
	at := time.Date(2026, 12, 4, 10, 0, 0, 123456000, loc)
	ap := netip.MustParseAddrPort
	for _, tc := range []struct {
		line string
		want Entry
		err  error
	}{
		// Xray 26.3.27's forms, as its tests here see them.
		{"2026/12/04 10:00:00.123456 from 127.0.0.1:54321 accepted tcp:example.com:443 [vless-in >> direct] email: alice",
			Entry{Time: at, Source: ap("127.0.0.1:54321"), Status: Accepted, Network: "tcp", Dest: "example.com:443",
				InboundTag: "vless-in", OutboundTag: "direct", Email: "alice"}, nil},
		{"2026/12/04 10:00:00.123456 from 127.0.0.10:38657 accepted 127.0.0.1:41627 [ss22-in >> direct] email: ss22-a",
			Entry{Time: at, Source: ap("127.0.0.10:38657"), Status: Accepted, Dest: "127.0.0.1:41627",
				InboundTag: "ss22-in", OutboundTag: "direct", Email: "ss22-a"}, nil},
		{"2026/12/04 10:00:00.123456 from 127.0.0.1:54988 rejected  common/drain: common/drain: unable to drain connection > EOF > proxy/shadowsocks: failed to read 50 bytes > EOF",
			Entry{Time: at, Source: ap("127.0.0.1:54988"), Status: Rejected,
				Reason: "common/drain: common/drain: unable to drain connection > EOF > proxy/shadowsocks: failed to read 50 bytes > EOF"}, nil},
		{"2026/12/04 10:00:00.123456 from 127.0.0.14:43733 rejected  proxy/vless/encoding: invalid request user id: 3819370f-d310-4b40-8a4e-667d36f5b486",
			Entry{Time: at, Source: ap("127.0.0.14:43733"), Status: Rejected,
				Reason: "proxy/vless/encoding: invalid request user id: 3819370f-d310-4b40-8a4e-667d36f5b486"}, nil},
		// A routing rule's detour, UDP, IPv6 on both ends.
		{"2026/12/04 10:00:00.123456 from [::1]:54321 accepted udp:[2001:db8::1]:53 [vmess-in -> direct] email: bob@example.com",
			Entry{Time: at, Source: ap("[::1]:54321"), Status: Accepted, Network: "udp", Dest: "[2001:db8::1]:53",
				InboundTag: "vmess-in", OutboundTag: "direct", Email: "bob@example.com"}, nil},
		{"2026/12/04 10:00:00.123456 from 10.0.0.2:1 accepted tcp:1.1.1.1:443 [in ==> out] email: x",
			Entry{Time: at, Source: ap("10.0.0.2:1"), Status: Accepted, Network: "tcp", Dest: "1.1.1.1:443",
				InboundTag: "in", OutboundTag: "out", Email: "x"}, nil},
		// An IPv4 client of a dual-stack listener; a mux sub-connection's
		// source; an untagged inbound; no detour; no email.
		{"2026/12/04 10:00:00.123456 from [::ffff:192.0.2.7]:443 accepted tcp:a.b:80 [t >> direct] email: u",
			Entry{Time: at, Source: ap("192.0.2.7:443"), Status: Accepted, Network: "tcp", Dest: "a.b:80",
				InboundTag: "t", OutboundTag: "direct", Email: "u"}, nil},
		{"2026/12/04 10:00:00.123456 from tcp:192.0.2.7:5000 accepted udp:8.8.8.8:53 [vless-in >> direct] email: u",
			Entry{Time: at, Source: ap("192.0.2.7:5000"), Status: Accepted, Network: "udp", Dest: "8.8.8.8:53",
				InboundTag: "vless-in", OutboundTag: "direct", Email: "u"}, nil},
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 accepted tcp:a_b-c.d:1 [direct] email: u",
			Entry{Time: at, Source: ap("192.0.2.7:5000"), Status: Accepted, Network: "tcp", Dest: "a_b-c.d:1",
				OutboundTag: "direct", Email: "u"}, nil},
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 accepted tcp:a.b:1 email: u",
			Entry{Time: at, Source: ap("192.0.2.7:5000"), Status: Accepted, Network: "tcp", Dest: "a.b:1", Email: "u"}, nil},
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 accepted tcp:a.b:1 [in >> direct]",
			Entry{Time: at, Source: ap("192.0.2.7:5000"), Status: Accepted, Network: "tcp", Dest: "a.b:1",
				InboundTag: "in", OutboundTag: "direct"}, nil},
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 accepted tcp:a.b:1",
			Entry{Time: at, Source: ap("192.0.2.7:5000"), Status: Accepted, Network: "tcp", Dest: "a.b:1"}, nil},
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 accepted tcp:a.b:1 [my in >> out] email: u\r",
			Entry{Time: at, Source: ap("192.0.2.7:5000"), Status: Accepted, Network: "tcp", Dest: "a.b:1",
				InboundTag: "my in", OutboundTag: "out", Email: "u"}, nil},
		// The last "email: " is the email's: a tag may hold the words.
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 accepted tcp:a.b:1 [in email: x >> out] email: u",
			Entry{Time: at, Source: ap("192.0.2.7:5000"), Status: Accepted, Network: "tcp", Dest: "a.b:1",
				InboundTag: "in email: x", OutboundTag: "out", Email: "u"}, nil},
		// A rejected line's reason is free text: "email:" in it is not one.
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 rejected  invalid domain name: x [in >> out] email: alice",
			Entry{Time: at, Source: ap("192.0.2.7:5000"), Status: Rejected, Reason: "invalid domain name: x [in >> out] email: alice"}, nil},

		// Emails that cannot be user names.
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 accepted tcp:a.b:1 [in >> out] email: ../etc", Entry{}, ErrBadEmail},
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 accepted tcp:a.b:1 [in >> out] email: -rf", Entry{}, ErrBadEmail},
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 accepted tcp:a.b:1 [in >> out] email: a\x00b", Entry{}, ErrBadEmail},
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 accepted tcp:a.b:1 [in >> out] email: a\x1bb", Entry{}, ErrBadEmail},
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 accepted tcp:a.b:1 [in >> out] email: \xff", Entry{}, ErrBadEmail},
		{"2026/12/04 10:00:00.123456 from 192.0.2.7:5000 accepted tcp:a.b:1 [in >> out] email: " + strings.Repeat("a", quota.MaxNameLen+1), Entry{}, ErrBadEmail},

		// DNS lines (log.dnsLog).
		{"2026/12/04 10:00:00.123456 localhost got answer: example.com. TypeA -> [93.184.216.34] 12ms", Entry{}, ErrNotConnection},

		// Not Xray's.
		{"", Entry{}, ErrMalformed},
		{"garbage", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 ", Entry{}, ErrMalformed},
		{"2026/13/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp:a.b:1", Entry{}, ErrMalformed},
		{"2026/12/04T10:00:00.123456 from 1.2.3.4:5 accepted tcp:a.b:1", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00 from 1.2.3.4:5 accepted tcp:a.b:1 [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 [Info] app/dispatcher: taking detour [direct] for [tcp:a.b:1]", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4 accepted tcp:a.b:1 [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:99999 accepted tcp:a.b:1 [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from example.com:5 accepted tcp:a.b:1 [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from @ accepted tcp:a.b:1 [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 refused tcp:a.b:1 [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted  [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp:a.b [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp:a.b:http [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp::1 [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp:[::1:443 [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp:[1.2.3.4]:443 [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp:a\"b:1 [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp:a\x00b:1 [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted unix:/run/x.sock [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp:" + strings.Repeat("a", 256) + ":1 [in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp:a.b:1 in >> out] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp:a.b:1 [in >> out email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp:a.b:1 [] email: u", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 accepted tcp:a.b:1 junk", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 rejected", Entry{}, ErrMalformed},
		{"2026/12/04 10:00:00.123456 from 1.2.3.4:5 rejected tcp:a\nb:1 reason", Entry{}, ErrMalformed},
	} {
		got, err := Parse([]byte(tc.line), loc)
		if tc.err != nil {
			if !errors.Is(err, tc.err) {
				t.Errorf("%q: error %v, want %v", tc.line, err, tc.err)
			}
			if tc.err == ErrBadEmail {
				if got.Email != "" || got.Status != Accepted || !errors.Is(err, quota.ErrBadName) {
					t.Errorf("%q: %+v, %v: want an accepted entry without email, and quota.ErrBadName", tc.line, got, err)
				}
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.line, err)
			continue
		}
		if got != tc.want || !got.Time.Equal(tc.want.Time) {
			t.Errorf("%q:\n got %+v\nwant %+v", tc.line, got, tc.want)
		}
	}
}

// TestParseLocation: times are read in the given zone, time.Local by
// default.
func TestParseLocation(t *testing.T) {
	line := []byte("2026/12/04 10:00:00.000001 from 1.2.3.4:5 accepted tcp:a.b:1 [in >> out] email: u")
	e, err := Parse(line, nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := time.Date(2026, 12, 4, 10, 0, 0, 1000, time.Local); !e.Time.Equal(want) || e.Time.Location() != time.Local {
		t.Errorf("time %v, want %v", e.Time, want)
	}
	e, _ = Parse(line, time.UTC)
	if want := time.Date(2026, 12, 4, 10, 0, 0, 1000, time.UTC); !e.Time.Equal(want) {
		t.Errorf("time %v, want %v", e.Time, want)
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"2026/12/04 10:00:00.123456 from 127.0.0.1:54321 accepted tcp:example.com:443 [vless-in >> direct] email: alice",
		"2026/12/04 10:00:00.123456 from [::1]:1 accepted 1.2.3.4:5 [a -> b] email: c",
		"2026/12/04 10:00:00.123456 from 1.2.3.4:5 rejected  reason email: x",
		"2026/12/04 10:00:00.123456 x got answer: a -> [b] 1ms",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		e, err := Parse(line, time.UTC)
		if err != nil && !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrNotConnection) && !errors.Is(err, ErrBadEmail) {
			t.Fatalf("error wraps no sentinel: %v", err)
		}
		if err != nil && !errors.Is(err, ErrBadEmail) {
			return
		}
		if !e.Source.IsValid() || e.Source.Addr().Is4In6() || (e.Status != Accepted && e.Status != Rejected) {
			t.Fatalf("%q: %+v", line, e)
		}
		if e.Email != "" && quota.ValidName(e.Email) != nil {
			t.Fatalf("%q: email %q", line, e.Email)
		}
		if e.Status == Accepted && strings.ContainsAny(e.Dest, " \n\r\t") {
			t.Fatalf("%q: destination %q", line, e.Dest)
		}
	})
}

func BenchmarkParse(b *testing.B) {
	line := []byte("2026/12/04 10:00:00.123456 from 203.0.113.77:54321 accepted tcp:www.example.com:443 [vless-in >> direct] email: alice@example.com")
	b.SetBytes(int64(len(line) + 1))
	for b.Loop() {
		if _, err := Parse(line, time.UTC); err != nil {
			b.Fatal(err)
		}
	}
}
