package config

import (
	"fmt"
	"math"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/myvpn/bwagent/quota"
)

// keyDef is one key of the file: how to read it, check it and write it.
type keyDef struct {
	path  string                       // dotted: "interval", "xray.timeout"
	doc   string                       // the comment above it in String's output
	value func(c *Config) string       // the value in TOML
	set   func(c *Config, v any) error // from a decoded TOML value; type errors only
	check func(c *Config) error        // the value on its own; nil if anything goes
}

// tableDef is one table of the file.
type tableDef struct {
	name string
	doc  string
}

// tableDefs are the tables in the order String writes them.
var tableDefs = slices.Concat(coreTableDefs, notifyTableDefs)

var coreTableDefs = []tableDef{
	{"paths", `Files and directories. The defaults are those of the bash cek-bw-limit
tool, so its files stay where they were. Absolute paths.`},
	{"ssh", `SSH users: Linux accounts, counted and blocked by UID in the kernel.`},
	{"kernel", `The BPF data plane.`},
	{"nft", `The agent's nftables table (family inet); the agent touches no other.
Names are 1 to 31 letters, digits, '_' or '-', not starting with a digit
or '-'.`},
	{"xray", `Xray users (VMess, VLESS, Trojan, Shadowsocks), counted and blocked
through Xray's API.`},
	{"devices", `Device limits: how many devices (client addresses) may have SSH sessions
or Xray connections of one user open at once. A user's own limit is
devices=N on their line of the limits file; the extra device's
connections are cut, nobody else's.`},
	{"speed", `Speed caps, enforced per user in the kernel, each direction. A user's own
caps are speed=DOWN/UP and throttle=DOWN/UP on their line of the limits
file; these are everyone else's. Rates as tc writes them: a positive
number with kbit, mbit or gbit ("20mbit"; "10mbit/2mbit" is download/upload).`},
	{"control", `Who may use bwctl.`},
	{"metrics", `Prometheus metrics, served over HTTP at /metrics (the README lists
them). Changing a key here needs a restart.`},
}

// keyDefs are the keys in the order String writes them: the top-level keys,
// then each table's in the order of tableDefs. The arrays of tables
// (arrayDefs) come after them.
var keyDefs = slices.Concat(coreKeyDefs, notifyKeyDefs)

