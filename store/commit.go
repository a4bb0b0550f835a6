package store

import (
	"cmp"
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/myvpn/bwagent/quota"
)

// bg is the context of every database call: the store has no deadlines of
// its own beyond SQLite's busy timeout.
var bg = context.Background()

// User is one user's persistent state: totals, today's usage, status and
// reset schedule. Name is the key.
type User struct {
	Name     string // the key: an SSH account name or an Xray email
	Protocol string // "ssh", "vmess", "vless", "trojan", "shadowsocks"
	UID      uint32 // SSH users only; 0 otherwise

	Up, Down uint64 // bytes since the last reset

	Day            string // "YYYY-MM-DD": the local day DayUp and DayDown belong to
	DayUp, DayDown uint64

	Blocked     bool
	BlockReason string
	BlockTime   time.Time // zero when never blocked
	Disabled    bool
	LastReset   time.Time // zero when never reset

	Unblocked    bool      // manual unblock override in force
	UnblockLimit uint64    // the limit in force when the override was granted
	UnblockUntil time.Time // zero: no end time

	Schedule  string    // reset schedule text NextReset was computed from
	NextReset time.Time // zero: none

	UpdatedAt time.Time // when the agent last changed the user
}

// Baseline is the last sample of one counter source that has been folded
// into the users' totals. Committing it together with the totals is what
// makes a restart neither lose nor double count traffic.
type Baseline struct {
	Source quota.Source
	// Epoch identifies the counter's lifetime (boot id and map id, Xray
	// start time): a different epoch means the counter restarted from zero.
	Epoch  quota.Epoch
	Rx, Tx uint64
}

// DayUsage is one user's usage on one local day ("YYYY-MM-DD"), finished or
// still running.
type DayUsage struct {
	Name, Day string
	Up, Down  uint64
}

// Event is one entry of the event log: a change of a user's status, or a
// notice recorded only to be notified (a threshold reached, an expiry
// coming, a part of the agent failing or recovering).
type Event struct {
	ID       int64     // assigned by the store on commit, ascending; ignored on input
	Time     time.Time // may be zero
	Protocol string    // "" for events of the agent itself
	Name     string    // the user; for events of the agent, the part ("xray api")
	Action   string    // "block", "unblock", "disable", "enable", "reset", "import", "threshold", ...
	Reason   string
	Logged   bool // appended to the operators' block log

	// The user's usage (the counted metric), limit (0: unlimited) and
	// status when the event happened; zero for events of the agent and
	// for events of schema version 1.
	Used, Limit uint64
	Status      string
	// Detail is what the action needs besides: the percentage of a
	// "threshold", the RFC 3339 expiry of an "expiring"; "" for others.
	Detail string
}

// Batch is everything that changed in one tick. [Store.Commit] applies it
// in one transaction, in this order: DropUsers and DropBaselines, then the
// upserts of Users, UserRows, Baselines and History, then Events, Logged
// and Meta.
// Drops come first, so a key both dropped and upserted in the same batch
// ends up present, with the upserted row; an entry listed twice ends up with
// its last value. Commit keeps no reference to the batch.
//
// Dropping a user (one gone longer than the retention) deletes its row in
// users and nothing else: its History and Events stay, and
// [Store.History] and [Store.Events] still return them. The baselines of
// the counter sources it was counted from are separate keys, dropped with
// DropBaselines in the same batch. Dropping a key that is not there is no
// error.
//
// A batch can therefore express "drop, then upsert" of a key, never
// "upsert, then drop". Whoever merges an older batch with a newer one (a
// failed commit retried with the next tick's) must keep that meaning: a
// drop in the newer batch removes the older batch's upsert of that key, and
// an upsert in the newer batch wins over the older batch's drop of it.
type Batch struct {
	Users []User // upserted, whole rows
	// UserRows are more users to upsert, rendered one at a time as the
	// commit writes them (after Users: a name in both ends up with its
	// UserRows row), so that a batch of many users need not hold them all
	// as rows. Nil is none.
	UserRows      UserRows
	DropUsers     []string       // names of users to delete; their History and Events are kept
	Baselines     []Baseline     // upserted
	DropBaselines []quota.Source // sources to delete
	History       []DayUsage     // upserted: absolute values for that name and day
	// Events are appended. On success Commit sets each one's ID; on
	// failure it leaves them alone, so the batch can be retried as it is.
	Events []Event
	Logged []int64 // IDs of earlier events to mark Logged; unknown IDs are ignored
	// Meta is upserted. The keys "schema_version" and "event_id_prefix"
	// are reserved.
	Meta map[string]string
}

