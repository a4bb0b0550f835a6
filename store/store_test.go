package store

import (
	"bufio"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"github.com/myvpn/bwagent/quota"
	"math"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func openTest(t *testing.T) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func commit(t *testing.T, s *Store, b *Batch) {
	t.Helper()
	if err := s.Commit(b); err != nil {
		t.Fatal(err)
	}
}

// stored returns u as the store gives it back: times in time.Local, with no
// monotonic reading.
func stored(u User) User {
	for _, t := range []*time.Time{&u.BlockTime, &u.LastReset, &u.UnblockUntil, &u.NextReset, &u.UpdatedAt} {
		*t = storedTime(*t)
	}
	return u
}

func storedTime(t time.Time) time.Time {
	if t.IsZero() {
		return t
	}
	return time.Unix(0, t.UnixNano())
}

func users(t *testing.T, s *Store) []User {
	t.Helper()
	us, err := s.Users()
	if err != nil {
		t.Fatal(err)
	}
	return us
}

func TestRoundTrip(t *testing.T) {
	s := openTest(t)
	tokyo := time.FixedZone("JST", 9*3600)
	full := User{
		Name:         "zed@example.com",
		Protocol:     "vless",
		UID:          math.MaxUint32,
		Up:           math.MaxUint64,
		Down:         math.MaxUint64 - 1,
		Day:          "2026-03-14",
		DayUp:        1 << 63,
		DayDown:      math.MaxInt64,
		Blocked:      true,
		BlockReason:  "quota exceeded: 10 GiB",
		BlockTime:    time.Date(2026, 3, 14, 15, 9, 26, 535897932, tokyo),
		Disabled:     true,
		LastReset:    time.Unix(0, 1), // just after the epoch
		Unblocked:    true,
		UnblockLimit: math.MaxUint64,
		UnblockUntil: time.Unix(0, math.MaxInt64), // the last storable instant
		Schedule:     "monthly 1",
		NextReset:    time.Unix(0, math.MinInt64), // the first one
		UpdatedAt:    time.Now(),                  // with a monotonic reading
	}
	zero := User{Name: "alice"} // every other field zero
	ssh := User{Name: "bob", Protocol: "ssh", UID: 1001, Up: 1, Down: 2, Day: "2026-03-15",
		BlockTime: time.Date(1969, 12, 31, 23, 59, 59, 999999999, time.UTC)}
	commit(t, s, &Batch{Users: []User{full, zero, ssh}})

	got := users(t, s)
	want := []User{stored(zero), stored(ssh), stored(full)} // by name
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Users:\n got %+v\nwant %+v", got, want)
	}
	for _, u := range got {
		if !u.BlockTime.IsZero() && u.BlockTime.Location() != time.Local {
			t.Errorf("%s: BlockTime in %v, want time.Local", u.Name, u.BlockTime.Location())
		}
	}
	if !got[0].UpdatedAt.IsZero() || !got[0].UnblockUntil.IsZero() {
		t.Error("zero times did not come back zero")
	}

	var each []User
	if err := s.EachUser(func(u User) error { each = append(each, u); return nil }); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(each, want) {
		t.Fatalf("EachUser:\n got %+v\nwant %+v", each, want)
	}
	stop := errors.New("stop")
	calls := 0
	if err := s.EachUser(func(User) error { calls++; return stop }); err != stop || calls != 1 {
		t.Fatalf("EachUser with fn failing: %v after %d calls, want fn's error after 1", err, calls)
	}

	// Upsert overwrites the whole row, including back to zero values.
	full2 := User{Name: full.Name, Protocol: "trojan", Up: 7}
	zero2 := zero
	zero2.Up, zero2.Blocked, zero2.BlockTime = 42, true, time.Now()
	commit(t, s, &Batch{Users: []User{zero2, full2}})
	got = users(t, s)
	want = []User{stored(zero2), stored(ssh), stored(full2)}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("after upsert:\n got %+v\nwant %+v", got, want)
	}

	// The last of two rows for the same user wins.
	a, b := zero, zero
	a.Up, b.Up = 1, 2
	commit(t, s, &Batch{Users: []User{a, b}})
	if got := users(t, s)[0]; got.Up != 2 {
		t.Errorf("duplicate rows in one batch: Up = %d, want the last one, 2", got.Up)
	}

	// Dropped users go; a user dropped and upserted in one batch stays.
	commit(t, s, &Batch{DropUsers: []string{"bob", "alice", "nobody"}, Users: []User{zero}})
	got = users(t, s)
	if len(got) != 2 || got[0].Name != "alice" || got[1].Name != full.Name {
		t.Errorf("after drop: %+v", got)
	}
}