var coreKeyDefs = []*keyDef{
	durationKey("interval", `How often the agent reads the counters and applies limits, from 1s to 5s.
Durations are strings such as "2s" or "1500ms", or whole seconds.`,
		func(c *Config) *time.Duration { return &c.Interval }, durationRange(MinInterval, MaxInterval)),
	{
		path: "warning_percent",
		doc:  "A user is shown as WARNING above this share of their limit: more than 0,\nat most 100.",
		value: func(c *Config) string {
			f := c.WarningPercent
			switch {
			case math.IsNaN(f):
				return "nan"
			case math.IsInf(f, 1):
				return "inf"
			case math.IsInf(f, -1):
				return "-inf"
			}
			s := strconv.FormatFloat(f, 'f', -1, 64)
			if !strings.Contains(s, ".") {
				s += ".0"
			}
			return s
		},
		set: func(c *Config, v any) error {
			switch v := v.(type) {
			case float64:
				c.WarningPercent = v
			case int64:
				if v > 1<<53 || v < -1<<53 {
					return invalidf("must be more than 0 and at most 100, got %d", v)
				}
				c.WarningPercent = float64(v)
			default:
				return invalidf("must be a number, got %s", describe(v))
			}
			return nil
		},
		check: func(c *Config) error {
			if !(c.WarningPercent > 0 && c.WarningPercent <= 100) {
				return invalidf("must be more than 0 and at most 100, got %s", strconv.FormatFloat(c.WarningPercent, 'g', -1, 64))
			}
			return nil
		},
	},
	{
		path: "metric",
		doc: `Which traffic counts against a limit: "total" (upload plus download),
"upload" (what the user sends) or "download" (what the user receives).`,
		value: func(c *Config) string { return quote(string(c.Metric)) },
		set: func(c *Config, v any) error {
			s, ok := v.(string)
			if !ok {
				return invalidf(`must be "total", "upload" or "download", got %s`, describe(v))
			}
			m, err := ParseMetric(s)
			c.Metric = m
			return err
		},
		check: func(c *Config) error {
			switch c.Metric {
			case MetricTotal, MetricUpload, MetricDownload:
				return nil
			}
			return invalidf(`must be "total", "upload" or "download", got %q`, c.Metric)
		},
	},
	{
		path: "timezone",
		doc: `Time zone of daily usage and reset schedules: "Local" (the server's:
TZ or /etc/localtime), "UTC", or an IANA name such as "Asia/Jakarta".`,
		value: func(c *Config) string { return quote(c.TimeZoneName) },
		set: func(c *Config, v any) error {
			s, ok := v.(string)
			if !ok {
				return invalidf(`must be "Local", "UTC" or an IANA time zone name such as "Asia/Jakarta", got %s`, describe(v))
			}
			loc, err := loadZone(s)
			if err != nil {
				return err
			}
			c.TimeZone, c.TimeZoneName = loc, s
			return nil
		},
		check: func(c *Config) error {
			if c.TimeZone == nil {
				return invalidf("TimeZone is nil (TimeZoneName %q)", c.TimeZoneName)
			}
			if c.TimeZone.String() != c.TimeZoneName {
				return invalidf("TimeZoneName %q does not name TimeZone %q", c.TimeZoneName, c.TimeZone)
			}
			return nil
		},
	},
	durationKey("json_interval", `How often usage-only updates of the per-user JSON files (paths.usage_dir)
are written, from 1s to 10m.`,
		func(c *Config) *time.Duration { return &c.JSONInterval }, durationRange(MinJSONInterval, MaxJSONInterval)),
	durationKey("retention", `How long the agent keeps a user who left (gone from the passwd file and
from Xray's config): their usage and status stay, so a user who comes back
within it carries on where they were; after it they are forgotten (their
per-day history stays in the state database). From 1d to 3650d.`,
		func(c *Config) *time.Duration { return &c.Retention }, durationRange(MinRetention, MaxRetention)),

	pathKey("paths.limits", "Limits per user, as the bash tool's `cek-bw-limit set john 10240`.", true,
		func(c *Config) *string { return &c.Paths.Limits }),
	pathKey("paths.usage_dir", "Usage per user: <user>.json.", true,
		func(c *Config) *string { return &c.Paths.UsageDir }),
	pathKey("paths.marker_dir", "A marker file per blocked user: <user>.", true,
		func(c *Config) *string { return &c.Paths.MarkerDir }),
	pathKey("paths.block_log", "One line per block: timestamp | protocol | username | reason.", true,
		func(c *Config) *string { return &c.Paths.BlockLog }),
	pathKey("paths.state_db", "The agent's own state.", true,
		func(c *Config) *string { return &c.Paths.StateDB }),
	pathKey("paths.socket", "bwctl's control socket.", true,
		func(c *Config) *string { return &c.Paths.Socket }),
	pathKey("paths.passwd", "Where SSH accounts (names and UIDs) are read.", true,
		func(c *Config) *string { return &c.Paths.Passwd }),

	boolKey("ssh.enabled", "Count and block SSH users.",
		func(c *Config) *bool { return &c.SSH.Enabled }),
	uint32Key("ssh.uid_min", `Accounts with uid_min <= UID < uid_max are SSH users. uid_min is at
least 1 (root never is one), uid_max at most 65534 (nobody).`,
		func(c *Config) *uint32 { return &c.SSH.UIDMin }, func(n int64) error {
			switch {
			case n == 0:
				return invalidf("must not be 0: root is never an SSH user")
			case n < 1 || n > 65533:
				return invalidf("must be from 1 to 65533, got %d", n)
			}
			return nil
		}),
	uint32Key("ssh.uid_max", "",
		func(c *Config) *uint32 { return &c.SSH.UIDMax }, func(n int64) error {
			if n < 1 || n > 65534 {
				return invalidf("must be from 1 to 65534 (nobody, never an SSH user), got %d", n)
			}
			return nil
		}),
	stringsKey("ssh.exclude", `Account names that are never SSH users, such as ["ubuntu", "backup"].`,
		func(c *Config) *[]string { return &c.SSH.Exclude }, func(s string) error {
			if !validAccountName(s) {
				return invalidf("must be account names (letters, digits, '.', '_', '-', at most 32), got %q", s)
			}
			return nil
		}),

	boolKey("ssh.sessions", `Count each SSH login's own connection for its user: shell, scp, sftp and
tunnels, as the bytes between server and client. Off: only the sockets the
user's UID owns count (OpenSSH tunnels; not Dropbear before 2025.89).`,
		func(c *Config) *bool { return &c.SSH.Sessions }),
	stringsKey("ssh.servers", `The SSH servers' programs, absolute paths; those not installed are skipped.
Their session processes are told by their executable, never by name.`,
		func(c *Config) *[]string { return &c.SSH.Servers }, checkPath(true)),
	stringsKey("ssh.auth_logs", `Where the SSH servers log logins: Dropbear before 2025.89 keeps its
session process as root, and its login line ("Password auth succeeded for
'USER' from IP:PORT", with the PID) tells whose session it is. Log files,
and "journal" for the systemd journal ("journal:NAMESPACE" for a journal
namespace); sources that do not exist on this system are skipped.`,
		func(c *Config) *[]string { return &c.SSH.AuthLogs }, checkAuthLog),

	pathKey("kernel.pin_path", "The bpffs directory where maps and links are pinned; they outlive the agent.", true,
		func(c *Config) *string { return &c.Kernel.PinPath }),
	pathKey("kernel.cgroup", `The cgroup v2 directory the programs attach to. "" is the root of the
cgroup v2 hierarchy, found at run time, which sees every socket.`, false,
		func(c *Config) *string { return &c.Kernel.Cgroup }),
	uint32Key("kernel.max_uids", "How many UIDs the kernel counts, 1 to 1048576; packets of further UIDs\npass uncounted.",
		func(c *Config) *uint32 { return &c.Kernel.MaxUIDs }, func(n int64) error {
			if n < 1 || n > MaxMaxUIDs {
				return invalidf("must be from 1 to %d, got %d", MaxMaxUIDs, n)
			}
			return nil
		}),
	{
		path: "kernel.protected_uids",
		doc:  "UIDs never blocked or limited, besides 0 (root) and 65534 (nobody).",
		value: func(c *Config) string {
			s := make([]string, len(c.Kernel.ProtectedUIDs))
			for i, u := range c.Kernel.ProtectedUIDs {
				s[i] = strconv.FormatUint(uint64(u), 10)
			}
			return "[" + strings.Join(s, ", ") + "]"
		},
		set: func(c *Config, v any) error {
			a, ok := v.([]any)
			if !ok {
				return invalidf("must be an array of UIDs, got %s", describe(v))
			}
			var uids []uint32 // nil if empty, as in Default
			for _, e := range a {
				n, ok := e.(int64)
				if !ok {
					return invalidf("must be an array of UIDs, got %s in it", describe(e))
				}
				if n < 0 || n > math.MaxUint32 {
					return invalidf("must be UIDs from 0 to %d, got %d", uint32(math.MaxUint32), n)
				}
				uids = append(uids, uint32(n))
			}
			c.Kernel.ProtectedUIDs = uids
			return nil
		},
	},

	nameKey("nft.table", "The table.", func(c *Config) *string { return &c.NFT.Table }),
	nameKey("nft.set", "Its set of blocked UIDs.", func(c *Config) *string { return &c.NFT.Set }),
	nameKey("nft.chain", "Its output chain, which drops their packets.", func(c *Config) *string { return &c.NFT.Chain }),

	boolKey("xray.enabled", "Count and block Xray users.",
		func(c *Config) *bool { return &c.Xray.Enabled }),
	stringsKey("xray.configs", `Xray config files: the first that exists is read, for the API address
and the users.`,
		func(c *Config) *[]string { return &c.Xray.Configs }, checkPath(true)),
	pathKey("xray.config_dir", `A directory of *.json config files (Xray's -confdir), read in name
order and merged as Xray does, instead of configs; "" is none.`, false,
		func(c *Config) *string { return &c.Xray.ConfigDir }),
	stringKey("xray.api", `Xray's API address, host:port, such as "127.0.0.1:10085"; "" takes it
from the api section of Xray's config.`,
		func(c *Config) *string { return &c.Xray.API }, checkHostPort),
	durationKey("xray.timeout", `The longest an API call may take: more than 0 and less than half of
interval. Left out, it is 500ms, or 250ms when interval is 1s.`,
		func(c *Config) *time.Duration { return &c.Xray.Timeout }, func(d time.Duration) error {
			if d <= 0 {
				return invalidf("must be more than 0, got %s", formatDuration(d))
			}
			return nil
		}),

	boolKey("xray.connections", `Count Xray users' TCP connections in the kernel, live (XTLS Vision
included), and stop them at their limit there, from the connection each
line of Xray's access log names: it needs "log": {"access": FILE} in
Xray's config and Linux 6.0. Other connections are counted by Xray.`,
		func(c *Config) *bool { return &c.Xray.Connections }),

	uint32Key("devices.default", `The device limit of every user whose line of the limits file sets none,
from 0 to 1000; 0 is no limit. A line's devices=unlimited exempts its user.`,
		func(c *Config) *uint32 { return &c.Devices.Default }, func(n int64) error {
			if n < 0 || n > quota.MaxDevices {
				return invalidf("must be from 0 (no limit) to %d, got %d", quota.MaxDevices, n)
			}
			return nil
		}),
	uint32Key("devices.ipv6_prefix", `IPv6 addresses within a prefix of this length are one device, from 16 to
128: a phone's privacy addresses rotate within its /64.`,
		func(c *Config) *uint32 { return &c.Devices.IPv6Prefix }, func(n int64) error {
			if n < MinIPv6Prefix || n > 128 {
				return invalidf("must be from %d to 128, got %d", MinIPv6Prefix, n)
			}
			return nil
		}),
	{
		path: "devices.cut",
		doc: `Which device is cut when a user has one more than allowed: "newest" (the
one that came last; the others keep working) or "oldest" (the newest
login wins). The cut device's new connections are cut too while the user
has their allowed number of other devices.`,
		value: func(c *Config) string { return quote(string(c.Devices.Cut)) },
		set: func(c *Config, v any) error {
			s, ok := v.(string)
			if !ok {
				return invalidf(`must be "newest" or "oldest", got %s`, describe(v))
			}
			c.Devices.Cut = DeviceCut(s)
			return nil
		},
		check: func(c *Config) error {
			switch c.Devices.Cut {
			case CutNewest, CutOldest:
				return nil
			}
			return invalidf(`must be "newest" or "oldest", got %q`, c.Devices.Cut)
		},
	},

	speedKey("speed.default", `The speed caps of every user whose line of the limits file sets none
(speed=): "20mbit" for both directions, "10mbit/2mbit" for download/upload;
"" is no cap.`,
		func(c *Config) *quota.Speed { return &c.Speed.Default }),
	speedKey("speed.throttle", `The throttle rate of every user whose line sets none (throttle=): a user
who reaches their limit is slowed to it (status THROTTLED) instead of
blocked, until what lifts a block lifts it. "" blocks at the limit.`,
		func(c *Config) *quota.Speed { return &c.Speed.Throttle }),

	stringKey("control.admin_group", `Members of this group may use bwctl to change anything, as root can;
"" is root only.`,
		func(c *Config) *string { return &c.Control.AdminGroup }, func(s string) error {
			if s != "" && !validAccountName(s) {
				return invalidf("must be a group name (letters, digits, '.', '_', '-', at most 32) or \"\", got %q", s)
			}
			return nil
		}),

	stringKey("metrics.listen", `The address of the metrics, host:port, such as "127.0.0.1:9477", or
"0.0.0.0:9477" for every IPv4 address; port 0 picks a free port, which
the agent logs. "" serves no metrics. Whoever reaches the address reads
every metric (user names too, with per_user): keep it on loopback or
behind a firewall.`,
		func(c *Config) *string { return &c.Metrics.Listen }, checkListen),
	boolKey("metrics.per_user", `Also serve series per user: used bytes, limit (unless unlimited) and
status, up to 3 series a user. Off by default: a label per user is what
Prometheus's maintainers warn against with thousands of users.`,
		func(c *Config) *bool { return &c.Metrics.PerUser }),
	uint32Key("metrics.per_user_max", `With per_user, at most this many users (the first present ones in name
order) get series, from 1 to 1000000; the others are left out and
counted in bwagent_user_metrics_omitted.`,
		func(c *Config) *uint32 { return &c.Metrics.PerUserMax }, func(n int64) error {
			if n < 1 || n > MaxPerUserMax {
				return invalidf("must be from 1 to %d, got %d", MaxPerUserMax, n)
			}
			return nil
		}),
}

