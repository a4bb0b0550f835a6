package opsfiles

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/quota"
	"golang.org/x/sys/unix"
)

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	info, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return info.Sys().(*syscall.Stat_t).Ino
}

func TestMarkerContent(t *testing.T) {
	loc := time.FixedZone("WIB", 7*3600)
	m := Marker{Reason: quota.ReasonLimit, Time: time.Date(2024, 12, 7, 7, 30, 45, 0, time.UTC)}
	if got := string(m.Content(loc)); got != "2024-12-07 14:30:45 | Bandwidth Limit Reached\n" {
		t.Errorf("Content = %q", got)
	}
	m.Reason = "two\nlines\r\n"
	if got := string(m.Content(loc)); got != "2024-12-07 14:30:45 | two lines \n" {
		t.Errorf("Content = %q", got)
	}
}

func TestSyncMarkers(t *testing.T) {
	loc := time.FixedZone("WIB", 7*3600)
	root := t.TempDir()
	dir := filepath.Join(root, "blocked_users") // created by the first sync
	t0 := time.Date(2024, 12, 7, 14, 30, 45, 0, loc)
	want := map[string]Marker{
		"alice":            {Reason: quota.ReasonLimit, Time: t0},
		"bob@example.com":  {Reason: quota.ReasonExpired, Time: t0.Add(time.Hour)},
		"carol":            {Reason: quota.ReasonDisabled, Time: t0},
		"d\u00e9j\u00e0vu": {Reason: quota.ReasonLimit, Time: t0},
	}
	added, removed, err := SyncMarkers(dir, want, loc)
	if err != nil {
		t.Fatal(err)
	}
	sameNames(t, "added", added, []string{"alice", "bob@example.com", "carol", "d\u00e9j\u00e0vu"})
	sameNames(t, "removed", removed, nil)
	if got := readString(t, filepath.Join(dir, "bob@example.com")); got != "2024-12-07 15:30:45 | Expired\n" {
		t.Errorf("bob's marker %q", got)
	}
	if info, err := os.Stat(dir); err != nil || info.Mode().Perm() != 0o755 {
		t.Errorf("dir: %v %v", info, err)
	}
	if info, err := os.Stat(filepath.Join(dir, "alice")); err != nil || info.Mode().Perm() != 0o644 {
		t.Errorf("marker: %v %v", info, err)
	}

	// Nothing changed: nothing written.
	before := map[string]uint64{}
	for name := range want {
		before[name] = inode(t, filepath.Join(dir, name))
	}
	added, removed, err = SyncMarkers(dir, want, loc)
	if err != nil || len(added)+len(removed) != 0 {
		t.Fatalf("no-op sync: %v %v %v", added, removed, err)
	}
	for name, ino := range before {
		if inode(t, filepath.Join(dir, name)) != ino {
			t.Errorf("%s rewritten although unchanged", name)
		}
	}

	// The operator's and other tools' files, and leftovers.
	for _, name := range []string{"stale", ".dotfile", "-notauser", "with space", "README.txt"} {
		writeString(t, filepath.Join(dir, name), "x\n")
	}
	if err := os.MkdirAll(filepath.Join(dir, "subdir", "inner"), 0o755); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(root, "target")
	writeString(t, target, "keep\n")
	if err := os.Symlink(target, filepath.Join(dir, "linked")); err != nil {
		t.Fatal(err)
	}
	oldTemp := ".alice.tmp-0123456789abcdef"
	youngTemp := ".bob.tmp-0123456789abcdef"
	writeString(t, filepath.Join(dir, oldTemp), "")
	writeString(t, filepath.Join(dir, youngTemp), "")
	past := time.Now().Add(-time.Hour)
	os.Chtimes(filepath.Join(dir, oldTemp), past, past)

	// carol: new reason, same time; bob: same reason, new time; alice edited
	// by hand; dave new; déjàvu unblocked.
	want["carol"] = Marker{Reason: quota.ReasonLimit, Time: t0}
	want["bob@example.com"] = Marker{Reason: quota.ReasonExpired, Time: t0.Add(2 * time.Hour)}
	want["dave"] = Marker{Reason: "custom | reason", Time: t0}
	delete(want, "d\u00e9j\u00e0vu")
	writeString(t, filepath.Join(dir, "alice"), "2024-12-07 14:30:45 | Bandwidth Limit Reachec\n")
	aliceIno := inode(t, filepath.Join(dir, "alice"))

	added, removed, err = SyncMarkers(dir, want, loc)
	if err != nil {
		t.Fatal(err)
	}
	sameNames(t, "added", added, []string{"dave"})
	sameNames(t, "removed", removed, []string{"README.txt", "d\u00e9j\u00e0vu", "linked", "stale"})
	for name, m := range want {
		if got := readString(t, filepath.Join(dir, name)); got != string(m.Content(loc)) {
			t.Errorf("%s = %q, want %q", name, got, m.Content(loc))
		}
	}
	if inode(t, filepath.Join(dir, "alice")) == aliceIno {
		t.Error("alice's edited marker not rewritten")
	}
	if got := readString(t, target); got != "keep\n" {
		t.Errorf("symlink target changed: %q", got)
	}
	sameNames(t, "dir", listDir(t, dir), []string{"-notauser", ".bob.tmp-0123456789abcdef", ".dotfile", "alice", "bob@example.com", "carol", "dave", "subdir", "with space"})
	sameNames(t, "subdir", listDir(t, filepath.Join(dir, "subdir")), []string{"inner"})

	// Nobody blocked.
	added, removed, err = SyncMarkers(dir, nil, loc)
	if err != nil || len(added) != 0 {
		t.Fatal(added, err)
	}
	sameNames(t, "removed", removed, []string{"alice", "bob@example.com", "carol", "dave"})
}

