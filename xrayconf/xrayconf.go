package xrayconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/myvpn/bwagent/quota"
)

// Sentinel errors; test with [errors.Is].
var (
	// ErrNoConfig: none of the config files tried exists, or the config
	// directory has no config files.
	ErrNoConfig = errors.New("no xray config")
	// ErrSyntax: a file is not JSON, even with Xray's comments allowed.
	ErrSyntax = errors.New("xray config syntax error")
	// ErrInvalid: a file is JSON but not a config that Xray accepts (a
	// value of the wrong type, a duplicate inbound tag, a client that Xray
	// refuses, ...), or not a regular file, or too large.
	ErrInvalid = errors.New("invalid xray config")
	// ErrUnsupported: a config file in a format this package does not read
	// (TOML, YAML or protobuf).
	ErrUnsupported = errors.New("unsupported xray config format")
)

// DefaultPaths are the config files that [Load] tries when given none: where
// Xray's install script (XTLS/Xray-install) and distribution packages put it.
var DefaultPaths = []string{"/usr/local/etc/xray/config.json", "/etc/xray/config.json"}

// MaxFileSize bounds the size of a config file (Xray's with tens of
// thousands of clients are a few MB).
const MaxFileSize = 64 << 20

// User is one client of one Xray inbound.
type User struct {
	// Email is the client's email: its name in Xray's stats and API and
	// its user name in bwagent. It passes [quota.ValidName]; clients whose
	// email does not are left out and reported in [Config.Problems].
	Email string
	// Protocol is the inbound's protocol; Shadowsocks 2022 is
	// [quota.Shadowsocks].
	Protocol quota.Protocol
	// Inbound is the tag of the inbound; "" for an untagged inbound, whose
	// users Xray counts but cannot add or remove through its API.
	Inbound string
	// Level is the client's level, whose policy (policy.levels) decides
	// whether Xray counts its traffic.
	Level uint32

	// The account (see Account), packed: 72 bytes a User in all.
	kind  acctKind
	split uint16
	acct  string
}

// Alterable reports whether the user can be removed from its inbound and
// added again through Xray's API: its inbound has a tag and takes users.
func (u User) Alterable() bool { return u.kind != acctNone && u.Inbound != "" }

// Inbound is an Xray inbound of a protocol with users.
type Inbound struct {
	Tag      string         // "" if the inbound has none
	Protocol quota.Protocol // vless, vmess, trojan or shadowsocks
	// Method is a Shadowsocks inbound's settings.method: a
	// "2022-blake3-..." one for Shadowsocks 2022; "" for other protocols.
	Method string
	Listen string // "listen" as written; "" means all addresses
	Port   int    // the first port of "port"; 0 if none or from env:
	// Network is streamSettings.network, the transport: "raw" (Xray's
	// name for plain TCP, also when the config says "tcp" or nothing),
	// "ws", "grpc", "xhttp", "httpupgrade", "kcp"...
	Network string
	// ProxyProtocol: the inbound takes the PROXY protocol
	// (streamSettings.sockopt or rawSettings acceptProxyProtocol), so the
	// address Xray logs is the one the proxy in front of it passed on, not
	// its socket's peer.
	ProxyProtocol bool
	// UDP: the users' traffic also reaches the inbound's own UDP socket,
	// where no connection is there to attribute: a UDP transport ("kcp",
	// "quic"), or a Shadowsocks inbound with "udp" in settings.network
	// (Xray's default for it is "tcp" alone). VLESS, VMess and Trojan carry
	// their users' UDP inside the TCP connection.
	UDP   bool
	File  string // the file that defines the inbound
	Pos   int    // its index in File's "inbounds" array
	Users []User // its clients with a usable email, in config order
}