// Empty reports whether the batch changes nothing.
func (b *Batch) Empty() bool {
	return b == nil || len(b.Users)+rowCount(b.UserRows)+len(b.DropUsers)+len(b.Baselines)+len(b.DropBaselines)+
		len(b.History)+len(b.Events)+len(b.Logged)+len(b.Meta) == 0
}

// UserRows is a list of user rows that [Store.Commit] renders one at a time,
// for a caller that keeps its users in another form. Commit calls its
// methods from its own goroutine while it runs, so the rows must not change
// until it returns.
type UserRows interface {
	Len() int
	// Name returns the name (the key) of the i-th row.
	Name(i int) string
	// Row renders the i-th row into u, a whole row, all fields set.
	Row(i int, u *User)
}

// rowCount is the number of rows of l; a nil l has none.
func rowCount(l UserRows) int {
	if l == nil {
		return 0
	}
	return l.Len()
}

// writer is the connection all commits go through, with its statements
// prepared once.
type writer struct {
	c *sql.Conn

	delUser, delBaseline       *sql.Stmt
	upHistory                  *sql.Stmt
	insEvent, logEvent, upMeta *sql.Stmt
	stmts                      []*sql.Stmt

	// The statements a commit runs by the thousand, prepared on the
	// driver's connection and used only inside c.Raw (see bulk), and the
	// argument slice they reuse.
	rawUser, rawBaseline driver.Stmt
	args                 []driver.NamedValue
}

// bulk runs fn on the writer's driver connection, with the user and
// baseline upserts prepared on it. Through the driver, one argument slice
// serves every row: database/sql's Exec converts each call's arguments into
// a new slice and a new result (about 1 KB a user row, which made up 40% of
// what a tick allocated at 100,000 users).
func (w *writer) bulk(fn func() error) error {
	return w.c.Raw(func(dc any) error {
		if w.rawUser == nil {
			p, ok := dc.(driver.ConnPrepareContext)
			if !ok {
				return errors.New("the SQLite driver cannot prepare with a context")
			}
			for _, s := range []struct {
				st  *driver.Stmt
				sql string
			}{{&w.rawUser, sqlUpsertUser}, {&w.rawBaseline, sqlUpsertBaseline}} {
				st, err := p.PrepareContext(bg, s.sql)
				if err != nil {
					return fmt.Errorf("prepare %q: %w", strings.SplitN(s.sql, "\n", 2)[0], err)
				}
				if _, ok := st.(driver.StmtExecContext); !ok {
					st.Close()
					return errors.New("the SQLite driver cannot execute with a context")
				}
				*s.st = st
			}
		}
		return fn()
	})
}

// exec runs st, prepared by bulk, with vals as its arguments; only inside
// bulk's fn.
func (w *writer) exec(st driver.Stmt, vals ...driver.Value) error {
	w.args = w.args[:0]
	for i, v := range vals {
		w.args = append(w.args, driver.NamedValue{Ordinal: i + 1, Value: v})
	}
	_, err := st.(driver.StmtExecContext).ExecContext(bg, w.args)
	clear(w.args) // no references kept to the caller's strings
	return err
}

