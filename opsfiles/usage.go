package opsfiles

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/quota"
)

// Usage is the content of a user's usage file, <usage_dir>/<user>.json. The
// first eight fields are the bash tool's, in its order; the others are this
// agent's additions. Byte counts are in bytes.
type Usage struct {
	Username    string  `json:"username"`
	TotalUsage  uint64  `json:"total_usage"`  // bytes counted against the limit (per the configured metric)
	DailyUsage  uint64  `json:"daily_usage"`  // today's bytes, same metric
	TotalLimit  uint64  `json:"total_limit"`  // bytes, 0 = unlimited
	Blocked     bool    `json:"blocked"`      // blocked for any reason; false while THROTTLED
	BlockReason string  `json:"block_reason"` // "" when not blocked
	BlockTime   string  `json:"block_time"`   // TimeLayout, local time; "" when not blocked
	LastReset   string  `json:"last_reset"`   // TimeLayout, local time; "" if never
	Protocol    string  `json:"protocol"`     // ssh, vmess, vless, trojan or shadowsocks
	Status      string  `json:"status"`       // ACTIVE, WARNING, THROTTLED, BLOCKED, UNLIMITED or DISABLED
	Upload      uint64  `json:"upload"`       // bytes from the user since the last reset
	Download    uint64  `json:"download"`     // bytes to the user since the last reset
	Remaining   *uint64 `json:"remaining"`    // bytes left before the limit; null when unlimited
	UpdatedAt   string  `json:"updated_at"`   // TimeLayout, local time
	// Protocols are the user's sources now: "ssh" for an SSH account, then
	// an Xray client's protocol; both for a user who is both. Omitted when
	// unknown (a file of an earlier version).
	Protocols []string `json:"protocols,omitempty"`
	// Devices is how many devices (client addresses) have an SSH session
	// or an Xray connection of the user open now; DevicesLimit is how many
	// may, null without a device limit. Live values, not read back by
	// ReadUsage.
	Devices      int  `json:"devices"`
	DevicesLimit *int `json:"devices_limit"`
	// SpeedDown and SpeedUp are the speed caps in force now, in bits per
	// second: the throttle rate while THROTTLED, else the user's speed=
	// (or the configured default); null without one. Live values, not
	// read back by ReadUsage.
	SpeedDown *uint64 `json:"speed_down"`
	SpeedUp   *uint64 `json:"speed_up"`
}

// TimeLayout is the layout of every timestamp in the operators' files:
// local time to the second, as the bash tool's `date '+%Y-%m-%d %H:%M:%S'`.
const TimeLayout = "2006-01-02 15:04:05"

// ErrCorrupt is the error (wrapped in an *fs.PathError naming the file and
// the problem) of ReadUsage and ImportDir for a usage file that is not a
// usage document: empty, larger than 1 MiB, invalid JSON, not an object, a
// negative or non-numeric byte count, a value of the wrong type, or a
// username that differs from the file's name. MoveAside keeps such a file for inspection.
var ErrCorrupt = errors.New("corrupt usage file")

// maxUsageSize bounds the size of a usage file ReadUsage reads; a real one is
// well under 1 KiB.
const maxUsageSize = 1 << 20

// usageExt is the extension of usage files.
const usageExt = ".json"

// FormatTime formats t in loc as TimeLayout, and the zero time as "". A nil
// loc formats t in its own location.
func FormatTime(t time.Time, loc *time.Location) string {
	if t.IsZero() {
		return ""
	}
	if loc != nil {
		t = t.In(loc)
	}
	return t.Format(TimeLayout)
}

// ParseTime parses a timestamp of the operators' files: "" (the zero time),
// TimeLayout in loc (UTC if loc is nil), or RFC 3339 (which carries its own
// offset).
func ParseTime(s string, loc *time.Location) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if loc == nil {
		loc = time.UTC
	}
	if t, err := time.ParseInLocation(TimeLayout, s, loc); err == nil {
		return t, nil
	}
	if t, err := time.Parse(time.RFC3339, s); err == nil {
		return t, nil
	}
	return time.Time{}, fmt.Errorf("invalid time %q: want YYYY-MM-DD HH:MM:SS or RFC 3339", s)
}

// Marshal returns u as the usage file holds it: JSON indented by two
// spaces, fields in the order of the struct (the bash tool's first), HTML
// characters not escaped, and a trailing newline, as encoding/json's
// Encoder writes it with SetIndent("", "  ") and SetEscapeHTML(false).
func (u Usage) Marshal() []byte {
	return appendUsage(nil, &u)
}

