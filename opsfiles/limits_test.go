package opsfiles

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/quota"
)

const sampleLimits = "# /etc/xray/bw-limit.conf: USER LIMIT (MB)\n" +
	"\n" +
	"john 10240\n" +
	"user123\t5120   # VMESS user, 5 GB\n" +
	"  indented   500M reset=monthly:1\n" +
	"bob@example.com 1.5T reset=weekly:mon expires=2025-01-31 # trial\n" +
	"free unlimited\n" +
	"zero 0\n" +
	"   # indented comment\n" +
	"a#b 1G\n" +
	"daily 1G reset=daily\n"

func TestParseLimits(t *testing.T) {
	l, errs := ParseLimits("bw-limit.conf", []byte(sampleLimits))
	if len(errs) != 0 {
		t.Fatal(errs)
	}
	want := []Entry{
		{Line: 3, User: "john", Limit: 10 * quota.GiB},
		{Line: 4, User: "user123", Limit: 5 * quota.GiB},
		{Line: 5, User: "indented", Limit: 500 * quota.MiB, Reset: quota.Schedule{Period: quota.Monthly, Day: 1}},
		{Line: 6, User: "bob@example.com", Limit: 3 * quota.TiB / 2, Reset: quota.Schedule{Period: quota.Weekly, Day: int(time.Monday)}, Expires: "2025-01-31"},
		{Line: 7, User: "free"},
		{Line: 8, User: "zero"},
		{Line: 10, User: "a#b", Limit: quota.GiB},
		{Line: 11, User: "daily", Limit: quota.GiB, Reset: quota.Schedule{Period: quota.Daily}},
	}
	if got := l.Entries(); !reflect.DeepEqual(got, want) {
		t.Errorf("Entries:\n%+v\nwant\n%+v", got, want)
	}
	if e, ok := l.Lookup("user123"); !ok || e != want[1] {
		t.Errorf("Lookup = %+v %v", e, ok)
	}
	if _, ok := l.Lookup("nobody"); ok {
		t.Error("Lookup(nobody)")
	}
	if got := string(l.Marshal()); got != sampleLimits {
		t.Errorf("Marshal changed the file:\n%s", got)
	}
}

