package config_test

import (
	"errors"
	"flag"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/nft"
	"github.com/myvpn/bwagent/quota"
)

var update = flag.Bool("update", false, "rewrite example.toml from Default().String()")

// file is the name the tests give to Parse, as Load would.
const file = "/etc/bwagent/bwagent.toml"

// full sets every key to a value other than its default.
const full = `# every key, none at its default
interval = 3 # whole seconds
warning_percent = 90.5
metric = "upload"
timezone = "Asia/Jakarta"
json_interval = "1m30s"
retention = "30d"

[paths]
limits = "/srv/bw/limits.conf"
usage_dir = "/srv/bw/usage"
marker_dir = "/srv/bw/blocked"
block_log = "/var/log/bwagent/blocked.log"
state_db = "/srv/bw/state.db"
socket = "/run/bw.sock"
passwd = "/srv/passwd"

[ssh]
enabled = false
uid_min = 2000
uid_max = 60000
exclude = ["ubuntu", "backup$", "svc.deploy"]
sessions = false
servers = ["/opt/dropbear/sbin/dropbear"]
auth_logs = ["/var/log/secure", "journal:vpn", "/var/log/dropbear.log"]

[kernel]
pin_path = "/sys/fs/bpf/bw2"
cgroup = "/sys/fs/cgroup/vpn.slice"
max_uids = 1048576
protected_uids = [0, 1001, 4294967295]

[nft]
table = "bw_2"
set = "Blocked-UIDs"
chain = "_out"

[xray]
enabled = false
configs = ["/opt/xray/config.json", "/etc/xray/a b.json"]
config_dir = "/opt/xray/conf.d"
api = "[::1]:10085"
timeout = "1s"
connections = false

[devices]
default = 3
ipv6_prefix = 56
cut = "oldest"

[speed]
default = "20mbit"
throttle = "10mbit/1.5mbit"

[control]
admin_group = "vpnadmin"

[metrics]
listen = "[::1]:0"
per_user = true
per_user_max = 50000
[fleet]
database = "postgres://bwagent:secret@db.example:5432/bwagent"
node = "vpn-sg-1"
[notify]
node = "vpn-sg-1"
thresholds = [50, 75, 99]
expiry_days = 7
max_age = "6h"

[[notify.webhook]]
url = "https://hooks.example.com/bw?token=x"
secret = "s3cret"
timeout = "30s"
events = ["block", "failed"]

[[notify.webhook]]
url = "http://127.0.0.1:8080/"

[[notify.exec]]
command = ["/usr/local/bin/on-event", "--verbose", "a b"]
timeout = "2m"
events = ["threshold"]

[[notify.telegram]]
token = "123456:ABC-DEF_ghi"
chats = [123456789, -1001234567890, "@vpn_alerts", "42"]
api = "http://127.0.0.1:8081"
timeout = "5s"
events = ["block", "expiring", "recovered"]
`

func fullConfig(t testing.TB) config.Config {
	jakarta, err := time.LoadLocation("Asia/Jakarta")
	if err != nil {
		t.Fatal(err)
	}
	return config.Config{
		Interval:       3 * time.Second,
		WarningPercent: 90.5,
		Metric:         config.MetricUpload,
		TimeZone:       jakarta,
		TimeZoneName:   "Asia/Jakarta",
		JSONInterval:   90 * time.Second,
		Retention:      30 * 24 * time.Hour,
		Paths: config.Paths{
			Limits:    "/srv/bw/limits.conf",
			UsageDir:  "/srv/bw/usage",
			MarkerDir: "/srv/bw/blocked",
			BlockLog:  "/var/log/bwagent/blocked.log",
			StateDB:   "/srv/bw/state.db",
			Socket:    "/run/bw.sock",
			Passwd:    "/srv/passwd",
		},
		SSH: config.SSH{
			Enabled:  false,
			UIDMin:   2000,
			UIDMax:   60000,
			Exclude:  []string{"ubuntu", "backup$", "svc.deploy"},
			Servers:  []string{"/opt/dropbear/sbin/dropbear"},
			AuthLogs: []string{"/var/log/secure", "journal:vpn", "/var/log/dropbear.log"},
		},
		Kernel: config.Kernel{
			PinPath:       "/sys/fs/bpf/bw2",
			Cgroup:        "/sys/fs/cgroup/vpn.slice",
			MaxUIDs:       1 << 20,
			ProtectedUIDs: []uint32{0, 1001, 4294967295},
		},
		NFT: config.NFT{Table: "bw_2", Set: "Blocked-UIDs", Chain: "_out"},
		Xray: config.Xray{
			Enabled:     false,
			Configs:     []string{"/opt/xray/config.json", "/etc/xray/a b.json"},
			ConfigDir:   "/opt/xray/conf.d",
			API:         "[::1]:10085",
			Timeout:     time.Second,
			Connections: false,
		},
		Devices: config.Devices{Default: 3, IPv6Prefix: 56, Cut: config.CutOldest},
		Speed:   config.Speed{Default: quota.Speed{Down: 20e6, Up: 20e6}, Throttle: quota.Speed{Down: 10e6, Up: 1.5e6}},
		Control: config.Control{AdminGroup: "vpnadmin"},
		Metrics: config.Metrics{Listen: "[::1]:0", PerUser: true, PerUserMax: 50000},
		Fleet:   config.Fleet{Database: "postgres://bwagent:secret@db.example:5432/bwagent", Node: "vpn-sg-1"},
		Notify: config.Notify{
			Node:       "vpn-sg-1",
			Thresholds: []int{50, 75, 99},
			ExpiryDays: 7,
			MaxAge:     6 * time.Hour,
			Webhooks: []config.Webhook{
				{URL: "https://hooks.example.com/bw?token=x", Secret: "s3cret", Timeout: 30 * time.Second, Events: []string{"block", "failed"}},
				{URL: "http://127.0.0.1:8080/", Timeout: 10 * time.Second},
			},
			Execs: []config.Exec{{Command: []string{"/usr/local/bin/on-event", "--verbose", "a b"}, Timeout: 2 * time.Minute, Events: []string{"threshold"}}},
			Telegrams: []config.Telegram{{Token: "123456:ABC-DEF_ghi", Chats: []string{"123456789", "-1001234567890", "@vpn_alerts", "42"},
				API: "http://127.0.0.1:8081", Timeout: 5 * time.Second, Events: []string{"block", "expiring", "recovered"}}},
		},
	}
}

func mustParse(t *testing.T, data string) config.Config {
	t.Helper()
	c, err := config.Parse(file, []byte(data))
	if err != nil {
		t.Fatalf("Parse:\n%s\nerror: %v", data, err)
	}
	return c
}

func TestDefault(t *testing.T) {
	d := config.Default()
	if err := d.Validate(); err != nil {
		t.Fatalf("Default().Validate() = %v", err)
	}
	for _, data := range []string{"", "\n", "# nothing but a comment\n\n", "[paths]\n[ssh]\n[kernel]\n[nft]\n[xray]\n[devices]\n[control]\n[metrics]\n[notify]\n", "notify.webhook = []\n"} {
		if c := mustParse(t, data); !reflect.DeepEqual(c, d) {
			t.Errorf("Parse(%q) = %+v, want Default() %+v", data, c, d)
		}
	}
	if d.TimeZone != time.Local || d.TimeZoneName != "Local" {
		t.Errorf("default time zone = %v %q, want time.Local", d.TimeZone, d.TimeZoneName)
	}
	// Default returns fresh lists.
	d.Xray.Configs[0] = "/changed"
	if config.Default().Xray.Configs[0] == "/changed" {
		t.Error("Default() shares its Xray.Configs slice")
	}
}