// Config is what bwagent needs from an Xray config.
type Config struct {
	// Files are the files read, in merge order.
	Files []string
	// API is the address of Xray's gRPC API ("host:port", or "unix:PATH"),
	// ready for xraystats.Dial: api.listen if set, else the listen address
	// and port of the inbound tagged api.tag, with an address of all
	// interfaces (0.0.0.0, ::, none) replaced by loopback. "" if the config
	// has no "api" object or no address for it (then a Problem says why).
	API string
	// APIServices are the services of api.services, as written.
	APIServices []string
	// Stats: the config has a "stats" object, without which Xray keeps no
	// counters.
	Stats bool
	// UserStats: policy.levels."0" has statsUserUplink and
	// statsUserDownlink, so Xray counts the traffic of users of level 0.
	UserStats bool
	// UserOnline: policy.levels."0" has statsUserOnline.
	UserOnline bool
	// ConnIdle is the longest policy.levels.N.connIdle (Xray's default
	// 300 s where a level sets none): a connection that moved nothing for
	// that long has been closed by Xray.
	ConnIdle time.Duration
	// AccessLog is the file that Xray writes its access log to
	// (log.access): a line per accepted connection that names the user's
	// address and email, which package xrayaccess follows. It is as
	// written: a relative path is relative to Xray's working directory.
	// "" when Xray writes no access log to a file: log.access absent or
	// empty (Xray writes it to its standard output), "none", or
	// log.loglevel "none", which turns the access log off too
	// (infra/conf/log.go).
	AccessLog string
	// LogMaskAddress is log.maskAddress as written ("half", "quarter",
	// "full", "/16+/64", ...); "" if unset. When set, Xray masks the IP
	// addresses in its logs, the access log included, which then cannot
	// tell whose a connection is.
	LogMaskAddress string
	// Inbounds are the VLESS, VMess, Trojan and Shadowsocks inbounds, in
	// config (merge) order, also those without users; other inbounds (the
	// API's dokodemo-door, socks, http, ...) are left out.
	Inbounds []Inbound
	// Problems are what discovery could not use or what keeps bwagent from
	// accounting or enforcing quotas, none of which stops it. They do not
	// repeat what API, Stats and UserStats say: a config without "api",
	// "stats" or user stats at level 0 has no Problem for it.
	Problems []Problem

	src    source      // how the files were found, for Changed
	stamps []fileStamp // the files as read, for Changed
}

// Problem is a part of the config that bwagent cannot use, or a setting
// that keeps it from accounting or enforcing quotas.
type Problem struct {
	File    string // the file it is in; "" if it is about the whole config
	Inbound string // the inbound's tag; "" if untagged or not about an inbound
	// Pos is the inbound's index in File's "inbounds" array, -1 if the
	// problem is not about an inbound.
	Pos int
	// Index is the client's index in the inbound's settings.clients, -1 if
	// the problem is not about a client.
	Index int
	Msg   string
}

// String names the file, the inbound and the client, and says what is
// wrong, e.g. `/etc/xray/config.json: inbound "vless-in": client 2: no
// email: ...`.
func (p Problem) String() string {
	var b strings.Builder
	if p.File != "" {
		b.WriteString(p.File)
		b.WriteString(": ")
	}
	switch {
	case p.Inbound != "":
		fmt.Fprintf(&b, "inbound %q: ", p.Inbound)
	case p.Pos >= 0:
		fmt.Fprintf(&b, "untagged inbound inbounds[%d]: ", p.Pos)
	}
	if p.Index >= 0 {
		fmt.Fprintf(&b, "client %d: ", p.Index)
	}
	b.WriteString(p.Msg)
	return b.String()
}

// Error is String, so that a Problem can be returned or wrapped as an error.
func (p Problem) Error() string { return p.String() }

// Users returns the users of all inbounds, in config order. A user of
// several inbounds appears once per inbound.
func (c *Config) Users() []User {
	var us []User
	for _, in := range c.Inbounds {
		us = append(us, in.Users...)
	}
	return us
}

// Lookup returns the users with this email (compared exactly, as Xray's
// stats names are), one per inbound; nil if there is none.
func (c *Config) Lookup(email string) []User {
	var us []User
	for _, in := range c.Inbounds {
		for _, u := range in.Users {
			if u.Email == email {
				us = append(us, u)
			}
		}
	}
	return us
}

// Inbound returns the inbound with this tag, if any.
func (c *Config) Inbound(tag string) (Inbound, bool) {
	for _, in := range c.Inbounds {
		if in.Tag == tag {
			return in, true
		}
	}
	return Inbound{}, false
}

// HasAPIService reports whether api.services enables the service, e.g.
// "StatsService" or "HandlerService"; Xray compares the names
// case-insensitively.
func (c *Config) HasAPIService(name string) bool {
	for _, s := range c.APIServices {
		if strings.EqualFold(s, name) {
			return true
		}
	}
	return false
}

// source is how Load found its files.
type source struct {
	kind  int // srcNone (Parse), srcPaths, srcDir, srcFiles
	paths []string
	dir   string
}

const (
	srcNone = iota
	srcPaths
	srcDir
	srcFiles
)

