package opsfiles

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/quota"
)

func ptr(n uint64) *uint64 { return &n }

// The guide's example, field for field.
const guideJSON = `{
  "username": "john",
  "total_usage": 1073741824,
  "daily_usage": 104857600,
  "total_limit": 10737418240,
  "blocked": true,
  "block_reason": "Bandwidth Limit Reached",
  "block_time": "2024-12-07 14:30:45",
  "last_reset": "2024-12-01 00:00:00"
}`

func TestUsageMarshal(t *testing.T) {
	u := Usage{
		Username: "john", TotalUsage: 1073741824, DailyUsage: 104857600, TotalLimit: 10737418240,
		Blocked: true, BlockReason: "Bandwidth Limit Reached", BlockTime: "2024-12-07 14:30:45", LastReset: "2024-12-01 00:00:00",
		Protocol: "ssh", Status: "BLOCKED", Upload: 1073741824, Download: 5 << 30, Remaining: ptr(0), UpdatedAt: "2024-12-07 14:30:47",
	}
	got := u.Marshal()
	want := strings.TrimSuffix(guideJSON, "\n}") + `,
  "protocol": "ssh",
  "status": "BLOCKED",
  "upload": 1073741824,
  "download": 5368709120,
  "remaining": 0,
  "updated_at": "2024-12-07 14:30:47",
  "devices": 0,
  "devices_limit": null,
  "speed_down": null,
  "speed_up": null
}
`
	if string(got) != want {
		t.Errorf("Marshal:\n%s\nwant:\n%s", got, want)
	}

	two := 2
	u = Usage{Username: "d", Protocols: []string{"ssh", "vless"}, Devices: 1, DevicesLimit: &two, Status: "THROTTLED",
		SpeedDown: ptr(4000000), SpeedUp: ptr(1000000)}
	got = u.Marshal()
	if !strings.Contains(string(got), `"protocols": [
    "ssh",
    "vless"
  ],
  "devices": 1,
  "devices_limit": 2,
  "speed_down": 4000000,
  "speed_up": 1000000
}`) {
		t.Errorf("Marshal:\n%s", got)
	}

	u = Usage{Username: "a<b>&c", Status: "UNLIMITED", BlockReason: "x<y"}
	got = u.Marshal()
	if !strings.Contains(string(got), `"remaining": null`) || !strings.Contains(string(got), `"a<b>&c"`) || !strings.Contains(string(got), `"x<y"`) {
		t.Errorf("Marshal:\n%s", got)
	}
}

// jsonUsage is Usage rendered by encoding/json, as Marshal must render it.
func jsonUsage(t testing.TB, u Usage) string {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(u); err != nil {
		t.Fatal(err)
	}
	return buf.String()
}

// Marshal writes what encoding/json writes, byte for byte, whatever the
// strings hold: every escape, invalid UTF-8, the characters JSON allows
// but encoding/json escapes, and no HTML escaping.
func TestUsageMarshalIsJSON(t *testing.T) {
	one, zero := 1, 0
	for _, u := range []Usage{
		{},
		{Username: "a", Remaining: ptr(0), DevicesLimit: &zero, SpeedDown: ptr(0), SpeedUp: ptr(1 << 63), Protocols: []string{}},
		{Username: "b", TotalUsage: 1<<64 - 1, Devices: -1, DevicesLimit: &one, Protocols: []string{"ssh"}},
		{BlockReason: "\"quoted\" \\ back\b\f\n\r\t\x00\x01\x1f\x7f <&> é 日本 \u2028\u2029 \xff\xfe end", Protocols: []string{"\u2029", "\xc3"}},
	} {
		if got, want := string(u.Marshal()), jsonUsage(t, u); got != want {
			t.Errorf("Marshal(%+v):\n%s\nencoding/json:\n%s", u, got, want)
		}
	}
}

func FuzzUsageMarshal(f *testing.F) {
	f.Add("john", "Bandwidth Limit Reached", "ssh", uint64(1<<30), true, 2)
	f.Add("\u2028\x00\"\\", "\xff<>&", "", uint64(0), false, 0)
	f.Fuzz(func(t *testing.T, name, reason, proto string, n uint64, blocked bool, devs int) {
		u := Usage{Username: name, TotalUsage: n, Blocked: blocked, BlockReason: reason, Protocol: proto, Devices: devs}
		if devs%2 == 0 {
			u.Remaining, u.DevicesLimit, u.Protocols = &n, &devs, []string{proto, reason}
		}
		if got, want := string(u.Marshal()), jsonUsage(t, u); got != want {
			t.Errorf("Marshal:\n%q\nencoding/json:\n%q", got, want)
		}
	})
}