func TestRoundTripBaselines(t *testing.T) {
	s := openTest(t)
	bs := []Baseline{
		{Source: quota.XraySource("zed@example"), Epoch: quota.Epoch{Origin: "xray", Start: 1757000000}, Rx: math.MaxUint64, Tx: 1 << 63},
		{Source: quota.UIDSource(1001), Epoch: quota.Epoch{Origin: "boot-1", Gen: 7}, Rx: 10, Tx: 20},
		{Source: quota.UIDSource(1002)},
	}
	commit(t, s, &Batch{Baselines: bs})
	got, err := s.Baselines()
	if err != nil {
		t.Fatal(err)
	}
	want := []Baseline{bs[1], bs[2], bs[0]}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Baselines:\n got %+v\nwant %+v", got, want)
	}

	commit(t, s, &Batch{
		DropBaselines: []quota.Source{quota.UIDSource(1002), quota.UIDSource(9999)},
		Baselines:     []Baseline{{Source: quota.UIDSource(1001), Epoch: quota.Epoch{Origin: "boot-2", Gen: 1}, Rx: 1, Tx: 2}},
	})
	got, err = s.Baselines()
	if err != nil {
		t.Fatal(err)
	}
	want = []Baseline{{Source: quota.UIDSource(1001), Epoch: quota.Epoch{Origin: "boot-2", Gen: 1}, Rx: 1, Tx: 2}, bs[0]}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("after drop and upsert:\n got %+v\nwant %+v", got, want)
	}
}

func TestHistory(t *testing.T) {
	s := openTest(t)
	var hs []DayUsage
	for _, name := range []string{"bob", "alice"} {
		for d := 1; d <= 5; d++ {
			hs = append(hs, DayUsage{Name: name, Day: fmt.Sprintf("2026-03-%02d", d), Up: uint64(d), Down: uint64(10 * d)})
		}
	}
	rand.Shuffle(len(hs), func(i, j int) { hs[i], hs[j] = hs[j], hs[i] })
	commit(t, s, &Batch{History: hs})
	// Upserting a day replaces its values (they are absolute).
	commit(t, s, &Batch{History: []DayUsage{{Name: "alice", Day: "2026-03-05", Up: math.MaxUint64, Down: 1}}})

	days := func(hs []DayUsage) string {
		var b strings.Builder
		for _, h := range hs {
			fmt.Fprintf(&b, "%s/%s/%d/%d ", h.Name, h.Day[8:], h.Up, h.Down)
		}
		return strings.TrimSpace(b.String())
	}
	for _, tc := range []struct{ name, from, to, want string }{
		{"alice", "", "", "alice/01/1/10 alice/02/2/20 alice/03/3/30 alice/04/4/40 alice/05/18446744073709551615/1"},
		{"alice", "2026-03-02", "2026-03-03", "alice/02/2/20 alice/03/3/30"},
		{"alice", "2026-03-04", "", "alice/04/4/40 alice/05/18446744073709551615/1"},
		{"alice", "", "2026-03-01", "alice/01/1/10"},
		{"alice", "2026-03-03", "2026-03-03", "alice/03/3/30"},
		{"alice", "2026-03-04", "2026-03-02", ""},
		{"bob", "2026-02-01", "2026-03-02", "bob/01/1/10 bob/02/2/20"},
		{"carol", "", "", ""},
		{"", "2026-03-04", "", "alice/04/4/40 bob/04/4/40 alice/05/18446744073709551615/1 bob/05/5/50"},
	} {
		got, err := s.History(tc.name, tc.from, tc.to)
		if err != nil {
			t.Fatal(err)
		}
		if days(got) != tc.want {
			t.Errorf("History(%q, %q, %q) = %s, want %s", tc.name, tc.from, tc.to, days(got), tc.want)
		}
	}
}

func TestEvents(t *testing.T) {
	s := openTest(t)
	t0 := time.Date(2026, 3, 14, 12, 0, 0, 0, time.UTC)
	b := &Batch{Events: []Event{
		{Time: t0, Protocol: "ssh", Name: "bob", Action: "block", Reason: "quota"},
		{Time: t0.Add(time.Second), Protocol: "vless", Name: "alice", Action: "block", Reason: "quota", Logged: true},
		{Time: t0.Add(2 * time.Second), Protocol: "ssh", Name: "bob", Action: "unblock", Reason: "manual"},
	}}
	commit(t, s, b)
	for i, e := range b.Events {
		if e.ID == 0 || (i > 0 && e.ID <= b.Events[i-1].ID) {
			t.Fatalf("event IDs not assigned in order: %+v", b.Events)
		}
	}
	b2 := &Batch{Events: []Event{{ID: 999, Protocol: "vless", Name: "alice", Action: "reset"}}}
	commit(t, s, b2)
	if b2.Events[0].ID != b.Events[2].ID+1 {
		t.Errorf("event ID %d, want the next one, %d (the input ID is ignored)", b2.Events[0].ID, b.Events[2].ID+1)
	}

	ids := func(es []Event) []int64 {
		var ids []int64
		for _, e := range es {
			ids = append(ids, e.ID)
		}
		return ids
	}
	e1, e2, e3, e4 := b.Events[0].ID, b.Events[1].ID, b.Events[2].ID, b2.Events[0].ID
	for _, tc := range []struct {
		name  string
		limit int
		want  []int64
	}{
		{"", 0, []int64{e4, e3, e2, e1}},
		{"", 2, []int64{e4, e3}},
		{"bob", 0, []int64{e3, e1}},
		{"bob", 1, []int64{e3}},
		{"alice", -1, []int64{e4, e2}},
		{"carol", 5, nil},
	} {
		es, err := s.Events(tc.name, tc.limit)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(ids(es), tc.want) {
			t.Errorf("Events(%q, %d) = %v, want %v", tc.name, tc.limit, ids(es), tc.want)
		}
	}
	es, err := s.Events("", 0)
	if err != nil {
		t.Fatal(err)
	}
	want := b.Events[1]
	want.Time = storedTime(want.Time)
	if !reflect.DeepEqual(es[2], want) {
		t.Errorf("event round trip: got %+v, want %+v", es[2], want)
	}
	if !es[0].Time.IsZero() {
		t.Errorf("zero event time came back as %v", es[0].Time)
	}

	un, err := s.UnloggedEvents()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(ids(un), []int64{e1, e3, e4}) {
		t.Fatalf("UnloggedEvents = %v, want %v", ids(un), []int64{e1, e3, e4})
	}
	commit(t, s, &Batch{Logged: []int64{e1, e4, 12345}})
	un, err = s.UnloggedEvents()
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(ids(un), []int64{e3}) {
		t.Fatalf("UnloggedEvents after marking = %v, want [%d]", ids(un), e3)
	}
	if es, _ := s.Events("bob", 0); !es[1].Logged || es[0].Logged {
		t.Errorf("Logged flags: %+v", es)
	}
}