// Load reads the Xray config. With dir set, it reads the directory's
// *.json and *.jsonc files in lexical order and merges them as `xray run
// -confdir dir` does (see the package documentation). Otherwise it reads the
// first of paths that exists, or of [DefaultPaths] if paths is empty. If
// there is nothing to read, the error wraps [ErrNoConfig] and names what was
// tried.
func Load(paths []string, dir string) (*Config, error) {
	src := source{kind: srcPaths, paths: paths}
	if dir != "" {
		src = source{kind: srcDir, dir: dir}
	} else if len(paths) == 0 {
		src.paths = slices.Clone(DefaultPaths)
	}
	files, err := src.files()
	if err != nil {
		return nil, err
	}
	return load(files, src)
}

// LoadFiles reads the files and merges them in this order, as `xray run -c
// FILE1 -c FILE2 ...` does; all of them must exist.
func LoadFiles(files ...string) (*Config, error) {
	if len(files) == 0 {
		return nil, fmt.Errorf("xrayconf: %w: no files given", ErrNoConfig)
	}
	return load(files, source{kind: srcFiles, paths: files})
}

// Parse reads one config file's contents; name is the file's name for
// errors and problems.
func Parse(name string, data []byte) (*Config, error) {
	m := &merged{}
	if err := m.add(name, data); err != nil {
		return nil, err
	}
	return m.build()
}

// files returns the files that src names now.
func (src source) files() ([]string, error) {
	switch src.kind {
	case srcDir:
		return dirFiles(src.dir)
	case srcPaths:
		for _, p := range src.paths {
			fi, err := os.Stat(p)
			switch {
			case err == nil && !fi.IsDir():
				return []string{p}, nil
			case err == nil, errors.Is(err, fs.ErrNotExist), errors.Is(err, fs.ErrInvalid):
				// A directory is not a config file, as for Xray.
			default:
				return nil, fmt.Errorf("xrayconf: %w", err)
			}
		}
		return nil, fmt.Errorf("xrayconf: %w: none of %s exists", ErrNoConfig, strings.Join(src.paths, ", "))
	case srcFiles:
		return src.paths, nil
	}
	return nil, nil
}

// dirFiles lists the config files of dir as `xray -confdir` does.
func dirFiles(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("xrayconf: %w: config directory %s: %w", ErrNoConfig, dir, err)
		}
		return nil, fmt.Errorf("xrayconf: config directory: %w", err)
	}
	var files []string
	for _, e := range ents {
		name := e.Name()
		ext := filepath.Ext(name)
		if len(name) == len(ext) { // Xray's pattern wants a character before the dot
			continue
		}
		switch ext {
		case ".json", ".jsonc":
			files = append(files, filepath.Join(dir, name))
		case ".toml", ".yaml", ".yml":
			return nil, fmt.Errorf("xrayconf: %w: %s: Xray merges it, but this package reads JSON only",
				ErrUnsupported, filepath.Join(dir, name))
		}
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("xrayconf: %w: no *.json or *.jsonc files in %s", ErrNoConfig, dir)
	}
	return files, nil
}

// load reads and merges files.
func load(files []string, src source) (*Config, error) {
	m := &merged{}
	var stamps []fileStamp
	for _, name := range files {
		data, st, err := readFile(name)
		if err != nil {
			return nil, err
		}
		stamps = append(stamps, st)
		if err := m.add(name, data); err != nil {
			return nil, err
		}
	}
	c, err := m.build()
	if err != nil {
		return nil, err
	}
	c.src, c.stamps = src, stamps
	return c, nil
}

// readFile reads a config file, and its stamp as of just before.
func readFile(name string) ([]byte, fileStamp, error) {
	switch strings.ToLower(filepath.Ext(name)) {
	case ".toml", ".yaml", ".yml", ".pb", ".protobuf":
		return nil, fileStamp{}, fmt.Errorf("xrayconf: %w: %s: this package reads JSON only", ErrUnsupported, name)
	}
	f, err := os.Open(name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fileStamp{}, fmt.Errorf("xrayconf: %w: %w", ErrNoConfig, err)
		}
		return nil, fileStamp{}, fmt.Errorf("xrayconf: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fileStamp{}, fmt.Errorf("xrayconf: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fileStamp{}, fmt.Errorf("xrayconf: %w: %s: not a regular file", ErrInvalid, name)
	}
	// Read into a buffer of the file's size (and a little): io.ReadAll's
	// doubling would allocate twice a large config's size.
	buf := bytes.NewBuffer(make([]byte, 0, min(fi.Size(), MaxFileSize)+512))
	if _, err := buf.ReadFrom(io.LimitReader(f, MaxFileSize+1)); err != nil {
		return nil, fileStamp{}, fmt.Errorf("xrayconf: %w", err)
	}
	data := buf.Bytes()
	if len(data) > MaxFileSize {
		return nil, fileStamp{}, fmt.Errorf("xrayconf: %w: %s: larger than %d bytes", ErrInvalid, name, MaxFileSize)
	}
	return data, stampOf(name, fi), nil
}