func TestSyncMarkersUnsafeNames(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "markers")
	want := map[string]Marker{
		"good":      {Reason: "r"},
		"../escape": {Reason: "r"},
		"a/b":       {Reason: "r"},
		".hidden":   {Reason: "r"},
		"":          {Reason: "r"},
		"new\nline": {Reason: "r"},
	}
	added, _, err := SyncMarkers(dir, want, time.UTC)
	if !errors.Is(err, quota.ErrBadName) {
		t.Fatalf("err = %v", err)
	}
	for _, name := range []string{`"../escape"`, `"a/b"`, `".hidden"`, `"new\nline"`, "empty"} {
		if !strings.Contains(err.Error(), name) {
			t.Errorf("error does not name %s: %v", name, err)
		}
	}
	sameNames(t, "added", added, []string{"good"})
	sameNames(t, "dir", listDir(t, dir), []string{"good"})
	sameNames(t, "root", listDir(t, root), []string{"markers"})
	if got := readString(t, filepath.Join(dir, "good")); got != " | r\n" {
		t.Errorf("marker without a time: %q", got)
	}
}

func TestSyncMarkersDirectoryInTheWay(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "alice"), 0o755); err != nil {
		t.Fatal(err)
	}
	added, _, err := SyncMarkers(dir, map[string]Marker{"alice": {Reason: "r"}, "bob": {Reason: "r"}}, time.UTC)
	if err == nil || !strings.Contains(err.Error(), "alice") {
		t.Errorf("err = %v", err)
	}
	sameNames(t, "added", added, []string{"bob"})
}

func TestSyncMarkersMany(t *testing.T) {
	dir := t.TempDir()
	want := map[string]Marker{}
	for i := range 100 { // more than markerSyncfsMin: one syncfs
		want["user"+string(rune('A'+i/26))+string(rune('a'+i%26))] = Marker{Reason: quota.ReasonLimit, Time: time.Unix(int64(i), 0)}
	}
	added, _, err := SyncMarkers(dir, want, time.UTC)
	if err != nil || len(added) != 100 {
		t.Fatal(len(added), err)
	}
	noTemps(t, dir)
}

func TestSyncMarkersReadOnly(t *testing.T) {
	dir := t.TempDir()
	writeString(t, filepath.Join(dir, "stale"), "x\n")
	mountReadOnly(t, dir)
	added, removed, err := SyncMarkers(dir, map[string]Marker{"alice": {Reason: "r"}}, time.UTC)
	if !errors.Is(err, unix.EROFS) || len(added)+len(removed) != 0 {
		t.Errorf("read-only: %v %v %v", added, removed, err)
	}
	sameNames(t, "dir", listDir(t, dir), []string{"stale"})
}
