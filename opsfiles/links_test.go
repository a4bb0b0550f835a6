package opsfiles

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// symlink makes a symbolic link at link to target.
func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

func isLink(t *testing.T, path string) bool {
	t.Helper()
	info, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return info.Mode()&fs.ModeSymlink != 0
}

// TestImportDirSymlinks: a usage file that is a symbolic link is reported,
// naming it, and not read, wherever it points (a file outside the
// directory, another usage file, nowhere); the directory itself may be a
// link, as it may for the writers.
func TestImportDirSymlinks(t *testing.T) {
	root := t.TempDir()
	outside := filepath.Join(root, "tmp", "planted.json")
	if err := os.Mkdir(filepath.Dir(outside), 0o755); err != nil {
		t.Fatal(err)
	}
	// Followed, this would import alice with 999 bytes.
	writeString(t, outside, `{"username": "alice", "total_usage": 999}`)
	dir := filepath.Join(root, "usage")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeString(t, filepath.Join(dir, "bob.json"), `{"username": "bob", "total_usage": 5}`)
	symlink(t, outside, filepath.Join(dir, "alice.json"))
	symlink(t, "bob.json", filepath.Join(dir, "carol.json"))
	symlink(t, filepath.Join(root, "missing"), filepath.Join(dir, "dave.json"))
	linkedDir := filepath.Join(root, "usage-elsewhere")
	symlink(t, dir, linkedDir)

	for _, d := range []string{dir, linkedDir} {
		ok, bad := ImportDir(d)
		if len(ok) != 1 || ok[0].Username != "bob" || ok[0].TotalUsage != 5 {
			t.Errorf("ImportDir(%s) imported %+v, want bob alone", d, ok)
		}
		refused := map[string]bool{}
		for _, err := range bad {
			var pe *fs.PathError
			if !errors.Is(err, ErrSymlink) || !errors.As(err, &pe) || filepath.Dir(pe.Path) != d {
				t.Errorf("ImportDir(%s): %v, want ErrSymlink naming a file of the directory", d, err)
				continue
			}
			if !strings.HasSuffix(err.Error(), pe.Path+": is a symbolic link; not imported") {
				t.Errorf("message %q", err)
			}
			refused[filepath.Base(pe.Path)] = true
		}
		if len(refused) != 3 || !refused["alice.json"] || !refused["carol.json"] || !refused["dave.json"] {
			t.Errorf("ImportDir(%s) refused %v, want alice.json, carol.json, dave.json", d, refused)
		}
	}
	if got := readString(t, outside); got != `{"username": "alice", "total_usage": 999}` {
		t.Errorf("the link's target changed: %q", got)
	}

	// The writers treat the two the same way: through the linked
	// directory, a linked file is replaced, its target untouched.
	if err := WriteUsage(linkedDir, Usage{Username: "alice", TotalUsage: 1}); err != nil {
		t.Fatal(err)
	}
	if isLink(t, filepath.Join(dir, "alice.json")) {
		t.Error("WriteUsage wrote through the link")
	}
	if got := readString(t, outside); !strings.Contains(got, "999") {
		t.Errorf("WriteUsage changed the link's target: %q", got)
	}
}

func TestReadUsageSymlink(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "real.json")
	writeString(t, real, `{"username": "alice", "total_usage": 1}`)
	link := filepath.Join(dir, "alice.json")
	symlink(t, real, link)
	if _, err := ReadUsage(link); !errors.Is(err, ErrSymlink) || !strings.Contains(err.Error(), link) {
		t.Errorf("ReadUsage of a link: %v, want ErrSymlink naming it", err)
	}
	// A link among the directories is followed.
	symlink(t, dir, filepath.Join(dir, "sub"))
	if err := os.Rename(real, filepath.Join(dir, "bob.json")); err != nil {
		t.Fatal(err)
	}
	writeString(t, filepath.Join(dir, "bob.json"), `{"username": "bob"}`)
	if u, err := ReadUsage(filepath.Join(dir, "sub", "bob.json")); err != nil || u.Username != "bob" {
		t.Errorf("through a linked directory: %+v, %v", u, err)
	}
}

func TestReadLimitsNotRegular(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "bw-limit.conf")
	if err := mkfifo(fifo); err != nil {
		t.Skip(err)
	}
	done := make(chan error, 1)
	go func() { _, _, err := ReadLimits(fifo); done <- err }()
	select {
	case err := <-done:
		if err == nil {
			t.Error("a FIFO read as the limits file")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadLimits blocked on a FIFO")
	}
}

// TestMarkerSymlink: a wanted marker that is a link, even to a file with
// the right content, is replaced by the marker, its target untouched; the
// marker reader does not follow links.
func TestMarkerSymlink(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "blocked_users")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	m := Marker{Reason: "Bandwidth Limit Reached", Time: time.Date(2026, 3, 14, 12, 0, 0, 0, time.UTC)}
	outside := filepath.Join(root, "outside")
	writeString(t, outside, string(m.Content(time.UTC)))
	symlink(t, outside, filepath.Join(dir, "john"))
	if same, err := sameContent(filepath.Join(dir, "john"), m.Content(time.UTC)); same || err == nil {
		t.Errorf("sameContent through a link: %v, %v", same, err)
	}
	added, _, err := SyncMarkers(dir, map[string]Marker{"john": m}, time.UTC)
	if err != nil {
		t.Fatal(err)
	}
	if len(added) != 0 {
		t.Errorf("added %v: a link is replaced, not new", added)
	}
	if isLink(t, filepath.Join(dir, "john")) || readString(t, filepath.Join(dir, "john")) != string(m.Content(time.UTC)) {
		t.Error("the linked marker was not replaced by the marker")
	}
	if got := readString(t, outside); got != string(m.Content(time.UTC)) {
		t.Errorf("the link's target changed: %q", got)
	}
}