// The defaults shared with the kernel packages stay equal to theirs.
func TestDefaultsMatchPackages(t *testing.T) {
	d := config.Default()
	if d.Kernel.PinPath != bpf.DefaultPinPath || d.Kernel.MaxUIDs != bpf.DefaultMaxUIDs {
		t.Errorf("kernel defaults %q %d, bpf has %q %d", d.Kernel.PinPath, d.Kernel.MaxUIDs, bpf.DefaultPinPath, bpf.DefaultMaxUIDs)
	}
	if d.NFT != (config.NFT{Table: nft.DefaultTable, Set: nft.DefaultSet, Chain: nft.DefaultChain}) {
		t.Errorf("nft defaults %+v, nft has %q %q %q", d.NFT, nft.DefaultTable, nft.DefaultSet, nft.DefaultChain)
	}
}

func TestEveryKey(t *testing.T) {
	got := mustParse(t, full)
	want := fullConfig(t)
	if !got.Equal(want) {
		t.Fatalf("Parse(full) =\n%+v\nwant\n%+v", got, want)
	}
	if got.TimeZone.String() != "Asia/Jakarta" {
		t.Errorf("TimeZone = %v", got.TimeZone)
	}
	// full sets every key the example has, so every key is tested, and
	// every key of the arrays of tables, which the example only shows in
	// comments.
	var fk, fa []string
	for _, k := range leafKeys(t, full) {
		if strings.HasPrefix(k, "notify.webhook.") || strings.HasPrefix(k, "notify.exec.") || strings.HasPrefix(k, "notify.telegram.") {
			fa = append(fa, k)
		} else {
			fk = append(fk, k)
		}
	}
	if ek := leafKeys(t, readExample(t)); !slices.Equal(fk, ek) {
		t.Errorf("full sets %v\nexample has %v", fk, ek)
	}
	fa = slices.Compact(fa)
	if ak := slices.Sorted(slices.Values(config.ArrayKeys())); !slices.Equal(fa, ak) {
		t.Errorf("full sets %v in arrays of tables\nthey have %v", fa, ak)
	}
}

// Each key alone, in its table, keeps every other default.
func TestKeysAlone(t *testing.T) {
	def := config.Default()
	for _, tc := range []struct {
		data string
		want func(c *config.Config)
	}{
		{`interval = "4s"`, func(c *config.Config) { c.Interval = 4 * time.Second }},
		{`interval = 5`, func(c *config.Config) { c.Interval = 5 * time.Second }},
		{`interval = "1500ms"`, func(c *config.Config) { c.Interval = 1500 * time.Millisecond }},
		// The default timeout must stay below half of a 1s interval.
		{`interval = "1s"`, func(c *config.Config) { c.Interval = time.Second; c.Xray.Timeout = 250 * time.Millisecond }},
		{`warning_percent = 100`, func(c *config.Config) { c.WarningPercent = 100 }},
		{`warning_percent = 0.5`, func(c *config.Config) { c.WarningPercent = 0.5 }},
		{`metric = "Download"`, func(c *config.Config) { c.Metric = config.MetricDownload }},
		{`timezone = "UTC"`, func(c *config.Config) { c.TimeZone = time.UTC; c.TimeZoneName = "UTC" }},
		{`json_interval = 600`, func(c *config.Config) { c.JSONInterval = 10 * time.Minute }},
		{`json_interval = "10m"`, func(c *config.Config) { c.JSONInterval = 10 * time.Minute }},
		{`retention = "7d"`, func(c *config.Config) { c.Retention = 7 * 24 * time.Hour }},
		{`retention = "36h"`, func(c *config.Config) { c.Retention = 36 * time.Hour }},
		{"[paths]\nsocket = \"/run/x.sock\"", func(c *config.Config) { c.Paths.Socket = "/run/x.sock" }},
		{"paths.passwd = \"/etc/passwd2\"", func(c *config.Config) { c.Paths.Passwd = "/etc/passwd2" }},
		{"ssh = { uid_min = 500 }", func(c *config.Config) { c.SSH.UIDMin = 500 }},
		{"[ssh]\nuid_min = 1\nuid_max = 2", func(c *config.Config) { c.SSH.UIDMin, c.SSH.UIDMax = 1, 2 }},
		{"[ssh]\nexclude = []", func(c *config.Config) { c.SSH.Exclude = nil }},
		{"[kernel]\nmax_uids = 1", func(c *config.Config) { c.Kernel.MaxUIDs = 1 }},
		{"[nft]\ntable = \"" + strings.Repeat("t", 31) + "\"", func(c *config.Config) { c.NFT.Table = strings.Repeat("t", 31) }},
		{"[xray]\nconfigs = []\napi = \"localhost:10085\"", func(c *config.Config) { c.Xray.Configs = nil; c.Xray.API = "localhost:10085" }},
		{"[xray]\nconfigs = []\nconfig_dir = \"/etc/xray/conf\"", func(c *config.Config) { c.Xray.Configs = nil; c.Xray.ConfigDir = "/etc/xray/conf" }},
		{"[xray]\nenabled = false\nconfigs = []", func(c *config.Config) { c.Xray.Enabled = false; c.Xray.Configs = nil }},
		{"[xray]\napi = \"127.0.0.1:10085\"", func(c *config.Config) { c.Xray.API = "127.0.0.1:10085" }},
		{"[xray]\ntimeout = \"999ms\"", func(c *config.Config) { c.Xray.Timeout = 999 * time.Millisecond }},
		{"interval = \"1s\"\n[xray]\ntimeout = \"499ms\"", func(c *config.Config) { c.Interval = time.Second; c.Xray.Timeout = 499 * time.Millisecond }},
		{"[control]\nadmin_group = \"vpn-admins\"", func(c *config.Config) { c.Control.AdminGroup = "vpn-admins" }},
		{"[metrics]\nlisten = \"\"", func(c *config.Config) { c.Metrics.Listen = "" }},
		{"[metrics]\nlisten = \"0.0.0.0:9100\"", func(c *config.Config) { c.Metrics.Listen = "0.0.0.0:9100" }},
		{"[metrics]\nlisten = \"127.0.0.1:0\"", func(c *config.Config) { c.Metrics.Listen = "127.0.0.1:0" }},
		{"[metrics]\nlisten = \"localhost:9477\"", func(c *config.Config) { c.Metrics.Listen = "localhost:9477" }},
		{"[metrics]\nper_user = true", func(c *config.Config) { c.Metrics.PerUser = true }},
		{"metrics.per_user_max = 1", func(c *config.Config) { c.Metrics.PerUserMax = 1 }},
		{"[metrics]\nper_user_max = 1000000", func(c *config.Config) { c.Metrics.PerUserMax = 1000000 }},
		{"[notify]\nthresholds = []", func(c *config.Config) { c.Notify.Thresholds = nil }},
		{"[notify]\nexpiry_days = 0\nmax_age = \"30d\"", func(c *config.Config) { c.Notify.ExpiryDays, c.Notify.MaxAge = 0, 30*24*time.Hour }},
		{"[[notify.webhook]]\nurl = \"https://a.example/\"", func(c *config.Config) {
			c.Notify.Webhooks = []config.Webhook{{URL: "https://a.example/", Timeout: 10 * time.Second}}
		}},
		{"[[notify.exec]]\ncommand = [\"/bin/x\"]", func(c *config.Config) {
			c.Notify.Execs = []config.Exec{{Command: []string{"/bin/x"}, Timeout: 30 * time.Second}}
		}},
		{"[[notify.telegram]]\ntoken = \"1:a\"\nchats = [-5]", func(c *config.Config) {
			c.Notify.Telegrams = []config.Telegram{{Token: "1:a", Chats: []string{"-5"}, API: "https://api.telegram.org", Timeout: 10 * time.Second}}
		}},
	} {
		got := mustParse(t, tc.data)
		want := config.Default()
		tc.want(&want)
		if !reflect.DeepEqual(got, want) {
			t.Errorf("Parse(%q) =\n%+v\nwant\n%+v", tc.data, got, want)
		}
		if err := got.Validate(); err != nil {
			t.Errorf("Parse(%q).Validate() = %v", tc.data, err)
		}
	}
	if !reflect.DeepEqual(def, config.Default()) {
		t.Error("parsing changed Default()")
	}
}

