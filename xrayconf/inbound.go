package xrayconf

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/xraystats"
)

// The settings of the inbounds with users, with the fields and types of
// Xray's (infra/conf/vless.go, vmess.go, trojan.go, shadowsocks.go).
type (
	vlessSettings struct {
		Clients []vlessClient `json:"clients"`
		Flow    string        `json:"flow"`
	}
	// vlessClient is what Xray reads of a VLESS client (as protocol.User
	// and vless.Account) that this package uses.
	vlessClient struct {
		ID    string `json:"id"`
		Flow  string `json:"flow"`
		Email string `json:"email"`
		Level uint32 `json:"level"`
	}
	vmessSettings struct {
		Clients []vmessClient `json:"clients"`
	}
	vmessClient struct {
		ID    string `json:"id"`
		Email string `json:"email"`
		Level uint32 `json:"level"`
	}
	trojanSettings struct {
		Clients []*trojanClient `json:"clients"`
	}
	trojanClient struct {
		Password string `json:"password"`
		Level    byte   `json:"level"`
		Email    string `json:"email"`
		Flow     string `json:"flow"`
	}
	ssSettings struct {
		Network  json.RawMessage `json:"network"`
		Method   string          `json:"method"`
		Password string          `json:"password"`
		Level    byte            `json:"level"`
		Email    string          `json:"email"`
		Clients  []*ssClient     `json:"clients"`
	}
	ssClient struct {
		Method   string  `json:"method"`
		Password string  `json:"password"`
		Level    byte    `json:"level"`
		Email    string  `json:"email"`
		Address  *string `json:"address"` // a Shadowsocks 2022 relay's destination
		Port     uint16  `json:"port"`
	}
)

// takesUDP reports whether a Shadowsocks inbound's settings.network (a
// list of networks, as a string "tcp,udp" or an array, as Xray's NetworkList
// takes it; absent is "tcp") has "udp".
func takesUDP(raw json.RawMessage) (bool, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return false, nil
	}
	var list []string
	if err := json.Unmarshal(raw, &list); err != nil {
		var s string
		if json.Unmarshal(raw, &s) != nil {
			return false, fmt.Errorf("%s is neither a string nor a list of strings", raw)
		}
		list = strings.Split(s, ",")
	}
	for _, n := range list {
		if strings.EqualFold(strings.TrimSpace(n), "udp") {
			return true, nil
		}
	}
	return false, nil
}

// ss2022Methods are the methods of Shadowsocks 2022, compared exactly as
// Xray does (sing-shadowsocks' shadowaead_2022.List).
var ss2022Methods = []string{
	"2022-blake3-aes-128-gcm",
	"2022-blake3-aes-256-gcm",
	"2022-blake3-chacha20-poly1305",
}

// ssAEAD are the classic Shadowsocks methods that Xray takes for the
// clients of a multi-user inbound (infra/conf/shadowsocks.go,
// cipherFromString): the AEAD ciphers, in any case.
var ssAEAD = []string{
	"aes-128-gcm", "aead_aes_128_gcm",
	"aes-256-gcm", "aead_aes_256_gcm",
	"chacha20-poly1305", "aead_chacha20_poly1305", "chacha20-ietf-poly1305",
	"xchacha20-poly1305", "aead_xchacha20_poly1305", "xchacha20-ietf-poly1305",
}

// ssMethodOK reports whether Xray takes method for a classic Shadowsocks
// user: an AEAD cipher, or also "none" for a single-user inbound.
func ssMethodOK(method string, single bool) bool {
	m := strings.ToLower(method)
	return slices.Contains(ssAEAD, m) || single && (m == "none" || m == "plain")
}

// where names a raw inbound in errors.
func (in *rawInbound) where() string {
	if in.Tag != "" {
		return fmt.Sprintf("%s: inbound %q", in.file, in.Tag)
	}
	return fmt.Sprintf("%s: untagged inbound inbounds[%d]", in.file, in.pos)
}

// invalid returns an ErrInvalid error about the raw inbound.
func (in *rawInbound) invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrInvalid, in.where(), fmt.Sprintf(format, args...))
}

// transport returns the inbound's transport, by Xray's name for it, and
// whether it takes the PROXY protocol.
func (in *rawInbound) transport() (network string, proxied bool) {
	network = "raw"
	st := in.Stream
	if st == nil {
		return network, false
	}
	switch n := strings.ToLower(st.Network); n {
	case "", "tcp", "raw":
	case "mkcp":
		network = "kcp"
	case "splithttp":
		network = "xhttp"
	default:
		network = n
	}
	for _, p := range []*rawProxied{st.Sockopt, st.Raw, st.TCP} {
		proxied = proxied || p != nil && p.AcceptProxyProtocol
	}
	return network, proxied
}

