package notify

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

func openStore(t *testing.T) *store.Store {
	t.Helper()
	st, err := store.Open(filepath.Join(t.TempDir(), "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// add commits events of the given actions for user bob at at, and returns
// their ids.
func add(t *testing.T, st *store.Store, at time.Time, actions ...string) []int64 {
	t.Helper()
	b := &store.Batch{}
	for _, a := range actions {
		b.Events = append(b.Events, store.Event{Time: at, Protocol: "ssh", Name: "bob", Action: a, Reason: "why " + a,
			Used: 5, Limit: 10, Status: "ACTIVE", Logged: true})
	}
	if err := st.Commit(b); err != nil {
		t.Fatal(err)
	}
	var ids []int64
	for _, e := range b.Events {
		ids = append(ids, e.ID)
	}
	return ids
}

// fakeSender records what it is sent; fail decides each attempt's error.
type fakeSender struct {
	mu    sync.Mutex
	got   []string // payload ids, every attempt
	ok    []string // payload ids, delivered
	fail  func(p *Payload, attempt int) error
	tries map[string]int
}

func (f *fakeSender) Send(ctx context.Context, p *Payload, body []byte) error {
	f.mu.Lock()
	if f.tries == nil {
		f.tries = map[string]int{}
	}
	f.tries[p.ID]++
	n := f.tries[p.ID]
	f.got = append(f.got, p.ID)
	fail := f.fail
	f.mu.Unlock()
	var err error
	if fail != nil {
		err = fail(p, n)
	}
	if err == nil && ctx.Err() == nil {
		f.mu.Lock()
		f.ok = append(f.ok, p.ID)
		f.mu.Unlock()
	}
	return err
}

func (f *fakeSender) delivered() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.ok)
}

func (f *fakeSender) attempts() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.got)
}