// UsageEncoder renders many usage files as Usage.Marshal does, into one
// buffer it keeps: thousands of files a few seconds cost no allocation
// each. The zero UsageEncoder is ready to use; it is not safe for
// concurrent use.
type UsageEncoder struct {
	buf []byte
}

// Encode returns u's file content, valid until the next Reset (a later
// Encode leaves it as it is).
func (e *UsageEncoder) Encode(u *Usage) []byte {
	start := len(e.buf)
	e.buf = appendUsage(e.buf, u)
	// Capped: a later Encode that does not grow the buffer must not write
	// over this file.
	return e.buf[start:len(e.buf):len(e.buf)]
}

// Reset makes the encoder reuse its buffer: the contents Encode returned
// before are overwritten by later ones.
func (e *UsageEncoder) Reset() { e.buf = e.buf[:0] }

// appendUsage appends u as Marshal renders it. It writes what
// encoding/json would, field by field, without its reflection and its
// second, indenting pass over the output: those were a tenth of the usage
// file writer's CPU with 1,000 files a tick, the rest being the files'
// system calls. TestUsageMarshalIsJSON and FuzzUsageMarshal hold it to
// encoding/json's output.
func appendUsage(b []byte, u *Usage) []byte {
	field := func(name string) {
		b = append(b, ",\n  \""...)
		b = append(b, name...)
		b = append(b, "\": "...)
	}
	str := func(name, v string) {
		field(name)
		b = appendJSONString(b, v)
	}
	num := func(name string, v uint64) {
		field(name)
		b = strconv.AppendUint(b, v, 10)
	}
	optNum := func(name string, v *uint64) {
		if v == nil {
			field(name)
			b = append(b, "null"...)
			return
		}
		num(name, *v)
	}
	b = append(b, "{\n  \"username\": "...)
	b = appendJSONString(b, u.Username)
	num("total_usage", u.TotalUsage)
	num("daily_usage", u.DailyUsage)
	num("total_limit", u.TotalLimit)
	field("blocked")
	b = strconv.AppendBool(b, u.Blocked)
	str("block_reason", u.BlockReason)
	str("block_time", u.BlockTime)
	str("last_reset", u.LastReset)
	str("protocol", u.Protocol)
	str("status", u.Status)
	num("upload", u.Upload)
	num("download", u.Download)
	optNum("remaining", u.Remaining)
	str("updated_at", u.UpdatedAt)
	if len(u.Protocols) > 0 { // omitempty
		field("protocols")
		b = append(b, '[')
		for i, p := range u.Protocols {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, "\n    "...)
			b = appendJSONString(b, p)
		}
		b = append(b, "\n  ]"...)
	}
	field("devices")
	b = strconv.AppendInt(b, int64(u.Devices), 10)
	field("devices_limit")
	if u.DevicesLimit == nil {
		b = append(b, "null"...)
	} else {
		b = strconv.AppendInt(b, int64(*u.DevicesLimit), 10)
	}
	optNum("speed_down", u.SpeedDown)
	optNum("speed_up", u.SpeedUp)
	return append(b, "\n}\n"...)
}

// appendJSONString appends s as a JSON string, escaped as encoding/json
// escapes it without HTML escaping: a quote, a backslash and the control
// characters (\b, \f, \n, \r and \t by name, the others as \u00XX), an
// invalid UTF-8 byte as \ufffd, and U+2028 and U+2029.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// File returns u's usage file for WriteBatch: named "<user>.json", mode
// 0644. It fails, naming the problem, if u.Username is not a valid name.
func (u Usage) File() (File, error) {
	if err := quota.ValidName(u.Username); err != nil {
		return File{}, fmt.Errorf("usage file: %w", err)
	}
	return File{Name: u.Username + usageExt, Data: u.Marshal(), Perm: 0o644}, nil
}

// WriteUsage atomically writes u to dir/<user>.json (mode 0644), creating
// dir (0755) if it is missing. An invalid user name is an error and nothing
// is written.
func WriteUsage(dir string, u Usage) error {
	f, err := u.File()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return WriteFile(filepath.Join(dir, f.Name), f.Data, f.Perm)
}