func TestMeta(t *testing.T) {
	s := openTest(t)
	if v, ok, err := s.Meta("imported"); err != nil || ok || v != "" {
		t.Fatalf(`Meta("imported") on a new store = %q, %v, %v`, v, ok, err)
	}
	commit(t, s, &Batch{Meta: map[string]string{"imported": "2026-03-14", "empty": ""}})
	commit(t, s, &Batch{Meta: map[string]string{"imported": "2026-03-15"}})
	for k, want := range map[string]string{"imported": "2026-03-15", "empty": "", "schema_version": strconv.Itoa(SchemaVersion)} {
		if v, ok, err := s.Meta(k); err != nil || !ok || v != want {
			t.Errorf("Meta(%q) = %q, %v, %v; want %q", k, v, ok, err, want)
		}
	}
	err := s.Commit(&Batch{Meta: map[string]string{"schema_version": "2"}})
	if !errors.Is(err, ErrInvalid) {
		t.Errorf("setting schema_version: %v, want ErrInvalid", err)
	}
	if SchemaVersion != len(migrations) {
		t.Errorf("SchemaVersion = %d, but there are %d migrations", SchemaVersion, len(migrations))
	}
}

// snapshot is everything a store holds, for comparisons.
type snapshot struct {
	Users     []User
	Baselines []Baseline
	History   []DayUsage
	Events    []Event
	Meta      string
}

func snap(t *testing.T, s *Store) snapshot {
	t.Helper()
	var sn snapshot
	var err error
	if sn.Users, err = s.Users(); err != nil {
		t.Fatal(err)
	}
	if sn.Baselines, err = s.Baselines(); err != nil {
		t.Fatal(err)
	}
	if sn.History, err = s.History("", "", ""); err != nil {
		t.Fatal(err)
	}
	if sn.Events, err = s.Events("", 0); err != nil {
		t.Fatal(err)
	}
	sn.Meta, _, err = s.Meta("k")
	if err != nil {
		t.Fatal(err)
	}
	return sn
}

