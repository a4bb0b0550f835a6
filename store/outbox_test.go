package store

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/myvpn/bwagent/quota"
)

// copyFixture copies testdata/name to a temporary directory: Open migrates
// in place.
func copyFixture(t *testing.T, name string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "state.db")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// testdata/schema1.db was written by bwagent at schema version 1 (commit
// 6135bfa): two users, a baseline, a day of history, a logged reset and an
// unlogged block of john. Opening it migrates it to the current version in
// place, keeping everything.
func TestMigrateFromVersion1(t *testing.T) {
	path := copyFixture(t, "schema1.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if v, _, err := s.Meta(schemaVersionKey); err != nil || v != strconv.Itoa(SchemaVersion) {
		t.Fatalf("schema version after migration %q, %v; want %d", v, err, SchemaVersion)
	}
	us := users(t, s)
	if len(us) != 2 || us[1].Name != "john" || us[1].UID != 1001 || us[1].Up != 800<<20 || !us[1].Blocked {
		t.Errorf("users after migration: %+v", us)
	}
	if bs, err := s.Baselines(); err != nil || len(bs) != 1 || bs[0].Source != quota.UIDSource(1001) || bs[0].Tx != 800<<20 {
		t.Errorf("baselines after migration: %+v, %v", bs, err)
	}
	if hs, err := s.History("john", "", ""); err != nil || len(hs) != 1 || hs[0].Up != 10 {
		t.Errorf("history after migration: %+v, %v", hs, err)
	}
	es, err := s.Events("", 0)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2026, 5, 1, 10, 0, 0, 0, time.UTC)
	want := []Event{
		{ID: 2, Time: storedTime(t0), Protocol: "ssh", Name: "john", Action: "block", Reason: "Bandwidth Limit Reached"},
		{ID: 1, Time: storedTime(t0.Add(-time.Hour)), Protocol: "ssh", Name: "john", Action: "reset", Reason: "Usage reset", Logged: true},
	}
	if !reflect.DeepEqual(es, want) {
		t.Errorf("events after migration:\n%+v\nwant\n%+v", es, want)
	}
	if un, err := s.UnloggedEvents(); err != nil || len(un) != 1 || un[0].ID != 2 {
		t.Errorf("unlogged events after migration: %+v, %v", un, err)
	}
	prefix, err := s.EventIDPrefix()
	if err != nil || !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(prefix) {
		t.Errorf("event id prefix %q, %v", prefix, err)
	}
	if ds, err := s.Deliveries(); err != nil || len(ds) != 0 {
		t.Errorf("deliveries after migration: %+v, %v", ds, err)
	}
	// A channel added now starts after the events of version 1, and new
	// events carry their snapshot.
	d, err := s.OpenDelivery("webhook:x")
	if err != nil || d.Cursor != 2 {
		t.Fatalf("OpenDelivery = %+v, %v; want cursor 2", d, err)
	}
	b := &Batch{Events: []Event{{Time: t0, Protocol: "ssh", Name: "john", Action: "threshold", Reason: "80%",
		Used: 8, Limit: 10, Status: "WARNING", Detail: "80", Logged: true}}}
	commit(t, s, b)
	es, _, err = s.PendingEvents(d.Cursor, []string{"threshold"}, 10)
	if err != nil || len(es) != 1 || es[0].ID != 3 || es[0].Used != 8 || es[0].Limit != 10 || es[0].Status != "WARNING" || es[0].Detail != "80" {
		t.Errorf("new event after migration: %+v, %v", es, err)
	}
	s.Close()

	// Opening again migrates nothing and keeps the prefix.
	s2, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if p2, err := s2.EventIDPrefix(); err != nil || p2 != prefix {
		t.Errorf("prefix after reopening %q, %v; want %q", p2, err, prefix)
	}
	if err := s2.Check(); err != nil {
		t.Error(err)
	}
}

// A database made at version 1 by the migration of version 1 itself (the
// same path an operator's file takes), then migrated: the new columns read
// as zero for the old rows.
func TestMigrateBuiltVersion1(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	sqliteFile(t, path, "PRAGMA application_id = "+strconv.Itoa(appID), migrations[0],
		"INSERT INTO meta (key, value) VALUES ('schema_version', '1')",
		"INSERT INTO events (time, protocol, name, action, reason, logged) VALUES (5, 'vless', 'a@b', 'disable', 'Disabled by administrator', 1)")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	es, err := s.Events("a@b", 0)
	if err != nil || len(es) != 1 || es[0].Action != "disable" || es[0].Used != 0 || es[0].Status != "" || es[0].Detail != "" {
		t.Errorf("old event: %+v, %v", es, err)
	}
	if _, err := s.EventIDPrefix(); err != nil {
		t.Error(err)
	}
}

// Two databases get different event id prefixes, and Batch.Meta cannot set
// one.
func TestEventIDPrefix(t *testing.T) {
	a, b := openTest(t), openTest(t)
	pa, err := a.EventIDPrefix()
	if err != nil {
		t.Fatal(err)
	}
	pb, err := b.EventIDPrefix()
	if err != nil {
		t.Fatal(err)
	}
	if pa == pb {
		t.Errorf("two databases share the prefix %q", pa)
	}
	if err := a.Commit(&Batch{Meta: map[string]string{eventPrefixKey: "x"}}); !errors.Is(err, ErrInvalid) {
		t.Errorf("Batch.Meta setting %s: %v, want ErrInvalid", eventPrefixKey, err)
	}
}

