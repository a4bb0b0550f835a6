package xrayconf

import (
	"strings"
	"testing"
	"unsafe"

	"github.com/myvpn/bwagent/xraystats"
)

// TestPackAccount: every kind of account comes back from its packing as it
// went in, a UUID id written any other way than Xray's included, and only a
// UUID written as Xray writes it is packed as its bytes.
func TestPackAccount(t *testing.T) {
	for _, tc := range []struct {
		acct xraystats.Account
		raw  bool // packed as a UUID's bytes
	}{
		{nil, false},
		{xraystats.VLESS{ID: "6851ce24-54cd-4a50-8e93-b1d7298a6117"}, true},
		{xraystats.VLESS{ID: "6851ce24-54cd-4a50-8e93-b1d7298a6117", Flow: "xtls-rprx-vision"}, true},
		{xraystats.VLESS{ID: "00000000-0000-0000-0000-000000000000"}, true},
		{xraystats.VLESS{ID: "ffffffff-ffff-ffff-ffff-ffffffffffff", Flow: "x"}, true},
		{xraystats.VLESS{ID: "6851CE24-54CD-4A50-8E93-B1D7298A6117"}, false}, // upper case: kept as written
		{xraystats.VLESS{ID: "6851ce2454cd4a508e93b1d7298a6117"}, false},     // no dashes
		{xraystats.VLESS{ID: "6851ce24-54cd4-a50-8e93-b1d7298a6117"}, false}, // a dash elsewhere
		{xraystats.VLESS{ID: "6851ce24-54cd-4a50-8e93-b1d7298a611g"}, false},
		{xraystats.VLESS{ID: "my-custom-id", Flow: "xtls-rprx-vision"}, false},
		{xraystats.VMess{ID: "ae9210a2-d150-4a37-9336-4651134f23a0"}, true},
		{xraystats.VMess{ID: "a"}, false},
		{xraystats.Trojan{Password: "Vq3xLr9TzKp2"}, false},
		{xraystats.Trojan{Password: strings.Repeat("p", 70000)}, false},
		{xraystats.Trojan{Password: "ae9210a2-d150-4a37-9336-4651134f23a0"}, false}, // a password is never packed
		{xraystats.Shadowsocks{Method: "aes-256-gcm", Password: "Zx4Cv7Bn0Mq3"}, false},
		{xraystats.Shadowsocks{Method: "none", Password: "\x00\xff"}, false},
		{xraystats.Shadowsocks2022{Key: "I8WYy8CSs9L1Z9EQvXjlhmjCAmsKt3fwThnIWw/x8vI="}, false},
	} {
		var u User
		u.packAccount(tc.acct)
		if got := u.Account(); got != tc.acct {
			t.Errorf("%#v packed and unpacked: %#v", tc.acct, got)
		}
		if raw := u.kind&rawID != 0; raw != tc.raw {
			t.Errorf("%#v: packed as a UUID's bytes %v, want %v", tc.acct, raw, tc.raw)
		}
		if (tc.acct != nil) != (u.kind != acctNone) {
			t.Errorf("%#v: kind %d", tc.acct, u.kind)
		}
	}
}

// FuzzPackAccount: a VLESS account of any id and flow, and a Shadowsocks one
// of any password, come back as they went in.
func FuzzPackAccount(f *testing.F) {
	f.Add("6851ce24-54cd-4a50-8e93-b1d7298a6117", "xtls-rprx-vision")
	f.Add("6851ce24-54cd-4a50-8e93-b1d7298a611", "")
	f.Add("", "p")
	f.Fuzz(func(t *testing.T, id, second string) {
		if len(id) > 36 {
			id = id[:36] // the callers check an id's length
		}
		for _, acct := range []xraystats.Account{xraystats.VLESS{ID: id, Flow: second}, xraystats.Shadowsocks{Method: id, Password: second}} {
			var u User
			u.packAccount(acct)
			if got := u.Account(); got != acct {
				t.Errorf("%#v packed and unpacked: %#v", acct, got)
			}
		}
	})
}

// TestUserSize: a User stays 72 bytes on 64-bit machines (its doc says
// so): there is one for each client, 50,000 at 50,000 users.
func TestUserSize(t *testing.T) {
	if unsafe.Sizeof(uintptr(0)) == 8 && unsafe.Sizeof(User{}) > 72 {
		t.Errorf("a User takes %d bytes, more than 72", unsafe.Sizeof(User{}))
	}
}