// keyIndex maps a dotted key to its definition.
var keyIndex = func() map[string]*keyDef {
	m := make(map[string]*keyDef, len(keyDefs))
	for _, d := range keyDefs {
		m[d.path] = d
	}
	return m
}()

// knownPaths are every key and table, for suggestions.
var knownPaths = func() []string {
	var s []string
	for _, t := range tableDefs {
		s = append(s, t.name)
	}
	for _, d := range keyDefs {
		s = append(s, d.path)
	}
	for _, a := range arrayDefs {
		s = append(s, a.path)
	}
	return s
}()

func isTable(path string) bool {
	return slices.ContainsFunc(tableDefs, func(t tableDef) bool { return t.name == path })
}

// crossCheck checks the relations between values.
func (c Config) crossCheck() error {
	if 2*c.Xray.Timeout >= c.Interval {
		return &Error{
			Key: "xray.timeout",
			Err: invalidf("must be less than half of interval (%s), got %s", formatDuration(c.Interval), formatDuration(c.Xray.Timeout)),
			alts: []alt{{"interval", invalidf("must be more than twice xray.timeout (%s), got %s",
				formatDuration(c.Xray.Timeout), formatDuration(c.Interval))}},
		}
	}
	if c.SSH.UIDMin >= c.SSH.UIDMax {
		return &Error{
			Key:  "ssh.uid_max",
			Err:  invalidf("must be more than ssh.uid_min (%d), got %d", c.SSH.UIDMin, c.SSH.UIDMax),
			alts: []alt{{"ssh.uid_min", invalidf("must be less than ssh.uid_max (%d), got %d", c.SSH.UIDMax, c.SSH.UIDMin)}},
		}
	}
	paths := []struct {
		key, path string
	}{
		{"paths.limits", c.Paths.Limits},
		{"paths.usage_dir", c.Paths.UsageDir},
		{"paths.marker_dir", c.Paths.MarkerDir},
		{"paths.block_log", c.Paths.BlockLog},
		{"paths.state_db", c.Paths.StateDB},
		{"paths.socket", c.Paths.Socket},
		{"paths.passwd", c.Paths.Passwd},
	}
	for j := range paths {
		for i := range j {
			if paths[i].path == paths[j].path {
				return &Error{
					Key:  paths[j].key,
					Err:  invalidf("must differ from %s, got the same path %q", paths[i].key, paths[j].path),
					alts: []alt{{paths[i].key, invalidf("must differ from %s, got the same path %q", paths[j].key, paths[i].path)}},
				}
			}
		}
	}
	if c.Xray.Enabled && len(c.Xray.Configs) == 0 && c.Xray.ConfigDir == "" && c.Xray.API == "" {
		msg := "must name a file when xray.config_dir and xray.api are empty: the agent would not find Xray's API"
		return &Error{
			Key: "xray.configs",
			Err: invalidf("%s", msg),
			alts: []alt{
				{"xray.config_dir", invalidf("must be set when xray.configs and xray.api are empty: the agent would not find Xray's API")},
				{"xray.api", invalidf("must be set when xray.configs and xray.config_dir are empty: the agent would not find Xray's API")},
				{"xray.enabled", invalidf("xray.configs, xray.config_dir and xray.api are all empty: set one, or set enabled = false")},
			},
		}
	}
	return nil
}

