// Package config reads bwagent's configuration file, a TOML file at
// DefaultPath (/etc/bwagent/bwagent.toml) or wherever `bwagent --config FILE`
// points.
//
// Every key has a working default, so the agent runs with no file at all;
// a key left out of the file keeps its default. example.toml in this
// directory is the documented file with every key at its default, and
// [Config.String] renders any configuration in the same layout.
//
// An invalid file is refused with an [*Error] naming the file, the line and
// the key:
//
//	/etc/bwagent/bwagent.toml:3: interval: must be from 1s to 5s, got 10s
//	/etc/bwagent/bwagent.toml:7: paths.usage_dir: must be an absolute path, got "usage"
//	/etc/bwagent/bwagent.toml:2: unknown key xray.tiemout (did you mean xray.timeout?)
//	/etc/bwagent/bwagent.toml:3: syntax error: Key 'interval' has already been defined.
//	/etc/bwagent/bwagent.toml:14: notify.webhook[2].url: must be set, such as "https://hooks.example.com/bwagent"
//
// In an array of tables ([[notify.webhook]]) a key is named with its
// table's place among those of its name, from 1.
//
// The error wraps one of [ErrSyntax], [ErrUnknownKey] and [ErrInvalid].
// A problem between two keys (xray.timeout and interval, ssh.uid_min and
// ssh.uid_max, two equal paths) is reported at the one the file sets.
//
// Time zones: the package imports time/tzdata, so every IANA zone name
// loads, and a file that is valid on one machine is valid on all of them,
// even without /usr/share/zoneinfo. The system's zone database is still
// preferred when it has the zone.
//
// The package does no logging and, apart from [Load] reading the file and
// time zones being loaded, no I/O: it does not check that the configured
// files, directories, groups or addresses exist.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"reflect"
	"slices"
	"strings"
	"time"
	_ "time/tzdata" // see the package documentation

	"github.com/BurntSushi/toml"
	"github.com/myvpn/bwagent/quota"
)

// DefaultPath is the configuration file Load reads when given no path.
const DefaultPath = "/etc/bwagent/bwagent.toml"

// defaultPath is DefaultPath, replaced by tests.
var defaultPath = DefaultPath

// Bounds of Config.Interval and Config.JSONInterval.
const (
	MinInterval     = time.Second
	MaxInterval     = 5 * time.Second
	MinJSONInterval = time.Second
	MaxJSONInterval = 10 * time.Minute
)

// Bounds of Config.Retention.
const (
	MinRetention = 24 * time.Hour
	MaxRetention = 3650 * 24 * time.Hour
)

// MaxMaxUIDs is the largest Kernel.MaxUIDs: the data plane's policy bitmap
// covers UIDs below 2^20.
const MaxMaxUIDs = 1 << 20

// Defaults of values shared with other packages; a test keeps them equal to
// bpf.DefaultPinPath, bpf.DefaultMaxUIDs and nft.DefaultTable, DefaultSet
// and DefaultChain (importing those packages here would pull the BPF loader
// into every program that reads the configuration).
const (
	defaultPinPath = "/sys/fs/bpf/bwagent"
	defaultMaxUIDs = 65536
	defaultTable   = "bwagent"
	defaultSet     = "blocked_uids"
	defaultChain   = "output"
)

// Metric says which traffic counts against a user's limit.
type Metric string

// Metrics.
const (
	MetricTotal    Metric = "total"    // upload plus download
	MetricUpload   Metric = "upload"   // traffic the user sends
	MetricDownload Metric = "download" // traffic the user receives
)

// ParseMetric accepts "total", "upload" or "download", in any case.
func ParseMetric(s string) (Metric, error) {
	for _, m := range []Metric{MetricTotal, MetricUpload, MetricDownload} {
		if strings.EqualFold(s, string(m)) {
			return m, nil
		}
	}
	return "", invalidf(`must be "total", "upload" or "download", got %q`, s)
}