func TestCommitAtomic(t *testing.T) {
	s := openTest(t)
	commit(t, s, &Batch{
		Users:     []User{{Name: "alice", Up: 1}, {Name: "bob", Up: 1}},
		Baselines: []Baseline{{Source: quota.UIDSource(1), Rx: 1}, {Source: quota.UIDSource(2), Rx: 1}},
		History:   []DayUsage{{Name: "alice", Day: "2026-03-14", Up: 1}},
		Events:    []Event{{Name: "alice", Action: "block"}},
		Meta:      map[string]string{"k": "1"},
	})
	before := snap(t, s)
	first := before.Events[0].ID

	batch := func() *Batch {
		return &Batch{
			Users:         []User{{Name: "alice", Up: 2}, {Name: "carol", Up: 2}},
			DropUsers:     []string{"bob"},
			Baselines:     []Baseline{{Source: quota.UIDSource(1), Rx: 2}, {Source: quota.UIDSource(3), Rx: 2}},
			DropBaselines: []quota.Source{quota.UIDSource(2)},
			History:       []DayUsage{{Name: "alice", Day: "2026-03-14", Up: 2}, {Name: "alice", Day: "2026-03-15", Up: 2}},
			Events:        []Event{{Name: "alice", Action: "unblock"}, {Name: "carol", Action: "import"}},
			Logged:        []int64{first},
			Meta:          map[string]string{"k": "2"},
		}
	}
	fail := errors.New("injected failure")
	for _, step := range []string{"drop", "users", "baselines", "history", "events", "logged", "meta"} {
		s.hook = func(at string) error {
			if at == step {
				return fail
			}
			return nil
		}
		b := batch()
		if err := s.Commit(b); !errors.Is(err, fail) {
			t.Fatalf("failure after %s: Commit returned %v", step, err)
		}
		if b.Events[0].ID != 0 {
			t.Errorf("failure after %s: event ID set to %d", step, b.Events[0].ID)
		}
		if after := snap(t, s); !reflect.DeepEqual(after, before) {
			t.Fatalf("failure after %s changed the store:\n got %+v\nwant %+v", step, after, before)
		}
	}

	// A value that cannot be stored, in the last event, after everything
	// else was written.
	s.hook = nil
	b := batch()
	b.Events[1].Time = time.Date(3000, 1, 1, 0, 0, 0, 0, time.UTC)
	err := s.Commit(b)
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), s.Path()) {
		t.Fatalf("event in year 3000: Commit returned %v, want ErrInvalid naming the file", err)
	}
	b.Events[1].Time = time.Unix(0, 0)
	if err := s.Commit(b); !errors.Is(err, ErrInvalid) {
		t.Fatalf("event at the Unix epoch: Commit returned %v, want ErrInvalid", err)
	}
	if after := snap(t, s); !reflect.DeepEqual(after, before) {
		t.Fatalf("invalid batch changed the store:\n got %+v\nwant %+v", after, before)
	}

	// The same batch, retried, goes through whole.
	b.Events[1].Time = time.Time{}
	commit(t, s, b)
	after := snap(t, s)
	if len(after.Users) != 2 || after.Users[0].Up != 2 || after.Users[1].Name != "carol" ||
		len(after.Baselines) != 2 || after.Baselines[1].Source != quota.UIDSource(3) ||
		len(after.History) != 2 || after.History[0].Up != 2 ||
		len(after.Events) != 3 || !after.Events[2].Logged || after.Meta != "2" {
		t.Fatalf("retried batch not applied whole: %+v", after)
	}
	if b.Events[0].ID <= first || b.Events[1].ID != b.Events[0].ID+1 {
		t.Errorf("event IDs after retry: %+v (first event %d)", b.Events, first)
	}
}

// TestRollbackFails makes a commit fail and then its ROLLBACK too, leaving
// the transaction open: the store must drop the connection, which rolls the
// transaction back and releases the write lock, and the next commit must
// open a new one.
func TestRollbackFails(t *testing.T) {
	s := openTest(t)
	commit(t, s, &Batch{Users: []User{{Name: "alice", Up: 1}}})
	before := snap(t, s)
	fail := errors.New("injected failure")
	s.hook = func(step string) error {
		if step == "baselines" || step == "rollback" {
			return fail
		}
		return nil
	}
	b := &Batch{
		Users:     []User{{Name: "alice", Up: 2}},
		Baselines: []Baseline{{Source: quota.UIDSource(1), Rx: 2}},
		Events:    []Event{{Name: "alice", Action: "reset"}},
	}
	if err := s.Commit(b); !errors.Is(err, fail) {
		t.Fatalf("Commit: %v, want the injected failure", err)
	}
	if s.w != nil {
		t.Fatal("writer connection kept after a failed ROLLBACK")
	}
	s.hook = nil
	if after := snap(t, s); !reflect.DeepEqual(after, before) {
		t.Fatalf("failed commit changed the store:\n got %+v\nwant %+v", after, before)
	}
	commit(t, s, b)
	if us := users(t, s); us[0].Up != 2 || b.Events[0].ID == 0 {
		t.Fatalf("retry on a new connection: %+v, events %+v", us, b.Events)
	}
	if err := s.Check(); err != nil {
		t.Fatal(err)
	}
}