func TestRulesAndRestartKeys(t *testing.T) {
	c := mustParse(t, "metric = \"download\"\nwarning_percent = 90")
	if r := c.Rules(); r.Metric != quota.Download || r.Warning != 0.9 {
		t.Errorf("Rules() = %+v", r)
	}
	if r := config.Default().Rules(); r.Metric != quota.Total || r.Warning != 0.8 {
		t.Errorf("default Rules() = %+v", r)
	}
	next := c
	next.Paths.StateDB = "/var/lib/other.db"
	next.NFT.Table = "other"
	next.Interval = 3 * time.Second // applied live
	next.Paths.Limits = "/etc/other.conf"
	if got := c.NeedsRestart(next); !slices.Equal(got, []string{"nft.table", "paths.state_db"}) {
		t.Errorf("NeedsRestart = %v", got)
	}
	next = c
	next.Metrics = config.Metrics{Listen: "", PerUser: true, PerUserMax: 5}
	if got := c.NeedsRestart(next); !slices.Equal(got, []string{"metrics.listen", "metrics.per_user", "metrics.per_user_max"}) {
		t.Errorf("NeedsRestart(metrics) = %v", got)
	}
	if got := c.NeedsRestart(c); got != nil {
		t.Errorf("NeedsRestart(same) = %v", got)
	}
}

// String renders a config that parses back to the same config.
func TestStringRoundTrip(t *testing.T) {
	weird := config.Default()
	weird.Paths.Limits = "/etc/xray/\"quoted\" \\ tab\there\u00e9\x7f\x01"
	weird.WarningPercent = 1e-7
	weird.Xray.Timeout = 1234567 * time.Nanosecond
	weird.JSONInterval = time.Hour / 6
	for _, c := range []config.Config{config.Default(), fullConfig(t), weird} {
		if err := c.Validate(); err != nil {
			t.Fatalf("Validate: %v", err)
		}
		got := mustParse(t, c.String())
		if !got.Equal(c) {
			t.Errorf("Parse(String()) =\n%+v\nwant\n%+v\nString():\n%s", got, c, c.String())
		}
	}
}

func TestEqual(t *testing.T) {
	a, b := config.Default(), config.Default()
	b.Xray.Configs = append([]string(nil), b.Xray.Configs...)
	b.SSH.Exclude = []string{} // nil and empty are equal
	if !a.Equal(b) {
		t.Error("equal configs differ")
	}
	b.TimeZone, b.TimeZoneName = time.UTC, "UTC"
	if a.Equal(b) {
		t.Error("different time zones are equal")
	}
	b = config.Default()
	b.Kernel.ProtectedUIDs = []uint32{7}
	if a.Equal(b) {
		t.Error("different protected UIDs are equal")
	}
}

