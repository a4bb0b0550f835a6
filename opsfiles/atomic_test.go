package opsfiles

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestWriteFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f.conf")
	if err := WriteFile(path, []byte("one\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, path); got != "one\n" {
		t.Errorf("content %q", got)
	}
	old := unix.Umask(0o077) // the mode is set exactly, whatever the umask
	defer unix.Umask(old)
	if err := WriteFile(path, []byte("two\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	info, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := readString(t, path); got != "two\n" || info.Mode().Perm() != 0o644 {
		t.Errorf("content %q mode %v", got, info.Mode())
	}
	sameNames(t, "dir", listDir(t, dir), []string{"f.conf"})
}

func TestWriteFileReplacesSymlink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target")
	writeString(t, target, "target\n")
	link := filepath.Join(dir, "link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(link, []byte("new\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, target); got != "target\n" {
		t.Errorf("wrote through the link: %q", got)
	}
	if info, err := os.Lstat(link); err != nil || !info.Mode().IsRegular() {
		t.Errorf("link not replaced by a file: %v %v", info, err)
	}
}

func TestWriteFileBadPath(t *testing.T) {
	dir := t.TempDir()
	for _, p := range []string{dir + "/", filepath.Join(dir, "missing", "f")} {
		if err := WriteFile(p, []byte("x"), 0o644); err == nil {
			t.Errorf("WriteFile(%q) succeeded", p)
		}
	}
	sameNames(t, "dir", listDir(t, dir), nil)
}

func TestWriteFileReadOnlyKeepsOld(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "f")
	writeString(t, path, "old\n")
	mountReadOnly(t, dir)
	err := WriteFile(path, []byte("new\n"), 0o644)
	if !errors.Is(err, unix.EROFS) {
		t.Fatalf("err = %v, want EROFS", err)
	}
	var pe *fs.PathError
	if !errors.As(err, &pe) || pe.Path != path {
		t.Errorf("error does not name the file: %v", err)
	}
	if got := readString(t, path); got != "old\n" {
		t.Errorf("old file changed: %q", got)
	}
	sameNames(t, "dir", listDir(t, dir), []string{"f"})
}

// A failure after the temporary file is written (here the rename, over a
// non-empty directory) removes it.
func TestWriteFileRenameFailureCleansUp(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "d")
	if err := os.MkdirAll(filepath.Join(target, "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(target, []byte("new\n"), 0o644); err == nil {
		t.Fatal("rename over a directory succeeded")
	}
	sameNames(t, "dir", listDir(t, dir), []string{"d"})
	sameNames(t, "d", listDir(t, target), []string{"x"})
}

// A failure while writing (a full filesystem) leaves the old file and no
// temporary file.
func TestWriteFileFullDiskKeepsOld(t *testing.T) {
	dir := t.TempDir()
	mountTmpfs(t, dir, "64k")
	path := filepath.Join(dir, "f")
	writeString(t, path, "old\n")
	fill, err := os.Create(filepath.Join(dir, "fill"))
	if err != nil {
		t.Fatal(err)
	}
	fill.Write(make([]byte, 56<<10)) // most of the space; the rest is not enough
	fill.Close()
	err = WriteFile(path, make([]byte, 32<<10), 0o644)
	if !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("err = %v, want ENOSPC", err)
	}
	if got := readString(t, path); got != "old\n" {
		t.Errorf("old file changed: %q", got)
	}
	sameNames(t, "dir", listDir(t, dir), []string{"f", "fill"})
}