func TestFormatParseTime(t *testing.T) {
	loc := time.FixedZone("WIB", 7*3600)
	tm := time.Date(2024, 12, 7, 7, 30, 45, 999, time.UTC)
	if got := FormatTime(tm, loc); got != "2024-12-07 14:30:45" {
		t.Errorf("FormatTime = %q", got)
	}
	if got := FormatTime(tm, nil); got != "2024-12-07 07:30:45" {
		t.Errorf("FormatTime(nil loc) = %q", got)
	}
	if got := FormatTime(time.Time{}, loc); got != "" {
		t.Errorf("FormatTime(zero) = %q", got)
	}
	for s, want := range map[string]time.Time{
		"":                          {},
		"2024-12-07 14:30:45":       time.Date(2024, 12, 7, 14, 30, 45, 0, loc),
		"2024-12-07T07:30:45Z":      time.Date(2024, 12, 7, 7, 30, 45, 0, time.UTC),
		"2024-12-07T14:30:45+07:00": time.Date(2024, 12, 7, 7, 30, 45, 0, time.UTC),
	} {
		got, err := ParseTime(s, loc)
		if err != nil || !got.Equal(want) {
			t.Errorf("ParseTime(%q) = %v, %v; want %v", s, got, err, want)
		}
	}
	if _, err := ParseTime("yesterday", loc); err == nil {
		t.Error("ParseTime(yesterday) succeeded")
	}
}