func TestParseLimitsBadLines(t *testing.T) {
	in := "john 10240\n" + // 1
		"jane\n" + // 2 no limit
		"../etc/passwd 100\n" + // 3 unsafe name
		"-rf 100\n" + // 4 unsafe name
		"mike 10X\n" + // 5 bad limit
		"mike2 -5\n" + // 6 negative
		"anna 100 reset=hourly\n" + // 7 bad schedule
		"anna2 100 expires=2025-13-01\n" + // 8 bad date
		"anna3 100 expires=2025-1-1\n" + // 9 bad date
		"anna4 100 color=red\n" + // 10 unknown token
		"anna5 100 200\n" + // 11 unknown token
		"anna6 100 reset=daily reset=daily\n" + // 12 repeated
		"john 20480\n" + // 13 duplicate of 1: wins
		"ok 1G\r\n" + // 14 fine, CRLF
		"\u00e9l\u00e8ve 1G\n" // 15 fine, Unicode
	l, errs := ParseLimits("bw-limit.conf", []byte(in))
	type lineErr struct {
		line int
		is   error
		text string
	}
	want := []lineErr{
		{1, ErrDuplicate, "duplicate of line 13"},
		{2, ErrSyntax, "has no limit"},
		{3, quota.ErrBadName, `"../etc/passwd": starts with '.'`},
		{4, quota.ErrBadName, "starts with '-'"},
		{5, quota.ErrBadLimit, `"10X"`},
		{6, quota.ErrBadLimit, "negative"},
		{7, quota.ErrBadSchedule, "hourly"},
		{8, ErrSyntax, "2025-13-01"},
		{9, ErrSyntax, "2025-1-1"},
		{10, ErrSyntax, `unknown option "color=red"`},
		{11, ErrSyntax, `unknown option "200"`},
		{12, ErrSyntax, "reset= given twice"},
	}
	if len(errs) != len(want) {
		t.Fatalf("errors: %v", errs)
	}
	for i, w := range want {
		e := errs[i]
		if e.Line != w.line || !errors.Is(e, w.is) || !strings.Contains(e.Error(), w.text) || !strings.HasPrefix(e.Error(), "bw-limit.conf:"+itoa(w.line)+": ") {
			t.Errorf("error %d: %v (line %d), want line %d, %v, %q", i, e, e.Line, w.line, w.is, w.text)
		}
		if e.Text != strings.Split(in, "\n")[w.line-1] {
			t.Errorf("error %d text %q", i, e.Text)
		}
	}
	var got []string
	for _, e := range l.Entries() {
		got = append(got, e.User+"@"+itoa(e.Line))
	}
	sameNames(t, "entries", got, []string{"john@13", "ok@14", "\u00e9l\u00e8ve@15"})
	if e, _ := l.Lookup("john"); e.Limit != 20*quota.GiB {
		t.Errorf("duplicate: the last line must win: %+v", e)
	}
	if got := string(l.Marshal()); got != in {
		t.Error("Marshal changed the file")
	}
	if s := (LineError{Line: 3, Err: ErrSyntax}).Error(); s != "line 3: syntax error" {
		t.Errorf("LineError without a file: %q", s)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestLimitsSetInPlace(t *testing.T) {
	l, _ := ParseLimits("bw-limit.conf", []byte(sampleLimits))
	// Unchanged: byte-identical.
	for _, e := range l.Entries() {
		if err := l.Set(e); err != nil {
			t.Fatal(err)
		}
	}
	if got := string(l.Marshal()); got != sampleLimits {
		t.Fatalf("Set of unchanged entries changed the file:\n%s", got)
	}
	e, _ := l.Lookup("user123")
	e.Limit = 20 * quota.GiB
	e.Reset = quota.Schedule{Period: quota.Monthly, Day: 15}
	if err := l.Set(e); err != nil {
		t.Fatal(err)
	}
	e, _ = l.Lookup("indented")
	e.Limit, e.Reset, e.Expires = 1536*quota.MiB+1, quota.Schedule{}, "2030-02-28"
	if err := l.Set(e); err != nil {
		t.Fatal(err)
	}
	e, _ = l.Lookup("bob@example.com")
	e.Limit, e.Reset, e.Expires = 0, quota.Schedule{}, ""
	if err := l.Set(e); err != nil {
		t.Fatal(err)
	}
	want := strings.NewReplacer(
		"user123\t5120   # VMESS user, 5 GB\n", "user123 20480 reset=monthly:15   # VMESS user, 5 GB\n",
		"  indented   500M reset=monthly:1\n", "  indented 1610612737B expires=2030-02-28\n",
		"bob@example.com 1.5T reset=weekly:mon expires=2025-01-31 # trial\n", "bob@example.com unlimited # trial\n",
	).Replace(sampleLimits)
	if got := string(l.Marshal()); got != want {
		t.Errorf("after Set:\n%s\nwant:\n%s", got, want)
	}
	// What Set wrote reads back the same.
	l2, errs := ParseLimits("", l.Marshal())
	if len(errs) != 0 || !reflect.DeepEqual(l2.Entries(), l.Entries()) {
		t.Errorf("re-parse: %v\n%+v\n%+v", errs, l2.Entries(), l.Entries())
	}
}

func TestLimitsSetAppend(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", "new 100\n"},
		{"john 1\n", "john 1\nnew 100\n"},
		{"john 1", "john 1\nnew 100\n"},
		{"john 1\r\njane 2", "john 1\r\njane 2\r\nnew 100\r\n"},
		{"# only a comment", "# only a comment\nnew 100\n"},
	} {
		l, _ := ParseLimits("", []byte(tc.in))
		if err := l.Set(Entry{User: "new", Limit: 100 * quota.MiB}); err != nil {
			t.Fatal(err)
		}
		if got := string(l.Marshal()); got != tc.want {
			t.Errorf("Set on %q: %q, want %q", tc.in, got, tc.want)
		}
		if e, ok := l.Lookup("new"); !ok || e.Line != strings.Count(tc.want, "\n") {
			t.Errorf("Lookup after append: %+v", e)
		}
	}
	var zero Limits
	if err := zero.Set(Entry{User: "a", Limit: quota.MiB}); err != nil || string(zero.Marshal()) != "a 1\n" {
		t.Errorf("zero Limits: %v %q", err, zero.Marshal())
	}
}

func TestLimitsBOM(t *testing.T) {
	in := "\ufeffjohn 1\r\njane 2\r\n"
	l, errs := ParseLimits("", []byte(in))
	if len(errs) != 0 {
		t.Fatal(errs)
	}
	if _, ok := l.Lookup("john"); !ok {
		t.Fatal("the byte order mark is part of the first name")
	}
	if string(l.Marshal()) != in {
		t.Error("Marshal dropped the byte order mark")
	}
	l.Set(Entry{User: "john", Limit: 5 * quota.MiB})
	if got := string(l.Marshal()); got != "\ufeffjohn 5\r\njane 2\r\n" {
		t.Errorf("%q", got)
	}
}

func TestLimitsSetFixesBadLine(t *testing.T) {
	l, errs := ParseLimits("", []byte("john 10X # typo\njane 5\n"))
	if len(errs) != 1 {
		t.Fatal(errs)
	}
	if err := l.Set(Entry{User: "john", Limit: 10 * quota.GiB}); err != nil {
		t.Fatal(err)
	}
	if got := string(l.Marshal()); got != "john 10240 # typo\njane 5\n" {
		t.Errorf("%q", got)
	}
}

func TestLimitsSetRefuses(t *testing.T) {
	l, _ := ParseLimits("", []byte(sampleLimits))
	for _, e := range []Entry{
		{User: "", Limit: 1},
		{User: "../x", Limit: 1},
		{User: "a b", Limit: 1},
		{User: "#comment", Limit: 1},
		{User: "x", Limit: quota.MaxLimit + 1},
		{User: "x", Limit: 1, Reset: quota.Schedule{Period: quota.Monthly, Day: 32}},
		{User: "x", Limit: 1, Reset: quota.Schedule{Period: quota.Weekly, Day: 7}},
		{User: "x", Limit: 1, Reset: quota.Schedule{Period: 9}},
		{User: "x", Limit: 1, Expires: "tomorrow"},
		{User: "john", Limit: 1, Expires: "2025-02-30"},
	} {
		if err := l.Set(e); err == nil {
			t.Errorf("Set(%+v) accepted", e)
		}
	}
	if got := string(l.Marshal()); got != sampleLimits {
		t.Errorf("refused Set changed the file:\n%s", got)
	}
	// A schedule without period ignores a stray day.
	if err := l.Set(Entry{User: "x", Limit: quota.MiB, Reset: quota.Schedule{Day: 3}}); err != nil {
		t.Error(err)
	}
	if e, _ := l.Lookup("x"); e.Reset != (quota.Schedule{}) {
		t.Errorf("%+v", e)
	}
}

func TestLimitsRemove(t *testing.T) {
	in := "john 1\n# keep\njane 2 # jane\njohn 3\njohn 4X\nzed 5\n"
	l, _ := ParseLimits("", []byte(in))
	if !l.Remove("john") {
		t.Fatal("Remove(john) = false")
	}
	if got := string(l.Marshal()); got != "# keep\njane 2 # jane\nzed 5\n" {
		t.Errorf("%q", got)
	}
	if _, ok := l.Lookup("john"); ok {
		t.Error("john still there")
	}
	if e, ok := l.Lookup("zed"); !ok || e.Line != 3 {
		t.Errorf("zed %+v", e)
	}
	if l.Remove("john") || l.Remove("nobody") || l.Remove("") {
		t.Error("Remove of an absent user")
	}
}

func TestReadWriteLimits(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "bw-limit.conf")
	l, errs, err := ReadLimits(path)
	if err != nil || errs != nil || len(l.Entries()) != 0 {
		t.Fatalf("missing file: %v %v %v", l, errs, err)
	}
	if err := l.Set(Entry{User: "john", Limit: 10 * quota.GiB}); err != nil {
		t.Fatal(err)
	}
	if err := WriteLimits(path, l); err != nil {
		t.Fatal(err)
	}
	if info, err := os.Stat(path); err != nil || info.Mode().Perm() != 0o644 {
		t.Errorf("new file: %v %v", info, err)
	}
	writeString(t, path, sampleLimits+"bad line here\n")
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}
	l, errs, err = ReadLimits(path)
	if err != nil || len(errs) != 1 || !strings.HasPrefix(errs[0].Error(), "bw-limit.conf:12: ") {
		t.Fatalf("%v %v", errs, err)
	}
	e, _ := l.Lookup("john")
	e.Limit = 20 * quota.GiB
	l.Set(e)
	if err := WriteLimits(path, l); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, path); got != strings.Replace(sampleLimits, "john 10240", "john 20480", 1)+"bad line here\n" {
		t.Errorf("written:\n%s", got)
	}
	if info, _ := os.Stat(path); info.Mode().Perm() != 0o600 {
		t.Errorf("mode not kept: %v", info.Mode())
	}
	noTemps(t, dir)

	// Through a symbolic link: the target is replaced, the link kept.
	link := filepath.Join(dir, "link.conf")
	if err := os.Symlink("bw-limit.conf", link); err != nil {
		t.Fatal(err)
	}
	l.Remove("john")
	if err := WriteLimits(link, l); err != nil {
		t.Fatal(err)
	}
	if info, err := os.Lstat(link); err != nil || info.Mode()&os.ModeSymlink == 0 {
		t.Errorf("link replaced: %v %v", info, err)
	}
	if strings.Contains(readString(t, path), "john") {
		t.Error("target not written")
	}
}