func TestEmptyBatch(t *testing.T) {
	s := openTest(t)
	if err := s.Commit(nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(&Batch{Meta: map[string]string{}}); err != nil {
		t.Fatal(err)
	}
}

// crashChildEnv names the database the child process of TestCrashSafety
// commits to until it is killed.
const crashChildEnv = "BWAGENT_STORE_CRASH_CHILD"

// crashUsers is the number of users (and baselines) in each crash test batch:
// enough that a commit takes a while, so kills land inside commits.
const crashUsers = 2000

// crashChild commits batches to the database named by crashChildEnv until it
// is killed. Batch i sets every user's Up and every baseline's Rx to i and
// meta "seq" to i, and appends one event: a partly applied batch would show
// as a mismatch.
func crashChild(path string) {
	s, err := Open(path)
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	seq := 0
	if v, ok, err := s.Meta("seq"); err == nil && ok {
		seq, _ = strconv.Atoi(v)
	}
	for i := seq + 1; ; i++ {
		b := &Batch{Meta: map[string]string{"seq": strconv.Itoa(i)}}
		for u := range crashUsers {
			name := fmt.Sprintf("user%05d", (u*7919)%crashUsers)
			b.Users = append(b.Users, User{Name: name, Up: uint64(i), UpdatedAt: time.Now()})
			b.Baselines = append(b.Baselines, Baseline{Source: quota.XraySource(name), Rx: uint64(i)})
		}
		b.History = []DayUsage{{Name: "user00000", Day: "2026-03-14", Up: uint64(i)}}
		b.Events = []Event{{Name: "user00000", Action: "tick", Reason: strconv.Itoa(i)}}
		if err := s.Commit(b); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		if i == seq+1 {
			fmt.Println("ready")
		}
	}
}

func TestMain(m *testing.M) {
	if path := os.Getenv(crashChildEnv); path != "" {
		crashChild(path)
		return
	}
	if path := os.Getenv(memChildEnv); path != "" {
		memChild(path)
		return
	}
	os.Exit(m.Run())
}

func TestCrashSafety(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	seq := 0
	for round := range 5 {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(out).ReadString('\n')
		if line != "ready\n" {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("child: %q %v", line, err)
		}
		time.Sleep(time.Duration(rand.IntN(300)) * time.Millisecond)
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		cmd.Wait()

		s, err := Open(path)
		if err != nil {
			t.Fatalf("round %d: reopen after kill: %v", round, err)
		}
		v, _, err := s.Meta("seq")
		if err != nil {
			t.Fatal(err)
		}
		n, _ := strconv.Atoi(v)
		if n <= seq {
			t.Fatalf("round %d: seq %d after the child committed past %d", round, n, seq)
		}
		seq = n
		us, err := s.Users()
		if err != nil {
			t.Fatal(err)
		}
		bs, err := s.Baselines()
		if err != nil {
			t.Fatal(err)
		}
		if len(us) != crashUsers || len(bs) != crashUsers {
			t.Fatalf("round %d: %d users and %d baselines, want %d", round, len(us), len(bs), crashUsers)
		}
		for i := range us {
			if us[i].Up != uint64(seq) || bs[i].Rx != uint64(seq) || bs[i].Source != quota.XraySource(us[i].Name) {
				t.Fatalf("round %d: batch %d torn: user %+v, baseline %+v", round, seq, us[i], bs[i])
			}
		}
		es, err := s.Events("", 0)
		if err != nil {
			t.Fatal(err)
		}
		if len(es) != seq || es[0].Reason != v {
			t.Fatalf("round %d: %d events, the newest for batch %q; want %d", round, len(es), es[0].Reason, seq)
		}
		hs, err := s.History("user00000", "", "")
		if err != nil {
			t.Fatal(err)
		}
		if len(hs) != 1 || hs[0].Up != uint64(seq) {
			t.Fatalf("round %d: history %+v, want Up %d", round, hs, seq)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		t.Logf("round %d: killed after batch %d, state consistent", round, seq)
	}
}

// checkCorrupt checks that err is a clear ErrCorrupt naming the file.
func checkCorrupt(t *testing.T, err error, path string) {
	t.Helper()
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("got %v, want ErrCorrupt", err)
	}
	if msg := err.Error(); !strings.Contains(msg, path) || !strings.Contains(msg, "move the file aside") {
		t.Errorf("error does not name the file and the remedy: %v", err)
	}
	t.Log(err)
}

func TestCorrupt(t *testing.T) {
	t.Run("random", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		junk := make([]byte, 64<<10)
		for i := range junk {
			junk[i] = byte(rand.Uint32())
		}
		if err := os.WriteFile(path, junk, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := Open(path)
		if err == nil {
			s.Close()
		}
		checkCorrupt(t, err, path)
	})

	t.Run("text", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		if err := os.WriteFile(path, []byte(`{"alice": {"up": 1}}`+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := Open(path)
		checkCorrupt(t, err, path)
	})

	t.Run("truncated", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		s, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		us, bs := benchUsers(20_000)
		commit(t, s, &Batch{Users: us, Baselines: bs})
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, fi.Size()/2); err != nil {
			t.Fatal(err)
		}
		s, err = Open(path)
		if err == nil {
			// Open does not read every page; reading them must fail.
			_, err = s.Users()
			if err == nil {
				_, err = s.Baselines()
			}
			s.Close()
		}
		checkCorrupt(t, err, path)
	})

	t.Run("damaged", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		s, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		us, bs := benchUsers(20_000)
		commit(t, s, &Batch{Users: us, Baselines: bs})
		s.Close()
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		// Overwrite pages in the middle of the file with junk.
		junk := make([]byte, 64<<10)
		for i := range junk {
			junk[i] = byte(rand.Uint32())
		}
		if _, err := f.WriteAt(junk, 256<<10); err != nil {
			t.Fatal(err)
		}
		f.Close()
		s, err = Open(path)
		if err != nil {
			t.Fatalf("Open does not read the whole file, yet: %v", err)
		}
		defer s.Close()
		checkCorrupt(t, s.Check(), path)
		_, err = s.Users()
		if err == nil {
			_, err = s.Baselines()
		}
		checkCorrupt(t, err, path)
	})

	t.Run("foreign", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state.db")
		db, err := sql.Open("sqlite", path)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := db.Exec("CREATE TABLE users (name TEXT)"); err != nil {
			t.Fatal(err)
		}
		db.Close()
		_, err = Open(path)
		checkCorrupt(t, err, path)
	})
}

func TestNewerSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.w.c.ExecContext(bg, "UPDATE meta SET value = ? WHERE key = 'schema_version'", SchemaVersion+1); err != nil {
		t.Fatal(err)
	}
	s.Close()
	_, err = Open(path)
	if !errors.Is(err, ErrSchemaVersion) || !strings.Contains(err.Error(), path) {
		t.Fatalf("Open of a newer schema: %v, want ErrSchemaVersion naming the file", err)
	}
	t.Log(err)
}

func TestFileModes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "var", "lib", "bwagent")
	path := filepath.Join(dir, "state.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	commit(t, s, &Batch{Users: []User{{Name: "alice"}}})
	for p, want := range map[string]os.FileMode{
		dir:               0o700 | os.ModeDir,
		filepath.Dir(dir): 0o700 | os.ModeDir,
		path:              0o600,
		path + "-wal":     0o600,
		path + "-shm":     0o600,
	} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", p, fi.Mode(), want)
		}
	}
	if s.Path() != path {
		t.Errorf("Path() = %q, want %q", s.Path(), path)
	}
}

// TestOddPath checks that characters with a meaning in URIs are taken
// literally in the path.
func TestOddPath(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "a dir?x=1#frag%20", "state?.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	commit(t, s, &Batch{Users: []User{{Name: "alice"}}})
	s.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("database not at the path given: %v", err)
	}
	if s, err = Open(path); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if us := users(t, s); len(us) != 1 {
		t.Fatalf("reopened: %+v", us)
	}
}

func TestClosed(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	for name, err := range map[string]error{
		"Commit": s.Commit(&Batch{Users: []User{{Name: "alice"}}}),
		"Users":  func() error { _, err := s.Users(); return err }(),
		"Events": func() error { _, err := s.Events("", 0); return err }(),
		"Meta":   func() error { _, _, err := s.Meta("k"); return err }(),
	} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("%s after Close: %v, want ErrClosed", name, err)
		}
	}
}

// TestTwoStores opens the same file twice, as a second process would, and
// commits through both.
func TestTwoStores(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	a, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	done := make(chan error)
	for _, s := range []*Store{a, b} {
		go func() {
			var err error
			for i := 0; i < 50 && err == nil; i++ {
				err = s.Commit(&Batch{Users: []User{{Name: fmt.Sprintf("%p-%d", s, i)}}, Events: []Event{{Action: "x"}}})
			}
			done <- err
		}()
	}
	for range 2 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []*Store{a, b} {
		if us := users(t, s); len(us) != 100 {
			t.Errorf("%d users, want 100", len(us))
		}
	}
}

// fileState is a file's content hash and the names beside it, to show that
// Open left a file alone.
type fileState struct {
	sum   [sha256.Size]byte
	names []string
}

func stateOf(t *testing.T, path string) fileState {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	st := fileState{sum: sha256.Sum256(data)}
	for _, e := range ents {
		st.names = append(st.names, e.Name())
	}
	return st
}