// The parts of Xray's config that this package reads. The types of the
// fields are those of Xray's (infra/conf), so that a value of the wrong type
// is refused as Xray refuses it.
type (
	rawConfig struct {
		Inbounds []rawInbound `json:"inbounds"`
		API      *rawAPI      `json:"api"`
		Stats    *struct{}    `json:"stats"`
		Policy   *rawPolicy   `json:"policy"`
		Routing  *rawRouting  `json:"routing"`
		Log      *rawLog      `json:"log"`
	}
	rawLog struct {
		Access      string `json:"access"`
		LogLevel    string `json:"loglevel"`
		MaskAddress string `json:"maskAddress"`
	}
	rawInbound struct {
		Protocol string          `json:"protocol"`
		Tag      string          `json:"tag"`
		Port     json.RawMessage `json:"port"`
		Listen   *string         `json:"listen"`
		Settings json.RawMessage `json:"settings"`
		Stream   *rawStream      `json:"streamSettings"`

		file string // where it came from
		pos  int    // its index in file's "inbounds"
	}
	rawStream struct {
		Network string      `json:"network"`
		Sockopt *rawProxied `json:"sockopt"`
		Raw     *rawProxied `json:"rawSettings"`
		TCP     *rawProxied `json:"tcpSettings"`
	}
	rawProxied struct {
		AcceptProxyProtocol bool `json:"acceptProxyProtocol"`
	}
	rawAPI struct {
		Tag      string   `json:"tag"`
		Listen   string   `json:"listen"`
		Services []string `json:"services"`
	}
	rawPolicy struct {
		Levels map[uint32]*rawLevel `json:"levels"`
	}
	rawLevel struct {
		StatsUserUplink   bool    `json:"statsUserUplink"`
		StatsUserDownlink bool    `json:"statsUserDownlink"`
		StatsUserOnline   bool    `json:"statsUserOnline"`
		ConnIdle          *uint32 `json:"connIdle"`
	}
	rawRouting struct {
		Rules []json.RawMessage `json:"rules"`
	}
)

// merged is the config of the files added so far, merged as Xray merges
// them (infra/conf/xray.go, Config.Override).
type merged struct {
	files []string
	cfg   rawConfig
	// The files that the top-level objects in cfg came from.
	apiFile, policyFile, routingFile string
}

// add decodes a file and merges it into m.
func (m *merged) add(name string, data []byte) error {
	var c rawConfig
	if err := decodeJSONC(name, data, &c); err != nil {
		return fmt.Errorf("xrayconf: %w", err)
	}
	for i := range c.Inbounds {
		c.Inbounds[i].file, c.Inbounds[i].pos = name, i
	}
	m.files = append(m.files, name)
	if len(m.files) == 1 {
		m.cfg = c
		m.apiFile, m.policyFile, m.routingFile = name, name, name
		return nil
	}
	if c.API != nil {
		m.cfg.API, m.apiFile = c.API, name
	}
	if c.Stats != nil {
		m.cfg.Stats = c.Stats
	}
	if c.Policy != nil {
		m.cfg.Policy, m.policyFile = c.Policy, name
	}
	if c.Routing != nil {
		m.cfg.Routing, m.routingFile = c.Routing, name
	}
	if c.Log != nil {
		m.cfg.Log = c.Log
	}
	// Each inbound replaces the first one so far with its tag, also one
	// appended by this same file; an empty tag matches an empty tag.
	for _, in := range c.Inbounds {
		i := m.findInbound(in.Tag)
		if i >= 0 {
			m.cfg.Inbounds[i] = in
		} else {
			m.cfg.Inbounds = append(m.cfg.Inbounds, in)
		}
	}
	return nil
}

func (m *merged) findInbound(tag string) int {
	for i, in := range m.cfg.Inbounds {
		if in.Tag == tag {
			return i
		}
	}
	return -1
}