// durationKey defines a duration key.
func durationKey(path, doc string, field func(*Config) *time.Duration, check func(time.Duration) error) *keyDef {
	return &keyDef{
		path:  path,
		doc:   doc,
		value: func(c *Config) string { return quote(formatDuration(*field(c))) },
		set: func(c *Config, v any) error {
			var d time.Duration
			switch v := v.(type) {
			case string:
				var err error
				if d, err = parseDuration(v); err != nil {
					return invalidf(`must be a duration such as "2s" or a whole number of seconds, got %q`, v)
				}
			case int64:
				if v > math.MaxInt64/int64(time.Second) || v < math.MinInt64/int64(time.Second) {
					return invalidf("must be a duration such as \"2s\" or a whole number of seconds, got %d seconds: out of range", v)
				}
				d = time.Duration(v) * time.Second
			default:
				return invalidf(`must be a duration such as "2s" or a whole number of seconds, got %s`, describe(v))
			}
			*field(c) = d
			return nil
		},
		check: func(c *Config) error { return check(*field(c)) },
	}
}

// durationRange returns a check of min <= d <= max.
func durationRange(min, max time.Duration) func(time.Duration) error {
	return func(d time.Duration) error {
		if d < min || d > max {
			return invalidf("must be from %s to %s, got %s", formatDuration(min), formatDuration(max), formatDuration(d))
		}
		return nil
	}
}