func TestWriteLimitsReadOnlyKeepsOld(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "bw-limit.conf")
	writeString(t, path, sampleLimits)
	mountReadOnly(t, dir)
	l, _, err := ReadLimits(path)
	if err != nil {
		t.Fatal(err)
	}
	l.Set(Entry{User: "new", Limit: 1})
	if err := WriteLimits(path, l); err == nil {
		t.Fatal("write to a read-only dir succeeded")
	}
	if got := readString(t, path); got != sampleLimits {
		t.Error("old file changed")
	}
	sameNames(t, "dir", listDir(t, dir), []string{"bw-limit.conf"})
}

func TestEntryPlan(t *testing.T) {
	loc := time.FixedZone("WIB", 7*3600)
	e := Entry{User: "a", Limit: 5, Reset: quota.Schedule{Period: quota.Daily}, Expires: "2025-01-31"}
	p := e.Plan(loc)
	if p.Limit != 5 || p.Reset != e.Reset || !p.Expires.Time().Equal(time.Date(2025, 1, 31, 0, 0, 0, 0, loc)) {
		t.Errorf("%+v", p)
	}
	if p := (Entry{}).Plan(nil); !p.Expires.IsZero() {
		t.Errorf("%+v", p)
	}
}

func FuzzParseLimits(f *testing.F) {
	for _, s := range []string{
		sampleLimits, "", "\n", "john 10240", "john 1\r\njohn 2\r\n", "a#b 1 #c", "x 1.5T reset=weekly:0 expires=2024-02-29",
		"\tjohn\t10G\t# tab\n", "j 1 reset=", "#x 1\n y 2", "a\u2000b 1", "a\v1\f2", "a 1e3", "a 0x10",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		l, errs := ParseLimits("bw-limit.conf", data)
		for _, e := range errs {
			if e.Line < 1 || e.Err == nil {
				t.Fatalf("bad LineError %+v", e)
			}
		}
		entries := l.Entries()
		if got := l.Marshal(); string(got) != string(data) {
			t.Fatalf("Marshal changed the file: %q", got)
		}
		// Rewriting every entry (as Set formats it) reads back the same.
		for _, e := range entries {
			e.Limit++ // force a rewrite
			if e.Limit > quota.MaxLimit {
				e.Limit -= 2
			}
			if err := l.Set(e); err != nil && !errors.Is(err, quota.ErrBadLimit) {
				t.Fatalf("Set(%+v): %v", e, err)
			}
		}
		// Setting a user whose only lines are bad replaces the last of them.
		for _, ln := range l.lines {
			if _, ok := l.Lookup(ln.user); !ok && ln.user != "" && ln.user[0] != '#' {
				if err := l.Set(Entry{User: ln.user, Limit: quota.MiB}); err != nil {
					t.Fatalf("Set(%q): %v", ln.user, err)
				}
			}
		}
		want := l.Entries()
		l2, _ := ParseLimits("", l.Marshal())
		if got := l2.Entries(); !reflect.DeepEqual(got, want) {
			t.Fatalf("re-parse of %q:\n%+v\nwant\n%+v", l.Marshal(), got, want)
		}
		for _, e := range want {
			if !l.Remove(e.User) {
				t.Fatalf("Remove(%q) = false", e.User)
			}
		}
		if len(l.Entries()) != 0 {
			t.Fatal("entries left after removing all")
		}
	})
}

