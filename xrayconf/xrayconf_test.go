package xrayconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/xraystats"
)

func mustLoad(t *testing.T, paths []string, dir string) *Config {
	t.Helper()
	c, err := Load(paths, dir)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func parse(t *testing.T, data string) *Config {
	t.Helper()
	c, err := Parse("test.json", []byte(data))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func tags(c *Config) []string {
	var ts []string
	for _, in := range c.Inbounds {
		ts = append(ts, in.Tag)
	}
	return ts
}

func problemStrings(c *Config) []string {
	var ps []string
	for _, p := range c.Problems {
		ps = append(ps, p.String())
	}
	return ps
}

// wantProblems checks that c has exactly one problem containing each of
// want, and no others.
func wantProblems(t *testing.T, c *Config, want ...string) {
	t.Helper()
	got := problemStrings(c)
	for _, w := range want {
		n := 0
		for _, g := range got {
			if strings.Contains(g, w) {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%d problems contain %q, want 1", n, w)
		}
	}
	if len(got) != len(want) {
		t.Errorf("%d problems, want %d:\n%s", len(got), len(want), strings.Join(got, "\n"))
	}
}

func TestThreeXUI(t *testing.T) {
	c := mustLoad(t, []string{"testdata/3x-ui.json"}, "")
	if !slices.Equal(c.Files, []string{"testdata/3x-ui.json"}) {
		t.Errorf("Files = %q", c.Files)
	}
	if c.API != "127.0.0.1:62789" {
		t.Errorf("API = %q, want the api inbound's 127.0.0.1:62789", c.API)
	}
	if !slices.Equal(c.APIServices, []string{"HandlerService", "LoggerService", "StatsService"}) {
		t.Errorf("APIServices = %q", c.APIServices)
	}
	if !c.HasAPIService("statsservice") || !c.HasAPIService("HandlerService") || c.HasAPIService("RoutingService") {
		t.Error("HasAPIService is wrong")
	}
	if !c.Stats || !c.UserStats || c.UserOnline {
		t.Errorf("Stats, UserStats, UserOnline = %v, %v, %v; want true, true, false", c.Stats, c.UserStats, c.UserOnline)
	}
	wantProblems(t, c)

	// The api's dokodemo-door inbound is left out.
	if want := []string{"inbound-443", "inbound-8080", "inbound-8443", "inbound-8388", "inbound-8389"}; !slices.Equal(tags(c), want) {
		t.Errorf("inbound tags = %q, want %q", tags(c), want)
	}
	in, ok := c.Inbound("inbound-8443")
	if !ok || in.Protocol != quota.Trojan || in.Listen != "0.0.0.0" || in.Port != 8443 || in.Pos != 3 || in.File != "testdata/3x-ui.json" {
		t.Errorf("Inbound(inbound-8443) = %+v, %v", in, ok)
	}
	if in, _ := c.Inbound("inbound-8389"); in.Method != "2022-blake3-aes-256-gcm" {
		t.Errorf("inbound-8389 method %q", in.Method)
	}

	want := []wantUser{
		{"alice", quota.VLESS, "inbound-443", xraystats.VLESS{ID: "2033d348-ecb9-4486-a427-7dafdd8435c2", Flow: "xtls-rprx-vision"}, 0},
		{"bob.m", quota.VLESS, "inbound-443", xraystats.VLESS{ID: "b8f38a0e-bae7-492b-aab9-9be965fbb455", Flow: "xtls-rprx-vision"}, 0},
		{"carol", quota.VMess, "inbound-8080", xraystats.VMess{ID: "ae9210a2-d150-4a37-9336-4651134f23a0"}, 0},
		{"dave", quota.Trojan, "inbound-8443", xraystats.Trojan{Password: "Vq3xLr9TzKp2"}, 0},
		{"ivan", quota.Trojan, "inbound-8443", xraystats.Trojan{Password: "Hw7Nd2Qm5Ys8"}, 0},
		// Each client's own method, not the inbound's.
		{"erin", quota.Shadowsocks, "inbound-8388", xraystats.Shadowsocks{Method: "chacha20-ietf-poly1305", Password: "eRt5Yu8Io1Pa"}, 0},
		{"frank", quota.Shadowsocks, "inbound-8388", xraystats.Shadowsocks{Method: "aes-256-gcm", Password: "Zx4Cv7Bn0Mq3"}, 0},
		{"grace", quota.Shadowsocks, "inbound-8389", xraystats.Shadowsocks2022{Key: "I8WYy8CSs9L1Z9EQvXjlhmjCAmsKt3fwThnIWw/x8vI="}, 0},
		{"heidi", quota.Shadowsocks, "inbound-8389", xraystats.Shadowsocks2022{Key: "p/xe88UZVwESQoy1yHdtwMWk/bpgmSqTe4VlszDp4TY="}, 0},
	}
	if got := view(c.Users()); !reflect.DeepEqual(got, want) {
		t.Errorf("Users() =\n%+v\nwant\n%+v", got, want)
	}
	for _, u := range c.Users() {
		if !u.Alterable() {
			t.Errorf("%s: not alterable", u.Email)
		}
	}
	if got := view(c.Lookup("dave")); len(got) != 1 || got[0] != want[3] {
		t.Errorf("Lookup(dave) = %+v", got)
	}
	if got := c.Lookup("Dave"); got != nil {
		t.Errorf("Lookup(Dave) = %+v, want nil: stats names are case-sensitive", got)
	}
}

func TestAPIListen(t *testing.T) {
	c := mustLoad(t, []string{"testdata/api-listen.json"}, "")
	if c.API != "127.0.0.1:10085" {
		t.Errorf("API = %q, want api.listen", c.API)
	}
	if !c.Stats || !c.UserStats || !c.UserOnline {
		t.Errorf("Stats, UserStats, UserOnline = %v, %v, %v; want all true", c.Stats, c.UserStats, c.UserOnline)
	}
	// The socks inbound is left out.
	if want := []string{"vless-in", "vless-ws", "vmess-ws", "ss-single", "ss22-single"}; !slices.Equal(tags(c), want) {
		t.Errorf("inbound tags = %q, want %q", tags(c), want)
	}
	vin, _ := c.Inbound("vless-in")
	if vin.Protocol != quota.VLESS || vin.Listen != "::" || vin.Port != 4443 {
		t.Errorf("vless-in = %+v: want protocol vless (from VLESS), listen ::, port 4443 (from a string)", vin)
	}
	if vm, _ := c.Inbound("vmess-ws"); vm.Port != 10003 {
		t.Errorf("vmess-ws port %d, want 10003, the first of \"10003-10005,10010\"", vm.Port)
	}
	wantV := []wantUser{
		// An empty flow takes settings.flow.
		{"user1@example.com", quota.VLESS, "vless-in", xraystats.VLESS{ID: "6851ce24-54cd-4a50-8e93-b1d7298a6117", Flow: "xtls-rprx-vision"}, 0},
		{"user2@example.com", quota.VLESS, "vless-in", xraystats.VLESS{ID: "aa938575a7bd4b7794ee80e49f833f4c", Flow: "xtls-rprx-vision"}, 1},
		{"user3@example.com", quota.VLESS, "vless-in", xraystats.VLESS{ID: "my-custom-id", Flow: "xtls-rprx-vision"}, 0},
	}
	if got := view(vin.Users); !reflect.DeepEqual(got, wantV) {
		t.Errorf("vless-in users =\n%+v\nwant\n%+v", got, wantV)
	}
	if got := c.Lookup("user1@example.com"); len(got) != 2 || got[0].Inbound != "vless-in" || got[1].Inbound != "vless-ws" ||
		got[1].Account() != (xraystats.VLESS{ID: "6851ce24-54cd-4a50-8e93-b1d7298a6117"}) {
		t.Errorf("Lookup(user1) = %+v, want one user per inbound", got)
	}
	// The single-user inbounds.
	solo := c.Lookup("solo")
	if len(solo) != 1 || solo[0].Account() != (xraystats.Shadowsocks{Method: "aes-128-gcm", Password: "single-user-secret"}) || !solo[0].Alterable() {
		t.Errorf("Lookup(solo) = %+v", solo)
	}
	solo22 := c.Lookup("solo22")
	if len(solo22) != 1 || solo22[0].Account() != nil || solo22[0].Alterable() || solo22[0].Protocol != quota.Shadowsocks {
		t.Errorf("Lookup(solo22) = %+v: want a user without account", solo22)
	}
	wantProblems(t, c,
		`testdata/api-listen.json: inbound "ss22-single": single-user Shadowsocks 2022 inbound`,
		`1 user(s) of level 1, but policy.levels."1" lacks statsUserUplink`,
	)
}

func TestConfdir(t *testing.T) {
	c := mustLoad(t, nil, "testdata/confdir")
	wantFiles := []string{"testdata/confdir/00_base.json", "testdata/confdir/10_users.json", "testdata/confdir/20_override.json"}
	if !slices.Equal(c.Files, wantFiles) {
		t.Errorf("Files = %q, want %q (README.txt is no config)", c.Files, wantFiles)
	}
	if want := []string{"vless-in", "trojan-in", "vmess-in"}; !slices.Equal(tags(c), want) {
		t.Errorf("inbound tags = %q, want %q", tags(c), want)
	}
	tr, _ := c.Inbound("trojan-in")
	if tr.File != "testdata/confdir/20_override.json" || tr.Port != 2087 || tr.Pos != 0 {
		t.Errorf("trojan-in = %+v: want the one of 20_override.json", tr)
	}
	want := []wantUser{
		{"carol", quota.Trojan, "trojan-in", xraystats.Trojan{Password: "new-carol-password"}, 0},
		{"dave", quota.Trojan, "trojan-in", xraystats.Trojan{Password: "dave-password"}, 0},
	}
	if got := view(tr.Users); !reflect.DeepEqual(got, want) {
		t.Errorf("trojan-in users = %+v, want %+v", got, want)
	}
	if c.API != "127.0.0.1:10085" || !slices.Equal(c.APIServices, []string{"HandlerService", "StatsService", "LoggerService"}) {
		t.Errorf("API %q %q: want 00_base.json's", c.API, c.APIServices)
	}
	// "stats": null in 20_override.json leaves 00_base.json's; its policy
	// replaces 00_base.json's.
	if !c.Stats || !c.UserStats || !c.UserOnline {
		t.Errorf("Stats, UserStats, UserOnline = %v, %v, %v; want all true", c.Stats, c.UserStats, c.UserOnline)
	}
	wantProblems(t, c)
	if n := len(c.Users()); n != 5 {
		t.Errorf("%d users, want 5", n)
	}
}

func TestProblems(t *testing.T) {
	c := mustLoad(t, []string{"testdata/problems.json"}, "")
	wantProblems(t, c,
		`testdata/problems.json: untagged inbound inbounds[0]: no tag`,
		`untagged inbound inbounds[0]: client 1: no email`,
		`untagged inbound inbounds[0]: client 2: email can't be a bwagent user name: invalid user name "../x"`,
		`untagged inbound inbounds[0]: client 3: email can't be a bwagent user name: invalid user name "a b"`,
		`inbound "trojan-in": email "alice" is also a vless user of an untagged inbound`,
		`inbound "ss-in": client 1: email "kim" is also the email of client 0`,
		`inbound "ss22-relay": Shadowsocks 2022 relay`,
		`inbound "hy-in": protocol "hysteria" with 1 client(s)`,
		`inbound "ss-nobody": single-user inbound without email`,
		`api.listen "0.0.0.0:10085": Xray's API is reachable from beyond this machine`,
		`1 user(s) of level 2, but policy.levels."2"`,
	)
	var emails []string
	for _, u := range c.Users() {
		emails = append(emails, u.Inbound+"/"+u.Email)
	}
	if want := []string{"/alice", "/staff", "trojan-in/alice", "trojan-in/bob", "ss-in/Kim", "ss-in/kim", "ss22-relay/relayed"}; !slices.Equal(emails, want) {
		t.Errorf("users %q, want %q", emails, want)
	}
	for _, u := range c.Users() {
		if err := quota.ValidName(u.Email); err != nil {
			t.Error(err)
		}
		if want := u.Inbound != "" && u.Inbound != "ss22-relay"; u.Alterable() != want {
			t.Errorf("%s/%s: Alterable() = %v", u.Inbound, u.Email, !want)
		}
	}
	if c.API != "127.0.0.1:10085" {
		t.Errorf("API = %q, want 0.0.0.0 dialled as 127.0.0.1", c.API)
	}
	p := c.Problems[1]
	if p.File != "testdata/problems.json" || p.Inbound != "" || p.Pos != 0 || p.Index != 1 {
		t.Errorf("problem %+v", p)
	}
	if p.Error() != p.String() {
		t.Error("Error() != String()")
	}
}

func TestSyntaxError(t *testing.T) {
	_, err := Load([]string{"testdata/bad.json"}, "")
	if !errors.Is(err, ErrSyntax) {
		t.Fatalf("err = %v, want ErrSyntax", err)
	}
	// Lines and columns of the file as written, comments included.
	if !strings.Contains(err.Error(), "testdata/bad.json:10:6: invalid character ']'") {
		t.Errorf("err = %v, want it at testdata/bad.json:10:6", err)
	}
}

func TestDecodeErrors(t *testing.T) {
	for _, tc := range []struct {
		name, data string
		want       error
		msg        string
	}{
		{"empty", "", ErrSyntax, "test.json: no JSON value"},
		{"comments only", "// nothing\n/* here */ # at all", ErrSyntax, "no JSON value"},
		{"unterminated", "{\n  \"inbounds\": [\n", ErrSyntax, "test.json:3:1: unexpected end of file"},
		{"trailing comma", "{\"log\": {},\n}", ErrSyntax, "test.json:2:1: invalid character '}'"},
		{"after comment", "/* a\nb */ {\"x\": 1 2}", ErrSyntax, "test.json:2:14: invalid character '2'"},
		{"column in characters", "{\"é\": \"ü\" 1}", ErrSyntax, "test.json:1:11:"},
		{"single quotes", "{'log': {}}", ErrSyntax, "test.json:1:2:"},
		{"wrong type", "{\n \"inbounds\": {}}", ErrInvalid, "test.json:2:14: inbounds: got a JSON object, want an array"},
		{"wrong type deep", "{\"inbounds\": [{\"tag\": 5}]}", ErrInvalid, "test.json:1:23: inbounds.tag: got a JSON number, want a string"},
		{"not an object", "[]", ErrInvalid, "test.json:1:1: the config: got a JSON array, want an object"},
		{"level type", `{"inbounds": [{"tag": "t", "protocol": "trojan", "settings": {"clients": [{"password": "p", "level": 300}]}}]}`,
			ErrInvalid, `test.json: inbound "t": settings.clients.level: got a JSON number 300, want a whole number from 0 to 255`},
		{"vless level type", `{"inbounds": [{"tag": "t", "protocol": "vless", "settings": {"clients": [{"id": "x", "level": "1"}]}}]}`,
			ErrInvalid, `inbound "t": settings.clients[0].level: got a JSON string, want a whole number`},
		{"vmess id type, second client", `{"inbounds": [{"tag": "t", "protocol": "vmess", "settings": {"clients": [{"id": "2033d348-ecb9-4486-a427-7dafdd8435cf", "email": "a"}, {"id": 5, "email": "b"}]}}]}`,
			ErrInvalid, `inbound "t": settings.clients[1].id: got a JSON number, want a string`},
		{"bad port", `{"inbounds": [{"protocol": "vless", "port": "44x"}]}`, ErrInvalid, `untagged inbound inbounds[0]: port "44x": invalid port "44x"`},
		{"bad port type", `{"inbounds": [{"tag": "t", "protocol": "vless", "port": true}]}`, ErrInvalid, `inbound "t": port true: want a number or a string`},
		{"duplicate tag", `{"inbounds": [{"tag": "a", "protocol": "socks"}, {"tag": "a", "protocol": "vmess"}]}`,
			ErrInvalid, `test.json: inbounds[1]: tag "a" is also the tag of inbounds[0] of test.json`},
		{"duplicate vless email", `{"inbounds": [{"tag": "t", "protocol": "vless", "settings": {"clients": [{"id": "a", "email": "Bob"}, {"id": "b", "email": "bob"}]}}]}`,
			ErrInvalid, `settings.clients[1]: email "bob" is also the email of client 0`},
		{"duplicate trojan email", `{"inbounds": [{"tag": "t", "protocol": "trojan", "settings": {"clients": [{"password": "a", "email": "x"}, {"password": "b", "email": "x"}]}}]}`,
			ErrInvalid, `settings.clients[1]: email "x" is also the email of client 0`},
		{"bad uuid", `{"inbounds": [{"tag": "t", "protocol": "vmess", "settings": {"clients": [{"id": "2033d348-ecb9-4486-a427-7dafdd8435cZ", "email": "x"}]}}]}`,
			ErrInvalid, `settings.clients[0]: id "2033d348-ecb9-4486-a427-7dafdd8435cZ" is no UUID`},
		{"empty uuid", `{"inbounds": [{"tag": "t", "protocol": "vless", "settings": {"clients": [{"email": "x"}]}}]}`,
			ErrInvalid, `settings.clients[0]: id "" is no UUID`},
		{"trojan flow", `{"inbounds": [{"tag": "t", "protocol": "trojan", "settings": {"clients": [{"password": "a", "flow": "xtls-rprx-direct"}]}}]}`,
			ErrInvalid, `no longer takes a flow`},
		{"trojan null client", `{"inbounds": [{"tag": "t", "protocol": "trojan", "settings": {"clients": [null]}}]}`,
			ErrInvalid, `settings.clients[0] is null`},
		{"ss client without method", `{"inbounds": [{"tag": "t", "protocol": "shadowsocks", "settings": {"method": "aes-128-gcm", "clients": [{"password": "a", "email": "x"}]}}]}`,
			ErrInvalid, `settings.clients[0]: no "method"`},
		{"ss client with none", `{"inbounds": [{"tag": "t", "protocol": "shadowsocks", "settings": {"clients": [{"method": "none", "password": "a", "email": "x"}]}}]}`,
			ErrInvalid, `method "none" is no AEAD method`},
		{"ss single unknown method", `{"inbounds": [{"tag": "t", "protocol": "shadowsocks", "settings": {"method": "aes-256-cfb", "password": "a"}}]}`,
			ErrInvalid, `settings.method "aes-256-cfb" is no Shadowsocks method`},
		{"ss single no password", `{"inbounds": [{"tag": "t", "protocol": "shadowsocks", "settings": {"method": "aes-256-gcm"}}]}`,
			ErrInvalid, `settings.password is empty`},
		{"ss2022 client method", `{"inbounds": [{"tag": "t", "protocol": "shadowsocks", "settings": {"method": "2022-blake3-aes-128-gcm", "password": "k", "clients": [{"method": "aes-128-gcm", "password": "k", "email": "x"}]}}]}`,
			ErrInvalid, `has no method of its own`},
		{"ss2022 multi chacha", `{"inbounds": [{"tag": "t", "protocol": "shadowsocks", "settings": {"method": "2022-blake3-chacha20-poly1305", "password": "k", "clients": [{"password": "k", "email": "x"}]}}]}`,
			ErrInvalid, `takes 2022-blake3-aes-*-gcm only`},
		{"api without tag", `{"api": {"listen": "127.0.0.1:1"}}`, ErrInvalid, `test.json: api.tag is empty`},
		{"policy level key", `{"policy": {"levels": {"x": {}}}}`, ErrInvalid, `test.json:1:`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("test.json", []byte(tc.data))
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Parse = %v, %v; want %v containing %q", c, err, tc.want, tc.msg)
			}
		})
	}
}

// What Xray's comment filter accepts, this package accepts: see
// TestXrayAccepts for the proof against Xray itself.
func TestComments(t *testing.T) {
	for _, tc := range []struct{ in, out string }{
		{`{"a": 1} // c`, `{"a": 1} `},
		{"{\"a\": 1, # c\n\"b\": 2}", "{\"a\": 1, \n\"b\": 2}"},
		{"/* a\n * b */{}", "\n{}"},
		{`{"a": "// # /* not comments */"}`, `{"a": "// # /* not comments */"}`},
		{`{"a": "\"//"} //x`, `{"a": "\"//"} `},
		{`{"a": 44/**/3}`, `{"a": 443}`},
		{`{"a": 1/***/}`, `{"a": 1}`},
		{`{"a": 1/*/ still **/}`, `{"a": 1}`},
		{`'#//' # c`, `'#//' `},
		{`\# x`, `\# x`},
		{`/x/y`, `/x`}, // Xray's filter stays "after a slash"
		{`{}/`, `{}`},
	} {
		if got := string(stripComments([]byte(tc.in), nil)); got != tc.out {
			t.Errorf("stripComments(%q) = %q, want %q", tc.in, got, tc.out)
		}
	}
	// Text after the config is ignored, as by Xray.
	c := parse(t, `{"inbounds": [{"tag": "t", "protocol": "trojan", "port": 44/* */3,
		"settings": {"clients": [{"password": "a#b//c", "email": "e"}]}}]} and then } some ] garbage`)
	if u := c.Users(); len(u) != 1 || u[0].Account() != (xraystats.Trojan{Password: "a#b//c"}) || c.Inbounds[0].Port != 443 {
		t.Errorf("users %+v, port %d", u, c.Inbounds[0].Port)
	}
}

func TestMerge(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	a := write("a.json", `{"api": {"tag": "api", "listen": "127.0.0.1:1"}, "inbounds": [
		{"protocol": "trojan", "port": 1, "settings": {"clients": [{"password": "p", "email": "one"}]}},
		{"tag": "x", "protocol": "trojan", "port": 2, "settings": {"clients": [{"password": "p", "email": "two"}]}},
		{"protocol": "trojan", "port": 3, "settings": {"clients": [{"password": "p", "email": "three"}]}}]}`)
	b := write("b.jsonc", `// .jsonc is read too
		{"api": null, "inbounds": [
		{"protocol": "vmess", "port": 4, "settings": {"clients": [{"id": "abc", "email": "four"}]}},
		{"tag": "y", "protocol": "trojan", "port": 5, "settings": {}},
		{"tag": "y", "protocol": "trojan", "port": 6, "settings": {"clients": [{"password": "p", "email": "six"}]}}]}`)
	c, err := LoadFiles(a, b)
	if err != nil {
		t.Fatal(err)
	}
	// The untagged inbound of b replaces the first untagged one of a; the
	// second "y" of b replaces the first, appended by b itself.
	var ports []int
	for _, in := range c.Inbounds {
		ports = append(ports, in.Port)
	}
	if !slices.Equal(ports, []int{4, 2, 3, 6}) {
		t.Errorf("ports %v, want [4 2 3 6]", ports)
	}
	if c.API != "127.0.0.1:1" {
		t.Errorf("API %q: \"api\": null must not replace a's", c.API)
	}
	c2, err := Load(nil, dir)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(c2.Inbounds, c.Inbounds) || !slices.Equal(c2.Files, []string{a, b}) {
		t.Errorf("Load(dir) differs from LoadFiles: %q", c2.Files)
	}
	// A duplicate tag within the first file is refused, as by Xray; in a
	// later file, the second replaces the first.
	write("c.json", `{"inbounds": [{"tag": "z", "protocol": "socks"}, {"tag": "z", "protocol": "socks"}]}`)
	if _, err := LoadFiles(filepath.Join(dir, "c.json"), a); !errors.Is(err, ErrInvalid) {
		t.Errorf("duplicate tag in the first file: %v", err)
	}
	if _, err := LoadFiles(a, filepath.Join(dir, "c.json")); err != nil {
		t.Errorf("duplicate tag in a later file replaces: %v", err)
	}
}

func TestMissing(t *testing.T) {
	_, err := Load([]string{"testdata/none.json", "testdata/nothing.json"}, "")
	if !errors.Is(err, ErrNoConfig) || !strings.Contains(err.Error(), "testdata/none.json, testdata/nothing.json") {
		t.Errorf("missing paths: %v", err)
	}
	c, err := Load([]string{"testdata/none.json", "testdata", "testdata/api-listen.json", "testdata/3x-ui.json"}, "")
	if err != nil || !slices.Equal(c.Files, []string{"testdata/api-listen.json"}) {
		t.Errorf("first existing file: %v, %v", c, err)
	}
	if _, err := Load(nil, "testdata/nodir"); !errors.Is(err, ErrNoConfig) || !strings.Contains(err.Error(), "testdata/nodir") {
		t.Errorf("missing dir: %v", err)
	}
	empty := t.TempDir()
	os.WriteFile(filepath.Join(empty, "x.txt"), []byte("{}"), 0o600)
	os.WriteFile(filepath.Join(empty, ".json"), []byte("{}"), 0o600)
	if _, err := Load(nil, empty); !errors.Is(err, ErrNoConfig) || !strings.Contains(err.Error(), "no *.json or *.jsonc files in "+empty) {
		t.Errorf("empty dir: %v", err)
	}
	os.WriteFile(filepath.Join(empty, "y.yaml"), []byte("inbounds: []"), 0o600)
	if _, err := Load(nil, empty); !errors.Is(err, ErrUnsupported) {
		t.Errorf("yaml in dir: %v", err)
	}
	if _, err := LoadFiles("testdata/3x-ui.json", "testdata/none.json"); !errors.Is(err, ErrNoConfig) {
		t.Errorf("LoadFiles with a missing file: %v", err)
	}
	if _, err := LoadFiles(); !errors.Is(err, ErrNoConfig) {
		t.Errorf("LoadFiles(): %v", err)
	}
	if _, err := LoadFiles("/dev/null"); !errors.Is(err, ErrInvalid) {
		t.Errorf("LoadFiles(/dev/null): %v, want ErrInvalid: not a regular file", err)
	}
}

func TestAPIForms(t *testing.T) {
	const routed = `"routing": {"rules": [{"type": "field", "inboundTag": ["x", "api"], "outboundTag": "api"}]}`
	for _, tc := range []struct {
		name, data, api, problem string
	}{
		{"none", `{}`, "", ""},
		{"listen", `{"api": {"tag": "api", "listen": "127.0.0.1:10085"}}`, "127.0.0.1:10085", ""},
		{"listen localhost", `{"api": {"tag": "api", "listen": "localhost:10085"}}`, "localhost:10085", ""},
		{"listen all", `{"api": {"tag": "api", "listen": ":10085"}}`, "127.0.0.1:10085", "reachable from beyond this machine"},
		{"listen all v6", `{"api": {"tag": "api", "listen": "[::]:10085"}}`, "[::1]:10085", "reachable from beyond"},
		{"listen v6 loopback", `{"api": {"tag": "api", "listen": "[::1]:10085"}}`, "[::1]:10085", ""},
		{"listen public", `{"api": {"tag": "api", "listen": "192.0.2.1:10085"}}`, "192.0.2.1:10085", "reachable from beyond"},
		{"listen bad", `{"api": {"tag": "api", "listen": "10085"}}`, "", `api.listen "10085" is no host:port`},
		{"inbound", `{"api": {"tag": "api"}, "inbounds": [{"tag": "api", "listen": "127.0.0.1", "port": 62789, "protocol": "dokodemo-door"}], ` + routed + `}`,
			"127.0.0.1:62789", ""},
		{"inbound string port", `{"api": {"tag": "api"}, "inbounds": [{"tag": "api", "listen": "127.0.0.1", "port": "62789", "protocol": "tunnel"}], ` + routed + `}`,
			"127.0.0.1:62789", ""},
		{"inbound comma rule", `{"api": {"tag": "api"}, "inbounds": [{"tag": "api", "listen": "127.0.0.1", "port": 1, "protocol": "dokodemo-door"}],
			"routing": {"rules": [{"inboundTag": "a,api", "outboundTag": "api"}]}}`, "127.0.0.1:1", ""},
		{"inbound no listen", `{"api": {"tag": "api"}, "inbounds": [{"tag": "api", "port": 62789, "protocol": "dokodemo-door"}], ` + routed + `}`,
			"127.0.0.1:62789", `inbound "api": the API inbound listens on 0.0.0.0:62789`},
		{"inbound unix", `{"api": {"tag": "api"}, "inbounds": [{"tag": "api", "listen": "/run/xray/api.sock", "protocol": "dokodemo-door"}], ` + routed + `}`,
			"unix:/run/xray/api.sock", ""},
		{"inbound env", `{"api": {"tag": "api"}, "inbounds": [{"tag": "api", "listen": "127.0.0.1", "port": "env:API_PORT", "protocol": "dokodemo-door"}]}`,
			"", "environment variable"},
		{"inbound no port", `{"api": {"tag": "api"}, "inbounds": [{"tag": "api", "listen": "127.0.0.1", "protocol": "dokodemo-door"}]}`,
			"", "has no port"},
		{"inbound not routed", `{"api": {"tag": "api"}, "inbounds": [{"tag": "api", "listen": "127.0.0.1", "port": 1, "protocol": "dokodemo-door"}],
			"routing": {"rules": [{"inboundTag": ["api"], "outboundTag": "direct"}]}}`, "127.0.0.1:1", `no routing rule sends inbound "api" to outbound "api"`},
		{"no inbound", `{"api": {"tag": "api", "services": ["StatsService"]}}`, "", `no inbound has the tag "api"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := parse(t, tc.data)
			if c.API != tc.api {
				t.Errorf("API = %q, want %q", c.API, tc.api)
			}
			ps := strings.Join(problemStrings(c), "\n")
			if (tc.problem == "") != (ps == "") || !strings.Contains(ps, tc.problem) {
				t.Errorf("problems %q, want one with %q", ps, tc.problem)
			}
		})
	}
}

func TestChanged(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("a.json", `{"inbounds": []}`)
	c := mustLoad(t, nil, dir)
	if c.Changed() {
		t.Fatal("changed right after Load")
	}
	write("a.json", `{"inbounds": [ ]}`) // another size
	if !c.Changed() {
		t.Error("not changed after a write")
	}
	c = mustLoad(t, nil, dir)
	// Replaced by a file of the same size (and, likely, modification time).
	write("a.json.tmp", `{"inbounds": [ ]}`)
	if c.Changed() {
		t.Error("changed by a file that is no config file")
	}
	if err := os.Rename(filepath.Join(dir, "a.json.tmp"), filepath.Join(dir, "a.json")); err != nil {
		t.Fatal(err)
	}
	if !c.Changed() {
		t.Error("not changed after a replace")
	}
	c = mustLoad(t, nil, dir)
	write("b.json", `{}`)
	if !c.Changed() {
		t.Error("not changed after a new file")
	}
	c = mustLoad(t, nil, dir)
	os.Remove(filepath.Join(dir, "b.json"))
	if !c.Changed() {
		t.Error("not changed after a file went")
	}

	// Paths: a file earlier in the list appears.
	first, second := filepath.Join(dir, "first.json"), filepath.Join(dir, "a.json")
	c = mustLoad(t, []string{first, second}, "")
	if c.Changed() {
		t.Error("changed right after Load")
	}
	write("first.json", `{}`)
	if !c.Changed() {
		t.Error("not changed after an earlier path appeared")
	}
	if parse(t, `{}`).Changed() {
		t.Error("a parsed config changed")
	}
}

// TestXrayAccepts runs Xray on the test configs: they are configs that Xray
// itself accepts (and bad.json one it refuses, at the same place), and it
// merges the config directory and reads comments as this package does.
func TestXrayAccepts(t *testing.T) {
	bin := os.Getenv("XRAY_BIN")
	if bin == "" {
		bin = "/usr/local/bin/xray"
	}
	if _, err := os.Stat(bin); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("no Xray binary at %s (set XRAY_BIN): %v", bin, err)
		}
		t.Skipf("no Xray binary at %s (set XRAY_BIN): %v", bin, err)
	}
	xray := func(args ...string) (string, error) {
		cmd := exec.Command(bin, append([]string{"run"}, args...)...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		if err != nil {
			return stdout.String() + stderr.String(), err
		}
		return stdout.String(), nil
	}
	for _, f := range []string{"3x-ui.json", "api-listen.json", "problems.json"} {
		if out, err := xray("-test", "-c", filepath.Join("testdata", f)); err != nil {
			t.Errorf("xray -test %s: %v\n%s", f, err, out)
		}
	}
	if out, err := xray("-test", "-confdir", "testdata/confdir"); err != nil {
		t.Errorf("xray -test -confdir testdata/confdir: %v\n%s", err, out)
	}
	if out, err := xray("-test", "-c", "testdata/bad.json"); err == nil || !strings.Contains(out, "line 10 char 6") {
		t.Errorf("xray -test bad.json: %v, want it refused at line 10 char 6:\n%s", err, out)
	}

	// Xray's own merge of the directory, and its reading of comments.
	type dumped struct {
		Inbounds []struct {
			Tag      string          `json:"tag"`
			Port     json.RawMessage `json:"port"`
			Settings struct {
				Clients []struct {
					Email    string `json:"email"`
					Password string `json:"password"`
				} `json:"clients"`
			} `json:"settings"`
		} `json:"inbounds"`
	}
	dump := func(args ...string) dumped {
		t.Helper()
		out, err := xray(append([]string{"-dump"}, args...)...)
		if err != nil {
			t.Fatalf("xray -dump %q: %v\n%s", args, err, out)
		}
		var d dumped
		// The dump follows Xray's log lines.
		if i := strings.Index(out, "\n{"); i >= 0 {
			out = out[i+1:]
		}
		if err := json.Unmarshal([]byte(out), &d); err != nil {
			t.Fatalf("xray -dump %q: %v\n%s", args, err, out)
		}
		return d
	}
	d := dump("-confdir", "testdata/confdir")
	c := mustLoad(t, nil, "testdata/confdir")
	var xrayTags []string
	for _, in := range d.Inbounds {
		if in.Tag != "api" {
			xrayTags = append(xrayTags, in.Tag+":"+string(in.Port))
		}
	}
	var ourTags []string
	for _, in := range c.Inbounds {
		ourTags = append(ourTags, in.Tag+":"+strconv.Itoa(in.Port))
	}
	if !slices.Equal(xrayTags, ourTags) {
		t.Errorf("xray merged inbounds %q, we %q", xrayTags, ourTags)
	}

	tricky := filepath.Join(t.TempDir(), "tricky.json")
	os.WriteFile(tricky, []byte(`# comments
		{"inbounds": [{"tag": "t", "listen": "127.0.0.1", "protocol": "trojan", "port": 44/* */3, // 443
		"settings": {"clients": [{"password": "a#b//c/*d*/", "email": "e"}]}}]} and then } some ] garbage`), 0o600)
	d = dump("-c", tricky)
	c = mustLoad(t, []string{tricky}, "")
	if len(d.Inbounds) != 1 || string(d.Inbounds[0].Port) != "443" || d.Inbounds[0].Settings.Clients[0].Password != "a#b//c/*d*/" {
		t.Fatalf("xray read %+v", d)
	}
	if u := c.Users(); len(u) != 1 || u[0].Account() != (xraystats.Trojan{Password: "a#b//c/*d*/"}) || c.Inbounds[0].Port != 443 {
		t.Errorf("we read %+v", c.Inbounds)
	}
}

func FuzzParse(f *testing.F) {
	for _, name := range []string{"3x-ui.json", "api-listen.json", "problems.json", "bad.json",
		"confdir/00_base.json", "confdir/10_users.json", "confdir/20_override.json"} {
		b, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	for _, s := range []string{"", "{", "/*", "/", "#", "'", `"\`, "{}/", "{\"inbounds\":[{\"port\":\"1-2,env:X\"}]}", "\xff\xfe{}"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse("fuzz.json", data)
		if err != nil {
			if !errors.Is(err, ErrSyntax) && !errors.Is(err, ErrInvalid) {
				t.Fatalf("error wraps no sentinel: %v", err)
			}
			return
		}
		n := 0
		for _, in := range c.Inbounds {
			for _, u := range in.Users {
				n++
				if err := quota.ValidName(u.Email); err != nil {
					t.Fatal(err)
				}
				if u.Inbound != in.Tag || u.Protocol != in.Protocol || !u.Protocol.Xray() {
					t.Fatalf("user %+v of inbound %q %s", u, in.Tag, in.Protocol)
				}
			}
		}
		if len(c.Users()) != n {
			t.Fatalf("Users() has %d users, the inbounds %d", len(c.Users()), n)
		}
		for _, p := range c.Problems {
			_ = p.String()
		}
	})
}

