package passwd

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

const file = `root:x:0:0:root:/root:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
# a comment
john:x:1001:1001::/home/john:/bin/false
mary:x:1002:100::/home/mary:/usr/sbin/nologin
a..b:x:1003:1003::/:/bin/false
+nis::::::
-nis2::::::
bad line
x:x:notanumber:1::/:/bin/sh
big:x:4294967296:1::/:/bin/sh
alice:x:1004:1::/:/bin/sh
johnny:x:1001:1001::/:/bin/sh
sys:x:999:999::/:/bin/false
`

func names(es []Entry) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.Name)
	}
	return out
}

func TestParseAndSelect(t *testing.T) {
	es := Parse([]byte(file))
	if got := names(es); !slices.Equal(got, []string{"root", "nobody", "john", "mary", "a..b", "alice", "johnny", "sys"}) {
		t.Fatalf("Parse: %v", got)
	}
	if e := es[3]; e.UID != 1002 || e.GID != 100 || e.Line != 5 {
		t.Errorf("mary: %+v", e)
	}
	a := Select(es, 1000, 65534, []string{"alice"})
	if got := names(a.Users); !slices.Equal(got, []string{"john", "mary"}) {
		t.Errorf("Users: %v", got)
	}
	if got := names(a.Bad); !slices.Equal(got, []string{"a..b"}) {
		t.Errorf("Bad: %v", got)
	}
	if got := names(a.Shadowed); !slices.Equal(got, []string{"johnny"}) {
		t.Errorf("Shadowed: %v", got)
	}
}

func TestNameOfAndRead(t *testing.T) {
	path := filepath.Join(t.TempDir(), "passwd")
	if err := os.WriteFile(path, []byte(file), 0o644); err != nil {
		t.Fatal(err)
	}
	if n, err := NameOf(path, 1001); err != nil || n != "john" {
		t.Errorf("NameOf(1001) = %q, %v (the first entry owns the UID)", n, err)
	}
	if _, err := NameOf(path, 4242); err == nil {
		t.Error("NameOf of a UID without an account succeeded")
	}
	if _, err := NameOf(filepath.Join(t.TempDir(), "missing"), 0); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	huge := filepath.Join(t.TempDir(), "huge")
	f, err := os.Create(huge)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(MaxSize + 1); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := Read(huge); !errors.Is(err, ErrTooLarge) {
		t.Errorf("Read of a huge file: %v", err)
	}
}