// day is the unit "d" of durations: 24 hours (the configuration has no
// use for calendar days).
const day = 24 * time.Hour

// parseDuration is time.ParseDuration that also takes whole days, "90d".
func parseDuration(s string) (time.Duration, error) {
	if n, ok := strings.CutSuffix(s, "d"); ok {
		days, err := strconv.ParseInt(n, 10, 64)
		if err != nil || days < 0 || days > math.MaxInt64/int64(day) {
			return 0, fmt.Errorf("bad number of days %q", s)
		}
		return time.Duration(days) * day, nil
	}
	return time.ParseDuration(s)
}

// formatDuration formats d as time.Duration.String does, without zero
// minutes and seconds after a larger unit: "10m", "1h", "1h0m5s"; whole
// days as "90d".
func formatDuration(d time.Duration) string {
	if d >= day && d%day == 0 {
		return strconv.FormatInt(int64(d/day), 10) + "d"
	}
	s := d.String()
	if t, ok := strings.CutSuffix(s, "m0s"); ok {
		s = t + "m"
		if t, ok := strings.CutSuffix(s, "h0m"); ok {
			s = t + "h"
		}
	}
	return s
}

// stringKey defines a string key.
func stringKey(path, doc string, field func(*Config) *string, check func(string) error) *keyDef {
	return &keyDef{
		path:  path,
		doc:   doc,
		value: func(c *Config) string { return quote(*field(c)) },
		set: func(c *Config, v any) error {
			s, ok := v.(string)
			if !ok {
				return invalidf("must be a string, got %s", describe(v))
			}
			*field(c) = s
			return nil
		},
		check: func(c *Config) error { return check(*field(c)) },
	}
}