const (
	// INSERT OR REPLACE rather than ON CONFLICT DO UPDATE: the rows are
	// whole and there are no triggers or foreign keys, so the two do the
	// same, and REPLACE was about 8% faster in BenchmarkCommit at 100,000
	// users.
	sqlUpsertUser = `INSERT OR REPLACE INTO users (name, protocol, uid, up, down, day, day_up,
	day_down, blocked, block_reason, block_time, disabled, last_reset, unblocked,
	unblock_limit, unblock_until, schedule, next_reset, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`
	sqlUpsertBaseline = `INSERT OR REPLACE INTO baselines (source, epoch, rx, tx) VALUES (?, ?, ?, ?)`
	sqlUpsertHistory  = `INSERT OR REPLACE INTO history (name, day, up, down) VALUES (?, ?, ?, ?)`
	sqlInsertEvent    = `INSERT INTO events (time, protocol, name, action, reason, logged, used, usage_limit, status, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`
	sqlUpsertMeta     = `INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)`
)

// newWriter takes a connection out of db's pool for good, creates or
// migrates the schema and prepares the commit statements.
func newWriter(db *sql.DB) (*writer, error) {
	c, err := db.Conn(bg)
	if err != nil {
		return nil, err
	}
	w := &writer{c: c}
	if err := migrate(c); err != nil {
		c.Close()
		return nil, err
	}
	for _, p := range []struct {
		s   **sql.Stmt
		sql string
	}{
		{&w.delUser, "DELETE FROM users WHERE name = ?"},
		{&w.delBaseline, "DELETE FROM baselines WHERE source = ?"},
		{&w.upHistory, sqlUpsertHistory},
		{&w.insEvent, sqlInsertEvent},
		{&w.logEvent, "UPDATE events SET logged = 1 WHERE id = ?"},
		{&w.upMeta, sqlUpsertMeta},
	} {
		if *p.s, err = c.PrepareContext(bg, p.sql); err != nil {
			w.close(true)
			return nil, fmt.Errorf("prepare %q: %w", strings.SplitN(p.sql, "\n", 2)[0], err)
		}
		w.stmts = append(w.stmts, *p.s)
	}
	return w, nil
}

// discardWriter closes the writer's connection for good, rather than
// returning it to the pool, and leaves s.w nil for the next Commit to
// replace.
func (s *Store) discardWriter() {
	s.w.close(true)
	s.w = nil
}

// close closes the writer's statements and connection. If discard is set,
// the connection is closed for good rather than returned to the pool.
func (w *writer) close(discard bool) error {
	// database/sql does not close statements prepared on a Conn when it
	// closes the connection, and SQLite keeps a connection with open
	// statements, and its locks, alive: close them first. (The driver
	// reports a connection bad only once it is unusable, so database/sql
	// never closes this one behind the store's back.)
	for _, s := range w.stmts {
		s.Close()
	}
	if w.rawUser != nil || w.rawBaseline != nil {
		w.c.Raw(func(any) error {
			for _, s := range []driver.Stmt{w.rawUser, w.rawBaseline} {
				if s != nil {
					s.Close()
				}
			}
			return nil
		})
		w.rawUser, w.rawBaseline = nil, nil
	}
	if discard {
		w.c.Raw(func(any) error { return driver.ErrBadConn })
	}
	if err := w.c.Close(); err != nil && !errors.Is(err, sql.ErrConnDone) {
		return err
	}
	return nil
}

// Commit applies b in one transaction: when it returns nil, all of b is
// durable; when it returns an error, nothing of b was applied and b can be
// retried unchanged. On success it sets the IDs of b.Events.
//
// An empty batch commits nothing and returns nil. A batch holding a value
// the store cannot represent fails with [ErrInvalid]; another process
// holding the write lock too long fails with [ErrLocked]. (The one
// exception to all-or-nothing is the one every database has: an I/O error
// while the commit itself is being synced can leave the batch durable
// after all. Retrying it is harmless except that its Events are appended
// again.)
func (s *Store) Commit(b *Batch) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() {
		return s.wrap("commit to", ErrClosed)
	}
	if b.Empty() {
		return nil
	}
	ids, err := s.commit(b)
	if err != nil {
		return fmt.Errorf("commit to state database %s: %w", s.path, classify(err))
	}
	for i := range b.Events {
		b.Events[i].ID = ids[i]
	}
	return nil
}