// sqliteFile creates an SQLite database at path with another program's
// settings, runs stmts in it and closes it.
func sqliteFile(t *testing.T, path string, stmts ...string) {
	t.Helper()
	db, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for _, q := range stmts {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
}

// ourFile creates a state database at path with one user, runs stmts on its
// writer connection and closes it.
func ourFile(t *testing.T, path string, stmts ...string) {
	t.Helper()
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	commit(t, s, &Batch{Users: []User{{Name: "alice", Up: 1}}})
	for _, q := range stmts {
		if _, err := s.w.c.ExecContext(bg, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
}

// TestOpenRefusesUntouched checks that a file Open refuses is left byte for
// byte as it was, with no -wal, -shm or -journal file beside it: Open reads
// it, read-only, before anything writes to it (the switch to WAL would
// rewrite the header of a database in rollback mode).
func TestOpenRefusesUntouched(t *testing.T) {
	for _, tc := range []struct {
		name   string
		create func(t *testing.T, path string)
		want   error
	}{
		{"foreign", func(t *testing.T, path string) {
			sqliteFile(t, path, "CREATE TABLE users (name TEXT)", "INSERT INTO users VALUES ('alice')")
		}, ErrCorrupt},
		{"foreign application id, no tables", func(t *testing.T, path string) {
			sqliteFile(t, path, "PRAGMA application_id = 42")
		}, ErrCorrupt},
		{"foreign in WAL mode", func(t *testing.T, path string) {
			sqliteFile(t, path, "PRAGMA journal_mode = WAL", "CREATE TABLE t (x)")
		}, ErrCorrupt},
		{"foreign with our table names", func(t *testing.T, path string) {
			sqliteFile(t, path, migrations[0])
		}, ErrCorrupt},
		{"newer schema", func(t *testing.T, path string) {
			ourFile(t, path, fmt.Sprintf("UPDATE meta SET value = '%d' WHERE key = 'schema_version'", SchemaVersion+1))
		}, ErrSchemaVersion},
		{"ours without a schema version", func(t *testing.T, path string) {
			ourFile(t, path, "DELETE FROM meta WHERE key = 'schema_version'")
		}, ErrCorrupt},
		{"ours without a meta table", func(t *testing.T, path string) {
			ourFile(t, path, "DROP TABLE meta")
		}, ErrCorrupt},
		{"not SQLite", func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte(`{"alice": {"up": 1}}`+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, ErrCorrupt},
		{"SQLite header, then junk", func(t *testing.T, path string) {
			junk := make([]byte, 8192)
			for i := range junk {
				junk[i] = byte(rand.Uint32())
			}
			copy(junk, sqliteMagic)
			if err := os.WriteFile(path, junk, 0o600); err != nil {
				t.Fatal(err)
			}
		}, ErrCorrupt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.db")
			tc.create(t, path)
			before := stateOf(t, path)
			if !slices.Equal(before.names, []string{"state.db"}) {
				t.Fatalf("fixture left %v", before.names)
			}
			s, err := Open(path)
			if err == nil {
				s.Close()
			}
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), path) {
				t.Fatalf("Open: %v, want %v naming the file", err, tc.want)
			}
			t.Log(err)
			after := stateOf(t, path)
			if after.sum != before.sum {
				t.Error("the refused file was changed")
			}
			if !slices.Equal(after.names, before.names) {
				t.Errorf("files beside it: %v, want %v", after.names, before.names)
			}
		})
	}
}

// TestOpenRefusesInUse checks a foreign WAL database that another process
// holds open (its -wal file exists, so it is read with locks, not as
// immutable): refused, its database file unchanged.
func TestOpenRefusesInUse(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	other, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	other.SetMaxOpenConns(1)
	for _, q := range []string{"PRAGMA journal_mode = WAL", "PRAGMA wal_autocheckpoint = 0", "CREATE TABLE t (x)", "INSERT INTO t VALUES (1)"} {
		if _, err := other.Exec(q); err != nil {
			t.Fatal(err)
		}
	}
	if !exists(path + "-wal") {
		t.Fatal("no -wal file while the database is open")
	}
	before := stateOf(t, path)
	_, err = Open(path)
	checkCorrupt(t, err, path)
	if stateOf(t, path).sum != before.sum {
		t.Error("the refused file was changed")
	}
	var n int
	if err := other.QueryRow("SELECT count(*) FROM t").Scan(&n); err != nil || n != 1 {
		t.Errorf("the other process's database: %d rows, %v", n, err)
	}
}

// TestOpenTakesEmpty checks that an empty file and an empty SQLite database
// (no application id, no schema) are taken as new databases.
func TestOpenTakesEmpty(t *testing.T) {
	for name, create := range map[string]func(t *testing.T, path string){
		"empty file": func(t *testing.T, path string) {
			if err := os.WriteFile(path, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		},
		"empty SQLite database": func(t *testing.T, path string) {
			sqliteFile(t, path, "PRAGMA user_version = 0", "CREATE TABLE x (y)", "DROP TABLE x")
		},
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.db")
			create(t, path)
			s, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			commit(t, s, &Batch{Users: []User{{Name: "alice"}}})
			if us := users(t, s); len(us) != 1 {
				t.Errorf("users: %+v", us)
			}
		})
	}
}

