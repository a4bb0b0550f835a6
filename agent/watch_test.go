package agent

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/opsfiles"
)

// TestWatchOwnWrites: the events of the agent's own writes (for a new file,
// two for its temporary name; for one rewritten, five: the spare written
// and exchanged with the file) never reach the loop, however many files
// are written between two drains, as long as the writer pumps the watch
// after each chunk; without the pumps, 10,000 files overflow the kernel's
// queue (16,384 events by default), which asks for every file again.
func TestWatchOwnWrites(t *testing.T) {
	write := func(t *testing.T, dir string, pump func()) {
		for chunk := range 20 { // every file twice
			chunk %= 10
			files := make([]opsfiles.File, 1000)
			for i := range files {
				files[i] = opsfiles.File{Name: fmt.Sprintf("u%05d.json", chunk*1000+i), Data: []byte("{}\n"), Perm: 0o644}
			}
			for _, err := range opsfiles.WriteBatch(dir, files) {
				if err != nil {
					t.Fatal(err)
				}
			}
			if pump != nil {
				pump()
			}
		}
	}
	t.Run("pumped", func(t *testing.T) {
		dir := t.TempDir()
		w := newDirWatch(dir)
		defer w.close()
		if _, _, err := w.drain(); err != nil {
			t.Fatal(err)
		}
		write(t, dir, w.pump)
		if err := os.Remove(dir + "/u00042.json"); err != nil {
			t.Fatal(err)
		}
		names, all, err := w.drain()
		if err != nil || all || len(names) != 1 || names[0] != "u00042" {
			t.Errorf("after 10,000 files of its own and one deleted: names %q, all %v, err %v; want u00042 alone", names, all, err)
		}
	})
	t.Run("not pumped", func(t *testing.T) {
		if b, err := os.ReadFile("/proc/sys/fs/inotify/max_queued_events"); err != nil {
			t.Skip(err)
		} else if n, _ := strconv.Atoi(strings.TrimSpace(string(b))); n > 16384 {
			t.Skipf("fs.inotify.max_queued_events is %d: 10,000 files do not overflow it", n)
		}
		dir := t.TempDir()
		w := newDirWatch(dir)
		defer w.close()
		if _, _, err := w.drain(); err != nil {
			t.Fatal(err)
		}
		write(t, dir, nil)
		if _, all, _ := w.drain(); !all {
			t.Error("10,000 files written between two drains did not overflow the queue: the test shows nothing")
		}
	})
}

// TestWatchMovedAway: a file moved away by someone else is reported, even
// to its spare's name or exchanged with another file, and the agent's own
// exchanges around it are not.
func TestWatchMovedAway(t *testing.T) {
	dir := t.TempDir()
	w := newDirWatch(dir)
	defer w.close()
	if _, _, err := w.drain(); err != nil {
		t.Fatal(err)
	}
	write := func() {
		t.Helper()
		files := []opsfiles.File{{Name: "a.json", Data: []byte("{}\n")}, {Name: "b.json", Data: []byte("{}\n")}, {Name: "c.json", Data: []byte("{}\n")}}
		for _, err := range opsfiles.WriteBatch(dir, files) {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	write()
	write() // spares made and exchanged
	write()
	if names, all, err := w.drain(); len(names) > 0 || all || err != nil {
		t.Fatalf("own writes reported: %q, all %v, err %v", names, all, err)
	}
	if err := os.Rename(dir+"/a.json", dir+"/.a.json.spare"); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(dir+"/b.json", t.TempDir()+"/b.json"); err != nil {
		t.Fatal(err)
	}
	write()
	names, all, err := w.drain()
	slices.Sort(names)
	if !slices.Equal(names, []string{"a", "b"}) || all || err != nil {
		t.Errorf("names %q, all %v, err %v; want a and b", names, all, err)
	}
}

// TestSwapNext: which inotify event sequences are the agent's own
// exchanges and which report a file moved away.
func TestSwapNext(t *testing.T) {
	type ev struct {
		mask   uint32
		cookie uint32
		name   string
	}
	from, to := uint32(unix.IN_MOVED_FROM), uint32(unix.IN_MOVED_TO)
	for _, c := range []struct {
		name  string
		evs   []ev
		moved []string // files reported moved away
	}{
		{"exchange", []ev{{from, 1, ".a.json.spare"}, {to, 1, "a.json"}, {from, 2, "a.json"}, {to, 2, ".a.json.spare"}}, nil},
		{"spare renamed into place", []ev{{from, 1, ".a.json.spare"}, {to, 1, "a.json"}, {from, 2, "b.json"}}, []string{"b.json"}},
		{"moved away", []ev{{from, 1, "a.json"}, {to, 1, "elsewhere"}}, []string{"a.json"}},
		{"moved to its spare's name", []ev{{from, 1, "a.json"}, {to, 1, ".a.json.spare"}}, []string{"a.json"}},
		{"exchange cut short", []ev{{from, 1, ".a.json.spare"}, {to, 1, "a.json"}, {from, 2, "a.json"}, {to, 3, "x"}}, []string{"a.json"}},
		{"another file's spare", []ev{{from, 1, ".a.json.spare"}, {to, 1, "a.json"}, {from, 2, "a.json"}, {to, 2, ".b.json.spare"}}, []string{"a.json"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var s swap
			var moved []string
			for _, e := range c.evs {
				ours, m := s.next(e.mask, e.cookie, e.name)
				if m != "" {
					moved = append(moved, m)
				}
				if !ours && e.mask&from != 0 && !strings.HasPrefix(e.name, ".") {
					moved = append(moved, e.name) // as read() reports it
				}
			}
			if !slices.Equal(moved, c.moved) {
				t.Errorf("moved %q, want %q", moved, c.moved)
			}
		})
	}
}