// eventually waits up to 10 s for ok.
func eventually(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !ok(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// start runs n until the test ends (or stop is called).
func start(t *testing.T, n *Notifier) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { n.Run(ctx); close(done) }()
	stop = func() { cancel(); <-done }
	t.Cleanup(stop)
	return stop
}

func ids(prefix string, rows []int64) []string {
	var out []string
	for _, id := range rows {
		out = append(out, prefix+"-"+strconv.FormatInt(id, 10))
	}
	return out
}

const fast = 5 * time.Millisecond

func fastOptions(st *store.Store, chans ...Channel) Options {
	return Options{Store: st, Channels: chans, Node: "node1", Poll: fast, Backoff: func(int) time.Duration { return fast }}
}

// Events are delivered in order, at least once: a failing one is retried
// (and the later ones wait behind it) until it goes; events not of a
// notified type are skipped; the failure and the recovery are reported
// once each; the status shows it all.
func TestDeliverInOrder(t *testing.T) {
	st := openStore(t)
	prefix, _ := st.EventIDPrefix()
	s := &fakeSender{fail: func(p *Payload, n int) error {
		if strings.HasSuffix(p.ID, "-3") && n <= 2 {
			return errors.New("receiver down")
		}
		return nil
	}}
	var mu sync.Mutex
	var reports []string
	o := fastOptions(st, Channel{Key: "test:a", Name: "test a", Timeout: time.Second, Sender: s})
	o.Report = func(ch string, err error, next time.Time) {
		mu.Lock()
		defer mu.Unlock()
		reports = append(reports, fmt.Sprintf("%s: %v", ch, err))
	}
	n, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	rows := add(t, st, now, quota.ActBlock, "import", quota.ActReset, quota.ActThreshold, quota.ActFailed)
	start(t, n)
	want := ids(prefix, []int64{rows[0], rows[2], rows[3], rows[4]})
	eventually(t, "every event delivered", func() bool { return len(s.delivered()) == len(want) })
	if got := s.delivered(); !slices.Equal(got, want) {
		t.Errorf("delivered %v, want %v", got, want)
	}
	wantTries := ids(prefix, []int64{rows[0], rows[2], rows[2], rows[2], rows[3], rows[4]})
	if got := s.attempts(); !slices.Equal(got, wantTries) {
		t.Errorf("attempts %v, want %v", got, wantTries)
	}
	eventually(t, "status", func() bool { return n.Status()[0].Delivered == 4 })
	stt := n.Status()[0]
	if stt.Name != "test a" || stt.Backlog != 0 || stt.Attempts != 0 || !stt.NextTry.IsZero() || stt.LastError != "receiver down" || stt.ErrorTime.IsZero() {
		t.Errorf("status %+v", stt)
	}
	mu.Lock()
	if want := []string{"test a: receiver down", "test a: <nil>"}; !slices.Equal(reports, want) {
		t.Errorf("reports %q, want %q", reports, want)
	}
	mu.Unlock()
}

// A stopped notifier saves its progress; the next one (a restart) goes on
// from there: nothing lost, nothing sent twice. Its backoff is kept too.
func TestRestartContinues(t *testing.T) {
	st := openStore(t)
	prefix, _ := st.EventIDPrefix()
	var clock struct {
		sync.Mutex
		t time.Time
	}
	clock.t = time.Now()
	now := func() time.Time { clock.Lock(); defer clock.Unlock(); return clock.t }
	block := make(chan struct{})
	s := &fakeSender{fail: func(p *Payload, n int) error {
		if strings.HasSuffix(p.ID, "-3") {
			<-block
			return errors.New("still down")
		}
		return nil
	}}
	ch := Channel{Key: "test:a", Name: "test a", Timeout: time.Minute, Sender: s}
	o := fastOptions(st, ch)
	o.Now = now
	o.Backoff = func(int) time.Duration { return time.Hour }
	n, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	rows := add(t, st, now(), quota.ActBlock, quota.ActUnblock, quota.ActDisable, quota.ActEnable)
	stop := start(t, n)
	eventually(t, "two delivered", func() bool { return len(s.delivered()) == 2 })
	close(block) // the third fails: an hour of backoff
	eventually(t, "the failure", func() bool { return n.Status()[0].Attempts == 1 })
	stop()
	ds, err := st.Deliveries()
	if err != nil || len(ds) != 1 || ds[0].Cursor != rows[1] || ds[0].Attempts != 1 || ds[0].LastError != "still down" ||
		!ds[0].NextTry.Equal(now().Add(time.Hour)) || ds[0].Delivered != 2 {
		t.Fatalf("saved progress %+v, %v", ds, err)
	}

	s2 := &fakeSender{}
	ch.Sender = s2
	o.Channels = []Channel{ch}
	n2, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	if stt := n2.Status()[0]; stt.Backlog != 2 || stt.Attempts != 1 || stt.LastError != "still down" {
		t.Errorf("status at restart %+v", stt)
	}
	start(t, n2)
	time.Sleep(50 * time.Millisecond)
	if got := s2.attempts(); len(got) != 0 {
		t.Fatalf("sent %v before the saved backoff ended", got)
	}
	clock.Lock()
	clock.t = clock.t.Add(time.Hour)
	clock.Unlock()
	eventually(t, "the rest delivered", func() bool { return len(s2.delivered()) == 2 })
	if got, want := append(s.delivered(), s2.delivered()...), ids(prefix, rows); !slices.Equal(got, want) {
		t.Errorf("delivered across the restart %v, want %v", got, want)
	}
}

// Events older than MaxAge are given up and counted, never sent; a
// channel's Types limit what it is sent; a new channel starts after the
// events committed before it was first opened.
func TestExpiryTypesAndNewChannels(t *testing.T) {
	st := openStore(t)
	prefix, _ := st.EventIDPrefix()
	now := time.Now()
	add(t, st, now, quota.ActBlock) // before any channel
	all, blocks := &fakeSender{}, &fakeSender{}
	o := fastOptions(st,
		Channel{Key: "test:all", Name: "all", Timeout: time.Second, Sender: all},
		Channel{Key: "test:blocks", Name: "blocks", Types: []string{quota.ActBlock}, Timeout: time.Second, Sender: blocks})
	o.MaxAge = time.Hour
	n, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	old := add(t, st, now.Add(-2*time.Hour), quota.ActBlock, quota.ActReset)
	fresh := add(t, st, now, quota.ActReset, quota.ActBlock, quota.ActRecovered)
	start(t, n)
	eventually(t, "delivered", func() bool { return len(all.delivered()) == 3 && len(blocks.delivered()) == 1 })
	if got, want := all.delivered(), ids(prefix, fresh); !slices.Equal(got, want) {
		t.Errorf("all got %v, want %v", got, want)
	}
	if got, want := blocks.delivered(), ids(prefix, fresh[1:2]); !slices.Equal(got, want) {
		t.Errorf("blocks got %v, want %v", got, want)
	}
	eventually(t, "status", func() bool {
		s := n.Status()
		return s[0].Expired == 2 && s[0].Delivered == 3 && s[1].Expired == 1 && s[1].Delivered == 1
	})
	// The channel sent only blocks has moved past the rest.
	eventually(t, "cursor", func() bool {
		ds, _ := st.Deliveries()
		return len(ds) == 2 && ds[1].Channel == "test:blocks" && ds[1].Cursor == fresh[2]
	})
	for _, id := range ids(prefix, old) {
		if slices.Contains(all.attempts(), id) || slices.Contains(blocks.attempts(), id) {
			t.Errorf("expired event %s sent", id)
		}
	}
}

// A channel whose receiver hangs times out each attempt and backs off; the
// other channels deliver meanwhile.
func TestSlowChannel(t *testing.T) {
	st := openStore(t)
	slow := senderFunc(func(ctx context.Context, p *Payload, body []byte) error {
		<-ctx.Done()
		return ctx.Err()
	})
	quick := &fakeSender{}
	o := fastOptions(st,
		Channel{Key: "test:slow", Name: "slow", Timeout: 50 * time.Millisecond, Sender: slow},
		Channel{Key: "test:quick", Name: "quick", Timeout: time.Second, Sender: quick})
	o.Backoff = func(int) time.Duration { return time.Hour }
	n, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	add(t, st, time.Now(), quota.ActBlock, quota.ActUnblock, quota.ActBlock)
	start(t, n)
	eventually(t, "quick delivers", func() bool { return len(quick.delivered()) == 3 })
	eventually(t, "slow times out", func() bool { return n.Status()[0].Attempts == 1 })
	s := n.Status()[0]
	if !strings.HasPrefix(s.LastError, "timed out after 50ms: ") || s.Backlog != 3 || s.NextTry.Before(time.Now().Add(50*time.Minute)) {
		t.Errorf("slow channel %+v", s)
	}
}

type senderFunc func(ctx context.Context, p *Payload, body []byte) error

func (f senderFunc) Send(ctx context.Context, p *Payload, body []byte) error { return f(ctx, p, body) }

// A receiver's Retry-After longer than the backoff is honoured.
func TestRetryAfter(t *testing.T) {
	st := openStore(t)
	s := senderFunc(func(context.Context, *Payload, []byte) error {
		return &RetryError{After: 42 * time.Minute, Err: errors.New("slow down")}
	})
	n, err := New(fastOptions(st, Channel{Key: "test:a", Name: "a", Timeout: time.Second, Sender: s}))
	if err != nil {
		t.Fatal(err)
	}
	add(t, st, time.Now(), quota.ActBlock)
	start(t, n)
	eventually(t, "failure", func() bool { return n.Status()[0].Attempts == 1 })
	if next := n.Status()[0].NextTry; time.Until(next) < 41*time.Minute {
		t.Errorf("next try in %s, want Retry-After's 42m", time.Until(next))
	}
}

func TestBackoff(t *testing.T) {
	for _, tc := range []struct {
		n        int
		min, max time.Duration
	}{
		{1, 500 * time.Millisecond, time.Second},
		{2, time.Second, 2 * time.Second},
		{5, 8 * time.Second, 16 * time.Second},
		{9, 128 * time.Second, 256 * time.Second},
		{10, 150 * time.Second, 5 * time.Minute},
		{1000, 150 * time.Second, 5 * time.Minute},
		{0, 150 * time.Second, 5 * time.Minute},
	} {
		seen := map[time.Duration]bool{}
		for range 200 {
			d := Backoff(tc.n)
			if d < tc.min || d > tc.max {
				t.Fatalf("Backoff(%d) = %s, want %s to %s", tc.n, d, tc.min, tc.max)
			}
			seen[d] = true
		}
		if len(seen) < 50 {
			t.Errorf("Backoff(%d): %d different waits in 200: no jitter", tc.n, len(seen))
		}
	}
}

func TestDuplicateKeys(t *testing.T) {
	st := openStore(t)
	c := Channel{Key: "k", Name: "a", Timeout: time.Second, Sender: &fakeSender{}}
	if _, err := New(fastOptions(st, c, c)); err == nil {
		t.Error("two channels with one key accepted")
	}
}