// settings returns the inbound's settings; Xray takes none (or null) as {}.
func (in *rawInbound) settings() []byte {
	if len(in.Settings) == 0 || string(in.Settings) == "null" {
		return []byte("{}")
	}
	return in.Settings
}

// inbound makes the Inbound of raw, or returns nil for an inbound of another
// protocol.
func (c *Config) inbound(raw *rawInbound) (*Inbound, error) {
	var p quota.Protocol
	switch strings.ToLower(raw.Protocol) {
	case "vless":
		p = quota.VLESS
	case "vmess":
		p = quota.VMess
	case "trojan":
		p = quota.Trojan
	case "shadowsocks":
		p = quota.Shadowsocks
	default:
		c.otherInbound(raw)
		return nil, nil
	}
	port, _, err := firstPort(raw.Port)
	if err != nil {
		return nil, raw.invalid("%v", err)
	}
	in := &Inbound{Tag: raw.Tag, Protocol: p, Port: port, File: raw.file, Pos: raw.pos}
	if raw.Listen != nil {
		in.Listen = *raw.Listen
	}
	in.Network, in.ProxyProtocol = raw.transport()
	in.UDP = in.Network == "kcp" || in.Network == "quic"
	if in.Tag == "" {
		c.problem(in, -1, "no tag: Xray counts its users' traffic, but bwagent can't remove or add them through the API")
	}
	switch p {
	case quota.VLESS:
		err = c.vless(raw, in)
	case quota.VMess:
		err = c.vmess(raw, in)
	case quota.Trojan:
		err = c.trojan(raw, in)
	case quota.Shadowsocks:
		err = c.shadowsocks(raw, in)
	}
	if err != nil {
		return nil, err
	}
	return in, nil
}

// otherInbound reports an inbound of a protocol this package does not read
// whose settings have clients (e.g. hysteria).
func (c *Config) otherInbound(raw *rawInbound) {
	var s struct {
		Clients []json.RawMessage `json:"clients"`
	}
	if json.Unmarshal(raw.settings(), &s) != nil || len(s.Clients) == 0 {
		return
	}
	c.Problems = append(c.Problems, Problem{File: raw.file, Inbound: raw.Tag, Pos: raw.pos, Index: -1,
		Msg: fmt.Sprintf("protocol %q with %d client(s): bwagent accounts the users of vless, vmess, trojan and shadowsocks inbounds only",
			raw.Protocol, len(s.Clients))})
}

// addUser adds the client of index i (-1: the user of a single-user
// inbound) to in, or reports why it can't be a bwagent user.
func (c *Config) addUser(in *Inbound, i int, email string, level uint32, acct xraystats.Account) {
	switch err := quota.ValidName(email); {
	case email == "" && i < 0:
		c.problem(in, -1, "single-user inbound without email: Xray counts nobody's traffic on it")
		return
	case email == "":
		c.problem(in, i, "no email: Xray counts no traffic for a client without one, so it can't be accounted")
		return
	case err != nil:
		c.problem(in, i, fmt.Sprintf("email can't be a bwagent user name: %v", err))
		return
	}
	u := User{Email: email, Protocol: in.Protocol, Inbound: in.Tag, Level: level}
	u.packAccount(acct)
	in.Users = append(in.Users, u)
}

// emails detects two clients of one inbound with the same email, which
// Xray compares case-insensitively.
type emails map[string]int

// dup returns the index of an earlier client with email, and records i.
func (e emails) dup(email string, i int) (int, bool) {
	if email == "" {
		return 0, false
	}
	k := strings.ToLower(email)
	if j, ok := e[k]; ok {
		return j, true
	}
	e[k] = i
	return 0, false
}

func (c *Config) vless(raw *rawInbound, in *Inbound) error {
	var s vlessSettings
	if err := decodeSettings[vlessClient](raw, &s); err != nil {
		return err
	}
	seen := make(emails, len(s.Clients))
	in.Users = slices.Grow(in.Users, len(s.Clients))
	for i, cl := range s.Clients {
		if !validID(cl.ID) {
			return raw.invalid("settings.clients[%d]: id %q is no UUID (nor a string of 1 to 30 bytes)", i, cl.ID)
		}
		if j, ok := seen.dup(cl.Email, i); ok {
			return raw.invalid("settings.clients[%d]: email %q is also the email of client %d: Xray refuses it", i, cl.Email, j)
		}
		flow := cl.Flow
		if flow == "" {
			flow = s.Flow
		}
		c.addUser(in, i, cl.Email, cl.Level, xraystats.VLESS{ID: cl.ID, Flow: flow})
	}
	return nil
}