func TestDeliveries(t *testing.T) {
	s := openTest(t)
	t0 := time.Date(2026, 3, 14, 12, 0, 0, 0, time.UTC)
	// A channel opened on an empty database starts at 0.
	d, err := s.OpenDelivery("exec:a")
	if err != nil || !reflect.DeepEqual(d, Delivery{Channel: "exec:a"}) {
		t.Fatalf("OpenDelivery on an empty database = %+v, %v", d, err)
	}
	commit(t, s, &Batch{Events: []Event{
		{Time: t0, Protocol: "ssh", Name: "bob", Action: "block"},
		{Time: t0, Protocol: "ssh", Name: "bob", Action: "import"},
	}})
	// One opened later starts after the last event; one that exists keeps
	// its row.
	if d, err := s.OpenDelivery("webhook:b"); err != nil || d.Cursor != 2 {
		t.Errorf("OpenDelivery after 2 events = %+v, %v", d, err)
	}
	full := Delivery{Channel: "exec:a", Cursor: 1, Attempts: 3, NextTry: t0.Add(time.Minute), LastError: "exit status 1",
		ErrorTime: t0, Delivered: 1 << 40, Expired: 7}
	if err := s.SaveDelivery(full); err != nil {
		t.Fatal(err)
	}
	d, err = s.OpenDelivery("exec:a")
	want := full
	want.NextTry, want.ErrorTime = storedTime(full.NextTry), storedTime(full.ErrorTime)
	if err != nil || !reflect.DeepEqual(d, want) {
		t.Errorf("OpenDelivery of a saved row = %+v, %v; want %+v", d, err, want)
	}
	ds, err := s.Deliveries()
	if err != nil || len(ds) != 2 || ds[0].Channel != "exec:a" || ds[1].Channel != "webhook:b" || !reflect.DeepEqual(ds[0], want) {
		t.Errorf("Deliveries = %+v, %v", ds, err)
	}
	if err := s.SaveDelivery(Delivery{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("SaveDelivery without a channel: %v", err)
	}
	if err := s.SaveDelivery(Delivery{Channel: "x", NextTry: time.Unix(0, 0)}); !errors.Is(err, ErrInvalid) {
		t.Errorf("SaveDelivery with an unstorable time: %v", err)
	}
	s.Close()
	if err := s.SaveDelivery(full); !errors.Is(err, ErrClosed) {
		t.Errorf("SaveDelivery after Close: %v", err)
	}
}

func TestPendingEvents(t *testing.T) {
	s := openTest(t)
	t0 := time.Date(2026, 3, 14, 12, 0, 0, 0, time.UTC)
	var evs []Event
	for i, a := range []string{"block", "import", "reset", "block", "import", "import"} {
		evs = append(evs, Event{Time: t0.Add(time.Duration(i) * time.Second), Protocol: "ssh", Name: "bob", Action: a})
	}
	commit(t, s, &Batch{Events: evs})
	ids := func(es []Event) []int64 {
		var out []int64
		for _, e := range es {
			out = append(out, e.ID)
		}
		return out
	}
	notify := []string{"block", "reset"}
	for _, tc := range []struct {
		after    int64
		actions  []string
		limit    int
		want     []int64
		wantNext int64
	}{
		{0, notify, 10, []int64{1, 3, 4}, 6}, // the imports after 4 need nothing
		{0, notify, 2, []int64{1, 3}, 3},     // a full page: up to its last
		{3, notify, 10, []int64{4}, 6},
		{4, notify, 10, nil, 6},
		{6, notify, 10, nil, 6},
		{9, notify, 10, nil, 9}, // never backwards
		{0, nil, 10, nil, 0},
		{0, []string{"import"}, 1, []int64{2}, 2},
	} {
		es, next, err := s.PendingEvents(tc.after, tc.actions, tc.limit)
		if err != nil || !reflect.DeepEqual(ids(es), tc.want) || next != tc.wantNext {
			t.Errorf("PendingEvents(%d, %v, %d) = %v, %d, %v; want %v, %d", tc.after, tc.actions, tc.limit, ids(es), next, err, tc.want, tc.wantNext)
		}
		if n, err := s.CountEvents(tc.after, tc.actions); err != nil || (tc.limit == 10 && n != len(tc.want)) {
			t.Errorf("CountEvents(%d, %v) = %d, %v", tc.after, tc.actions, n, err)
		}
	}
}

func TestLatestEvents(t *testing.T) {
	s := openTest(t)
	t0 := time.Date(2026, 3, 14, 12, 0, 0, 0, time.UTC)
	commit(t, s, &Batch{Events: []Event{
		{Time: t0, Protocol: "ssh", Name: "bob", Action: "threshold", Detail: "80"},
		{Time: t0, Protocol: "ssh", Name: "bob", Action: "threshold", Detail: "90"},
		{Time: t0, Protocol: "ssh", Name: "amy", Action: "threshold", Detail: "80"},
		{Time: t0, Protocol: "ssh", Name: "bob", Action: "block"},
		{Time: t0, Name: "xray api", Action: "failed", Reason: "down"},
		{Time: t0, Name: "xray api", Action: "recovered"},
		{Time: t0, Name: "nftables", Action: "failed", Reason: "gone"},
	}})
	es, err := s.LatestEvents("threshold")
	if err != nil || len(es) != 2 || es[0].Name != "amy" || es[0].Detail != "80" || es[1].Name != "bob" || es[1].Detail != "90" {
		t.Errorf("LatestEvents(threshold) = %+v, %v", es, err)
	}
	es, err = s.LatestEvents("failed", "recovered")
	if err != nil || len(es) != 2 || es[0].Name != "nftables" || es[0].Action != "failed" || es[1].Name != "xray api" || es[1].Action != "recovered" {
		t.Errorf("LatestEvents(failed, recovered) = %+v, %v", es, err)
	}
	if es, err := s.LatestEvents("expiring"); err != nil || len(es) != 0 {
		t.Errorf("LatestEvents(expiring) = %+v, %v", es, err)
	}
}