// TestDropUsers checks the retention of users gone for good: a dropped
// user's row and the named baselines go, in the same transaction; its
// history and events stay and are still returned. Drops apply before the
// upserts of the same batch.
func TestDropUsers(t *testing.T) {
	s := openTest(t)
	t0 := time.Date(2026, 3, 14, 12, 0, 0, 0, time.UTC)
	commit(t, s, &Batch{
		Users:     []User{{Name: "alice", Protocol: "ssh", UID: 1001, Up: 5}, {Name: "bob", Protocol: "ssh", UID: 1002, Up: 7}},
		Baselines: []Baseline{{Source: quota.UIDSource(1001), Epoch: quota.Epoch{Origin: "e"}, Rx: 5}, {Source: quota.UIDSource(1002), Epoch: quota.Epoch{Origin: "e"}, Rx: 7}},
		History: []DayUsage{
			{Name: "alice", Day: "2026-03-13", Up: 2}, {Name: "alice", Day: "2026-03-14", Up: 3},
			{Name: "bob", Day: "2026-03-14", Up: 7},
		},
		Events: []Event{{Time: t0, Protocol: "ssh", Name: "alice", Action: "block", Reason: "quota"}},
	})

	// alice goes; in the same batch her history of a new day is written:
	// a drop never touches history, whichever batch it is in.
	commit(t, s, &Batch{
		DropUsers:     []string{"alice", "nobody"},
		DropBaselines: []quota.Source{quota.UIDSource(1001), quota.UIDSource(9999)},
		History:       []DayUsage{{Name: "alice", Day: "2026-03-15", Up: 1}},
	})
	if got := users(t, s); len(got) != 1 || got[0].Name != "bob" || got[0].Up != 7 {
		t.Errorf("users after dropping alice: %+v", got)
	}
	bs, err := s.Baselines()
	if err != nil {
		t.Fatal(err)
	}
	if want := []Baseline{{Source: quota.UIDSource(1002), Epoch: quota.Epoch{Origin: "e"}, Rx: 7}}; !reflect.DeepEqual(bs, want) {
		t.Errorf("baselines after dropping uid:1001: %+v, want %+v", bs, want)
	}
	hs, err := s.History("alice", "", "")
	if err != nil {
		t.Fatal(err)
	}
	want := []DayUsage{
		{Name: "alice", Day: "2026-03-13", Up: 2}, {Name: "alice", Day: "2026-03-14", Up: 3},
		{Name: "alice", Day: "2026-03-15", Up: 1},
	}
	if !reflect.DeepEqual(hs, want) {
		t.Errorf("dropped user's history: %+v, want %+v", hs, want)
	}
	if all, err := s.History("", "", ""); err != nil || len(all) != 4 {
		t.Errorf("all history: %+v, %v", all, err)
	}
	if es, err := s.Events("alice", 0); err != nil || len(es) != 1 || es[0].Action != "block" {
		t.Errorf("dropped user's events: %+v, %v", es, err)
	}

	// Drop, then upsert, of the same keys in one batch: the upserted rows
	// are there, with their new values, whatever order the slices list
	// them in.
	commit(t, s, &Batch{
		Users:         []User{{Name: "bob", Protocol: "ssh", UID: 1003, Up: 1}},
		Baselines:     []Baseline{{Source: quota.UIDSource(1002), Epoch: quota.Epoch{Origin: "f"}, Rx: 1}},
		DropUsers:     []string{"bob"},
		DropBaselines: []quota.Source{quota.UIDSource(1002)},
	})
	if got := users(t, s); len(got) != 1 || got[0].Name != "bob" || got[0].UID != 1003 || got[0].Up != 1 {
		t.Errorf("bob dropped and upserted in one batch: %+v", got)
	}
	if bs, err := s.Baselines(); err != nil || !reflect.DeepEqual(bs, []Baseline{{Source: quota.UIDSource(1002), Epoch: quota.Epoch{Origin: "f"}, Rx: 1}}) {
		t.Errorf("uid:1002 dropped and upserted in one batch: %+v, %v", bs, err)
	}
	if hs, err := s.History("bob", "", ""); err != nil || len(hs) != 1 || hs[0].Up != 7 {
		t.Errorf("bob's history after drop and upsert: %+v, %v", hs, err)
	}
}

// rowList is a UserRows over a slice, counting the rows rendered.
type rowList struct {
	us       []User
	rendered *int
}

func (l rowList) Len() int           { return len(l.us) }
func (l rowList) Name(i int) string  { return l.us[i].Name }
func (l rowList) Row(i int, u *User) { *l.rendered++; *u = l.us[i] }

// TestUserRows: rows rendered one at a time are written as whole rows, after
// Users, so a name in both ends up with its UserRows row; a batch of only
// UserRows is not empty.
func TestUserRows(t *testing.T) {
	s := openTest(t)
	t0 := time.Date(2026, 3, 14, 12, 0, 0, 0, time.UTC)
	var n int
	rows := rowList{rendered: &n, us: []User{
		{Name: "carol", Protocol: "vless", Up: 3, Day: "2026-03-14", DayUp: 3, UpdatedAt: t0},
		{Name: "alice", Protocol: "ssh", UID: 1001, Up: 5, Down: 6, Blocked: true, BlockReason: "Expired", BlockTime: t0,
			Schedule: "daily", NextReset: t0.Add(time.Hour), UpdatedAt: t0},
	}}
	if (&Batch{UserRows: rows}).Empty() {
		t.Fatal("a batch of UserRows is empty")
	}
	commit(t, s, &Batch{Users: []User{{Name: "alice", Protocol: "ssh", UID: 1001, Up: 1}, {Name: "bob", Protocol: "ssh", UID: 1002, Up: 7}},
		UserRows: rows})
	if n != 2 {
		t.Errorf("%d rows rendered, want 2", n)
	}
	want := []User{stored(rows.us[1]), {Name: "bob", Protocol: "ssh", UID: 1002, Up: 7}, stored(rows.us[0])}
	if got := users(t, s); !reflect.DeepEqual(got, want) {
		t.Errorf("users:\n got %+v\nwant %+v", got, want)
	}
	commit(t, s, &Batch{DropUsers: []string{"carol"}, UserRows: rowList{rendered: &n, us: []User{{Name: "carol", Protocol: "ssh", UID: 5}}}})
	if got := users(t, s); len(got) != 3 || got[2].Name != "carol" || got[2].UID != 5 {
		t.Errorf("carol dropped and upserted as a UserRows row: %+v", got)
	}
}