func TestWriteBatch(t *testing.T) {
	dir := t.TempDir()
	writeString(t, filepath.Join(dir, "b"), "old b\n")
	if err := os.MkdirAll(filepath.Join(dir, "isdir", "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	files := []File{
		{Name: "a", Data: []byte("a\n")},
		{Name: "b", Data: []byte("new b\n"), Perm: 0o600},
		{Name: "isdir", Data: []byte("no\n")}, // rename fails
		{Name: "../escape", Data: []byte("no\n")},
		{Name: "", Data: []byte("no\n")},
		{Name: "..", Data: []byte("no\n")},
		{Name: "c", Data: nil},
	}
	for _, syncfs := range []bool{true, false} {
		errs := writeBatch(dir, files, syncfs)
		if len(errs) != len(files) {
			t.Fatalf("%d errors for %d files", len(errs), len(files))
		}
		for i, f := range files {
			wantErr := f.Name == "isdir" || f.Name == "../escape" || f.Name == "" || f.Name == ".."
			if (errs[i] != nil) != wantErr {
				t.Errorf("syncfs=%v: %q: err = %v", syncfs, f.Name, errs[i])
			}
			if wantErr && f.Name != "" && !strings.Contains(errs[i].Error(), f.Name) {
				t.Errorf("error does not name the file: %v", errs[i])
			}
		}
		if !errors.Is(errs[3], ErrBadFileName) {
			t.Errorf("bad name: %v", errs[3])
		}
		for name, want := range map[string]string{"a": "a\n", "b": "new b\n", "c": ""} {
			if got := readString(t, filepath.Join(dir, name)); got != want {
				t.Errorf("%s = %q, want %q", name, got, want)
			}
		}
		if info, _ := os.Stat(filepath.Join(dir, "b")); info.Mode().Perm() != 0o600 {
			t.Errorf("b mode %v", info.Mode())
		}
		if info, _ := os.Stat(filepath.Join(dir, "a")); info.Mode().Perm() != 0o644 {
			t.Errorf("a mode %v (default 0644)", info.Mode())
		}
		sameNames(t, "dir", listDir(t, dir), []string{"a", "b", "c", "isdir"})
		sameNames(t, "parent", listDir(t, filepath.Dir(dir)), []string{filepath.Base(dir)})
	}
}

func TestWriteBatchReadOnlyKeepsOld(t *testing.T) {
	dir := t.TempDir()
	writeString(t, filepath.Join(dir, "a"), "old\n")
	mountReadOnly(t, dir)
	errs := WriteBatch(dir, []File{{Name: "a", Data: []byte("new\n")}, {Name: "b", Data: []byte("new\n")}})
	for i, err := range errs {
		if !errors.Is(err, unix.EROFS) {
			t.Errorf("file %d: err = %v, want EROFS", i, err)
		}
	}
	if got := readString(t, filepath.Join(dir, "a")); got != "old\n" {
		t.Errorf("old file changed: %q", got)
	}
	sameNames(t, "dir", listDir(t, dir), []string{"a"})
}

func TestWriteBatchMissingDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "missing")
	errs := WriteBatch(dir, []File{{Name: "a"}, {Name: "b"}})
	for _, err := range errs {
		if !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("err = %v, want ErrNotExist", err)
		}
	}
	if len(WriteBatch(dir, nil)) != 0 {
		t.Error("errors for no files")
	}
}

func TestTempNames(t *testing.T) {
	for range 100 {
		n := tmpName("john.json")
		if !isTempName(n) || !strings.HasPrefix(n, ".john.json.tmp-") {
			t.Fatalf("tmpName = %q", n)
		}
	}
	long := strings.Repeat("x", 300)
	if n := tmpName(long); len(n) > 255 || !isTempName(n) {
		t.Errorf("tmpName of a long name: %d bytes", len(n))
	}
	for _, n := range []string{"john", ".john", ".john.tmp-", ".john.tmp-0123456789abcdeg", "john.tmp-0123456789abcdef", ".john.tmp-0123456789ABCDEF"} {
		if isTempName(n) {
			t.Errorf("isTempName(%q)", n)
		}
	}
}

func TestRemoveStaleTemps(t *testing.T) {
	dir := t.TempDir()
	old := filepath.Join(dir, ".a.tmp-0123456789abcdef")
	young := filepath.Join(dir, ".b.tmp-0123456789abcdef")
	for _, p := range []string{old, young, filepath.Join(dir, "c"), filepath.Join(dir, ".c.tmp-x")} {
		writeString(t, p, "")
	}
	past := time.Now().Add(-time.Hour)
	if err := os.Chtimes(old, past, past); err != nil {
		t.Fatal(err)
	}
	removed, err := RemoveStaleTemps(dir, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	sameNames(t, "removed", removed, []string{".a.tmp-0123456789abcdef"})
	sameNames(t, "dir", listDir(t, dir), []string{".b.tmp-0123456789abcdef", ".c.tmp-x", "c"})
}