// decodeSettings decodes raw's settings into s, whose clients are a list of
// T, in one pass: what thousands of clients cost least. If that fails, it
// decodes them again one client at a time, so that the error names the
// client (settings.clients[i]) or else the setting at fault.
func decodeSettings[T any](raw *rawInbound, s any) error {
	err := json.Unmarshal(raw.settings(), s)
	if err == nil {
		return nil
	}
	var each struct {
		Clients []json.RawMessage `json:"clients"`
	}
	if json.Unmarshal(raw.settings(), &each) == nil {
		for i, rc := range each.Clients {
			var cl T
			if err := json.Unmarshal(rc, &cl); err != nil {
				return raw.invalid("%s", jsonErr(fmt.Sprintf("settings.clients[%d]", i), err))
			}
		}
	}
	return raw.invalid("%s", jsonErr("settings", err))
}

func (c *Config) vmess(raw *rawInbound, in *Inbound) error {
	var s vmessSettings
	if err := decodeSettings[vmessClient](raw, &s); err != nil {
		return err
	}
	seen := make(emails, len(s.Clients))
	in.Users = slices.Grow(in.Users, len(s.Clients))
	for i, cl := range s.Clients {
		if !validID(cl.ID) {
			return raw.invalid("settings.clients[%d]: id %q is no UUID (nor a string of 1 to 30 bytes)", i, cl.ID)
		}
		if j, ok := seen.dup(cl.Email, i); ok {
			return raw.invalid("settings.clients[%d]: email %q is also the email of client %d: Xray refuses it", i, cl.Email, j)
		}
		c.addUser(in, i, cl.Email, cl.Level, xraystats.VMess{ID: cl.ID})
	}
	return nil
}

func (c *Config) trojan(raw *rawInbound, in *Inbound) error {
	var s trojanSettings
	if err := json.Unmarshal(raw.settings(), &s); err != nil {
		return raw.invalid("%s", jsonErr("settings", err))
	}
	seen := make(emails, len(s.Clients))
	in.Users = slices.Grow(in.Users, len(s.Clients))
	for i, cl := range s.Clients {
		switch {
		case cl == nil:
			return raw.invalid("settings.clients[%d] is null", i)
		case cl.Flow != "":
			return raw.invalid("settings.clients[%d]: Xray no longer takes a flow for Trojan", i)
		}
		if j, ok := seen.dup(cl.Email, i); ok {
			return raw.invalid("settings.clients[%d]: email %q is also the email of client %d: Xray refuses it", i, cl.Email, j)
		}
		c.addUser(in, i, cl.Email, uint32(cl.Level), xraystats.Trojan{Password: cl.Password})
	}
	return nil
}

func (c *Config) shadowsocks(raw *rawInbound, in *Inbound) error {
	var s ssSettings
	if err := json.Unmarshal(raw.settings(), &s); err != nil {
		return raw.invalid("%s", jsonErr("settings", err))
	}
	in.Method = s.Method
	udp, err := takesUDP(s.Network)
	if err != nil {
		return raw.invalid("settings.network: %v", err)
	}
	in.UDP = in.UDP || udp
	for i, cl := range s.Clients {
		if cl == nil {
			return raw.invalid("settings.clients[%d] is null", i)
		}
	}
	if slices.Contains(ss2022Methods, s.Method) {
		return c.shadowsocks2022(raw, in, &s)
	}
	if s.Clients == nil { // absent or null; [] is a multi-user inbound without users
		if s.Password == "" {
			return raw.invalid("settings.password is empty: Xray refuses it")
		}
		if !ssMethodOK(s.Method, true) {
			return raw.invalid("settings.method %q is no Shadowsocks method that Xray knows", s.Method)
		}
		c.addUser(in, -1, s.Email, uint32(s.Level), xraystats.Shadowsocks{Method: s.Method, Password: s.Password})
		return nil
	}
	seen := make(emails, len(s.Clients))
	in.Users = slices.Grow(in.Users, len(s.Clients))
	for i, cl := range s.Clients {
		switch {
		case cl.Password == "":
			return raw.invalid("settings.clients[%d]: empty password: Xray refuses it", i)
		case cl.Method == "":
			return raw.invalid(`settings.clients[%d]: no "method": Xray wants each client's own, it does not take settings.method for clients`, i)
		case !ssMethodOK(cl.Method, false):
			return raw.invalid("settings.clients[%d]: method %q is no AEAD method: Xray refuses it", i, cl.Method)
		}
		if j, ok := seen.dup(cl.Email, i); ok {
			c.problem(in, i, fmt.Sprintf("email %q is also the email of client %d (compared case-insensitively, as Xray's API does): adding or removing either through the API is ambiguous", cl.Email, j))
		}
		c.addUser(in, i, cl.Email, uint32(cl.Level), xraystats.Shadowsocks{Method: cl.Method, Password: cl.Password})
	}
	return nil
}