// UnmarshalText implements encoding.TextUnmarshaler with ParseMetric, for
// flag.TextVar.
func (m *Metric) UnmarshalText(b []byte) error {
	v, err := ParseMetric(string(b))
	if err != nil {
		return err
	}
	*m = v
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (m Metric) MarshalText() ([]byte, error) { return []byte(m), nil }

// Config is the agent's configuration. Build one with Default, Load or
// Parse; a Config changed by code should be checked with Validate.
type Config struct {
	// Interval is the agent's tick, from MinInterval to MaxInterval.
	// Default 2s. TOML: interval, a duration string or whole seconds.
	Interval time.Duration
	// WarningPercent is the share of a limit above which a user is shown
	// as WARNING: more than 0, at most 100. Default 80.
	WarningPercent float64
	// Metric is the traffic counted against limits. Default MetricTotal.
	Metric Metric
	// TimeZone is the zone of daily usage and reset schedules, loaded from
	// TimeZoneName. Default time.Local.
	TimeZone *time.Location
	// TimeZoneName is "Local", "UTC" or an IANA name such as
	// "Asia/Jakarta"; it equals TimeZone.String(). TOML: timezone.
	TimeZoneName string
	// JSONInterval is how often usage-only updates of the per-user JSON
	// files are written, from MinJSONInterval to MaxJSONInterval.
	// Default 5s.
	JSONInterval time.Duration
	// Retention is how long a user who left (no account, no Xray client)
	// is kept with their usage and status, from MinRetention to
	// MaxRetention. Default 90 days. TOML: retention, e.g. "90d".
	Retention time.Duration

	Paths   Paths   // [paths]
	SSH     SSH     // [ssh]
	Kernel  Kernel  // [kernel]
	NFT     NFT     // [nft]
	Xray    Xray    // [xray]
	Devices Devices // [devices]
	Speed   Speed   // [speed]
	Control Control // [control]
	Metrics Metrics // [metrics]
	Notify  Notify  // [notify], [[notify.webhook]], [[notify.exec]], [[notify.telegram]]
}

// Paths are the files and directories the agent uses, all absolute and
// clean. The defaults are the bash cek-bw-limit tool's, so its files stay
// where operators look for them.
type Paths struct {
	Limits    string // limits per user; default /etc/xray/bw-limit.conf
	UsageDir  string // <user>.json per user; default /etc/myvpn/usage
	MarkerDir string // a marker file per blocked user; default /etc/myvpn/blocked_users
	BlockLog  string // one line per block; default /etc/myvpn/blocked.log
	StateDB   string // the agent's own state; default /var/lib/bwagent/state.db
	Socket    string // bwctl's control socket; default /run/bwagent/bwagent.sock
	Passwd    string // where SSH accounts are read; default /etc/passwd
}

// SSH selects the Linux accounts that are SSH users, counted and blocked by
// UID in the kernel.
type SSH struct {
	// Enabled turns SSH users on. Default true.
	Enabled bool
	// Accounts with UIDMin <= UID < UIDMax are SSH users. UIDMin is at
	// least 1 (root never is one), UIDMax at most 65534 (nobody).
	// Defaults 1000 and 65534.
	UIDMin, UIDMax uint32
	// Exclude lists account names that are never SSH users. Default none.
	Exclude []string
	// Sessions counts each SSH login's own connection for its user (shell,
	// scp, sftp and tunnels, on the wire), instead of only the sockets the
	// user's UID owns. Default true.
	Sessions bool
	// Servers are the SSH servers' executables, absolute paths; those not
	// installed are skipped. Default sshsess.DefaultPrograms.
	Servers []string
	// AuthLogs are where SSH servers log logins, read for the session
	// processes that stay root after a login (Dropbear before 2025.89):
	// log files, and "journal" (or "journal:NAMESPACE") for the systemd
	// journal. Default "journal" and /var/log/auth.log.
	AuthLogs []string
}

// Kernel configures the BPF data plane (package bpf).
type Kernel struct {
	// PinPath is the bpffs directory of the pinned maps and links.
	// Default /sys/fs/bpf/bwagent.
	PinPath string
	// Cgroup is the cgroup v2 directory the programs attach to; "" (the
	// default) means the root of the cgroup v2 hierarchy, found at run time.
	Cgroup string
	// MaxUIDs is how many UIDs the kernel counts, 1 to MaxMaxUIDs.
	// Default 65536.
	MaxUIDs uint32
	// ProtectedUIDs are never blocked or limited, besides 0 and 65534,
	// which always are protected. Default none.
	ProtectedUIDs []uint32
}

// NFT names the agent's nftables table (package nft). Each name is 1 to 31
// characters of [A-Za-z0-9_-], not starting with a digit or '-'.
type NFT struct {
	Table string // the inet table; default "bwagent"
	Set   string // the set of blocked UIDs; default "blocked_uids"
	Chain string // the output chain; default "output"
}

// Xray configures the Xray users, counted and blocked through Xray's API.
type Xray struct {
	// Enabled turns Xray users on. Default true.
	Enabled bool
	// Configs are Xray config files; the first that exists is used.
	// Default /usr/local/etc/xray/config.json, /etc/xray/config.json.
	Configs []string
	// ConfigDir is a directory of *.json files (Xray's -confdir), read as
	// well; "" (the default) means none.
	ConfigDir string
	// API is the address of Xray's API, host:port; "" (the default) means
	// the address in the api section of Xray's config.
	API string
	// Timeout bounds each API call: more than 0 and less than half of
	// Interval. Default 500ms (250ms when a file sets interval to 1s and
	// no timeout).
	Timeout time.Duration
	// Connections counts the users' TCP connections in the kernel, live,
	// from the connection each line of Xray's access log names (XTLS
	// Vision included), and enforces their limits there. It needs the
	// access log ("log": {"access": FILE} in Xray's config) and Linux 6.0.
	// Default true.
	Connections bool
}

// Devices configures the device limits: how many devices (client
// addresses) may have SSH sessions or Xray connections of one user open at
// once.
type Devices struct {
	// Default is the device limit of every user whose line of the limits
	// file sets none (devices=N), from 0 to quota.MaxDevices; 0 (the
	// default) is no limit.
	Default uint32
	// IPv6Prefix is the length of the IPv6 prefix whose addresses are one
	// device, from MinIPv6Prefix to 128: a device's privacy addresses
	// rotate within its /64. Default 64.
	IPv6Prefix uint32
	// Cut says which device is cut when a user has more than allowed.
	// Default CutNewest.
	Cut DeviceCut
}

// Speed configures the speed caps of users whose line of the limits file
// sets none.
type Speed struct {
	// Default is every such user's caps (speed=); zero (the default) is
	// none.
	Default quota.Speed
	// Throttle is the rate every such user is slowed to at their limit
	// instead of being blocked (throttle=); zero (the default) blocks.
	Throttle quota.Speed
}

// DeviceCut says which device of a user over their device limit is cut.
type DeviceCut string

// Device cuts.
const (
	// CutNewest cuts the device that came last: the devices that were
	// there keep working, and the new one is refused while they are.
	CutNewest DeviceCut = "newest"
	// CutOldest cuts the device that came first: the newest login wins,
	// and the device it replaced is refused while the others are there.
	CutOldest DeviceCut = "oldest"
)

// MinIPv6Prefix is the shortest Devices.IPv6Prefix.
const MinIPv6Prefix = 16

// Control configures who may use bwctl.
type Control struct {
	// AdminGroup is a group whose members may change anything, as root
	// can; "" (the default) means root only.
	AdminGroup string
}

// Metrics configures the Prometheus metrics (package metrics).
type Metrics struct {
	// Listen is the address the metrics are served on, host:port, at
	// /metrics; port 0 picks a free port (the agent logs it). "" serves
	// none. Default "127.0.0.1:9477".
	Listen string
	// PerUser adds per-user series (used bytes, limit, status). Default
	// false.
	PerUser bool
	// PerUserMax caps the users with per-user series, from 1 to
	// MaxPerUserMax; the others are left out and counted. Default 1000.
	PerUserMax uint32
}

// MaxPerUserMax is the largest Metrics.PerUserMax.
const MaxPerUserMax = 1_000_000

// Default returns the configuration used when there is no file. It is valid.
func Default() Config {
	return Config{
		Interval:       2 * time.Second,
		WarningPercent: 80,
		Metric:         MetricTotal,
		TimeZone:       time.Local,
		TimeZoneName:   "Local",
		JSONInterval:   5 * time.Second,
		Retention:      90 * 24 * time.Hour,
		Paths: Paths{
			Limits:    "/etc/xray/bw-limit.conf",
			UsageDir:  "/etc/myvpn/usage",
			MarkerDir: "/etc/myvpn/blocked_users",
			BlockLog:  "/etc/myvpn/blocked.log",
			StateDB:   "/var/lib/bwagent/state.db",
			Socket:    "/run/bwagent/bwagent.sock",
			Passwd:    "/etc/passwd",
		},
		SSH: SSH{
			Enabled:  true,
			UIDMin:   1000,
			UIDMax:   65534,
			Sessions: true,
			// sshsess.DefaultPrograms; config imports no agent package.
			Servers:  []string{"/usr/sbin/sshd", "/usr/lib/openssh/sshd-session", "/usr/sbin/dropbear"},
			AuthLogs: []string{"journal", "/var/log/auth.log"},
		},
		Kernel: Kernel{
			PinPath: defaultPinPath,
			MaxUIDs: defaultMaxUIDs,
		},
		NFT: NFT{
			Table: defaultTable,
			Set:   defaultSet,
			Chain: defaultChain,
		},
		Xray: Xray{
			Enabled:     true,
			Configs:     []string{"/usr/local/etc/xray/config.json", "/etc/xray/config.json"},
			Timeout:     500 * time.Millisecond,
			Connections: true,
		},
		Devices: Devices{
			IPv6Prefix: 64,
			Cut:        CutNewest,
		},
		Metrics: Metrics{
			Listen:     "127.0.0.1:9477",
			PerUserMax: 1000,
		},
		Notify: defaultNotify(),
	}
}

// Load reads and parses the file at path. An empty path means DefaultPath,
// and a missing DefaultPath means Default(); an explicitly given path that
// does not exist is an error (wrapping fs.ErrNotExist, naming the path).
func Load(path string) (Config, error) {
	explicit := path != ""
	if !explicit {
		path = defaultPath
	}
	data, err := os.ReadFile(path)
	if err != nil {
		if !explicit && errors.Is(err, fs.ErrNotExist) {
			return Default(), nil
		}
		return Config{}, fmt.Errorf("config file: %w", err)
	}
	return Parse(path, data)
}

// Parse parses a configuration file's contents; name is the file name used
// in errors. Keys absent from data keep their defaults. It runs Validate,
// and every error is an *Error naming the line and the key.
func Parse(name string, data []byte) (Config, error) {
	var raw map[string]any
	md, err := toml.NewDecoder(bytes.NewReader(data)).Decode(&raw)
	if err != nil {
		return Config{}, syntaxError(name, data, err)
	}
	p := &parser{name: name, data: data, md: md, raw: raw}
	c := Default()
	for _, k := range md.Keys() {
		if err := p.apply(&c, k); err != nil {
			return Config{}, err
		}
	}
	// The default timeout must stay below half of a 1s interval.
	if !md.IsDefined("xray", "timeout") && c.Xray.Timeout >= c.Interval/2 {
		c.Xray.Timeout = c.Interval / 4
	}
	if err := c.Validate(); err != nil {
		return Config{}, p.place(err)
	}
	return c, nil
}

// Validate checks every value and the relations between values: the checks
// Parse runs, for a Config built or changed by code. The error is an *Error
// naming the key (without file or line) and wrapping ErrInvalid.
func (c Config) Validate() error {
	for _, d := range keyDefs {
		if d.check == nil {
			continue
		}
		if err := d.check(&c); err != nil {
			return &Error{Key: d.path, Err: err}
		}
	}
	if err := c.checkArrays(); err != nil {
		return err
	}
	return c.crossCheck()
}

// Equal reports whether c and d are the same configuration: time zones are
// compared by name, and nil and empty lists are equal.
func (c Config) Equal(d Config) bool {
	return reflect.DeepEqual(c.normal(), d.normal())
}

// normal returns c with its time zone as a name and empty lists as nil.
func (c Config) normal() Config {
	zone := "<nil>"
	if c.TimeZone != nil {
		zone = c.TimeZone.String()
	}
	c.TimeZone = nil
	c.TimeZoneName += "\x00" + zone
	nilIfEmpty(&c.SSH.Exclude)
	nilIfEmpty(&c.Kernel.ProtectedUIDs)
	nilIfEmpty(&c.Xray.Configs)
	c.Notify = c.Notify.normal()
	return c
}

func nilIfEmpty[T any](s *[]T) {
	if len(*s) == 0 {
		*s = nil
	}
}

// Rules returns the accounting rules the configuration sets, for the
// accounting core. The configuration is assumed valid (Load, Parse and
// Validate make it so): the metric is one of the three and the warning
// share is in (0, 1].
func (c Config) Rules() quota.Rules {
	m := quota.Total
	switch c.Metric {
	case MetricUpload:
		m = quota.Upload
	case MetricDownload:
		m = quota.Download
	}
	return quota.Rules{Metric: m, Warning: c.WarningPercent / 100, Speed: c.Speed.Default, Throttle: c.Speed.Throttle}
}

// Location returns the configured time zone (time.Local if unset).
func (c Config) Location() *time.Location {
	if c.TimeZone == nil {
		return time.Local
	}
	return c.TimeZone
}

// NeedsRestart returns the keys whose change from c to next a running agent
// cannot apply: what it opened or attached at start (the state database,
// the control socket, the BPF pins, cgroup and map size, the protected
// UIDs, the nftables names, the metrics server). Sorted; nil when none
// changed.
func (c Config) NeedsRestart(next Config) []string {
	var keys []string
	add := func(key string, changed bool) {
		if changed {
			keys = append(keys, key)
		}
	}
	add("control.admin_group", c.Control.AdminGroup != next.Control.AdminGroup)
	add("kernel.cgroup", c.Kernel.Cgroup != next.Kernel.Cgroup)
	add("kernel.max_uids", c.Kernel.MaxUIDs != next.Kernel.MaxUIDs)
	add("kernel.pin_path", c.Kernel.PinPath != next.Kernel.PinPath)
	add("kernel.protected_uids", !slices.Equal(c.Kernel.ProtectedUIDs, next.Kernel.ProtectedUIDs))
	add("metrics.listen", c.Metrics.Listen != next.Metrics.Listen)
	add("metrics.per_user", c.Metrics.PerUser != next.Metrics.PerUser)
	add("metrics.per_user_max", c.Metrics.PerUserMax != next.Metrics.PerUserMax)
	add("nft.chain", c.NFT.Chain != next.NFT.Chain)
	add("nft.set", c.NFT.Set != next.NFT.Set)
	add("nft.table", c.NFT.Table != next.NFT.Table)
	add("paths.socket", c.Paths.Socket != next.Paths.Socket)
	add("paths.state_db", c.Paths.StateDB != next.Paths.StateDB)
	return keys
}