func TestReadUsage(t *testing.T) {
	guide := Usage{
		Username: "john", TotalUsage: 1073741824, DailyUsage: 104857600, TotalLimit: 10737418240,
		Blocked: true, BlockReason: "Bandwidth Limit Reached", BlockTime: "2024-12-07 14:30:45", LastReset: "2024-12-01 00:00:00",
	}
	for _, tc := range []struct {
		name, in string
		want     Usage
		corrupt  string // a part of the problem reported, or "" for success
	}{
		{name: "guide", in: guideJSON, want: guide},
		{name: "guide compact with BOM and CRLF", in: "\xef\xbb\xbf" + strings.ReplaceAll(strings.ReplaceAll(guideJSON, "\n  ", ""), "\n", "\r\n"), want: guide},
		{name: "floats and strings", in: `{"username":"john","total_usage":1.073741824e+09,"daily_usage":"104857600","total_limit":" 10737418240 ",
			"blocked":"true","block_reason":"Bandwidth Limit Reached","block_time":"2024-12-07 14:30:45","last_reset":"2024-12-01 00:00:00"}`, want: guide},
		{name: "fraction dropped", in: `{"total_usage": 1536.9, "daily_usage": "2.5e3"}`, want: Usage{Username: "john", TotalUsage: 1536, DailyUsage: 2500}},
		{name: "missing fields, name from file", in: `{}`, want: Usage{Username: "john"}},
		{name: "nulls", in: `{"username":null,"total_usage":null,"blocked":null,"block_time":null,"remaining":null,"protocol":null}`, want: Usage{Username: "john"}},
		{name: "empty strings", in: `{"username":"","total_usage":"","block_time":"","blocked":""}`, want: Usage{Username: "john"}},
		{name: "extra fields", in: `{"username":"john","uid":1001,"history":[1,2,{"x":null}],"note":"hi"}`, want: Usage{Username: "john"}},
		{name: "blocked variants", in: `{"blocked":"FALSE"}`, want: Usage{Username: "john"}},
		{name: "blocked 1", in: `{"blocked":1}`, want: Usage{Username: "john", Blocked: true}},
		{name: "blocked yes", in: `{"blocked":"yes"}`, want: Usage{Username: "john", Blocked: true}},
		{name: "RFC 3339 kept", in: `{"block_time":"2024-12-07T14:30:45+07:00","last_reset":"2024-12-01T00:00:00Z"}`,
			want: Usage{Username: "john", BlockTime: "2024-12-07T14:30:45+07:00", LastReset: "2024-12-01T00:00:00Z"}},
		{name: "T without zone", in: `{"block_time":"2024-12-07T14:30:45"}`, want: Usage{Username: "john", BlockTime: "2024-12-07 14:30:45"}},
		{name: "Unix time", in: `{"last_reset":1733011200,"block_time":0,"updated_at":"null"}`, want: Usage{Username: "john", LastReset: "2024-12-01T00:00:00Z"}},
		{name: "unknown time kept", in: `{"last_reset":"Sun Dec  1 00:00:00 WIB 2024"}`, want: Usage{Username: "john", LastReset: "Sun Dec  1 00:00:00 WIB 2024"}},
		{name: "agent fields", in: `{"protocol":"vmess","status":"ACTIVE","upload":5,"download":"6","remaining":7,"updated_at":"2024-12-07 14:30:45"}`,
			want: Usage{Username: "john", Protocol: "vmess", Status: "ACTIVE", Upload: 5, Download: 6, Remaining: ptr(7), UpdatedAt: "2024-12-07 14:30:45"}},
		{name: "remaining unlimited", in: `{"remaining":"unlimited","total_limit":"unlimited"}`, want: Usage{Username: "john"}},
		{name: "remaining zero", in: `{"remaining":0}`, want: Usage{Username: "john", Remaining: ptr(0)}},
		{name: "max", in: `{"total_usage":18446744073709551615}`, want: Usage{Username: "john", TotalUsage: 1<<64 - 1}},

		{name: "empty file", in: "", corrupt: "empty"},
		{name: "blank file", in: " \n\t\n", corrupt: "empty"},
		{name: "invalid JSON", in: `{"username": "john",`, corrupt: "invalid JSON"},
		{name: "trailing garbage", in: `{"username": "john"} x`, corrupt: "invalid JSON"},
		{name: "two objects", in: `{} {}`, corrupt: "invalid JSON"},
		{name: "array", in: `[{"username":"john"}]`, corrupt: "not a JSON object"},
		{name: "null", in: `null`, corrupt: "not a JSON object"},
		{name: "number", in: `42`, corrupt: "not a JSON object"},
		{name: "negative", in: `{"total_usage":-5}`, corrupt: "total_usage: negative"},
		{name: "negative float", in: `{"daily_usage":-1e3}`, corrupt: "daily_usage: negative"},
		{name: "negative string", in: `{"total_usage":"-5"}`, corrupt: "total_usage: negative"},
		{name: "non-numeric string", in: `{"total_usage":"lots"}`, corrupt: "total_usage: not a number"},
		{name: "NaN string", in: `{"total_usage":"NaN"}`, corrupt: "total_usage: not a number"},
		{name: "Inf string", in: `{"total_usage":"Infinity"}`, corrupt: "total_usage: not a number"},
		{name: "hex string", in: `{"total_usage":"0x10"}`, corrupt: "total_usage: not a number"},
		{name: "bool usage", in: `{"total_usage":true}`, corrupt: "total_usage: not a number"},
		{name: "object usage", in: `{"upload":{}}`, corrupt: "upload: not a number"},
		{name: "too large", in: `{"total_usage":1e20}`, corrupt: "total_usage: out of range"},
		{name: "too large int", in: `{"total_usage":18446744073709551616}`, corrupt: "total_usage: out of range"},
		{name: "huge exponent", in: `{"total_usage":1e400}`, corrupt: "total_usage: out of range"},
		{name: "bad blocked", in: `{"blocked":"maybe"}`, corrupt: "blocked: not a boolean"},
		{name: "bad blocked number", in: `{"blocked":2}`, corrupt: "blocked: not a boolean"},
		{name: "numeric username", in: `{"username":1001}`, corrupt: "username: not a string"},
		{name: "other user", in: `{"username":"jane"}`, corrupt: `username "jane" does not match the file name ("john.json")`},
		{name: "case differs", in: `{"username":"John"}`, corrupt: "does not match"},
		{name: "time object", in: `{"block_time":{}}`, corrupt: "block_time: not a time"},
		{name: "two problems", in: `{"total_usage":-1,"daily_usage":"x"}`, corrupt: `total_usage: negative: -1; daily_usage: not a number: "x"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "john.json")
			writeString(t, path, tc.in)
			got, err := ReadUsage(path)
			if tc.corrupt == "" {
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got, tc.want) {
					t.Errorf("got  %+v\nwant %+v", got, tc.want)
				}
				return
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("err = %v, want ErrCorrupt", err)
			}
			var pe *fs.PathError
			if !errors.As(err, &pe) || pe.Path != path {
				t.Errorf("error does not carry the path: %#v", err)
			}
			if !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tc.corrupt) {
				t.Errorf("err = %q, want it to name the file and %q", err, tc.corrupt)
			}
		})
	}
}

func TestReadUsageNotRegular(t *testing.T) {
	dir := t.TempDir()
	if _, err := ReadUsage(filepath.Join(dir, "missing.json")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing: %v", err)
	}
	fifo := filepath.Join(dir, "fifo.json")
	if err := mkfifo(fifo); err != nil {
		t.Skip(err)
	}
	if _, err := ReadUsage(fifo); err == nil || errors.Is(err, ErrCorrupt) {
		t.Errorf("FIFO: %v", err)
	}
	big := filepath.Join(dir, "big.json")
	writeString(t, big, `{"x":"`+strings.Repeat("a", maxUsageSize)+`"}`)
	if _, err := ReadUsage(big); !errors.Is(err, ErrCorrupt) {
		t.Errorf("too large: %v", err)
	}
}

func TestWriteReadUsage(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "usage") // created
	loc := time.FixedZone("WIB", 7*3600)
	u := Usage{
		Username: "user@example.com", TotalUsage: 123, DailyUsage: 45, TotalLimit: 10 << 30, Protocol: "vless", Status: "ACTIVE",
		Upload: 100, Download: 23, Remaining: ptr(10<<30 - 123), UpdatedAt: FormatTime(time.Now(), loc), LastReset: FormatTime(time.Now(), loc),
	}
	if err := WriteUsage(dir, u); err != nil {
		t.Fatal(err)
	}
	info, err := os.Stat(filepath.Join(dir, "user@example.com.json"))
	if err != nil || info.Mode().Perm() != 0o644 {
		t.Fatalf("%v %v", info, err)
	}
	got, err := ReadUsage(filepath.Join(dir, "user@example.com.json"))
	if err != nil || !reflect.DeepEqual(got, u) {
		t.Errorf("read back %+v, %v\nwant %+v", got, err, u)
	}
	noTemps(t, dir)
}

func TestWriteUsageUnsafeNames(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "usage")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bad := []string{"", "../evil", "a/b", ".hidden", "-rf", "..", "a\x00b", "a b", "a\nb", strings.Repeat("x", 200)}
	var us []Usage
	for _, name := range bad {
		if err := WriteUsage(dir, Usage{Username: name}); !errors.Is(err, quota.ErrBadName) {
			t.Errorf("WriteUsage(%q) = %v", name, err)
		}
		us = append(us, Usage{Username: name})
	}
	us = append(us, Usage{Username: "good"})
	errs := WriteUsages(dir, us)
	for i, err := range errs {
		if (err == nil) != (i == len(us)-1) {
			t.Errorf("WriteUsages %q: %v", us[i].Username, err)
		}
	}
	sameNames(t, "usage dir", listDir(t, dir), []string{"good.json"})
	sameNames(t, "root", listDir(t, root), []string{"usage"})
	if err := WriteUsage(filepath.Join(root, "never"), Usage{Username: "../x"}); err == nil {
		t.Error("bad name accepted")
	}
	sameNames(t, "root", listDir(t, root), []string{"usage"})
}

func TestImportDir(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{
		"john.json":                          guideJSON,
		"jane.json":                          `{"username":"jane","total_usage":"5"}`,
		"broken.json":                        `{"username":`,
		"other.json":                         `{"username":"john"}`,
		".hidden.json":                       `{}`,
		"-dash.json":                         `{}`,
		".json":                              `{}`,
		"notes.txt":                          `x`,
		"john.json.corrupt-20240101-000000":  `x`,
		".john.json.tmp-0123456789abcdef":    `x`,
		"john.json.bak":                      `x`,
		"with space.json":                    `{}`,
		"user@example.com.json":              `{"total_usage": 1e3}`,
		"emptyfile.json":                     ``,
		"negative.json":                      `{"daily_usage": -1}`,
		"unicode-\u00e9l\u00e8ve\u2603.json": `{}`,
	}
	for name, content := range files {
		writeString(t, filepath.Join(dir, name), content)
	}
	if err := os.Mkdir(filepath.Join(dir, "adir.json"), 0o755); err != nil {
		t.Fatal(err)
	}
	ok, bad := ImportDir(dir)
	var got []string
	for _, u := range ok {
		got = append(got, u.Username)
	}
	sameNames(t, "imported", got, []string{"jane", "john", "unicode-\u00e9l\u00e8ve\u2603", "user@example.com"})
	corrupt := map[string]bool{}
	badName := map[string]bool{}
	other := map[string]bool{}
	for _, err := range bad {
		var pe *fs.PathError
		if !errors.As(err, &pe) {
			t.Errorf("not a PathError: %v", err)
			continue
		}
		name := filepath.Base(pe.Path)
		switch {
		case errors.Is(err, ErrCorrupt):
			corrupt[name] = true
		case errors.Is(err, quota.ErrBadName):
			badName[name] = true
		default:
			other[name] = true
		}
	}
	wantCorrupt := map[string]bool{"broken.json": true, "other.json": true, "emptyfile.json": true, "negative.json": true}
	wantBadName := map[string]bool{".hidden.json": true, "-dash.json": true, ".json": true, "with space.json": true}
	if !reflect.DeepEqual(corrupt, wantCorrupt) || !reflect.DeepEqual(badName, wantBadName) || !reflect.DeepEqual(other, map[string]bool{"adir.json": true}) {
		t.Errorf("corrupt %v\nbad names %v\nother %v", corrupt, badName, other)
	}
	if ok, bad := ImportDir(filepath.Join(dir, "missing")); ok != nil || bad != nil {
		t.Errorf("missing dir: %v %v", ok, bad)
	}
}

func TestMoveAside(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "john.json")
	now := time.Date(2024, 12, 7, 14, 30, 45, 0, time.UTC)
	var moved []string
	for i := range 3 {
		writeString(t, path, "corrupt "+string(rune('a'+i)))
		to, err := MoveAside(path, now)
		if err != nil {
			t.Fatal(err)
		}
		moved = append(moved, filepath.Base(to))
		if got := readString(t, to); got != "corrupt "+string(rune('a'+i)) {
			t.Errorf("%s holds %q", to, got)
		}
	}
	sameNames(t, "moved", moved, []string{"john.json.corrupt-20241207-143045", "john.json.corrupt-20241207-143045-2", "john.json.corrupt-20241207-143045-3"})
	sameNames(t, "dir", listDir(t, dir), []string{"john.json.corrupt-20241207-143045", "john.json.corrupt-20241207-143045-2", "john.json.corrupt-20241207-143045-3"})
	if _, err := MoveAside(path, now); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if ok, bad := ImportDir(dir); len(ok)+len(bad) != 0 {
		t.Errorf("moved files imported: %v %v", ok, bad)
	}
}

func FuzzReadUsage(f *testing.F) {
	for _, s := range []string{
		guideJSON, `{}`, ``, `null`, `[]`, `{"total_usage":"1.5e3","blocked":"true","remaining":null}`,
		`{"username":"john","total_usage":-1}`, `{"block_time":"2024-12-07T14:30:45","last_reset":1733011200}`,
		`{"total_usage":1e400}`, "\xef\xbb\xbf{}", `{"username":"john\u0000"}`,
	} {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(dir, "john.json")
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		u, err := ReadUsage(path)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error is not ErrCorrupt: %v", err)
			}
			return
		}
		if u.Username != "john" {
			t.Fatalf("username %q", u.Username)
		}
		// What was read writes and reads back the same.
		if err := WriteUsage(dir, u); err != nil {
			t.Fatal(err)
		}
		again, err := ReadUsage(path)
		if err != nil || !reflect.DeepEqual(again, u) {
			t.Fatalf("round trip: %+v, %v\nwant %+v", again, err, u)
		}
	})
}

// TestUsageEncoder: many files encoded into one buffer each read as
// Marshal renders it alone, however the buffer grew after them, until
// Reset.
func TestUsageEncoder(t *testing.T) {
	var e UsageEncoder
	for round := range 2 {
		var got [][]byte
		var want []string
		for i := range 300 { // grows the buffer several times
			rem := uint64(i)
			u := Usage{Username: fmt.Sprintf("user%03d", i), TotalUsage: uint64(i) << 20, Remaining: &rem,
				Status: "ACTIVE", BlockReason: strings.Repeat("<&>", i%7), UpdatedAt: "2026-12-05 08:00:00"}
			got, want = append(got, e.Encode(&u)), append(want, string(u.Marshal()))
		}
		for i := range got {
			if string(got[i]) != want[i] {
				t.Fatalf("round %d, file %d: %q, want %q", round, i, got[i], want[i])
			}
		}
		e.Reset()
	}
}