// shadowsocks2022 reads a Shadowsocks 2022 inbound: single-user, multi-user
// or relay.
func (c *Config) shadowsocks2022(raw *rawInbound, in *Inbound, s *ssSettings) error {
	if len(s.Clients) == 0 {
		if s.Email != "" {
			c.problem(in, -1, "single-user Shadowsocks 2022 inbound: Xray counts its user, but can't remove or add it through the API")
		}
		c.addUser(in, -1, s.Email, uint32(s.Level), nil)
		return nil
	}
	if !strings.Contains(s.Method, "aes") {
		return raw.invalid("settings.method %q: Xray's multi-user Shadowsocks 2022 takes 2022-blake3-aes-*-gcm only", s.Method)
	}
	relay := s.Clients[0].Address != nil
	if relay {
		c.problem(in, -1, "Shadowsocks 2022 relay: Xray counts its users, but can't remove or add them through the API")
	}
	seen := make(emails, len(s.Clients))
	in.Users = slices.Grow(in.Users, len(s.Clients))
	for i, cl := range s.Clients {
		switch {
		case cl.Method != "":
			return raw.invalid("settings.clients[%d]: a Shadowsocks 2022 client has no method of its own: Xray refuses it", i)
		case relay && cl.Address == nil:
			return raw.invalid("settings.clients[%d]: no address, but client 0 has one: Xray wants an address for all clients of a relay or none", i)
		}
		if j, ok := seen.dup(cl.Email, i); ok {
			c.problem(in, i, fmt.Sprintf("email %q is also the email of client %d (compared case-insensitively, as Xray's API does): adding or removing either through the API is ambiguous", cl.Email, j))
		}
		var acct xraystats.Account
		if !relay {
			acct = xraystats.Shadowsocks2022{Key: cl.Password}
		}
		c.addUser(in, i, cl.Email, uint32(cl.Level), acct)
	}
	return nil
}

// validID reports whether Xray takes id as a VLESS or VMess id
// (common/uuid.ParseString): a UUID, with or without dashes, or any string
// of 1 to 30 bytes, which Xray maps to a UUID.
func validID(id string) bool {
	l := len(id)
	if l < 32 || l > 36 {
		return l >= 1 && l <= 30
	}
	t := id
	for _, g := range []int{8, 4, 4, 4, 12} {
		if len(t) > 0 && t[0] == '-' {
			t = t[1:]
		}
		if len(t) < g {
			return false
		}
		if _, err := hex.DecodeString(t[:g]); err != nil {
			return false
		}
		t = t[g:]
	}
	return true
}

// firstPort returns the first port of an inbound's "port", which Xray takes
// as a number, or a string of comma-separated ports and ranges ("443",
// "1000-2000,3000"); env is true if it is to come from an environment
// variable ("env:NAME"), which this package does not resolve. None (or null)
// is port 0.
func firstPort(raw json.RawMessage) (port int, env bool, err error) {
	if len(raw) == 0 || string(raw) == "null" {
		return 0, false, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		var n uint32
		if err := json.Unmarshal(raw, &n); err != nil {
			return 0, false, fmt.Errorf("port %s: want a number or a string such as \"443\" or \"1000-2000\"", raw)
		}
		return int(n), false, nil
	}
	first := -1
	for part := range strings.SplitSeq(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		p := 0
		switch {
		case strings.HasPrefix(part, "env:"):
			if first < 0 {
				env = true
			}
		case strings.Contains(part, "-"):
			from, to, _ := strings.Cut(part, "-")
			var err error
			if p, err = portNumber(from); err == nil {
				_, err = portNumber(to)
			}
			if err != nil {
				return 0, false, fmt.Errorf("port %q: invalid range %q", s, part)
			}
		default:
			var n uint32
			if err := json.Unmarshal([]byte(part), &n); err != nil || n > 65535 {
				return 0, false, fmt.Errorf("port %q: invalid port %q", s, part)
			}
			p = int(n)
		}
		if first < 0 {
			first = p
		}
	}
	return max(first, 0), env, nil
}

// portNumber parses a port as Xray's net.PortFromString does.
func portNumber(s string) (int, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n > 65535 {
		return 0, errors.New("invalid port")
	}
	return int(n), nil
}

// jsonErr describes an error of json.Unmarshal of the value at path.
func jsonErr(path string, err error) string {
	var typ *json.UnmarshalTypeError
	if errors.As(err, &typ) {
		if typ.Field != "" {
			path += "." + typ.Field
		}
		return fmt.Sprintf("%s: got a JSON %s, want %s", path, typ.Value, jsonKind(typ.Type))
	}
	return fmt.Sprintf("%s: %v", path, err)
}