func readExample(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("example.toml")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// leafKeys returns the dotted keys of data's values, sorted.
func leafKeys(t *testing.T, data string) []string {
	t.Helper()
	var m map[string]any
	md, err := toml.Decode(data, &m)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, k := range md.Keys() {
		if typ := md.Type(k...); typ != "Hash" && typ != "ArrayHash" {
			keys = append(keys, k.String())
		}
	}
	slices.Sort(keys)
	return keys
}

// example.toml is Default().String(): every key, commented, at its default.
func TestExample(t *testing.T) {
	want := config.Default().String()
	if *update {
		if err := os.WriteFile("example.toml", []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	ex := readExample(t)
	if ex != want {
		t.Errorf("example.toml differs from Default().String(); run go test ./config -run TestExample -update\n%s", want)
	}
	c := mustParse(t, ex)
	if !reflect.DeepEqual(c, config.Default()) {
		t.Errorf("example.toml parses to\n%+v\nwant Default()\n%+v", c, config.Default())
	}
	// Every key has a comment: the line above it is a comment or another
	// key of the same comment.
	lines := strings.Split(ex, "\n")
	for i, l := range lines {
		if strings.Contains(l, " = ") && !strings.HasPrefix(l, "#") {
			if i == 0 || (!strings.HasPrefix(lines[i-1], "# ") && !strings.Contains(lines[i-1], " = ")) {
				t.Errorf("example.toml:%d: %s has no comment", i+1, l)
			}
		}
	}
	if n := len(leafKeys(t, ex)); n != 48 {
		t.Errorf("example.toml has %d keys, want 48", n)
	}
}

// badFiles are invalid files and the exact error of each.
var badFiles = []struct {
	name string
	data string
	want string // the whole message, with file and line
	is   error
}{
	// The examples of the brief.
	{"interval range", "# bwagent\n\ninterval = \"10s\"\n",
		file + `:3: interval: must be from 1s to 5s, got 10s`, config.ErrInvalid},
	{"relative path", "interval = \"2s\"\n\n[paths]\nlimits = \"/etc/xray/bw-limit.conf\"\n\n# usage\nusage_dir = \"usage\"\n",
		file + `:7: paths.usage_dir: must be an absolute path, got "usage"`, config.ErrInvalid},
	{"misspelt key", "[xray]\ntiemout = \"1s\"\n",
		file + `:2: unknown key xray.tiemout (did you mean xray.timeout?)`, config.ErrUnknownKey},
	{"syntax", "interval = \"2s\"\nmetric = \n",
		file + `:2: syntax error: expected value but found '\n' instead`, config.ErrSyntax},

	// Durations.
	{"interval zero", "interval = 0", file + ":1: interval: must be from 1s to 5s, got 0s", config.ErrInvalid},
	{"interval negative", "interval = \"-2s\"", file + ":1: interval: must be from 1s to 5s, got -2s", config.ErrInvalid},
	{"interval short", "interval = \"999ms\"", file + ":1: interval: must be from 1s to 5s, got 999ms", config.ErrInvalid},
	{"interval word", "interval = \"fast\"", file + `:1: interval: must be a duration such as "2s" or a whole number of seconds, got "fast"`, config.ErrInvalid},
	{"interval float", "interval = 1.5", file + `:1: interval: must be a duration such as "2s" or a whole number of seconds, got float 1.5`, config.ErrInvalid},
	{"interval bool", "interval = true", file + `:1: interval: must be a duration such as "2s" or a whole number of seconds, got boolean true`, config.ErrInvalid},
	{"interval huge", "interval = 9999999999999", file + `:1: interval: must be a duration such as "2s" or a whole number of seconds, got 9999999999999 seconds: out of range`, config.ErrInvalid},
	{"interval table", "[interval]\nx = 1", file + `:1: interval: must be a duration such as "2s" or a whole number of seconds, got table`, config.ErrInvalid},
	{"json_interval", "json_interval = \"11m\"", file + ":1: json_interval: must be from 1s to 10m, got 11m", config.ErrInvalid},
	{"retention short", "retention = \"12h\"", file + ":1: retention: must be from 1d to 3650d, got 12h", config.ErrInvalid},
	{"retention days", "retention = \"-1d\"", file + ":1: retention: must be a duration such as \"2s\" or a whole number of seconds, got \"-1d\"", config.ErrInvalid},
	{"json_interval short", "json_interval = \"0.5s\"", file + ":1: json_interval: must be from 1s to 10m, got 500ms", config.ErrInvalid},
	{"timeout zero", "[xray]\ntimeout = \"0s\"", file + ":2: xray.timeout: must be more than 0, got 0s", config.ErrInvalid},
	{"timeout half interval", "[xray]\ntimeout = \"1s\"", file + ":2: xray.timeout: must be less than half of interval (2s), got 1s", config.ErrInvalid},
	{"timeout against explicit interval", "interval = \"1s\"\n[xray]\ntimeout = \"500ms\"",
		file + ":3: xray.timeout: must be less than half of interval (1s), got 500ms", config.ErrInvalid},
	{"dotted timeout", "metric = \"total\"\nxray.timeout = \"3s\"", file + ":2: xray.timeout: must be less than half of interval (2s), got 3s", config.ErrInvalid},

	// Numbers.
	{"warning zero", "warning_percent = 0", file + ":1: warning_percent: must be more than 0 and at most 100, got 0", config.ErrInvalid},
	{"warning above", "warning_percent = 100.5", file + ":1: warning_percent: must be more than 0 and at most 100, got 100.5", config.ErrInvalid},
	{"warning nan", "warning_percent = nan", file + ":1: warning_percent: must be more than 0 and at most 100, got NaN", config.ErrInvalid},
	{"warning string", "warning_percent = \"80\"", file + `:1: warning_percent: must be a number, got string "80"`, config.ErrInvalid},
	{"uid_min root", "[ssh]\nuid_min = 0", file + ":2: ssh.uid_min: must not be 0: root is never an SSH user", config.ErrInvalid},
	{"uid_min negative", "[ssh]\nuid_min = -1", file + ":2: ssh.uid_min: must be from 1 to 65533, got -1", config.ErrInvalid},
	{"uid_min huge", "[ssh]\nuid_min = 5000000000", file + ":2: ssh.uid_min: must be from 1 to 65533, got 5000000000", config.ErrInvalid},
	{"uid_max nobody", "[ssh]\nuid_max = 65535", file + ":2: ssh.uid_max: must be from 1 to 65534 (nobody, never an SSH user), got 65535", config.ErrInvalid},
	{"uid range", "[ssh]\nuid_min = 2000\nuid_max = 1500", file + ":3: ssh.uid_max: must be more than ssh.uid_min (2000), got 1500", config.ErrInvalid},
	{"auth log relative", "[ssh]\nauth_logs = [\"auth.log\"]", file + ":2: ssh.auth_logs: must be an absolute path, got \"auth.log\"", config.ErrInvalid},
	{"auth log journal namespace", "[ssh]\nauth_logs = [\"journal:a/b\"]", file + ":2: ssh.auth_logs: must be \"journal\" or \"journal:NAMESPACE\" (letters, digits, '_', '-', '.', at most 64), got \"journal:a/b\"", config.ErrInvalid},
	{"uid range min only", "[ssh]\nenabled = true\nuid_min = 65533\n[kernel]\n", "", nil}, // valid: 65533 < 65534
	{"uid range equal", "[ssh]\nuid_min = 3000\nuid_max = 3000", file + ":3: ssh.uid_max: must be more than ssh.uid_min (3000), got 3000", config.ErrInvalid},
	{"uid_min string", "[ssh]\nuid_min = \"1000\"", file + `:2: ssh.uid_min: must be an integer, got string "1000"`, config.ErrInvalid},
	{"max_uids zero", "[kernel]\nmax_uids = 0", file + ":2: kernel.max_uids: must be from 1 to 1048576, got 0", config.ErrInvalid},
	{"max_uids big", "[kernel]\nmax_uids = 1048577", file + ":2: kernel.max_uids: must be from 1 to 1048576, got 1048577", config.ErrInvalid},
	{"protected negative", "[kernel]\nprotected_uids = [1, -1]", file + ":2: kernel.protected_uids: must be UIDs from 0 to 4294967295, got -1", config.ErrInvalid},
	{"protected string", "[kernel]\nprotected_uids = [\"root\"]", file + `:2: kernel.protected_uids: must be an array of UIDs, got string "root" in it`, config.ErrInvalid},

	// Strings.
	{"metric", "metric = \"both\"", file + `:1: metric: must be "total", "upload" or "download", got "both"`, config.ErrInvalid},
	{"metric int", "metric = 1", file + `:1: metric: must be "total", "upload" or "download", got integer 1`, config.ErrInvalid},
	{"timezone unknown", "timezone = \"Mars/Olympus\"", file + `:1: timezone: must be "Local", "UTC" or an IANA time zone name such as "Asia/Jakarta", got "Mars/Olympus"`, config.ErrInvalid},
	{"timezone empty", "timezone = \"\"", file + `:1: timezone: must be "Local", "UTC" or an IANA time zone name such as "Asia/Jakarta", got ""`, config.ErrInvalid},
	{"timezone escape", "timezone = \"../../etc/passwd\"", file + `:1: timezone: must be "Local", "UTC" or an IANA time zone name such as "Asia/Jakarta", got "../../etc/passwd": time: invalid location name`, config.ErrInvalid},
	{"unclean path", "[paths]\nsocket = \"/run/bwagent//bwagent.sock\"", file + `:2: paths.socket: must be a clean path ("/run/bwagent/bwagent.sock"), got "/run/bwagent//bwagent.sock"`, config.ErrInvalid},
	{"trailing slash", "[paths]\nusage_dir = \"/etc/myvpn/usage/\"", file + `:2: paths.usage_dir: must be a clean path ("/etc/myvpn/usage"), got "/etc/myvpn/usage/"`, config.ErrInvalid},
	{"root path", "[paths]\nmarker_dir = \"/\"", file + `:2: paths.marker_dir: must not be /`, config.ErrInvalid},
	{"empty path", "[paths]\nstate_db = \"\"", file + `:2: paths.state_db: must be an absolute path, got ""`, config.ErrInvalid},
	{"same paths", "[paths]\nblock_log = \"/etc/myvpn/usage\"", file + `:2: paths.block_log: must differ from paths.usage_dir, got the same path "/etc/myvpn/usage"`, config.ErrInvalid},
	{"same paths earlier key", "[paths]\nlimits = \"/etc/passwd\"", file + `:2: paths.limits: must differ from paths.passwd, got the same path "/etc/passwd"`, config.ErrInvalid},
	{"path int", "[paths]\nlimits = 5", file + `:2: paths.limits: must be a string, got integer 5`, config.ErrInvalid},
	{"cgroup relative", "[kernel]\ncgroup = \"sys/fs/cgroup\"", file + `:2: kernel.cgroup: must be an absolute path, got "sys/fs/cgroup"`, config.ErrInvalid},
	{"pin_path empty", "[kernel]\npin_path = \"\"", file + `:2: kernel.pin_path: must be an absolute path, got ""`, config.ErrInvalid},
	{"nft digit", "[nft]\ntable = \"1bw\"", file + `:2: nft.table: must be 1 to 31 letters, digits, '_' or '-', not starting with a digit or '-', got "1bw"`, config.ErrInvalid},
	{"nft dash", "[nft]\nset = \"-x\"", file + `:2: nft.set: must be 1 to 31 letters, digits, '_' or '-', not starting with a digit or '-', got "-x"`, config.ErrInvalid},
	{"nft dot", "[nft]\nchain = \"out.put\"", file + `:2: nft.chain: must be 1 to 31 letters, digits, '_' or '-', not starting with a digit or '-', got "out.put"`, config.ErrInvalid},
	{"nft long", "[nft]\ntable = \"" + strings.Repeat("t", 32) + "\"", file + `:2: nft.table: must be 1 to 31 letters, digits, '_' or '-', not starting with a digit or '-', got "` + strings.Repeat("t", 32) + `"`, config.ErrInvalid},
	{"nft empty", "[nft]\ntable = \"\"", file + `:2: nft.table: must be 1 to 31 letters, digits, '_' or '-', not starting with a digit or '-', got ""`, config.ErrInvalid},
	{"exclude name", "[ssh]\nexclude = [\"ubuntu\", \"bad name\"]", file + `:2: ssh.exclude: must be account names (letters, digits, '.', '_', '-', at most 32), got "bad name"`, config.ErrInvalid},
	{"exclude digits", "[ssh]\nexclude = [\"1001\"]", file + `:2: ssh.exclude: must be account names (letters, digits, '.', '_', '-', at most 32), got "1001"`, config.ErrInvalid},
	{"exclude not array", "[ssh]\nexclude = \"ubuntu\"", file + `:2: ssh.exclude: must be an array of strings, got string "ubuntu"`, config.ErrInvalid},
	{"exclude mixed", "[ssh]\nexclude = [\"ubuntu\", 7]", file + `:2: ssh.exclude: must be an array of strings, got integer 7 in it`, config.ErrInvalid},
	{"enabled string", "[ssh]\nenabled = \"yes\"", file + `:2: ssh.enabled: must be true or false, got string "yes"`, config.ErrInvalid},
	{"configs relative", "[xray]\nconfigs = [\n  \"/etc/xray/config.json\",\n  \"config.json\",\n]", file + `:2: xray.configs: must be an absolute path, got "config.json"`, config.ErrInvalid},
	{"configs empty", "[xray]\nconfigs = []", file + `:2: xray.configs: must name a file when xray.config_dir and xray.api are empty: the agent would not find Xray's API`, config.ErrInvalid},
	{"config_dir relative", "[xray]\nconfig_dir = \"conf.d\"", file + `:2: xray.config_dir: must be an absolute path, got "conf.d"`, config.ErrInvalid},
	{"api no port", "[xray]\napi = \"127.0.0.1\"", file + `:2: xray.api: must be host:port such as "127.0.0.1:10085", or "", got "127.0.0.1"`, config.ErrInvalid},
	{"api port zero", "[xray]\napi = \"127.0.0.1:0\"", file + `:2: xray.api: must be host:port such as "127.0.0.1:10085", or "", got "127.0.0.1:0"`, config.ErrInvalid},
	{"api no host", "[xray]\napi = \":10085\"", file + `:2: xray.api: must be host:port such as "127.0.0.1:10085", or "", got ":10085"`, config.ErrInvalid},
	{"api bad host", "[xray]\napi = \"a b:10085\"", file + `:2: xray.api: must be host:port such as "127.0.0.1:10085", or "", got "a b:10085"`, config.ErrInvalid},
	{"admin group", "[control]\nadmin_group = \"vpn admins\"", file + `:2: control.admin_group: must be a group name (letters, digits, '.', '_', '-', at most 32) or "", got "vpn admins"`, config.ErrInvalid},
	{"listen no port", "[metrics]\nlisten = \"127.0.0.1\"", file + `:2: metrics.listen: must be host:port such as "127.0.0.1:9477" (port 0: any free port), or "" for none, got "127.0.0.1"`, config.ErrInvalid},
	{"listen no host", "[metrics]\nlisten = \":9477\"", file + `:2: metrics.listen: must be host:port such as "127.0.0.1:9477" (port 0: any free port), or "" for none, got ":9477"`, config.ErrInvalid},
	{"listen big port", "[metrics]\nlisten = \"127.0.0.1:65536\"", file + `:2: metrics.listen: must be host:port such as "127.0.0.1:9477" (port 0: any free port), or "" for none, got "127.0.0.1:65536"`, config.ErrInvalid},
	{"listen url", "[metrics]\nlisten = \"http://127.0.0.1:9477\"", file + `:2: metrics.listen: must be host:port such as "127.0.0.1:9477" (port 0: any free port), or "" for none, got "http://127.0.0.1:9477"`, config.ErrInvalid},
	{"listen int", "[metrics]\nlisten = 9477", file + `:2: metrics.listen: must be a string, got integer 9477`, config.ErrInvalid},
	{"per_user string", "[metrics]\nper_user = \"yes\"", file + `:2: metrics.per_user: must be true or false, got string "yes"`, config.ErrInvalid},
	{"per_user_max zero", "[metrics]\nper_user_max = 0", file + `:2: metrics.per_user_max: must be from 1 to 1000000, got 0`, config.ErrInvalid},
	{"per_user_max big", "[metrics]\nper_user_max = 1000001", file + `:2: metrics.per_user_max: must be from 1 to 1000000, got 1000001`, config.ErrInvalid},
	{"per_user_max negative", "[metrics]\nper_user_max = -5", file + `:2: metrics.per_user_max: must be from 1 to 1000000, got -5`, config.ErrInvalid},
	{"devices default", "[devices]\ndefault = 1001", file + `:2: devices.default: must be from 0 (no limit) to 1000, got 1001`, config.ErrInvalid},
	{"devices default negative", "[devices]\ndefault = -1", file + `:2: devices.default: must be from 0 (no limit) to 1000, got -1`, config.ErrInvalid},
	{"devices default string", "[devices]\ndefault = \"two\"", file + `:2: devices.default: must be an integer, got string "two"`, config.ErrInvalid},
	{"ipv6 prefix short", "[devices]\nipv6_prefix = 8", file + `:2: devices.ipv6_prefix: must be from 16 to 128, got 8`, config.ErrInvalid},
	{"ipv6 prefix long", "[devices]\nipv6_prefix = 129", file + `:2: devices.ipv6_prefix: must be from 16 to 128, got 129`, config.ErrInvalid},
	{"devices cut", "[devices]\ncut = \"random\"", file + `:2: devices.cut: must be "newest" or "oldest", got "random"`, config.ErrInvalid},
	{"speed default", "[speed]\ndefault = \"20mb\"", file + `:2: speed.default: invalid rate "20mb": no unit (want a positive number with kbit, mbit or gbit, as tc writes rates: 512kbit, 20mbit, 1gbit)`, config.ErrInvalid},
	{"speed throttle zero", "[speed]\nthrottle = \"0kbit\"", file + `:2: speed.throttle: invalid rate "0kbit": zero (want a positive number with kbit, mbit or gbit, as tc writes rates: 512kbit, 20mbit, 1gbit)`, config.ErrInvalid},
	{"speed int", "[speed]\ndefault = 20", file + `:2: speed.default: must be a rate such as "20mbit" or "10mbit/2mbit", got integer 20`, config.ErrInvalid},
	{"devices cut int", "[devices]\ncut = 1", file + `:2: devices.cut: must be "newest" or "oldest", got integer 1`, config.ErrInvalid},
	{"admin group multi-line string", "[control]\nadmin_group = \"\"\"\ninterval = \"9s\"\n\"\"\"\n", file + `:2: control.admin_group: must be a group name (letters, digits, '.', '_', '-', at most 32) or "", got "interval = \"9s\"\n"`, config.ErrInvalid},

	// Tables.
	{"table as value", "\npaths = \"/etc\"", file + `:2: paths: must be a table ([paths]), got string "/etc"`, config.ErrInvalid},
	{"array of tables", "\n[[ssh]]\nenabled = true", file + `:2: ssh: must be a table ([ssh]), got array of tables`, config.ErrInvalid},
	{"inline table", "\nssh = { enabled = true, uid_min = 0 }", file + ":2: ssh.uid_min: must not be 0: root is never an SSH user", config.ErrInvalid},

	// Unknown keys.
	{"unknown table", "interval = \"2s\"\n\n[pahts]\nlimits = \"/x\"", file + ":3: unknown key pahts (did you mean paths?)", config.ErrUnknownKey},
	{"unknown case", "interval = \"2s\"\nInterval = \"3s\"", file + ":2: unknown key Interval (did you mean interval?)", config.ErrUnknownKey},
	{"unknown case first", "Interval = \"3s\"\ninterval = \"2s\"", file + ":1: unknown key Interval (did you mean interval?)", config.ErrUnknownKey},
	{"wrong table", "timeout = \"1s\"", file + ":1: unknown key timeout (did you mean xray.timeout?)", config.ErrUnknownKey},
	{"wrong table 2", "[xray]\ninterval = \"1s\"", file + ":2: unknown key xray.interval (did you mean interval?)", config.ErrUnknownKey},
	{"unknown no suggestion", "[xray]\n\n\nflavour = \"vanilla\"", file + ":4: unknown key xray.flavour", config.ErrUnknownKey},
	{"key as table", "[xray.api]\nport = 1", file + ":1: xray.api: must be a string, got table", config.ErrInvalid},
	{"unknown subtable", "[xray.apis]\nport = 1", file + ":1: unknown key xray.apis (did you mean xray.api?)", config.ErrUnknownKey},
	{"unknown quoted", "\n\"json interval\" = \"5s\"", file + `:2: unknown key "json interval" (did you mean json_interval?)`, config.ErrUnknownKey},
	{"unknown dotted", "\n\nssh.uid.min = 3", file + `:3: unknown key ssh.uid.min (did you mean ssh.uid_min?)`, config.ErrUnknownKey},
	{"unknown in inline", "\nxray = { timeout = \"1s\", tiemout = \"1s\" }", file + `:2: unknown key xray.tiemout (did you mean xray.timeout?)`, config.ErrUnknownKey},
	{"unknown date", "\nstart = 2024-12-01", file + `:2: unknown key start`, config.ErrUnknownKey},

	// Notifications.
	{"thresholds range", "[notify]\nthresholds = [80, 100]", file + ":2: notify.thresholds: must be percentages from 1 to 99, got 100", config.ErrInvalid},
	{"thresholds order", "[notify]\nthresholds = [90, 80]", file + ":2: notify.thresholds: must be in ascending order without repeats, got 80 after 90", config.ErrInvalid},
	{"thresholds repeat", "[notify]\nthresholds = [80, 80]", file + ":2: notify.thresholds: must be in ascending order without repeats, got 80 after 80", config.ErrInvalid},
	{"thresholds float", "[notify]\nthresholds = [80.5]", file + ":2: notify.thresholds: must be an array of whole percentages, got float 80.5 in it", config.ErrInvalid},
	{"thresholds string", "[notify]\nthresholds = \"80\"", file + `:2: notify.thresholds: must be an array of percentages, got string "80"`, config.ErrInvalid},
	{"expiry_days", "[notify]\nexpiry_days = -1", file + ":2: notify.expiry_days: must be from 0 to 3650, got -1", config.ErrInvalid},
	{"max_age", "[notify]\nmax_age = \"30s\"", file + ":2: notify.max_age: must be from 1m to 30d, got 30s", config.ErrInvalid},
	{"fleet node", "[fleet]\nnode = \"a b\"", file + `:2: fleet.node: must be 1 to 63 letters, digits, '.', '_' or '-', or "" for the host name, got "a b"`, config.ErrInvalid},
	{"fleet database", "[fleet]\ndatabase = \"postgres://h:notaport/db\"", file + `:2: fleet.database: must be a PostgreSQL connection string (a postgres:// URL or key=value pairs): invalid port`, config.ErrInvalid},
	{"node", "[notify]\nnode = \"a\\nb\"", file + `:2: notify.node: must be at most 64 characters, none a control character, got "a\nb"`, config.ErrInvalid},
	{"webhook url", "[notify]\n\n[[notify.webhook]]\nurl = \"https://a.example/\"\n\n[[notify.webhook]]\nsecret = \"x\"\nurl = \"ftp://b.example/\"\n",
		file + `:8: notify.webhook[2].url: must be an http or https URL such as "https://hooks.example.com/bwagent", got "ftp://b.example/"`, config.ErrInvalid},
	{"webhook no url", "[[notify.webhook]]\nurl = \"https://a.example/\"\n[[notify.webhook]]\ntimeout = \"5s\"\n",
		file + `:3: notify.webhook[2].url: must be set, such as "https://hooks.example.com/bwagent"`, config.ErrInvalid},
	{"webhook twice", "[[notify.webhook]]\nurl = \"https://a.example/\"\n[[notify.webhook]]\nurl = \"https://a.example/\"\n",
		file + `:4: notify.webhook[2].url: must differ from notify.webhook[1].url, got the same "https://a.example/"`, config.ErrInvalid},
	{"webhook inline twice", "[notify]\nwebhook = [\n  {url = \"http://a\"},\n  {url = \"http://a\"},\n]\n",
		file + `:2: notify.webhook[2].url: must differ from notify.webhook[1].url, got the same "http://a"`, config.ErrInvalid},
	{"webhook timeout", "[[notify.webhook]]\nurl = \"https://a.example/\"\ntimeout = \"10m\"", file + ":3: notify.webhook[1].timeout: must be from 1s to 5m, got 10m", config.ErrInvalid},
	{"webhook events", "[[notify.webhook]]\nurl = \"https://a.example/\"\nevents = [\"block\", \"blocked\"]",
		file + `:3: notify.webhook[1].events: must be event types (block, throttle, unblock, disable, enable, reset, threshold, expiring, device, failed, recovered), got "blocked"`, config.ErrInvalid},
	{"webhook unknown key", "[[notify.webhook]]\nurl = \"https://a.example/\"\nsecrte = \"x\"",
		file + ":3: unknown key notify.webhook[1].secrte (did you mean notify.webhook[1].secret?)", config.ErrUnknownKey},
	{"webhook table", "[notify.webhook]\nurl = \"https://a.example/\"", file + ":1: notify.webhook: must be an array of tables ([[notify.webhook]]), got table", config.ErrInvalid},
	{"webhooks", "\n[[notify.webhooks]]\nurl = \"https://a.example/\"", file + ":2: unknown key notify.webhooks (did you mean notify.webhook?)", config.ErrUnknownKey},
	{"exec relative", "[[notify.exec]]\ncommand = [\n  \"on-event\",\n  \"x\",\n]\n",
		file + `:2: notify.exec[1].command: must start with the program's absolute, clean path, got "on-event"`, config.ErrInvalid},
	{"exec empty", "[[notify.exec]]\ntimeout = \"1m\"\n",
		file + `:1: notify.exec[1].command: must be set: the program and its arguments, such as ["/usr/local/bin/on-bw-event"]`, config.ErrInvalid},
	{"exec NUL", "[[notify.exec]]\ncommand = [\"/bin/x\", \"a\\u0000b\"]\n", file + `:2: notify.exec[1].command: must be valid UTF-8 without NUL bytes, got "a\x00b"`, config.ErrInvalid},
	{"exec timeout", "[[notify.exec]]\ncommand = [\"/bin/x\"]\ntimeout = \"2h\"", file + ":3: notify.exec[1].timeout: must be from 1s to 1h, got 2h", config.ErrInvalid},
	{"telegram no token", "[[notify.telegram]]\nchats = [1]\n", file + `:1: notify.telegram[1].token: must be set: the bot's token from @BotFather, such as "123456:ABC-DEF_ghi"`, config.ErrInvalid},
	{"telegram bad token", "[[notify.telegram]]\ntoken = \"secret word\"\nchats = [1]\n",
		file + `:2: notify.telegram[1].token: must be a bot token such as "123456:ABC-DEF_ghi" (digits, ':', then letters, digits, '_' or '-'), got 11 other characters`, config.ErrInvalid},
	{"telegram no chats", "[[notify.telegram]]\ntoken = \"1:a\"\n", file + `:1: notify.telegram[1].chats: must name at least one chat: a chat id such as 123456789, or "@channel"`, config.ErrInvalid},
	{"telegram chat twice", "[[notify.telegram]]\ntoken = \"1:a\"\nchats = [7, \"7\"]\n", file + ":3: notify.telegram[1].chats: must not repeat a chat, got 7 twice", config.ErrInvalid},
	{"telegram chat of another", "[[notify.telegram]]\ntoken = \"1:a\"\nchats = [7]\n[[notify.telegram]]\ntoken = \"1:a\"\nchats = [8, 7]\n",
		file + ":6: notify.telegram[2].chats: must not repeat a chat of notify.telegram[1] with the same bot, got 7", config.ErrInvalid},
	{"telegram bad chat", "[[notify.telegram]]\ntoken = \"1:a\"\nchats = [\"vpn\"]\n", file + `:3: notify.telegram[1].chats: must be chat ids (integers) or public channel names such as "@vpn_alerts", got "vpn"`, config.ErrInvalid},
	{"telegram chat float", "[[notify.telegram]]\ntoken = \"1:a\"\nchats = [1.5]\n", file + `:3: notify.telegram[1].chats: must be an array of chat ids or "@channel" names, got float 1.5 in it`, config.ErrInvalid},
	{"telegram api", "[[notify.telegram]]\ntoken = \"1:a\"\nchats = [1]\napi = \"api.telegram.org\"\n",
		file + `:4: notify.telegram[1].api: must be an http or https URL such as "https://hooks.example.com/bwagent", got "api.telegram.org"`, config.ErrInvalid},

	// Syntax.
	{"syntax table", "interval = \"2s\"\n[xray\n", file + `:2: syntax error: expected '.' or ']' to end table name, but got '\n' instead`, config.ErrSyntax},
	{"syntax duplicate", "interval = \"2s\"\n\ninterval = \"3s\"\n", file + `:3: syntax error: Key 'interval' has already been defined.`, config.ErrSyntax},
	{"syntax string", "[paths]\nlimits = \"/etc/x\n", file + `:2: syntax error: strings cannot contain newlines`, config.ErrSyntax},
	{"syntax bare word", "[ssh]\n\nenabled = yes", file + `:3: syntax error: expected value but found "yes" instead`, config.ErrSyntax},
	{"syntax NUL", "\n\n\x00", file + `:3: syntax error: files cannot contain NULL bytes; probably using UTF-16; TOML files must be UTF-8`, config.ErrSyntax},
	{"syntax int overflow", "[kernel]\nmax_uids = 99999999999999999999", file + `:2: syntax error: 99999999999999999999 is out of range for int64`, config.ErrSyntax},
}

func TestBadFiles(t *testing.T) {
	sentinels := []error{config.ErrSyntax, config.ErrUnknownKey, config.ErrInvalid}
	for _, tc := range badFiles {
		t.Run(tc.name, func(t *testing.T) {
			c, err := config.Parse(file, []byte(tc.data))
			if tc.want == "" {
				if err != nil {
					t.Fatalf("Parse(%q) = %v, want no error", tc.data, err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Parse(%q) = %+v, want error %s", tc.data, c, tc.want)
			}
			if err.Error() != tc.want {
				t.Errorf("Parse(%q) error\n got: %s\nwant: %s", tc.data, err, tc.want)
			}
			for _, s := range sentinels {
				if errors.Is(err, s) != (s == tc.is) {
					t.Errorf("errors.Is(err, %v) = %v", s, errors.Is(err, s))
				}
			}
			var e *config.Error
			if !errors.As(err, &e) || e.File != file || e.Line < 1 {
				t.Errorf("error %#v is not an *Error with file and line", err)
			}
			if !reflect.DeepEqual(c, config.Config{}) {
				t.Errorf("Parse returned %+v with an error", c)
			}
		})
	}
}

// The decoder's own error stays reachable behind a syntax error, and the
// time package's behind a time zone error.
func TestErrorChains(t *testing.T) {
	_, err := config.Parse(file, []byte("a = "))
	var pe toml.ParseError
	if !errors.As(err, &pe) {
		t.Errorf("syntax error %v does not wrap toml.ParseError", err)
	}
	_, err = config.Parse(file, []byte(`timezone = "Mars/Olympus"`))
	var e *config.Error
	if !errors.As(err, &e) || e.Key != "timezone" || e.Line != 1 || errors.Unwrap(e) != e.Err {
		t.Errorf("time zone error %#v", err)
	}
}

// Validate checks a Config built by code, naming the key without a file.
func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		change func(c *config.Config)
		want   string
	}{
		{func(c *config.Config) { c.Interval = 6 * time.Second }, "interval: must be from 1s to 5s, got 6s"},
		{func(c *config.Config) { c.Interval = time.Second }, "xray.timeout: must be less than half of interval (1s), got 500ms"},
		{func(c *config.Config) { c.Metric = "Total" }, `metric: must be "total", "upload" or "download", got "Total"`},
		{func(c *config.Config) { c.TimeZone = nil }, `timezone: TimeZone is nil (TimeZoneName "Local")`},
		{func(c *config.Config) { c.TimeZone = time.UTC }, `timezone: TimeZoneName "Local" does not name TimeZone "UTC"`},
		{func(c *config.Config) { c.WarningPercent = 0 }, "warning_percent: must be more than 0 and at most 100, got 0"},
		{func(c *config.Config) { c.Paths.Passwd = "passwd" }, `paths.passwd: must be an absolute path, got "passwd"`},
		{func(c *config.Config) { c.Paths.Passwd = "/etc/\xff" }, `paths.passwd: must be valid UTF-8, got "/etc/\xff"`},
		{func(c *config.Config) { c.Paths.Passwd = "/etc/a\x00b" }, `paths.passwd: must not contain a NUL byte, got "/etc/a\x00b"`},
		{func(c *config.Config) { c.SSH.UIDMin = 0 }, "ssh.uid_min: must not be 0: root is never an SSH user"},
		{func(c *config.Config) { c.SSH.UIDMin, c.SSH.UIDMax = 100, 100 }, "ssh.uid_max: must be more than ssh.uid_min (100), got 100"},
		{func(c *config.Config) { c.Kernel.MaxUIDs = 0 }, "kernel.max_uids: must be from 1 to 1048576, got 0"},
		{func(c *config.Config) { c.NFT.Chain = "" }, `nft.chain: must be 1 to 31 letters, digits, '_' or '-', not starting with a digit or '-', got ""`},
		{func(c *config.Config) { c.Xray.Configs = nil }, "xray.configs: must name a file when xray.config_dir and xray.api are empty: the agent would not find Xray's API"},
		{func(c *config.Config) { c.Xray.Timeout = 0 }, "xray.timeout: must be more than 0, got 0s"},
		{func(c *config.Config) { c.Control.AdminGroup = "-wheel" }, `control.admin_group: must be a group name (letters, digits, '.', '_', '-', at most 32) or "", got "-wheel"`},
		{func(c *config.Config) { c.Metrics.Listen = "[::1]" }, `metrics.listen: must be host:port such as "127.0.0.1:9477" (port 0: any free port), or "" for none, got "[::1]"`},
		{func(c *config.Config) { c.Metrics.PerUserMax = 0 }, `metrics.per_user_max: must be from 1 to 1000000, got 0`},
		{func(c *config.Config) { c.Notify.Thresholds = []int{90, 80} }, "notify.thresholds: must be in ascending order without repeats, got 80 after 90"},
		{func(c *config.Config) { c.Notify.MaxAge = 0 }, "notify.max_age: must be from 1m to 30d, got 0s"},
		{func(c *config.Config) {
			c.Notify.Webhooks = []config.Webhook{{URL: "https://a/", Timeout: time.Second}, {Timeout: time.Second}}
		},
			`notify.webhook[2].url: must be set, such as "https://hooks.example.com/bwagent"`},
		{func(c *config.Config) { c.Notify.Execs = []config.Exec{{Command: []string{"/bin/x"}}} }, "notify.exec[1].timeout: must be from 1s to 1h, got 0s"},
		{func(c *config.Config) {
			c.Notify.Telegrams = []config.Telegram{{Token: "1:a", Chats: []string{"1"}, Timeout: time.Second}}
		}, `notify.telegram[1].api: must be set, such as "https://api.telegram.org"`},
	} {
		c := config.Default()
		tc.change(&c)
		err := c.Validate()
		if err == nil || err.Error() != tc.want {
			t.Errorf("Validate() = %v, want %s", err, tc.want)
		}
		if !errors.Is(err, config.ErrInvalid) {
			t.Errorf("Validate() = %v, not ErrInvalid", err)
		}
	}
	// Accepted edge values.
	c := config.Default()
	c.Interval, c.Xray.Timeout = 5*time.Second, 2499*time.Millisecond
	c.JSONInterval = 10 * time.Minute
	c.WarningPercent = 100
	c.SSH.UIDMin, c.SSH.UIDMax = 1, 65534
	c.SSH.Exclude = []string{"a", "A.b-c_d", "machine$", strings.Repeat("x", 32)}
	c.Kernel.MaxUIDs = 1 << 20
	c.Xray.API = "xray.internal:65535"
	c.Xray.Configs, c.Xray.ConfigDir = nil, "/etc/xray/conf.d"
	c.Control.AdminGroup = "_vpn.admins"
	c.Metrics.Listen, c.Metrics.PerUserMax = "[::]:65535", 1
	if err := c.Validate(); err != nil {
		t.Errorf("Validate() = %v", err)
	}
	if err := (config.Config{}).Validate(); err == nil {
		t.Error("the zero Config is valid")
	}
}

// The problem of two keys is reported at the one the file sets.
func TestCrossFieldLine(t *testing.T) {
	for _, tc := range []struct{ data, want string }{
		{"\n[ssh]\nuid_max = 900\n", file + ":3: ssh.uid_max: must be more than ssh.uid_min (1000), got 900"},
		{"\n[ssh]\nuid_min = 900\nuid_max = 900\n", file + ":4: ssh.uid_max: must be more than ssh.uid_min (900), got 900"},
		{"[xray]\nconfigs = []\nconfig_dir = \"\"\n", file + ":2: xray.configs: must name a file when xray.config_dir and xray.api are empty: the agent would not find Xray's API"},
		{"[paths]\nmarker_dir = \"/etc/myvpn/blocked.log\"", file + `:2: paths.marker_dir: must differ from paths.block_log, got the same path "/etc/myvpn/blocked.log"`},
	} {
		_, err := config.Parse(file, []byte(tc.data))
		if err == nil || err.Error() != tc.want {
			t.Errorf("Parse(%q) = %v\nwant %s", tc.data, err, tc.want)
		}
	}
}

func TestErrorFormat(t *testing.T) {
	inner := errors.New("broken")
	for _, tc := range []struct {
		e    config.Error
		want string
	}{
		{config.Error{File: "f", Line: 3, Key: "k", Err: inner}, "f:3: k: broken"},
		{config.Error{File: "f", Key: "k", Err: inner}, "f: k: broken"},
		{config.Error{Line: 3, Key: "k", Err: inner}, "line 3: k: broken"},
		{config.Error{Key: "k", Err: inner}, "k: broken"},
		{config.Error{File: "f", Line: 1}, "f:1: invalid value"},
	} {
		if got := tc.e.Error(); got != tc.want {
			t.Errorf("%+v.Error() = %q, want %q", tc.e, got, tc.want)
		}
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()

	// No path and no default file: the defaults.
	restore := config.SetDefaultPath(filepath.Join(dir, "missing.toml"))
	c, err := config.Load("")
	if err != nil || !reflect.DeepEqual(c, config.Default()) {
		t.Errorf("Load(\"\") without the default file = %+v, %v; want Default()", c, err)
	}
	restore()

	// An explicit path that does not exist.
	missing := filepath.Join(dir, "nope.toml")
	_, err = config.Load(missing)
	if err == nil || !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("Load(%q) = %v, want an error naming it and wrapping fs.ErrNotExist", missing, err)
	}

	// The default path when it exists, and an explicit one.
	good := filepath.Join(dir, "bwagent.toml")
	if err := os.WriteFile(good, []byte("interval = \"3s\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	defer config.SetDefaultPath(good)()
	for _, p := range []string{"", good} {
		c, err := config.Load(p)
		if err != nil || c.Interval != 3*time.Second {
			t.Errorf("Load(%q) = %+v, %v", p, c, err)
		}
	}

	// Errors name the file Load read.
	bad := filepath.Join(dir, "bad.toml")
	if err := os.WriteFile(bad, []byte("\n[xray]\ntiemout = \"1s\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = config.Load(bad)
	if want := bad + ":3: unknown key xray.tiemout (did you mean xray.timeout?)"; err == nil || err.Error() != want {
		t.Errorf("Load(bad) = %v, want %s", err, want)
	}

	// A directory is not a file.
	if _, err := config.Load(dir); err == nil || !strings.Contains(err.Error(), dir) {
		t.Errorf("Load(dir) = %v", err)
	}
}

func TestParseMetric(t *testing.T) {
	var m config.Metric
	if err := m.UnmarshalText([]byte("UPLOAD")); err != nil || m != config.MetricUpload {
		t.Errorf("UnmarshalText(UPLOAD) = %v, %q", err, m)
	}
	if err := m.UnmarshalText([]byte("up")); !errors.Is(err, config.ErrInvalid) || m != config.MetricUpload {
		t.Errorf("UnmarshalText(up) = %v, %q", err, m)
	}
	if b, _ := config.MetricDownload.MarshalText(); string(b) != "download" {
		t.Errorf("MarshalText = %q", b)
	}
	// The rules' metric is named as the config spells it (the fleet's
	// database keeps that name).
	for _, m := range []config.Metric{config.MetricTotal, config.MetricUpload, config.MetricDownload} {
		c := config.Default()
		c.Metric = m
		if got := c.Rules().Metric.String(); got != string(m) {
			t.Errorf("metric %q: the rules' metric is named %q", m, got)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add("")
	f.Add(full)
	f.Add(config.Default().String())
	for _, tc := range badFiles {
		f.Add(tc.data)
	}
	sentinels := []error{config.ErrSyntax, config.ErrUnknownKey, config.ErrInvalid}
	f.Fuzz(func(t *testing.T, data string) {
		c, err := config.Parse("fuzz.toml", []byte(data))
		if err != nil {
			var e *config.Error
			if !errors.As(err, &e) {
				t.Fatalf("error %v is not an *Error", err)
			}
			n := 0
			for _, s := range sentinels {
				if errors.Is(err, s) {
					n++
				}
			}
			if n != 1 {
				t.Fatalf("error %v wraps %d sentinels", err, n)
			}
			if e.File != "fuzz.toml" || e.Line < 0 || e.Line > strings.Count(data, "\n")+1 {
				t.Fatalf("error %v: bad file or line", err)
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("Parse succeeded with an invalid config: %v", err)
		}
		back, err := config.Parse("string.toml", []byte(c.String()))
		if err != nil {
			t.Fatalf("Parse(String()) = %v\n%s", err, c.String())
		}
		if !back.Equal(c) {
			t.Fatalf("Parse(String()) =\n%+v\nwant\n%+v", back, c)
		}
	})
}
