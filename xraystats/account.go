package xraystats

import (
	"fmt"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/myvpn/bwagent/xraystats/internal/xraypb/serialpb"
	"github.com/myvpn/bwagent/xraystats/internal/xraypb/shadowsocks2022pb"
	"github.com/myvpn/bwagent/xraystats/internal/xraypb/shadowsockspb"
	"github.com/myvpn/bwagent/xraystats/internal/xraypb/trojanpb"
	"github.com/myvpn/bwagent/xraystats/internal/xraypb/vlesspb"
	"github.com/myvpn/bwagent/xraystats/internal/xraypb/vmesspb"
)

// Account is the protocol-specific part of a user: one of [VLESS], [VMess],
// [Trojan], [Shadowsocks] and [Shadowsocks2022] (or a pointer to one). It
// must be the account type of the inbound's protocol, with the same values
// as in the user's client configuration.
type Account interface {
	isAccount()
}

// VLESS is the account of a user of a VLESS inbound.
type VLESS struct {
	ID   string // UUID, e.g. "66ad4540-b58c-4ad2-9926-ea63445a9b57"
	Flow string // e.g. "xtls-rprx-vision"; empty for none
}

// VMess is the account of a user of a VMess inbound.
type VMess struct {
	ID string // UUID
}

// Trojan is the account of a user of a Trojan inbound.
type Trojan struct {
	Password string
}

// Shadowsocks is the account of a user of a (multi-user) Shadowsocks inbound
// with a classic AEAD cipher.
type Shadowsocks struct {
	// Method is the cipher, as in Xray's JSON config: "aes-128-gcm",
	// "aes-256-gcm", "chacha20-poly1305" (also "chacha20-ietf-poly1305"),
	// "xchacha20-poly1305" (also "xchacha20-ietf-poly1305") or "none".
	Method   string
	Password string
}

// Shadowsocks2022 is the account of a user of a multi-user Shadowsocks 2022
// inbound ("2022-blake3-..." method): the user's own key (identity PSK),
// base64-encoded, as in the "password" of the inbound's clients. The
// inbound's method and server key are the inbound's, not the user's.
type Shadowsocks2022 struct {
	Key string
}

func (VLESS) isAccount()           {}
func (VMess) isAccount()           {}
func (Trojan) isAccount()          {}
func (Shadowsocks) isAccount()     {}
func (Shadowsocks2022) isAccount() {}

// ssCiphers maps the method names of Xray's JSON config to its cipher enum.
var ssCiphers = map[string]shadowsockspb.CipherType{
	"aes-128-gcm":             shadowsockspb.CipherType_AES_128_GCM,
	"aead_aes_128_gcm":        shadowsockspb.CipherType_AES_128_GCM,
	"aes-256-gcm":             shadowsockspb.CipherType_AES_256_GCM,
	"aead_aes_256_gcm":        shadowsockspb.CipherType_AES_256_GCM,
	"chacha20-poly1305":       shadowsockspb.CipherType_CHACHA20_POLY1305,
	"aead_chacha20_poly1305":  shadowsockspb.CipherType_CHACHA20_POLY1305,
	"chacha20-ietf-poly1305":  shadowsockspb.CipherType_CHACHA20_POLY1305,
	"xchacha20-poly1305":      shadowsockspb.CipherType_XCHACHA20_POLY1305,
	"aead_xchacha20_poly1305": shadowsockspb.CipherType_XCHACHA20_POLY1305,
	"xchacha20-ietf-poly1305": shadowsockspb.CipherType_XCHACHA20_POLY1305,
	"none":                    shadowsockspb.CipherType_NONE,
	"plain":                   shadowsockspb.CipherType_NONE,
}

// accountMessage returns the Xray account message of acct.
func accountMessage(acct Account) (proto.Message, error) {
	switch a := acct.(type) {
	case VLESS:
		return &vlesspb.Account{Id: a.ID, Flow: a.Flow}, nil
	case VMess:
		return &vmesspb.Account{Id: a.ID}, nil
	case Trojan:
		return &trojanpb.Account{Password: a.Password}, nil
	case Shadowsocks:
		c, ok := ssCiphers[strings.ToLower(a.Method)]
		if !ok {
			return nil, fmt.Errorf("%w: unknown shadowsocks method %q", ErrInvalid, a.Method)
		}
		return &shadowsockspb.Account{Password: a.Password, CipherType: c}, nil
	case Shadowsocks2022:
		return &shadowsocks2022pb.Account{Key: a.Key}, nil
	case *VLESS:
		if a != nil {
			return accountMessage(*a)
		}
	case *VMess:
		if a != nil {
			return accountMessage(*a)
		}
	case *Trojan:
		if a != nil {
			return accountMessage(*a)
		}
	case *Shadowsocks:
		if a != nil {
			return accountMessage(*a)
		}
	case *Shadowsocks2022:
		if a != nil {
			return accountMessage(*a)
		}
	}
	return nil, fmt.Errorf("%w: account %T", ErrInvalid, acct)
}

// typed wraps m the way Xray expects a message inside another: its full
// proto name and its serialized bytes.
func typed(m proto.Message) (*serialpb.TypedMessage, error) {
	b, err := proto.Marshal(m)
	if err != nil {
		return nil, err
	}
	return &serialpb.TypedMessage{Type: string(proto.MessageName(m)), Value: b}, nil
}