// TestLimitsDevices: devices=N is read and written with the other options;
// a bad value is reported with its line number and ignored, and the rest of
// its line applies (a typo never lifts a user's data limit).
func TestLimitsDevices(t *testing.T) {
	in := "john 10240 devices=2\n" + // 1
		"mary 5G reset=daily devices=unlimited expires=2030-01-01\n" + // 2
		"bad 100 devices=-1 reset=daily\n" + // 3: -1 ignored
		"two 100 devices=two\n" + // 4: ignored
		"zero 100 devices=0 # keep\n" + // 5: ignored
		"many 100 devices=1001\n" + // 6: ignored
		"twice 100 devices=1 devices=2\n" // 7: syntax error, skipped
	l, errs := ParseLimits("bw-limit.conf", []byte(in))
	want := []struct {
		line    int
		is      error
		text    string
		partial bool
	}{
		{3, quota.ErrBadDevices, `bw-limit.conf:3: devices= ignored, the rest of the line applies: invalid device limit "-1": want a whole number of devices from 1 to 1000, or unlimited`, true},
		{4, quota.ErrBadDevices, `"two"`, true},
		{5, quota.ErrBadDevices, `"0"`, true},
		{6, quota.ErrBadDevices, `"1001"`, true},
		{7, ErrSyntax, "devices= given twice", false},
	}
	if len(errs) != len(want) {
		t.Fatalf("errors: %v", errs)
	}
	for i, w := range want {
		e := errs[i]
		if e.Line != w.line || !errors.Is(e, w.is) || !strings.Contains(e.Error(), w.text) || e.Partial != w.partial {
			t.Errorf("error %d: %v (line %d, partial %v), want line %d, %v, %q, partial %v", i, e, e.Line, e.Partial, w.line, w.is, w.text, w.partial)
		}
	}
	wantEntries := []Entry{
		{Line: 1, User: "john", Limit: 10 * quota.GiB, Devices: 2},
		{Line: 2, User: "mary", Limit: 5 * quota.GiB, Reset: quota.Schedule{Period: quota.Daily}, Expires: "2030-01-01", Devices: quota.DevicesUnlimited},
		{Line: 3, User: "bad", Limit: 100 * quota.MiB, Reset: quota.Schedule{Period: quota.Daily}},
		{Line: 4, User: "two", Limit: 100 * quota.MiB},
		{Line: 5, User: "zero", Limit: 100 * quota.MiB},
		{Line: 6, User: "many", Limit: 100 * quota.MiB},
	}
	if got := l.Entries(); !reflect.DeepEqual(got, wantEntries) {
		t.Errorf("Entries:\n%+v\nwant\n%+v", got, wantEntries)
	}
	if p := wantEntries[0].Plan(nil); p.Devices != 2 {
		t.Errorf("plan: %+v", p)
	}

	// Set writes devices= last, keeps it through a change of the limit,
	// and removes it for DevicesDefault.
	e, _ := l.Lookup("john")
	e.Limit = 20 * quota.GiB
	if err := l.Set(e); err != nil {
		t.Fatal(err)
	}
	e, _ = l.Lookup("zero")
	e.Devices = 3
	if err := l.Set(e); err != nil {
		t.Fatal(err)
	}
	e, _ = l.Lookup("mary")
	e.Devices = quota.DevicesDefault
	if err := l.Set(e); err != nil {
		t.Fatal(err)
	}
	if err := l.Set(Entry{User: "new", Devices: 1}); err != nil {
		t.Fatal(err)
	}
	for _, d := range []quota.DeviceLimit{-2, 0 - 5, quota.MaxDevices + 1} {
		if err := l.Set(Entry{User: "x", Devices: d}); !errors.Is(err, quota.ErrBadDevices) {
			t.Errorf("Set devices %d: %v", d, err)
		}
	}
	got := string(l.Marshal())
	for _, line := range []string{"john 20480 devices=2\n", "mary 5120 reset=daily expires=2030-01-01\n", "zero 100 devices=3 # keep\n", "new unlimited devices=1\n"} {
		if !strings.Contains(got, line) {
			t.Errorf("no %q in\n%s", line, got)
		}
	}
	l2, errs := ParseLimits("", l.Marshal())
	if len(errs) != 4 { // lines 3, 4, 6 and 7 as before
		t.Errorf("re-parse: %v", errs)
	}
	if e, _ := l2.Lookup("new"); e.Devices != 1 || e.Limit != 0 {
		t.Errorf("new: %+v", e)
	}
}