// build makes the Config of m.
func (m *merged) build() (*Config, error) {
	c := &Config{Files: m.files}
	raw := &m.cfg

	// Xray refuses two inbounds with one tag ("existing tag found").
	seen := map[string]*rawInbound{}
	for i := range raw.Inbounds {
		in := &raw.Inbounds[i]
		if in.Tag == "" {
			continue
		}
		if prev, ok := seen[in.Tag]; ok {
			return nil, fmt.Errorf("xrayconf: %w: %s: inbounds[%d]: tag %q is also the tag of inbounds[%d] of %s",
				ErrInvalid, in.file, in.pos, in.Tag, prev.pos, prev.file)
		}
		seen[in.Tag] = in
	}

	for i := range raw.Inbounds {
		in, err := c.inbound(&raw.Inbounds[i])
		if err != nil {
			return nil, fmt.Errorf("xrayconf: %w", err)
		}
		if in != nil {
			c.Inbounds = append(c.Inbounds, *in)
		}
	}
	c.crossInbound()

	c.Stats = raw.Stats != nil
	if err := c.api(m); err != nil {
		return nil, fmt.Errorf("xrayconf: %w", err)
	}
	c.policy(m)
	c.log(raw.Log)
	return c, nil
}

// log sets the access log's path and the address mask from "log", as Xray
// reads them (infra/conf/log.go, LogConfig.Build).
func (c *Config) log(l *rawLog) {
	if l == nil {
		return
	}
	c.LogMaskAddress = l.MaskAddress
	if l.Access != "none" && !strings.EqualFold(l.LogLevel, "none") {
		c.AccessLog = l.Access
	}
}

// crossInbound reports emails used in inbounds of different protocols: one
// bwagent user has one protocol.
func (c *Config) crossInbound() {
	withUsers := 0
	for i := range c.Inbounds {
		if len(c.Inbounds[i].Users) > 0 {
			withUsers++
		}
	}
	if withUsers < 2 {
		return // nothing to cross (and no map of every email to build)
	}
	type first struct {
		proto quota.Protocol
		in    *Inbound
	}
	firsts := map[string]first{}
	type report struct {
		email string
		in    *Inbound
	}
	reported := map[report]bool{}
	for i := range c.Inbounds {
		in := &c.Inbounds[i]
		for _, u := range in.Users {
			f, ok := firsts[u.Email]
			if !ok {
				firsts[u.Email] = first{u.Protocol, in}
				continue
			}
			key := report{u.Email, in}
			if f.proto == u.Protocol || reported[key] {
				continue
			}
			reported[key] = true
			where := fmt.Sprintf("inbound %q", f.in.Tag)
			if f.in.Tag == "" {
				where = "an untagged inbound"
			}
			c.problem(in, -1, fmt.Sprintf("email %q is also a %s user of %s (%s): one bwagent user, two protocols",
				u.Email, f.proto, where, f.in.File))
		}
	}
}

// defaultConnIdle is Xray's connIdle of a level that sets none
// (features/policy/default.go).
const defaultConnIdle = 300 * time.Second

// policy sets the stats flags and ConnIdle from policy.levels, and reports levels of
// users whose traffic Xray does not count.
func (c *Config) policy(m *merged) {
	var levels map[uint32]*rawLevel
	if m.cfg.Policy != nil {
		levels = m.cfg.Policy.Levels
	}
	counted := func(l uint32) bool {
		p := levels[l]
		return p != nil && p.StatsUserUplink && p.StatsUserDownlink
	}
	if p := levels[0]; p != nil {
		c.UserStats = counted(0)
		c.UserOnline = p.StatsUserOnline
	}
	c.ConnIdle = defaultConnIdle
	for _, p := range levels {
		if p != nil && p.ConnIdle != nil {
			c.ConnIdle = max(c.ConnIdle, time.Duration(*p.ConnIdle)*time.Second)
		}
	}
	// Level 0 is what UserStats tells; other levels need a word.
	var order []uint32
	n := map[uint32]int{}
	for i := range c.Inbounds {
		for _, u := range c.Inbounds[i].Users {
			if u.Level == 0 || counted(u.Level) {
				continue
			}
			if n[u.Level] == 0 {
				order = append(order, u.Level)
			}
			n[u.Level]++
		}
	}
	for _, l := range order {
		c.Problems = append(c.Problems, Problem{File: m.policyFile, Pos: -1, Index: -1,
			Msg: fmt.Sprintf(`%d user(s) of level %d, but policy.levels."%d" lacks statsUserUplink and statsUserDownlink: Xray does not count their traffic`,
				n[l], l, l)})
	}
}

// problem records a problem of inbound in (nil: none) and client index i.
func (c *Config) problem(in *Inbound, i int, msg string) {
	p := Problem{Pos: -1, Index: i, Msg: msg}
	if in != nil {
		p.File, p.Inbound, p.Pos = in.File, in.Tag, in.Pos
	}
	c.Problems = append(c.Problems, p)
}