// speedKey defines a pair of rates read by quota.ParseSpeed; "" is none.
func speedKey(path, doc string, field func(*Config) *quota.Speed) *keyDef {
	return &keyDef{
		path:  path,
		doc:   doc,
		value: func(c *Config) string { return quote(field(c).String()) },
		set: func(c *Config, v any) error {
			s, ok := v.(string)
			if !ok {
				return invalidf(`must be a rate such as "20mbit" or "10mbit/2mbit", got %s`, describe(v))
			}
			if s == "" {
				*field(c) = quota.Speed{}
				return nil
			}
			sp, err := quota.ParseSpeed(s)
			if err != nil {
				return invalidf("%v", err)
			}
			*field(c) = sp
			return nil
		},
		check: func(*Config) error { return nil },
	}
}

// pathKey defines a path; an optional path may be "".
func pathKey(path, doc string, required bool, field func(*Config) *string) *keyDef {
	return stringKey(path, doc, field, checkPath(required))
}

// checkAuthLog checks an ssh.auth_logs entry: "journal", "journal:NAMESPACE"
// or a log file's absolute path.
func checkAuthLog(s string) error {
	if ns, ok := strings.CutPrefix(s, "journal"); ok && (ns == "" || strings.HasPrefix(ns, ":")) {
		ns = strings.TrimPrefix(ns, ":")
		if s != "journal" && !validJournalNamespace(ns) {
			return invalidf("must be \"journal\" or \"journal:NAMESPACE\" (letters, digits, '_', '-', '.', at most 64), got %q", s)
		}
		return nil
	}
	return checkPath(true)(s)
}