// TestLimitsSpeed: speed= and throttle= are read and written with the other
// options, in tc's units; a bad rate is reported once per field with its
// line number, naming the value and the accepted units, and ignored: the
// rest of its line applies.
func TestLimitsSpeed(t *testing.T) {
	in := "john 10240 speed=20mbit\n" + // 1
		"mary 500M speed=10mbit/2mbit throttle=1mbit\n" + // 2
		"dave unlimited speed=5mbit\n" + // 3
		"bad 100 speed=20mb throttle=fast devices=2\n" + // 4: both ignored, devices applies
		"zero 100 throttle=0kbit\n" + // 5: ignored
		"neg 100 speed=-5mbit\n" + // 6: ignored
		"huge 100 speed=99999gbit\n" + // 7: ignored
		"upper 100 speed=20M\n" + // 8: ignored
		"twice 100 speed=1mbit speed=2mbit\n" // 9: syntax error, skipped
	l, errs := ParseLimits("bw-limit.conf", []byte(in))
	want := []struct {
		line    int
		text    string
		partial bool
	}{
		{4, `bw-limit.conf:4: speed= ignored, the rest of the line applies: invalid rate "20mb": no unit (want a positive number with kbit, mbit or gbit, as tc writes rates: 512kbit, 20mbit, 1gbit)`, true},
		{4, `bw-limit.conf:4: throttle= ignored, the rest of the line applies: invalid rate "fast"`, true},
		{5, `throttle= ignored, the rest of the line applies: invalid rate "0kbit": zero`, true},
		{6, `invalid rate "-5mbit"`, true},
		{7, `invalid rate "99999gbit": above 10gbit`, true},
		{8, `invalid rate "20M": no unit`, true},
		{9, "speed= given twice", false},
	}
	if len(errs) != len(want) {
		t.Fatalf("errors: %v", errs)
	}
	for i, w := range want {
		e := errs[i]
		if e.Line != w.line || !strings.Contains(e.Error(), w.text) || e.Partial != w.partial || (w.partial && !errors.Is(e, quota.ErrBadRate)) {
			t.Errorf("error %d: %v (line %d, partial %v), want line %d, %q, partial %v", i, e, e.Line, e.Partial, w.line, w.text, w.partial)
		}
	}
	mb := func(n float64) quota.Rate { return quota.Rate(n * 1e6) }
	got := map[string]Entry{}
	for _, e := range l.Entries() {
		got[e.User] = e
	}
	for user, w := range map[string][2]quota.Speed{
		"john": {{Down: mb(20), Up: mb(20)}, {}},
		"mary": {{Down: mb(10), Up: mb(2)}, {Down: mb(1), Up: mb(1)}},
		"dave": {{Down: mb(5), Up: mb(5)}, {}},
		"bad":  {}, "zero": {}, "neg": {}, "huge": {}, "upper": {},
	} {
		e, ok := got[user]
		if !ok || e.Speed != w[0] || e.Throttle != w[1] {
			t.Errorf("%s: %+v (found %v), want speed %v throttle %v", user, e, ok, w[0], w[1])
		}
	}
	if got["bad"].Devices != 2 || got["mary"].Limit != 500*quota.MiB || got["dave"].Limit != 0 {
		t.Errorf("the rest of the lines: %+v", got)
	}
	if p := got["mary"].Plan(nil); p.Speed != got["mary"].Speed || p.Throttle != got["mary"].Throttle {
		t.Errorf("plan: %+v", p)
	}

	// Set writes them after the other options, keeps the comment, and
	// removes them when zero; a rate out of bounds is refused.
	e := got["john"]
	e.Throttle = quota.Speed{Down: mb(4), Up: mb(4)}
	if err := l.Set(e); err != nil {
		t.Fatal(err)
	}
	e = got["mary"]
	e.Speed = quota.Speed{}
	if err := l.Set(e); err != nil {
		t.Fatal(err)
	}
	if err := l.Set(Entry{User: "x", Speed: quota.Speed{Down: 5, Up: 5}}); !errors.Is(err, quota.ErrBadRate) {
		t.Errorf("Set of a rate below 1kbit: %v", err)
	}
	out := string(l.Marshal())
	for _, line := range []string{"john 10240 speed=20mbit throttle=4mbit\n", "mary 500 throttle=1mbit\n"} {
		if !strings.Contains(out, line) {
			t.Errorf("file lacks %q:\n%s", line, out)
		}
	}
	back, errs := ParseLimits("", []byte(out))
	if e, _ := back.Lookup("john"); e.Throttle.Down != mb(4) || len(errs) != 7 {
		t.Errorf("read back: %+v, %v", e, errs)
	}
}