// WriteUsages writes many usage files to dir with one WriteBatch, creating
// dir (0755) if it is missing. The result has one entry per element of us,
// nil for each file written; a usage with an invalid user name gets an error
// and nothing is written for it.
func WriteUsages(dir string, us []Usage) []error {
	errs := make([]error, len(us))
	files := make([]File, 0, len(us))
	idx := make([]int, 0, len(us))
	for i, u := range us {
		f, err := u.File()
		if err != nil {
			errs[i] = err
			continue
		}
		files = append(files, f)
		idx = append(idx, i)
	}
	if len(files) == 0 {
		return errs
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		for _, i := range idx {
			errs[i] = err
		}
		return errs
	}
	for j, err := range WriteBatch(dir, files) {
		errs[idx[j]] = err
	}
	return errs
}

// ReadUsage reads a usage file, leniently enough for the files of the bash
// tool being replaced: byte counts may be JSON integers, floats
// (1.073741824e+09; a fraction is dropped) or numeric strings
// ("1073741824"); "blocked" may be a boolean, "true"/"false" (also
// yes/no, 1/0) or 0/1; missing fields are zero, null is zero, unknown
// fields are ignored, a UTF-8 byte order mark is skipped. A missing or empty
// username is taken from the file name (<user>.json).
//
// Timestamps in TimeLayout or RFC 3339 are kept as they are;
// "YYYY-MM-DDTHH:MM:SS" is rewritten in TimeLayout, a JSON number is taken
// as Unix seconds and rewritten in RFC 3339 (0 is ""), null and "null" are
// "". Any other string is kept verbatim: the byte counts are what matters,
// and ParseTime reports it to whoever needs the time.
//
// A file that is not a usage document is reported with ErrCorrupt (see
// there), wrapped in an *fs.PathError whose Path is path. A symbolic link at
// path is not followed: it gives ErrSymlink. Anything else that is not a
// regular file, and failing to read the file, give other errors, each an
// *fs.PathError.
func ReadUsage(path string) (Usage, error) {
	return readUsage(unix.AT_FDCWD, path, path)
}

// readUsage reads the usage file name, relative to the directory dirfd; path
// names it in errors.
func readUsage(dirfd int, name, path string) (Usage, error) {
	data, err := readRegular(dirfd, name, path, maxUsageSize)
	if err != nil {
		if errors.Is(err, errTooLarge) {
			return Usage{}, corrupt(path, fmt.Sprintf("larger than %d bytes", maxUsageSize))
		}
		return Usage{}, err
	}
	u, err := parseUsage(data, strings.TrimSuffix(filepath.Base(path), usageExt))
	if err != nil {
		return Usage{}, corrupt(path, err.Error())
	}
	return u, nil
}

func corrupt(path, why string) error {
	return &fs.PathError{Op: "read usage", Path: path, Err: fmt.Errorf("%w: %s", ErrCorrupt, why)}
}

var utf8BOM = []byte("\xef\xbb\xbf")

