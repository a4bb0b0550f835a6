package xrayaccess

import "testing"

func TestClosedReason(t *testing.T) {
	for _, tc := range []struct {
		reason string
		closed bool
	}{
		// What Xray 26.3.27 wrote for probes of its inbounds (TestXrayProbes).
		{"common/drain: common/drain: unable to drain connection > EOF > proxy/shadowsocks: failed to read 50 bytes > EOF", true},
		{"common/drain: common/drain: unable to drain connection > EOF > proxy/shadowsocks: failed to read 50 bytes > unexpected EOF", true},
		{"common/drain: common/drain: drained connection > proxy/shadowsocks: failed to match an user > proxy/shadowsocks: Not Found", true},
		{"common/drain: common/drain: unable to drain connection > EOF > proxy/shadowsocks: failed to read 50 bytes > read tcp 127.0.0.1:37097->127.0.0.1:39888: read: connection reset by peer", true},
		{"proxy/vless/encoding: invalid request version", true},
		{"proxy/vless/encoding: invalid request user id: 70831645-e358-605f-0585-7b915ae2b3b4", true},
		{"common/drain: common/drain: unable to drain connection > EOF > proxy/vmess/encoding: invalid user > user do not exist", true},
		{"proxy/vmess/encoding: failed to read request header > read tcp [::1]:41055->[::1]:51994: read: connection reset by peer", true},
		{"proxy/vmess/encoding: failed to read request header > read tcp 127.0.0.1:41055->127.0.0.1:51994: i/o timeout", true},
		{"proxy/trojan: not trojan protocol", true},
		{"proxy/trojan: not a valid user", true},

		// A client's bytes in the reason: Trojan's and Shadowsocks' refused
		// domain, whatever it holds.
		{"proxy/trojan: failed to read address and port > common/protocol: invalid domain name: x", false},
		{"proxy/trojan: failed to read address and port > common/protocol: invalid domain name: x > EOF", false},
		{"common/drain: common/drain: unable to drain connection > EOF > proxy/shadowsocks: failed to read address > common/protocol: invalid domain name: not trojan protocol", false},
		{"proxy/trojan: failed to read address and port > common/protocol: invalid domain name:  > proxy/trojan: not a valid user", false},
		// Unknown messages, and near misses.
		{"", false},
		{"proxy/trojan: not trojan protocol ", false},
		{"proxy/trojan: not trojan protocolx", false},
		{"proxy/vless/encoding: invalid request user id: 70831645-e358-605f-0585-7b915ae2b3b4x", false},
		{"proxy/vless/encoding: invalid request user id: 70831645", false},
		{"some/pkg: something new", false},
		{"Proxy/trojan: not trojan protocol", false},
		{"proxy/trojan: not trojan protocol >", false},
		{"EOF > ", false},
		{"read tcp 1.2.3.4:5->6.7.8.9:10 x: read: connection reset by peer", false},
	} {
		if got := closedReason(tc.reason); got != tc.closed {
			t.Errorf("closedReason(%q) = %v, want %v", tc.reason, got, tc.closed)
		}
	}
}
