package xrayconf

import (
	"encoding/hex"

	"github.com/myvpn/bwagent/xraystats"
)

// acctKind is the kind of a User's account as packed (see
// User.packAccount): which of xraystats' account types it is, and rawID.
type acctKind uint8

const (
	acctNone acctKind = iota // no account: a user the API cannot add
	acctVLESS
	acctVMess
	acctTrojan
	acctShadowsocks
	acctShadowsocks2022

	// rawID marks a VLESS or VMess account whose id is a UUID written as
	// Xray writes one (lower-case hex, with dashes), packed as its 16
	// bytes.
	rawID acctKind = 0x80
)

// packAccount sets u's account to acct, packed: its fields in one string,
// the first one's length in u.split (an id or a Shadowsocks method, which
// the caller checked: at most 36 bytes), and a UUID id as its 16 bytes. A
// user then keeps no interface value and no string of its own for its id:
// a VLESS user without a flow takes 96 bytes here instead of 160, which
// counts at 50,000 users.
func (u *User) packAccount(acct xraystats.Account) {
	first, second := "", ""
	switch a := acct.(type) {
	case nil:
		u.kind, u.acct, u.split = acctNone, "", 0
		return
	case xraystats.VLESS:
		u.kind, first, second = acctVLESS, a.ID, a.Flow
	case xraystats.VMess:
		u.kind, first = acctVMess, a.ID
	case xraystats.Trojan:
		u.kind, second = acctTrojan, a.Password
	case xraystats.Shadowsocks:
		u.kind, first, second = acctShadowsocks, a.Method, a.Password
	case xraystats.Shadowsocks2022:
		u.kind, second = acctShadowsocks2022, a.Key
	default:
		panic("xrayconf: packAccount of an unknown account type") // the package's own callers only
	}
	if id, ok := packUUID(first); ok {
		u.kind |= rawID
		first = id
	}
	u.split = uint16(len(first))
	switch {
	case second == "":
		u.acct = first
	case first == "":
		u.acct = second
	default:
		u.acct = first + second
	}
}

// Account is what HandlerService.AlterInbound needs to add the user to the
// inbound again (see [xraystats.Account]): [xraystats.VLESS],
// [xraystats.VMess], [xraystats.Trojan], [xraystats.Shadowsocks] or
// [xraystats.Shadowsocks2022], with the values of the user's client in the
// config. It is nil for the user of a single-user Shadowsocks 2022 inbound
// and the users of a Shadowsocks 2022 relay, which Xray cannot add or remove
// through its API.
func (u User) Account() xraystats.Account {
	first, second := u.acct[:u.split], u.acct[u.split:]
	if u.kind&rawID != 0 {
		first = unpackUUID(first)
	}
	switch u.kind &^ rawID {
	case acctVLESS:
		return xraystats.VLESS{ID: first, Flow: second}
	case acctVMess:
		return xraystats.VMess{ID: first}
	case acctTrojan:
		return xraystats.Trojan{Password: second}
	case acctShadowsocks:
		return xraystats.Shadowsocks{Method: first, Password: second}
	case acctShadowsocks2022:
		return xraystats.Shadowsocks2022{Key: second}
	}
	return nil
}

// uuidDashes are where a UUID as Xray writes it has its dashes.
var uuidDashes = [...]int{8, 13, 18, 23}

// packUUID returns id's 16 bytes if id is a UUID as Xray writes one
// (unpackUUID gives it back, byte for byte), and false for any other id.
func packUUID(id string) (string, bool) {
	if len(id) != 36 {
		return "", false
	}
	var hexID [32]byte
	n := 0
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case i == uuidDashes[0] || i == uuidDashes[1] || i == uuidDashes[2] || i == uuidDashes[3]:
			if c != '-' {
				return "", false
			}
		case '0' <= c && c <= '9' || 'a' <= c && c <= 'f':
			hexID[n] = c
			n++
		default:
			return "", false
		}
	}
	var raw [16]byte
	if _, err := hex.Decode(raw[:], hexID[:]); err != nil {
		return "", false
	}
	return string(raw[:]), true
}

// unpackUUID returns the UUID of 16 bytes as Xray writes it.
func unpackUUID(raw string) string {
	var b [36]byte
	hex.Encode(b[0:8], []byte(raw[0:4]))
	b[8] = '-'
	hex.Encode(b[9:13], []byte(raw[4:6]))
	b[13] = '-'
	hex.Encode(b[14:18], []byte(raw[6:8]))
	b[18] = '-'
	hex.Encode(b[19:23], []byte(raw[8:10]))
	b[23] = '-'
	hex.Encode(b[24:36], []byte(raw[10:16]))
	return string(b[:])
}