// validJournalNamespace reports whether ns is a journal namespace name
// journald takes.
func validJournalNamespace(ns string) bool {
	if ns == "" || len(ns) > 64 {
		return false
	}
	for _, r := range ns {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == '.') {
			return false
		}
	}
	return true
}

// checkPath returns a check of an absolute clean path.
func checkPath(required bool) func(string) error {
	return func(s string) error {
		switch {
		case s == "" && !required:
			return nil
		case !utf8.ValidString(s):
			return invalidf("must be valid UTF-8, got %q", s)
		case strings.IndexByte(s, 0) >= 0:
			return invalidf("must not contain a NUL byte, got %q", s)
		case !filepath.IsAbs(s):
			return invalidf("must be an absolute path, got %q", s)
		case filepath.Clean(s) != s:
			return invalidf("must be a clean path (%q), got %q", filepath.Clean(s), s)
		case s == "/":
			return invalidf("must not be /")
		}
		return nil
	}
}

// nameKey defines an nftables object name.
func nameKey(path, doc string, field func(*Config) *string) *keyDef {
	return stringKey(path, doc, field, func(s string) error {
		if !validNFTName(s) {
			return invalidf("must be 1 to 31 letters, digits, '_' or '-', not starting with a digit or '-', got %q", s)
		}
		return nil
	})
}

func validNFTName(s string) bool {
	if len(s) < 1 || len(s) > 31 || s[0] == '-' || (s[0] >= '0' && s[0] <= '9') {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isNameByte(s[i]) {
			return false
		}
	}
	return true
}

func isNameByte(b byte) bool {
	return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' || b == '_' || b == '-'
}

// validAccountName accepts what useradd and groupadd accept: at most 32 of
// [A-Za-z0-9._-], not starting with '-', optionally ending with '$', not
// entirely digits, and not "." or "..".
func validAccountName(s string) bool {
	if len(s) < 1 || len(s) > 32 || s[0] == '-' || s == "." || s == ".." {
		return false
	}
	name := strings.TrimSuffix(s, "$")
	if name == "" {
		return false
	}
	digits := true
	for i := 0; i < len(name); i++ {
		b := name[i]
		if !isNameByte(b) && b != '.' {
			return false
		}
		digits = digits && b >= '0' && b <= '9'
	}
	return !digits
}

// checkHostPort accepts "" and host:port with a host name or IP address and
// a port from 1 to 65535.
func checkHostPort(s string) error {
	if s == "" || validHostPort(s, 1) {
		return nil
	}
	return invalidf(`must be host:port such as "127.0.0.1:10085", or "", got %q`, s)
}

// checkListen accepts "" and host:port with a host name or IP address and
// a port from 0 (any free port) to 65535.
func checkListen(s string) error {
	if s == "" || validHostPort(s, 0) {
		return nil
	}
	return invalidf(`must be host:port such as "127.0.0.1:9477" (port 0: any free port), or "" for none, got %q`, s)
}