func (s *Store) commit(b *Batch) (ids []int64, err error) {
	if s.w == nil {
		// The last commit lost its connection; open another.
		if s.w, err = newWriter(s.db); err != nil {
			return nil, fmt.Errorf("reconnect: %w", err)
		}
	}
	w := s.w
	if _, err := w.c.ExecContext(bg, "BEGIN IMMEDIATE"); err != nil {
		if errors.Is(err, sql.ErrConnDone) || errors.Is(err, driver.ErrBadConn) {
			s.discardWriter()
		}
		return nil, err
	}
	defer func() {
		if err == nil {
			return
		}
		// SQLite rolls back by itself after some errors (a full disk, an
		// I/O error); ROLLBACK then fails harmlessly. If it fails for
		// another reason the transaction may still be open: discard the
		// connection, which rolls it back, rather than let the next
		// commit run inside it.
		var e error
		if s.hook != nil {
			// A test's failing ROLLBACK: the transaction stays open.
			e = s.hook("rollback")
		}
		if e == nil {
			_, e = w.c.ExecContext(bg, "ROLLBACK")
		}
		if e != nil && !strings.Contains(e.Error(), "no transaction is active") {
			s.discardWriter()
		}
	}()
	step := func(name string) error {
		if s.hook != nil {
			return s.hook(name)
		}
		return nil
	}

	for _, name := range b.DropUsers {
		if _, err := w.delUser.Exec(name); err != nil {
			return nil, fmt.Errorf("drop user %q: %w", name, err)
		}
	}
	for _, src := range b.DropBaselines {
		if _, err := w.delBaseline.Exec(encodeSource(src)); err != nil {
			return nil, fmt.Errorf("drop baseline %q: %w", encodeSource(src), err)
		}
	}
	if err := step("drop"); err != nil {
		return nil, err
	}

	upsert := func(u *User) error {
		var t [5]int64
		for j, f := range [...]struct {
			name string
			t    time.Time
		}{
			{"BlockTime", u.BlockTime}, {"LastReset", u.LastReset}, {"UnblockUntil", u.UnblockUntil},
			{"NextReset", u.NextReset}, {"UpdatedAt", u.UpdatedAt},
		} {
			var err error
			if t[j], err = unixNano(f.t); err != nil {
				return fmt.Errorf("user %q: %s: %w", u.Name, f.name, err)
			}
		}
		if err := w.exec(w.rawUser, u.Name, u.Protocol, int64(u.UID), int64(u.Up), int64(u.Down),
			u.Day, int64(u.DayUp), int64(u.DayDown), u.Blocked, u.BlockReason, t[0], u.Disabled,
			t[1], u.Unblocked, int64(u.UnblockLimit), t[2], u.Schedule, t[3], t[4]); err != nil {
			return fmt.Errorf("user %q: %w", u.Name, err)
		}
		return nil
	}
	err = w.bulk(func() error {
		for _, i := range sortedBy(b.Users, func(u *User) string { return u.Name }) {
			if err := upsert(&b.Users[i]); err != nil {
				return err
			}
		}
		if rows := b.UserRows; rowCount(rows) > 0 {
			var u User
			for _, i := range sortedIndexes(rows.Len(), rows.Name) {
				rows.Row(i, &u)
				if err := upsert(&u); err != nil {
					return err
				}
			}
		}
		if err := step("users"); err != nil {
			return err
		}
		// Each key and epoch encoded once (the epoch is mostly the same
		// for every row), not at every comparison of the sort.
		keys := make([]string, len(b.Baselines))
		for i := range b.Baselines {
			keys[i] = encodeSource(b.Baselines[i].Source)
		}
		var epoch quota.Epoch
		var epochText string
		for _, i := range sortedIndexes(len(keys), func(i int) string { return keys[i] }) {
			bl := &b.Baselines[i]
			if epochText == "" || bl.Epoch != epoch {
				epoch, epochText = bl.Epoch, encodeEpoch(bl.Epoch)
			}
			if err := w.exec(w.rawBaseline, keys[i], epochText, int64(bl.Rx), int64(bl.Tx)); err != nil {
				return fmt.Errorf("baseline %q: %w", keys[i], err)
			}
		}
		return step("baselines")
	})
	if err != nil {
		return nil, err
	}

	for i := range b.History {
		h := &b.History[i]
		if _, err := w.upHistory.Exec(h.Name, h.Day, int64(h.Up), int64(h.Down)); err != nil {
			return nil, fmt.Errorf("history of %q on %s: %w", h.Name, h.Day, err)
		}
	}
	if err := step("history"); err != nil {
		return nil, err
	}

	ids = make([]int64, len(b.Events))
	for i := range b.Events {
		e := &b.Events[i]
		t, err := unixNano(e.Time)
		if err != nil {
			return nil, fmt.Errorf("event %d (%s %q): Time: %w", i, e.Action, e.Name, err)
		}
		r, err := w.insEvent.Exec(t, e.Protocol, e.Name, e.Action, e.Reason, e.Logged, int64(e.Used), int64(e.Limit), e.Status, e.Detail)
		if err != nil {
			return nil, fmt.Errorf("event %d (%s %q): %w", i, e.Action, e.Name, err)
		}
		if ids[i], err = r.LastInsertId(); err != nil {
			return nil, err
		}
	}
	if err := step("events"); err != nil {
		return nil, err
	}

	for _, id := range b.Logged {
		if _, err := w.logEvent.Exec(id); err != nil {
			return nil, fmt.Errorf("mark event %d logged: %w", id, err)
		}
	}
	if err := step("logged"); err != nil {
		return nil, err
	}

	for k, v := range b.Meta {
		if k == schemaVersionKey || k == eventPrefixKey {
			return nil, fmt.Errorf("%w: meta key %q is reserved", ErrInvalid, k)
		}
		if _, err := w.upMeta.Exec(k, v); err != nil {
			return nil, fmt.Errorf("meta %q: %w", k, err)
		}
	}
	if err := step("meta"); err != nil {
		return nil, err
	}

	if _, err := w.c.ExecContext(bg, "COMMIT"); err != nil {
		return nil, err
	}
	return ids, nil
}

