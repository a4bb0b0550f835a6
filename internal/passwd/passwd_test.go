package passwd

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/quota"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name string
		data string
		want []Entry
	}{
		{"empty", "", nil},
		{"one line, no line end", "john:x:1001:1001::/home/john:/bin/bash", []Entry{{"john", 1001, 1001, 1}}},
		{"CRLF", "john:x:1001:100:J:/h:/bin/sh\r\nmary:x:1002:100:M:/h:/bin/sh\r\n",
			[]Entry{{"john", 1001, 100, 1}, {"mary", 1002, 100, 2}}},
		{"four fields are enough", "john:x:1001:1001\n", []Entry{{"john", 1001, 1001, 1}}},
		{"line numbers count skipped lines",
			"# comment\n\nroot:x:0:0:root:/root:/bin/bash\nbad\njohn:x:1001:1001::/:/bin/sh\n",
			[]Entry{{"root", 0, 0, 3}, {"john", 1001, 1001, 5}}},
		{"comments", "#john:x:1001:1001::/:/bin/sh\n", nil},
		{"NIS compat lines", "+\n-\n+john:x:1001:1001::/:/bin/sh\n-mary:x:1002:1002::/:/bin/sh\n+@netgroup\n-@other::::::\n+::::::\n", nil},
		{"fewer than four fields", "john\njohn:x\njohn:x:1001\n", nil},
		{"empty name", ":x:1001:1001::/:/bin/sh\n", nil},
		{"empty UID or GID", "a:x::1\nb:x:1:\n", nil},
		{"UID or GID not a number", "a:x:one:1\nb:x:1:one\nc:x:1e3:1\nd:x:0x10:1\n", nil},
		{"signs and spaces", "a:x:-1:1\nb:x:+1:1\nc:x: 1:1\nd:x:1 :1\ne:x:1:-1\n", nil},
		{"huge UIDs", "a:x:4294967296:1\nb:x:1:4294967296\nc:x:99999999999999999999:1\nmax:x:4294967295:4294967295\n",
			[]Entry{{"max", 4294967295, 4294967295, 4}}},
		{"leading zeros", "john:x:0001001:0100\n", []Entry{{"john", 1001, 100, 1}}},
		{"names are not checked here", "a b:x:1001:1\n../x:x:1002:1\n\u00e9l\u00e8ve:x:1003:1\n",
			[]Entry{{"a b", 1001, 1, 1}, {"../x", 1002, 1, 2}, {"\u00e9l\u00e8ve", 1003, 1, 3}}},
		{"duplicates are kept, in order", "a:x:1001:1\nb:x:1001:1\na:x:1002:1\n",
			[]Entry{{"a", 1001, 1, 1}, {"b", 1001, 1, 2}, {"a", 1002, 1, 3}}},
		{"a very long line does not stop the parse", "x:" + strings.Repeat("y", 2<<20) + "\njohn:x:1001:1001\n",
			[]Entry{{"john", 1001, 1001, 2}}},
		{"NUL and junk", "\x00\x00\x00\n\xff:x:1:1\n", []Entry{{"\xff", 1, 1, 2}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Parse([]byte(tc.data))
			if len(got) == 0 && len(tc.want) == 0 {
				return
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("Parse:\n got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

// TestParseCopiesNames checks that a name does not share the file's memory:
// a name kept for long would keep the whole file alive.
func TestParseCopiesNames(t *testing.T) {
	data := []byte("john:x:1001:1001\n")
	es := Parse(data)
	copy(data, "XXXX")
	if es[0].Name != "john" {
		t.Errorf("name changed with the file's bytes: %q", es[0].Name)
	}
}

const sample = `root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
john:x:1001:1001::/home/john:/bin/bash
mary:x:1002:1002::/home/mary:/bin/bash
+nis:x:1003:1003::/:/bin/sh
a..b:x:1004:1004::/:/bin/sh
alice:x:1005:1005::/:/bin/sh
alice2:x:1005:1005::/:/bin/sh
johnny:x:1001:1001::/:/bin/sh
a..b:x:1006:1006::/:/bin/sh
bob:x:1007:1007::/:/bin/sh
mary:x:1008:1008::/:/bin/sh
toor:x:0:0::/root:/bin/sh
daemon:x:1009:1009::/:/bin/sh
edge:x:1000:1000::/:/bin/sh
top:x:65533:65533::/:/bin/sh
out:x:65534:65534::/:/bin/sh
`

func names(es []Entry) []string {
	var ns []string
	for _, e := range es {
		ns = append(ns, e.Name)
	}
	return ns
}

func TestAccounts(t *testing.T) {
	es := Parse([]byte(sample))
	s := Accounts(es, 1000, 65534, []string{"alice", "bob"})
	if got, want := names(s.Accounts), []string{"edge", "john", "mary", "top"}; !reflect.DeepEqual(slices.Sorted(slices.Values(got)), want) {
		t.Errorf("Accounts: %v, want %v", got, want)
	}
	if s.Accounts[0].Name != "john" || s.Accounts[0].Line != 4 {
		t.Errorf("not in file order: %+v", s.Accounts)
	}
	if len(s.BadNames) != 1 || s.BadNames[0] != (Entry{"a..b", 1004, 1004, 7}) {
		t.Errorf("BadNames: %+v", s.BadNames)
	}
	if err := quota.ValidName(s.BadNames[0].Name); !errors.Is(err, quota.ErrBadName) {
		t.Errorf("bad name not refused by quota.ValidName: %v", err)
	}
	// Each later entry with its owner: the first of its UID, else of its
	// name. alice is excluded, yet owns 1005: alice2 is not accounted.
	want := []Duplicate{
		{Entry{"alice2", 1005, 1005, 9}, Entry{"alice", 1005, 1005, 8}},
		{Entry{"johnny", 1001, 1001, 10}, Entry{"john", 1001, 1001, 4}},
		{Entry{"a..b", 1006, 1006, 11}, Entry{"a..b", 1004, 1004, 7}},
		{Entry{"mary", 1008, 1008, 13}, Entry{"mary", 1002, 1002, 5}},
		{Entry{"daemon", 1009, 1009, 15}, Entry{"daemon", 1, 1, 2}},
	}
	if !reflect.DeepEqual(s.Duplicates, want) {
		t.Errorf("Duplicates:\n got %+v\nwant %+v", s.Duplicates, want)
	}
	// Out of the range: root, toor (a second UID 0), nobody, out, and
	// nothing reported about them.
	for _, d := range s.Duplicates {
		if d.UID < 1000 || d.UID >= 65534 {
			t.Errorf("duplicate out of the range reported: %+v", d)
		}
	}
	// Deterministic: the same input gives the same selection.
	if again := Accounts(Parse([]byte(sample)), 1000, 65534, []string{"alice", "bob"}); !reflect.DeepEqual(again, s) {
		t.Error("a second selection differs")
	}

	// The range bounds: uidMin included, uidMax excluded.
	for _, tc := range []struct {
		min, max uint32
		want     []string
	}{
		{1001, 1002, []string{"john"}},
		{1000, 1001, []string{"edge"}},
		{65533, 65534, []string{"top"}},
		{0, 1, []string{"root"}},
		{1002, 1002, nil},
		{2000, 1000, nil},
	} {
		if got := names(Accounts(es, tc.min, tc.max, nil).Accounts); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("Accounts(%d, %d) = %v, want %v", tc.min, tc.max, got, tc.want)
		}
	}
	if s := Accounts(nil, 0, 100, nil); len(s.Accounts)+len(s.BadNames)+len(s.Duplicates) != 0 {
		t.Errorf("no entries: %+v", s)
	}
}

func TestLookupNameOf(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "passwd")
	if err := os.WriteFile(path, []byte(sample), 0o644); err != nil {
		t.Fatal(err)
	}
	for uid, want := range map[uint32]string{0: "root", 1001: "john", 1005: "alice", 1004: "a..b", 65534: "nobody", 1009: "daemon"} {
		if got, err := NameOf(path, uid); err != nil || got != want {
			t.Errorf("NameOf(%d) = %q, %v; want %q", uid, got, err, want)
		}
		if e, ok := Lookup(Parse([]byte(sample)), uid); !ok || e.Name != want {
			t.Errorf("Lookup(%d) = %+v, %v; want %q", uid, e, ok, want)
		}
	}
	// 1003 is only on a NIS line.
	for _, uid := range []uint32{1003, 4242, 4294967295} {
		_, err := NameOf(path, uid)
		if !errors.Is(err, ErrNoAccount) || !strings.Contains(err.Error(), path) {
			t.Errorf("NameOf(%d): %v, want ErrNoAccount naming the file", uid, err)
		}
	}
	if _, err := NameOf(filepath.Join(dir, "missing"), 0); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}

func TestReadSize(t *testing.T) {
	dir := t.TempDir()
	big := filepath.Join(dir, "big")
	f, err := os.Create(big)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// A file of exactly MaxSize is read, to its last line.
	line := "\njohn:x:1001:1001\n"
	if _, err := f.WriteAt([]byte(line), MaxSize-int64(len(line))); err != nil {
		t.Fatal(err)
	}
	if name, err := NameOf(big, 1001); err != nil || name != "john" {
		t.Errorf("a file of MaxSize: %.20q, %v; want john", name, err)
	}
	// One byte more is refused.
	if _, err := f.WriteAt([]byte("\n"), MaxSize); err != nil {
		t.Fatal(err)
	}
	if _, err := Read(big); !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), big) {
		t.Errorf("a file over MaxSize: %v, want ErrTooLarge naming it", err)
	}
}

func TestReadNotRegular(t *testing.T) {
	dir := t.TempDir()
	if _, err := Read(dir); err == nil {
		t.Error("a directory read as a passwd file")
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Skip(err)
	}
	done := make(chan error, 1)
	go func() { _, err := Read(fifo); done <- err }()
	select {
	case err := <-done:
		if err == nil {
			t.Error("a FIFO read as a passwd file")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read blocked on a FIFO")
	}
}

// BenchmarkParseAccounts: a passwd file of 100,000 accounts, parsed and
// selected, as the agent does when the file changes.
func BenchmarkParseAccounts(b *testing.B) {
	var sb strings.Builder
	for i := range 100_000 {
		fmt.Fprintf(&sb, "user%d:x:%d:%d::/home/user%d:/bin/bash\n", i, 1000+i, 1000+i, i)
	}
	data := []byte(sb.String())
	b.ReportAllocs()
	for b.Loop() {
		if s := Accounts(Parse(data), 1000, 200_000, []string{"nobody"}); len(s.Accounts) != 100_000 {
			b.Fatalf("%d accounts", len(s.Accounts))
		}
	}
}