// validHostPort reports whether s is host:port with a host name or IP
// address and a port from minPort to 65535.
func validHostPort(s string, minPort uint64) bool {
	host, port, err := net.SplitHostPort(s)
	if err != nil || host == "" {
		return false
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n < minPort {
		return false
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return true
	}
	return validHostName(host)
}

// validHostName accepts dot-separated labels of letters, digits, '-' and
// '_', not starting or ending with '-'.
func validHostName(h string) bool {
	if len(h) > 253 {
		return false
	}
	for label := range strings.SplitSeq(h, ".") {
		if len(label) < 1 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			if !isNameByte(label[i]) {
				return false
			}
		}
	}
	return true
}

// boolKey defines a boolean key.
func boolKey(path, doc string, field func(*Config) *bool) *keyDef {
	return &keyDef{
		path:  path,
		doc:   doc,
		value: func(c *Config) string { return strconv.FormatBool(*field(c)) },
		set: func(c *Config, v any) error {
			b, ok := v.(bool)
			if !ok {
				return invalidf("must be true or false, got %s", describe(v))
			}
			*field(c) = b
			return nil
		},
	}
}

// uint32Key defines an integer key; check sees the integer of the file
// before it is narrowed to 32 bits, and must refuse what does not fit.
func uint32Key(path, doc string, field func(*Config) *uint32, check func(int64) error) *keyDef {
	return &keyDef{
		path:  path,
		doc:   doc,
		value: func(c *Config) string { return strconv.FormatUint(uint64(*field(c)), 10) },
		set: func(c *Config, v any) error {
			n, ok := v.(int64)
			if !ok {
				return invalidf("must be an integer, got %s", describe(v))
			}
			if n < 0 || n > math.MaxUint32 {
				if err := check(n); err != nil {
					return err
				}
				return invalidf("must be from 0 to %d, got %d", uint32(math.MaxUint32), n)
			}
			*field(c) = uint32(n)
			return nil
		},
		check: func(c *Config) error { return check(int64(*field(c))) },
	}
}

// stringsKey defines an array of strings, each checked by check.
func stringsKey(path, doc string, field func(*Config) *[]string, check func(string) error) *keyDef {
	return &keyDef{
		path: path,
		doc:  doc,
		value: func(c *Config) string {
			s := make([]string, len(*field(c)))
			for i, e := range *field(c) {
				s[i] = quote(e)
			}
			return "[" + strings.Join(s, ", ") + "]"
		},
		set: func(c *Config, v any) error {
			a, ok := v.([]any)
			if !ok {
				return invalidf("must be an array of strings, got %s", describe(v))
			}
			var s []string // nil if empty, as in Default
			for _, e := range a {
				str, ok := e.(string)
				if !ok {
					return invalidf("must be an array of strings, got %s in it", describe(e))
				}
				s = append(s, str)
			}
			*field(c) = s
			return nil
		},
		check: func(c *Config) error {
			for _, s := range *field(c) {
				if err := check(s); err != nil {
					return err
				}
			}
			return nil
		},
	}
}

// loadZone loads a time zone by the name the file gives.
func loadZone(name string) (*time.Location, error) {
	switch name {
	case "Local":
		return time.Local, nil
	case "UTC":
		return time.UTC, nil
	case "":
		return nil, invalidf(`must be "Local", "UTC" or an IANA time zone name such as "Asia/Jakarta", got ""`)
	}
	loc, err := time.LoadLocation(name)
	if err != nil {
		msg := fmt.Sprintf(`must be "Local", "UTC" or an IANA time zone name such as "Asia/Jakarta", got %q`, name)
		if !strings.HasPrefix(err.Error(), "unknown time zone") {
			msg += ": " + err.Error()
		}
		return nil, &kindError{kind: ErrInvalid, msg: msg, cause: err}
	}
	return loc, nil
}

// quote returns s as a TOML basic string.
func quote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch r {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\n':
			b.WriteString(`\n`)
		case '\t':
			b.WriteString(`\t`)
		case '\r':
			b.WriteString(`\r`)
		default:
			if r < 0x20 || r == 0x7f {
				fmt.Fprintf(&b, `\u%04X`, r)
			} else {
				b.WriteRune(r)
			}
		}
	}
	b.WriteByte('"')
	return b.String()
}
