package opsfiles

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/myvpn/bwagent/quota"
)

func TestAppendLog(t *testing.T) {
	loc := time.FixedZone("WIB", 7*3600)
	path := filepath.Join(t.TempDir(), "myvpn", "blocked.log") // dir created
	t0 := time.Date(2024, 12, 7, 7, 30, 45, 0, time.UTC)
	lines := []LogLine{
		{Time: t0, Protocol: "ssh", Username: "john", Reason: quota.ReasonLimit},
		{Time: t0.Add(time.Second), Protocol: "vmess", Username: "user@example.com", Reason: "Expired"},
	}
	if err := AppendLog(path, lines, loc); err != nil {
		t.Fatal(err)
	}
	if err := AppendLog(path, []LogLine{{Time: t0, Protocol: "trojan", Username: "a|b", Reason: "two\nlines | and\r\nCRLF"}}, loc); err != nil {
		t.Fatal(err)
	}
	if err := AppendLog(path, nil, loc); err != nil {
		t.Fatal(err)
	}
	want := "2024-12-07 14:30:45 | ssh | john | Bandwidth Limit Reached\n" +
		"2024-12-07 14:30:46 | vmess | user@example.com | Expired\n" +
		"2024-12-07 14:30:45 | trojan | a/b | two lines / and CRLF\n"
	if got := readString(t, path); got != want {
		t.Errorf("log:\n%s\nwant:\n%s", got, want)
	}
	if info, err := os.Stat(path); err != nil || info.Mode().Perm()&^0o644 != 0 {
		t.Errorf("mode: %v %v", info, err)
	}
	got, malformed, err := ReadLog(path, loc)
	if err != nil || malformed != 0 {
		t.Fatal(malformed, err)
	}
	wantLines := []LogLine{
		{Time: t0.In(loc), Protocol: "ssh", Username: "john", Reason: quota.ReasonLimit},
		{Time: t0.Add(time.Second).In(loc), Protocol: "vmess", Username: "user@example.com", Reason: "Expired"},
		{Time: t0.In(loc), Protocol: "trojan", Username: "a/b", Reason: "two lines / and CRLF"},
	}
	if len(got) != len(wantLines) {
		t.Fatalf("ReadLog: %+v", got)
	}
	for i := range got {
		if !got[i].Time.Equal(wantLines[i].Time) || got[i].Protocol != wantLines[i].Protocol || got[i].Username != wantLines[i].Username || got[i].Reason != wantLines[i].Reason {
			t.Errorf("line %d: %+v, want %+v", i, got[i], wantLines[i])
		}
	}
}

// The guide's example line, exactly.
func TestAppendLogGuideLine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blocked.log")
	loc := time.FixedZone("local", -5*3600)
	line := LogLine{Time: time.Date(2024, 12, 7, 14, 30, 45, 0, loc), Protocol: "ssh", Username: "john", Reason: "Bandwidth Limit Reached"}
	if err := AppendLog(path, []LogLine{line}, loc); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, path); got != "2024-12-07 14:30:45 | ssh | john | Bandwidth Limit Reached\n" {
		t.Errorf("%q", got)
	}
}

func TestAppendLogAfterTornLine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blocked.log")
	writeString(t, path, "2024-12-07 14:30:45 | ssh | john | Bandwidth Li")
	if err := AppendLog(path, []LogLine{{Time: time.Date(2024, 12, 8, 0, 0, 0, 0, time.UTC), Protocol: "ssh", Username: "jane", Reason: "r"}}, time.UTC); err != nil {
		t.Fatal(err)
	}
	want := "2024-12-07 14:30:45 | ssh | john | Bandwidth Li\n2024-12-08 00:00:00 | ssh | jane | r\n"
	if got := readString(t, path); got != want {
		t.Errorf("%q", got)
	}
}

func TestAppendLogConcurrent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "blocked.log")
	const writers, appends = 8, 50
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range appends {
				var lines []LogLine
				for j := range 3 {
					lines = append(lines, LogLine{Time: time.Unix(int64(i), 0), Protocol: "vless",
						Username: fmt.Sprintf("w%d", w), Reason: fmt.Sprintf("%s %d.%d", strings.Repeat("x", 200), i, j)})
				}
				if err := AppendLog(path, lines, time.UTC); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	lines, malformed, err := ReadLog(path, time.UTC)
	if err != nil || malformed != 0 || len(lines) != writers*appends*3 {
		t.Fatalf("%d lines, %d malformed, %v", len(lines), malformed, err)
	}
	// Each append's lines stay together and in order.
	for i := 0; i < len(lines); i += 3 {
		for j := range 3 {
			if lines[i+j].Username != lines[i].Username || !strings.HasSuffix(lines[i+j].Reason, fmt.Sprintf(".%d", j)) {
				t.Fatalf("interleaved at line %d: %+v", i+j+1, lines[i+j])
			}
		}
	}
}

func TestReadLog(t *testing.T) {
	dir := t.TempDir()
	if lines, malformed, err := ReadLog(filepath.Join(dir, "missing.log"), nil); lines != nil || malformed != 0 || err != nil {
		t.Errorf("missing: %v %d %v", lines, malformed, err)
	}
	path := filepath.Join(dir, "blocked.log")
	writeString(t, path, "\ufeff2024-12-07 14:30:45 | ssh | john | Bandwidth Limit Reached\r\n"+
		"\n"+
		"   \n"+
		"garbage\n"+
		"2024-12-07 14:30:45 | ssh | john\n"+ // three fields
		"2024-12-07 14:30:45 | ssh | john | a | b\n"+ // five
		"07/12/2024 14:30 | ssh | john | r\n"+ // bad time
		"2024-12-07 14:30:46|vmess|jane|Expired\n"+ // tight
		"2024-12-07 14:30:47 |  |  | \n"+ // empty fields
		strings.Repeat("y", maxLogLine+10)+"\n"+
		"2024-12-07 14:30:48 | ssh | last | no newline")
	lines, malformed, err := ReadLog(path, time.UTC)
	if err != nil {
		t.Fatal(err)
	}
	if malformed != 5 {
		t.Errorf("malformed = %d, want 5", malformed)
	}
	want := []LogLine{
		{Time: time.Date(2024, 12, 7, 14, 30, 45, 0, time.UTC), Protocol: "ssh", Username: "john", Reason: "Bandwidth Limit Reached"},
		{Time: time.Date(2024, 12, 7, 14, 30, 46, 0, time.UTC), Protocol: "vmess", Username: "jane", Reason: "Expired"},
		{Time: time.Date(2024, 12, 7, 14, 30, 47, 0, time.UTC)},
		{Time: time.Date(2024, 12, 7, 14, 30, 48, 0, time.UTC), Protocol: "ssh", Username: "last", Reason: "no newline"},
	}
	if !reflect.DeepEqual(lines, want) {
		t.Errorf("lines:\n%+v\nwant\n%+v", lines, want)
	}
}

func TestAppendLogReadOnly(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "blocked.log")
	writeString(t, path, "old\n")
	mountReadOnly(t, dir)
	if err := AppendLog(path, []LogLine{{Reason: "r"}}, time.UTC); err == nil {
		t.Error("append to a read-only file succeeded")
	}
	if got := readString(t, path); got != "old\n" {
		t.Errorf("%q", got)
	}
}