// parseUsage decodes a usage document leniently; name is the user the file
// name says. The error describes the problem, without the file name.
func parseUsage(data []byte, name string) (Usage, error) {
	data = bytes.TrimPrefix(data, utf8BOM)
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 {
		return Usage{}, errors.New("empty")
	}
	var m map[string]json.RawMessage
	if trimmed[0] != '{' && json.Valid(trimmed) {
		return Usage{}, errors.New("not a JSON object")
	}
	if err := json.Unmarshal(trimmed, &m); err != nil {
		return Usage{}, fmt.Errorf("invalid JSON: %v", err)
	}
	var u Usage
	var errs []error
	field := func(key string, parse func(json.RawMessage) error) {
		raw, ok := m[key]
		if !ok {
			return
		}
		if err := parse(raw); err != nil {
			errs = append(errs, fmt.Errorf("%s: %v", key, err))
		}
	}
	count := func(p *uint64) func(json.RawMessage) error {
		return func(raw json.RawMessage) (err error) {
			*p, _, err = jsonCount(raw)
			return err
		}
	}
	text := func(p *string) func(json.RawMessage) error {
		return func(raw json.RawMessage) (err error) {
			*p, err = jsonString(raw)
			return err
		}
	}
	stamp := func(p *string) func(json.RawMessage) error {
		return func(raw json.RawMessage) (err error) {
			*p, err = jsonTime(raw)
			return err
		}
	}
	field("username", text(&u.Username))
	field("total_usage", count(&u.TotalUsage))
	field("daily_usage", count(&u.DailyUsage))
	field("total_limit", func(raw json.RawMessage) (err error) {
		if s, err := jsonString(raw); err == nil && strings.EqualFold(strings.TrimSpace(s), "unlimited") {
			return nil
		}
		u.TotalLimit, _, err = jsonCount(raw)
		return err
	})
	field("blocked", func(raw json.RawMessage) (err error) {
		u.Blocked, err = jsonBool(raw)
		return err
	})
	field("block_reason", text(&u.BlockReason))
	field("block_time", stamp(&u.BlockTime))
	field("last_reset", stamp(&u.LastReset))
	field("protocol", text(&u.Protocol))
	field("status", text(&u.Status))
	field("upload", count(&u.Upload))
	field("download", count(&u.Download))
	field("remaining", func(raw json.RawMessage) error {
		if s, err := jsonString(raw); err == nil && strings.EqualFold(strings.TrimSpace(s), "unlimited") {
			return nil
		}
		n, ok, err := jsonCount(raw)
		if ok {
			u.Remaining = &n
		}
		return err
	})
	field("updated_at", stamp(&u.UpdatedAt))
	if err := errors.Join(errs...); err != nil {
		return Usage{}, errors.New(strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	switch {
	case u.Username == "":
		u.Username = name
	case u.Username != name:
		return Usage{}, fmt.Errorf("username %q does not match the file name (%q)", u.Username, name+usageExt)
	}
	if err := quota.ValidName(u.Username); err != nil {
		return Usage{}, fmt.Errorf("username: %v", err)
	}
	return u, nil
}

// jsonCount decodes a byte count: a non-negative JSON number or numeric
// string, or null or "" (zero, not present).
func jsonCount(raw json.RawMessage) (n uint64, present bool, err error) {
	switch raw[0] {
	case 'n':
		return 0, false, nil
	case '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return 0, false, err
		}
		s = strings.TrimSpace(s)
		if s == "" {
			return 0, false, nil
		}
		if strings.Trim(s, "0123456789.eE+-") != "" {
			return 0, false, fmt.Errorf("not a number: %q", s)
		}
		n, err := parseCount(s)
		return n, err == nil, err
	case '-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9':
		n, err := parseCount(string(raw))
		return n, err == nil, err
	}
	return 0, false, fmt.Errorf("not a number: %s", truncate(string(raw), 40))
}

// parseCount parses a decimal number as a byte count, dropping a fraction.
func parseCount(s string) (uint64, error) {
	if n, err := strconv.ParseUint(s, 10, 64); err == nil {
		return n, nil
	}
	f, err := strconv.ParseFloat(s, 64)
	switch {
	case err != nil && !errors.Is(err, strconv.ErrRange):
		return 0, fmt.Errorf("not a number: %q", s)
	case f < 0:
		return 0, fmt.Errorf("negative: %s", s)
	case err != nil || f >= math.MaxUint64 || math.IsInf(f, 0) || math.IsNaN(f):
		return 0, fmt.Errorf("out of range: %s", s)
	}
	return uint64(f), nil
}

// jsonString decodes a string; null is "".
func jsonString(raw json.RawMessage) (string, error) {
	switch raw[0] {
	case 'n':
		return "", nil
	case '"':
		var s string
		err := json.Unmarshal(raw, &s)
		return s, err
	}
	return "", fmt.Errorf("not a string: %s", truncate(string(raw), 40))
}

// jsonBool decodes a boolean, leniently.
func jsonBool(raw json.RawMessage) (bool, error) {
	switch raw[0] {
	case 'n':
		return false, nil
	case 't', 'f':
		var b bool
		err := json.Unmarshal(raw, &b)
		return b, err
	case '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return false, err
		}
		switch strings.ToLower(strings.TrimSpace(s)) {
		case "true", "yes", "1", "on":
			return true, nil
		case "false", "no", "0", "off", "":
			return false, nil
		}
		return false, fmt.Errorf("not a boolean: %q", s)
	}
	switch string(raw) {
	case "1":
		return true, nil
	case "0":
		return false, nil
	}
	return false, fmt.Errorf("not a boolean: %s", truncate(string(raw), 40))
}

