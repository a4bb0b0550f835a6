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
	for round, opts := range []batchOpts{{syncfs: true, spares: true}, {spares: true}, {syncfs: true}, {}} {
		errs := writeBatch(dir, files, opts)
		if len(errs) != len(files) {
			t.Fatalf("%d errors for %d files", len(errs), len(files))
		}
		for i, f := range files {
			wantErr := f.Name == "isdir" || f.Name == "../escape" || f.Name == "" || f.Name == ".."
			if (errs[i] != nil) != wantErr {
				t.Errorf("%+v: %q: err = %v", opts, f.Name, errs[i])
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
		// Spares are kept beside files that were replaced (b at the
		// first write, a, b and c after), none for the directory.
		want := []string{"a", "b", "c", "isdir"}
		switch {
		case opts.spares && round == 0:
			want = append([]string{".b.spare"}, want...)
		case opts.spares:
			want = append([]string{".a.spare", ".b.spare", ".c.spare"}, want...)
		}
		sameNames(t, "dir", listDir(t, dir), want)
		sameNames(t, "parent", listDir(t, filepath.Dir(dir)), []string{filepath.Base(dir)})
		for _, name := range []string{"a", "b", "c"} {
			os.Remove(filepath.Join(dir, "."+name+".spare"))
		}
	}
}

// ino returns the inode number of the file at path.
func ino(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestWriteBatchSpare(t *testing.T) {
	dir := t.TempDir()
	path, spare := filepath.Join(dir, "u.json"), filepath.Join(dir, ".u.json.spare")
	write := func(content string) {
		t.Helper()
		if err := firstErr(WriteBatch(dir, []File{{Name: "u.json", Data: []byte(content)}})); err != nil {
			t.Fatal(err)
		}
		if got := readString(t, path); got != content {
			t.Fatalf("content %q, want %q", got, content)
		}
	}
	write("first, a long content\n") // no file yet: the new one is renamed in place
	sameNames(t, "dir", listDir(t, dir), []string{"u.json"})
	first := ino(t, path)
	write("second\n") // a spare made, swapped with the file
	second := ino(t, path)
	if got := readString(t, spare); got != "first, a long content\n" {
		t.Errorf("spare %q, want the first content", got)
	}
	if ino(t, spare) != first {
		t.Error("the spare is not the first file")
	}
	// From now on the two inodes take turns: no inode made or freed. The
	// spare's longer old content is cut.
	for i, content := range []string{"3\n", "fourth, longer than 3\n", "5\n"} {
		write(content)
		want := []uint64{first, second}[i%2]
		if got := ino(t, path); got != want {
			t.Errorf("write %d: inode %d, want %d", i+3, got, want)
		}
	}
	old := unix.Umask(0o077)
	defer unix.Umask(old)
	if err := firstErr(WriteBatch(dir, []File{{Name: "u.json", Data: []byte("six\n"), Perm: 0o640}})); err != nil {
		t.Fatal(err)
	}
	if info, err := os.Stat(path); err != nil || info.Mode().Perm() != 0o640 {
		t.Errorf("mode %v, %v; want 0640", info.Mode(), err)
	}
	sameNames(t, "dir", listDir(t, dir), []string{".u.json.spare", "u.json"})

	// Two files of one name: the later wins.
	errs := WriteBatch(dir, []File{{Name: "u.json", Data: []byte("earlier\n")}, {Name: "u.json", Data: []byte("later\n")}})
	if err := firstErr(errs); err != nil {
		t.Fatal(err)
	}
	if got := readString(t, path); got != "later\n" {
		t.Errorf("content %q, want the later", got)
	}
}

// TestWriteBatchUnfitSpare puts in the spare's place what an agent never
// makes there: each is removed and a new spare made (a directory, which
// cannot be, is left and the file written through a temporary file),
// nothing outside is written, and nothing blocks.
func TestWriteBatchUnfitSpare(t *testing.T) {
	dir := t.TempDir()
	outside := filepath.Join(t.TempDir(), "outside")
	path, spare := filepath.Join(dir, "u.json"), filepath.Join(dir, ".u.json.spare")
	for _, c := range []struct {
		name string
		make func() error
	}{
		{"symlink", func() error { return os.Symlink(outside, spare) }},
		{"hard link", func() error { return os.Link(outside, spare) }},
		{"fifo", func() error { return unix.Mkfifo(spare, 0o644) }},
		{"directory", func() error { return os.MkdirAll(filepath.Join(spare, "x"), 0o755) }},
		{"other owner", func() error {
			if err := os.WriteFile(spare, []byte("x"), 0o644); err != nil {
				return err
			}
			return os.Chown(spare, 65534, 65534)
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			writeString(t, outside, "outside\n")
			writeString(t, path, "old\n")
			os.Remove(spare)
			if err := c.make(); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { done <- firstErr(WriteBatch(dir, []File{{Name: "u.json", Data: []byte("new\n")}})) }()
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("WriteBatch blocked")
			}
			if got := readString(t, path); got != "new\n" {
				t.Errorf("content %q", got)
			}
			if got := readString(t, outside); got != "outside\n" {
				t.Errorf("wrote outside: %q", got)
			}
			os.RemoveAll(spare)
		})
	}
}

// TestWriteBatchReplacesSymlink: a target that is a link is replaced by the
// file, not written through nor swapped to the spare's name.
func TestWriteBatchReplacesSymlink(t *testing.T) {
	dir := t.TempDir()
	outside := filepath.Join(t.TempDir(), "outside")
	writeString(t, outside, "outside\n")
	link := filepath.Join(dir, "u.json")
	if err := os.Symlink(outside, link); err != nil {
		t.Fatal(err)
	}
	writeString(t, filepath.Join(dir, ".u.json.spare"), "old spare\n")
	if err := firstErr(WriteBatch(dir, []File{{Name: "u.json", Data: []byte("new\n")}})); err != nil {
		t.Fatal(err)
	}
	if info, err := os.Lstat(link); err != nil || !info.Mode().IsRegular() {
		t.Errorf("link not replaced by a file: %v %v", info, err)
	}
	if got := readString(t, link); got != "new\n" {
		t.Errorf("content %q", got)
	}
	if got := readString(t, outside); got != "outside\n" {
		t.Errorf("wrote through the link: %q", got)
	}
	sameNames(t, "dir", listDir(t, dir), []string{"u.json"})
}

func TestSpareNames(t *testing.T) {
	if n, ok := SpareName("john.json"); !ok || n != ".john.json.spare" {
		t.Errorf("SpareName = %q, %v", n, ok)
	}
	if target, ok := SpareTarget(".john.json.spare"); !ok || target != "john.json" {
		t.Errorf("SpareTarget = %q, %v", target, ok)
	}
	if _, ok := SpareName(strings.Repeat("x", 201)); ok {
		t.Error("a spare for a name that would be cut")
	}
	for _, n := range []string{"john.json.spare", ".spare", "..spare", ".john.json", ".a/b.spare"} {
		if target, ok := SpareTarget(n); ok {
			t.Errorf("SpareTarget(%q) = %q", n, target)
		}
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
	// Spares: of a file that is there (kept), of one that is gone (removed
	// once old).
	kept, orphan, youngOrphan := filepath.Join(dir, ".c.spare"), filepath.Join(dir, ".d.spare"), filepath.Join(dir, ".e.spare")
	for _, p := range []string{old, young, filepath.Join(dir, "c"), filepath.Join(dir, ".c.tmp-x"), kept, orphan, youngOrphan} {
		writeString(t, p, "")
	}
	past := time.Now().Add(-time.Hour)
	for _, p := range []string{old, kept, orphan} {
		if err := os.Chtimes(p, past, past); err != nil {
			t.Fatal(err)
		}
	}
	removed, err := RemoveStaleTemps(dir, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	sameNames(t, "removed", removed, []string{".a.tmp-0123456789abcdef", ".d.spare"})
	sameNames(t, "dir", listDir(t, dir), []string{".b.tmp-0123456789abcdef", ".c.spare", ".c.tmp-x", ".e.spare", "c"})
}
