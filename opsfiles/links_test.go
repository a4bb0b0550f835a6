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

// disown gives the symbolic link at link to an unprivileged owner, as if a
// user who can write to its directory had made it.
func disown(t *testing.T, link string) {
	t.Helper()
	needRoot(t)
	if err := os.Lchown(link, 12345, 12345); err != nil {
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

// TestLimitsSymlinks: the limits file is the operator's; a link made by
// root is followed for reading and writing, one made by anyone else is
// refused and its target neither read nor written.
func TestLimitsSymlinks(t *testing.T) {
	needRoot(t)
	root := t.TempDir()
	real := filepath.Join(root, "real.conf")
	writeString(t, real, "john 10\n")
	link := filepath.Join(root, "bw-limit.conf")
	symlink(t, real, link)

	l, _, err := ReadLimits(link)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := l.Lookup("john"); !ok {
		t.Fatal("root's link not followed")
	}

	disown(t, link)
	if _, _, err := ReadLimits(link); !errors.Is(err, ErrUntrustedLink) || !strings.Contains(err.Error(), link) {
		t.Errorf("ReadLimits through another's link: %v, want ErrUntrustedLink naming the link", err)
	}
	l.Set(Entry{User: "mary", Limit: 1})
	if err := WriteLimits(link, l); !errors.Is(err, ErrUntrustedLink) {
		t.Errorf("WriteLimits through another's link: %v, want ErrUntrustedLink", err)
	}
	if got := readString(t, real); got != "john 10\n" || !isLink(t, link) {
		t.Errorf("after refusals: target %q, link kept %v", got, isLink(t, link))
	}

	// Root's link to another's link: the chain is refused.
	chain := filepath.Join(root, "chain.conf")
	symlink(t, "bw-limit.conf", chain)
	if _, _, err := ReadLimits(chain); !errors.Is(err, ErrUntrustedLink) || !strings.Contains(err.Error(), link) {
		t.Errorf("ReadLimits through a chain with another's link: %v", err)
	}
}

// TestLimitsSymlinkRelative: a relative link is resolved from where the
// link really is, as the kernel does, even under a linked directory.
func TestLimitsSymlinkRelative(t *testing.T) {
	root := t.TempDir()
	for _, d := range []string{"opt/xray", "opt/shared", "etc"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	writeString(t, filepath.Join(root, "opt/shared/limits.conf"), "john 10\n")
	symlink(t, "../shared/limits.conf", filepath.Join(root, "opt/xray/bw-limit.conf"))
	symlink(t, filepath.Join(root, "opt/xray"), filepath.Join(root, "etc/xray"))
	path := filepath.Join(root, "etc/xray/bw-limit.conf")
	l, _, err := ReadLimits(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := l.Lookup("john"); !ok {
		t.Fatal("relative link under a linked directory not followed to its target")
	}
	l.Set(Entry{User: "mary", Limit: 1})
	if err := WriteLimits(path, l); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, filepath.Join(root, "opt/shared/limits.conf")); !strings.Contains(got, "mary") {
		t.Errorf("target not written: %q", got)
	}
	if !isLink(t, filepath.Join(root, "opt/xray/bw-limit.conf")) {
		t.Error("link replaced")
	}
	if _, err := os.Lstat(filepath.Join(root, "etc/shared")); err == nil {
		t.Error("written where a lexical resolution of the link points")
	}

	// A link to a missing file: the file is created where it points.
	symlink(t, "new.conf", filepath.Join(root, "opt/xray/new-link.conf"))
	if err := WriteLimits(filepath.Join(root, "etc/xray/new-link.conf"), l); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, filepath.Join(root, "opt/xray/new.conf")); !strings.Contains(got, "mary") {
		t.Errorf("link to a missing file: target %q", got)
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

// TestBlockLogSymlinks: the block log follows the limits file's rule.
func TestBlockLogSymlinks(t *testing.T) {
	needRoot(t)
	root := t.TempDir()
	real := filepath.Join(root, "real.log")
	link := filepath.Join(root, "blocked.log")
	symlink(t, real, link)
	line := []LogLine{{Time: time.Date(2026, 3, 14, 12, 0, 0, 0, time.UTC), Protocol: "ssh", Username: "john", Reason: "x"}}
	if err := AppendLog(link, line, time.UTC); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, real); got != "2026-03-14 12:00:00 | ssh | john | x\n" || !isLink(t, link) {
		t.Errorf("through root's link: target %q", got)
	}
	if lines, _, err := ReadLog(link, time.UTC); err != nil || len(lines) != 1 {
		t.Errorf("ReadLog through root's link: %v, %v", lines, err)
	}

	disown(t, link)
	if err := AppendLog(link, line, time.UTC); !errors.Is(err, ErrUntrustedLink) {
		t.Errorf("AppendLog through another's link: %v, want ErrUntrustedLink", err)
	}
	if _, _, err := ReadLog(link, time.UTC); !errors.Is(err, ErrUntrustedLink) {
		t.Errorf("ReadLog through another's link: %v, want ErrUntrustedLink", err)
	}
	if got := readString(t, real); got != "2026-03-14 12:00:00 | ssh | john | x\n" {
		t.Errorf("target written through another's link: %q", got)
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