// jsonTime decodes a timestamp (see ReadUsage).
func jsonTime(raw json.RawMessage) (string, error) {
	if raw[0] != '"' && raw[0] != 'n' {
		if n, _, err := jsonCount(raw); err == nil {
			if n == 0 {
				return "", nil
			}
			if n > 1<<40 {
				return "", fmt.Errorf("not a Unix time: %s", truncate(string(raw), 40))
			}
			return time.Unix(int64(n), 0).UTC().Format(time.RFC3339), nil
		}
		return "", fmt.Errorf("not a time: %s", truncate(string(raw), 40))
	}
	s, err := jsonString(raw)
	if err != nil {
		return "", err
	}
	s = strings.TrimSpace(s)
	if s == "null" {
		return "", nil
	}
	if len(s) == len(TimeLayout) && s[10] == 'T' {
		if _, err := time.Parse("2006-01-02T15:04:05", s); err == nil {
			return s[:10] + " " + s[11:], nil
		}
	}
	return s, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// ImportDir reads every usage file (*.json) in dir, in name order, for the
// one-time import of an earlier install's files. ok holds the documents
// read; bad has one error per file not imported, each an *fs.PathError
// naming the file: wrapping ErrCorrupt for a corrupt document (see
// ReadUsage and MoveAside), quota.ErrBadName when the name before ".json"
// is not a valid user name (such a file is not read), ErrSymlink for a
// symbolic link ("is a symbolic link; not imported": it is not read, so it
// cannot lead the import to a file outside dir), or the error reading it
// (a directory or another file that is not a regular file is not read
// either). Files not ending in ".json" (temporary files, files moved aside)
// are ignored. If dir cannot be read, bad holds that error alone; a missing
// dir is no error and imports nothing.
//
// dir itself may be a symbolic link, as it may for the writers: the
// operator's choice of where the usage files live. The files are opened
// relative to the directory ImportDir opened, so a link swapped in for dir
// meanwhile changes nothing.
func ImportDir(dir string) (ok []Usage, bad []error) {
	dirfd, err := openDir(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return nil, []error{err}
	}
	d := os.NewFile(uintptr(dirfd), dir)
	defer d.Close()
	ents, err := d.ReadDir(-1)
	if err != nil {
		return nil, []error{err}
	}
	slices.SortFunc(ents, func(a, b os.DirEntry) int { return strings.Compare(a.Name(), b.Name()) })
	notImported := func(path string) error {
		return &fs.PathError{Op: "import", Path: path, Err: fmt.Errorf("%w; not imported", ErrSymlink)}
	}
	for _, e := range ents {
		name, isUsage := strings.CutSuffix(e.Name(), usageExt)
		if !isUsage {
			continue
		}
		path := filepath.Join(dir, e.Name())
		if err := quota.ValidName(name); err != nil {
			bad = append(bad, &fs.PathError{Op: "import", Path: path, Err: err})
			continue
		}
		if e.Type()&fs.ModeSymlink != 0 {
			bad = append(bad, notImported(path))
			continue
		}
		u, err := readUsage(dirfd, e.Name(), path)
		if errors.Is(err, ErrSymlink) { // a link since ReadDir
			err = notImported(path)
		}
		if err != nil {
			bad = append(bad, err)
			continue
		}
		ok = append(ok, u)
	}
	return ok, bad
}

// MoveAside renames the file at path to path + ".corrupt-YYYYMMDD-HHMMSS"
// (now in its own location), never replacing an existing file: if that name
// is taken, "-2", "-3"... is appended. It returns the new path. Nothing is
// ever deleted, and the new name does not end in ".json", so ImportDir
// ignores it from then on.
func MoveAside(path string, now time.Time) (string, error) {
	base := path + ".corrupt-" + now.Format("20060102-150405")
	for i := 1; i <= 1000; i++ {
		to := base
		if i > 1 {
			to += "-" + strconv.Itoa(i)
		}
		err := renameNoReplace(path, to)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return "", err
		}
		if err := syncDir(filepath.Dir(path)); err != nil {
			return to, err
		}
		return to, nil
	}
	return "", &fs.PathError{Op: "move aside", Path: path, Err: fs.ErrExist}
}

// renameNoReplace renames from to to unless to exists (fs.ErrExist).
func renameNoReplace(from, to string) error {
	err := ignoringEINTR(func() error {
		return unix.Renameat2(unix.AT_FDCWD, from, unix.AT_FDCWD, to, unix.RENAME_NOREPLACE)
	})
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
		// A filesystem without RENAME_NOREPLACE: link(2) refuses to replace.
		if err = os.Link(from, to); err == nil {
			return os.Remove(from)
		}
		return err
	}
	if err != nil {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: err}
	}
	return nil
}