// sortedBy returns the indexes of xs in ascending order of key, equal keys in
// their original order. Writing rows in key order visits each B-tree page
// once, in order, instead of seeking all over the table.
func sortedBy[T any](xs []T, key func(*T) string) []int {
	return sortedIndexes(len(xs), func(i int) string { return key(&xs[i]) })
}

// sortedIndexes returns 0..n-1 in ascending order of key(i), equal keys in
// their original order.
func sortedIndexes(n int, key func(i int) string) []int {
	idx := make([]int, n)
	for i := range idx {
		idx[i] = i
	}
	if slices.IsSortedFunc(idx, func(i, j int) int { return strings.Compare(key(i), key(j)) }) {
		return idx
	}
	slices.SortFunc(idx, func(i, j int) int {
		if c := strings.Compare(key(i), key(j)); c != 0 {
			return c
		}
		return cmp.Compare(i, j)
	})
	return idx
}

// Range of the times the store can hold: Unix nanoseconds in an int64.
var (
	minTime = time.Unix(0, math.MinInt64)
	maxTime = time.Unix(0, math.MaxInt64)
)

// unixNano encodes t for the database: the zero time as 0, any other time as
// its Unix nanoseconds.
func unixNano(t time.Time) (int64, error) {
	if t.IsZero() {
		return 0, nil
	}
	if t.Before(minTime) || t.After(maxTime) {
		return 0, fmt.Errorf("%w: time %s is outside the years 1678 to 2262", ErrInvalid, t.Format(time.RFC3339Nano))
	}
	n := t.UnixNano()
	if n == 0 {
		return 0, fmt.Errorf("%w: time %s is the Unix epoch, which stands for the zero time", ErrInvalid, t.Format(time.RFC3339Nano))
	}
	return n, nil
}

// fromUnixNano decodes a time written by unixNano, in time.Local.
func fromUnixNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}