// TestAccessLog: the access log's file is log.access unless Xray writes none
// to a file; a later file's "log" replaces the earlier one as a whole.
func TestAccessLog(t *testing.T) {
	for _, tc := range []struct {
		config, want, mask string
	}{
		{`{}`, "", ""},
		{`{"log": null}`, "", ""},
		{`{"log": {}}`, "", ""},
		{`{"log": {"loglevel": "warning"}}`, "", ""},
		{`{"log": {"access": "/var/log/xray/access.log"}}`, "/var/log/xray/access.log", ""},
		{`{"log": {"access": "/var/log/xray/access.log", "loglevel": "debug"}}`, "/var/log/xray/access.log", ""},
		{`{"log": {"access": "./access.log"}}`, "./access.log", ""}, // 3x-ui's, relative to Xray's directory
		{`{"log": {"access": "none"}}`, "", ""},
		{`{"log": {"access": ""}}`, "", ""}, // Xray's standard output
		{`{"log": {"access": "/var/log/xray/access.log", "loglevel": "none"}}`, "", ""},
		{`{"log": {"access": "/var/log/xray/access.log", "loglevel": "None"}}`, "", ""},
		{`{"LOG": {"Access": "/a.log", "maskAddress": "half"}}`, "/a.log", "half"},
		{`/* comment */ {"log": {"access": "/a.log" /* comment */, "maskAddress": "/16+/64"}}`, "/a.log", "/16+/64"},
	} {
		c := parse(t, tc.config)
		if c.AccessLog != tc.want || c.LogMaskAddress != tc.mask {
			t.Errorf("%s: AccessLog %q, LogMaskAddress %q; want %q, %q", tc.config, c.AccessLog, c.LogMaskAddress, tc.want, tc.mask)
		}
		if len(c.Problems) != 0 {
			t.Errorf("%s: problems %q", tc.config, problemStrings(c))
		}
	}
	if _, err := Parse("test.json", []byte(`{"log": {"access": 5}}`)); !errors.Is(err, ErrInvalid) {
		t.Errorf(`"access": 5: %v, want ErrInvalid`, err)
	}
	if c := mustLoad(t, []string{"testdata/3x-ui.json"}, ""); c.AccessLog != "" {
		t.Errorf("3x-ui.json (access none): AccessLog %q", c.AccessLog)
	}

	dir := t.TempDir()
	write := func(name, data string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	a := write("a.json", `{"log": {"access": "/a.log", "maskAddress": "full"}}`)
	b := write("b.json", `{"log": {"loglevel": "info"}}`)
	n := write("n.json", `{"log": null, "inbounds": []}`)
	for _, tc := range []struct {
		files      []string
		want, mask string
	}{
		{[]string{a}, "/a.log", "full"},
		{[]string{a, n}, "/a.log", "full"}, // "log": null replaces nothing
		{[]string{a, b}, "", ""},           // b's "log" replaces a's as a whole
		{[]string{b, a}, "/a.log", "full"},
	} {
		c, err := LoadFiles(tc.files...)
		if err != nil {
			t.Fatal(err)
		}
		if c.AccessLog != tc.want || c.LogMaskAddress != tc.mask {
			t.Errorf("%q: AccessLog %q, LogMaskAddress %q; want %q, %q", tc.files, c.AccessLog, c.LogMaskAddress, tc.want, tc.mask)
		}
	}
}

// An inbound's transport and PROXY protocol say whether the address Xray
// logs for a connection is its socket's peer.
func TestTransport(t *testing.T) {
	for _, tc := range []struct {
		stream  string
		network string
		proxied bool
	}{
		{``, "raw", false},
		{`, "streamSettings": null`, "raw", false},
		{`, "streamSettings": {"network": "tcp", "security": "tls"}`, "raw", false},
		{`, "streamSettings": {"network": "RAW"}`, "raw", false},
		{`, "streamSettings": {"network": "ws", "wsSettings": {"path": "/v"}}`, "ws", false},
		{`, "streamSettings": {"network": "grpc"}`, "grpc", false},
		{`, "streamSettings": {"network": "splithttp"}`, "xhttp", false},
		{`, "streamSettings": {"network": "mkcp"}`, "kcp", false},
		{`, "streamSettings": {"sockopt": {"acceptProxyProtocol": true}}`, "raw", true},
		{`, "streamSettings": {"network": "tcp", "tcpSettings": {"acceptProxyProtocol": true}}`, "raw", true},
		{`, "streamSettings": {"network": "raw", "rawSettings": {"acceptProxyProtocol": true}}`, "raw", true},
		{`, "streamSettings": {"network": "ws", "sockopt": {"acceptProxyProtocol": false}}`, "ws", false},
	} {
		c := parse(t, `{"inbounds": [{"tag": "in", "protocol": "vless", "port": 443, "settings": {"clients": [{"id": "27848739-7e62-4138-9fd3-098a63964b6b", "email": "a"}]}`+tc.stream+`}]}`)
		in, ok := c.Inbound("in")
		if !ok {
			t.Fatalf("%s: no inbound", tc.stream)
		}
		if in.Network != tc.network || in.ProxyProtocol != tc.proxied {
			t.Errorf("%s: Network %q, ProxyProtocol %v; want %q, %v", tc.stream, in.Network, in.ProxyProtocol, tc.network, tc.proxied)
		}
	}
	if _, err := Parse("test.json", []byte(`{"inbounds": [{"protocol": "vless", "streamSettings": {"network": 5}}]}`)); !errors.Is(err, ErrInvalid) {
		t.Errorf(`"network": 5: %v, want ErrInvalid`, err)
	}
}

// UDP: a Shadowsocks inbound takes UDP where its settings.network says so
// (tcp alone by default), any inbound on a UDP transport; VLESS carries its
// users' UDP inside TCP.
func TestUDP(t *testing.T) {
	ss := func(network string) string {
		return `{"inbounds": [{"tag": "in", "protocol": "shadowsocks", "port": 8388, "settings": {` + network +
			`"method": "aes-256-gcm", "password": "p", "email": "a"}}]}`
	}
	for _, tc := range []struct {
		config string
		udp    bool
	}{
		{ss(``), false},
		{ss(`"network": null, `), false},
		{ss(`"network": "tcp", `), false},
		{ss(`"network": "tcp,udp", `), true},
		{ss(`"network": "UDP", `), true},
		{ss(`"network": ["tcp", "udp"], `), true},
		{`{"inbounds": [{"tag": "in", "protocol": "vless", "port": 443, "settings": {"clients": [{"id": "27848739-7e62-4138-9fd3-098a63964b6b", "email": "a"}]}}]}`, false},
		{`{"inbounds": [{"tag": "in", "protocol": "vless", "port": 443, "settings": {"clients": [{"id": "27848739-7e62-4138-9fd3-098a63964b6b", "email": "a"}]}, "streamSettings": {"network": "mkcp"}}]}`, true},
	} {
		in, ok := parse(t, tc.config).Inbound("in")
		if !ok || in.UDP != tc.udp {
			t.Errorf("%s: %+v, UDP want %v", tc.config, in, tc.udp)
		}
	}
	if _, err := Parse("test.json", []byte(ss(`"network": 5, `))); !errors.Is(err, ErrInvalid) {
		t.Errorf(`"network": 5: %v, want ErrInvalid`, err)
	}
}

// ConnIdle is the longest connIdle of the policy's levels, Xray's 300 s
// where none is set.
func TestConnIdle(t *testing.T) {
	for _, tc := range []struct {
		config string
		want   time.Duration
	}{
		{`{}`, 300 * time.Second},
		{`{"policy": {"levels": {"0": {"statsUserUplink": true}}}}`, 300 * time.Second},
		{`{"policy": {"levels": {"0": {"connIdle": 600}}}}`, 600 * time.Second},
		{`{"policy": {"levels": {"0": {"connIdle": 120}, "1": {"connIdle": 900}}}}`, 900 * time.Second},
		{`{"policy": {"levels": {"0": {"connIdle": 60}}}}`, 300 * time.Second}, // level 0 sets it lower; the default bounds the others
	} {
		if got := parse(t, tc.config).ConnIdle; got != tc.want {
			t.Errorf("%s: ConnIdle %v, want %v", tc.config, got, tc.want)
		}
	}
}

// wantUser is a User as a test states it: its account unpacked.
type wantUser struct {
	Email    string
	Protocol quota.Protocol
	Inbound  string
	Account  xraystats.Account
	Level    uint32
}

// view returns us as wantUsers.
func view(us []User) []wantUser {
	var out []wantUser
	for _, u := range us {
		out = append(out, wantUser{u.Email, u.Protocol, u.Inbound, u.Account(), u.Level})
	}
	return out
}
