package store

import (
	"database/sql"
	"errors"
	"fmt"
	"strings"
)

const sqlSelectUsers = `SELECT name, protocol, uid, up, down, day, day_up, day_down, blocked,
	block_reason, block_time, disabled, last_reset, unblocked, unblock_limit, unblock_until,
	schedule, next_reset, updated_at
FROM users ORDER BY name`

// Users returns every user, ordered by name.
//
// With many users the slice is large (about 300 bytes a user, 30 MB for
// 100,000); [Store.EachUser] reads them without holding them all.
func (s *Store) Users() ([]User, error) {
	var us []User
	err := s.readUsers(func(n int) { us = make([]User, 0, n) }, func(u *User) error {
		us = append(us, *u)
		return nil
	})
	if err != nil {
		return nil, s.wrap("read users from", err)
	}
	return us, nil
}

// EachUser calls fn for every user, ordered by name, from one consistent
// snapshot of the database: commits made meanwhile, by fn or anyone else,
// are not seen. It stops at the first error fn returns and returns that
// error unchanged.
func (s *Store) EachUser(fn func(User) error) error {
	var fnErr error
	err := s.readUsers(nil, func(u *User) error {
		fnErr = fn(*u)
		return fnErr
	})
	if fnErr != nil {
		return fnErr
	}
	if err != nil {
		return s.wrap("read users from", err)
	}
	return nil
}

// readUsers reads every user in one read transaction. If count is not nil,
// it is first called with the number of users.
func (s *Store) readUsers(count func(int), fn func(*User) error) error {
	tx, err := s.db.BeginTx(bg, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if count != nil {
		// Lets Users allocate its slice once: growing it by appending
		// would briefly need twice the memory.
		var n int
		if err := tx.QueryRow("SELECT count(*) FROM users").Scan(&n); err != nil {
			return err
		}
		count(n)
	}
	rows, err := tx.Query(sqlSelectUsers)
	if err != nil {
		return err
	}
	defer rows.Close()

	// Protocols, days, schedules and block reasons repeat across users:
	// share one copy of each.
	intern := make(map[string]string)
	in := func(s string) string {
		if v, ok := intern[s]; ok {
			return v
		}
		intern[s] = s
		return s
	}

	var (
		u                                                User
		uid, up, down, dayUp, dayDown, unblockLimit      int64
		blocked, disabled, unblocked                     int64
		blockTime, lastReset, unblockUntil, next, update int64
	)
	for rows.Next() {
		if err := rows.Scan(&u.Name, &u.Protocol, &uid, &up, &down, &u.Day, &dayUp, &dayDown,
			&blocked, &u.BlockReason, &blockTime, &disabled, &lastReset, &unblocked,
			&unblockLimit, &unblockUntil, &u.Schedule, &next, &update); err != nil {
			return err
		}
		u.Protocol, u.Day, u.BlockReason, u.Schedule = in(u.Protocol), in(u.Day), in(u.BlockReason), in(u.Schedule)
		u.UID = uint32(uid)
		u.Up, u.Down = uint64(up), uint64(down)
		u.DayUp, u.DayDown = uint64(dayUp), uint64(dayDown)
		u.Blocked, u.Disabled, u.Unblocked = blocked != 0, disabled != 0, unblocked != 0
		u.BlockTime = fromUnixNano(blockTime)
		u.LastReset = fromUnixNano(lastReset)
		u.UnblockLimit = uint64(unblockLimit)
		u.UnblockUntil = fromUnixNano(unblockUntil)
		u.NextReset = fromUnixNano(next)
		u.UpdatedAt = fromUnixNano(update)
		if err := fn(&u); err != nil {
			return err
		}
	}
	return rows.Err()
}

// Baselines returns every counter baseline, ordered by source.
func (s *Store) Baselines() ([]Baseline, error) {
	rows, err := s.db.Query("SELECT source, epoch, rx, tx FROM baselines ORDER BY source")
	if err != nil {
		return nil, s.wrap("read baselines from", err)
	}
	defer rows.Close()
	var bs []Baseline
	for rows.Next() {
		var b Baseline
		var src, epoch string
		var rx, tx int64
		if err := rows.Scan(&src, &epoch, &rx, &tx); err != nil {
			return nil, s.wrap("read baselines from", err)
		}
		if b.Source, err = decodeSource(src); err != nil {
			return nil, s.wrap("read baselines from", err)
		}
		b.Epoch = decodeEpoch(epoch)
		b.Rx, b.Tx = uint64(rx), uint64(tx)
		bs = append(bs, b)
	}
	if err := rows.Err(); err != nil {
		return nil, s.wrap("read baselines from", err)
	}
	return bs, nil
}

// History returns name's usage for the days from through to, both included
// ("YYYY-MM-DD"; "" leaves that end open), in ascending order of day. An
// empty name returns every user's days, ordered by day, then name.
func (s *Store) History(name, from, to string) ([]DayUsage, error) {
	q := "SELECT name, day, up, down FROM history WHERE (?1 = '' OR name = ?1) AND (?2 = '' OR day >= ?2) AND (?3 = '' OR day <= ?3) ORDER BY day, name"
	if name != "" {
		// Lets SQLite walk the primary key instead of sorting.
		q = "SELECT name, day, up, down FROM history WHERE name = ?1 AND (?2 = '' OR day >= ?2) AND (?3 = '' OR day <= ?3) ORDER BY name, day"
	}
	rows, err := s.db.Query(q, name, from, to)
	if err != nil {
		return nil, s.wrap("read history from", err)
	}
	defer rows.Close()
	var hs []DayUsage
	for rows.Next() {
		var h DayUsage
		var up, down int64
		if err := rows.Scan(&h.Name, &h.Day, &up, &down); err != nil {
			return nil, s.wrap("read history from", err)
		}
		h.Up, h.Down = uint64(up), uint64(down)
		hs = append(hs, h)
	}
	if err := rows.Err(); err != nil {
		return nil, s.wrap("read history from", err)
	}
	return hs, nil
}

// Events returns name's events, newest first, at most limit of them
// (limit <= 0: all). An empty name returns every user's events.
func (s *Store) Events(name string, limit int) ([]Event, error) {
	if limit <= 0 {
		limit = -1 // no limit, to SQLite
	}
	q := "SELECT " + eventColumns + " FROM events ORDER BY id DESC LIMIT ?2"
	if name != "" {
		q = "SELECT " + eventColumns + " FROM events WHERE name = ?1 ORDER BY id DESC LIMIT ?2"
	}
	es, err := s.events(q, name, limit)
	if err != nil {
		return nil, s.wrap("read events from", err)
	}
	return es, nil
}

// UnloggedEvents returns the events not yet marked Logged, oldest first.
func (s *Store) UnloggedEvents() ([]Event, error) {
	es, err := s.events("SELECT " + eventColumns + " FROM events WHERE logged = 0 ORDER BY id")
	if err != nil {
		return nil, s.wrap("read events from", err)
	}
	return es, nil
}

// eventColumns are the columns scanEvents reads, in its order.
const eventColumns = "id, time, protocol, name, action, reason, logged, used, usage_limit, status, detail"

func (s *Store) events(q string, args ...any) ([]Event, error) {
	rows, err := s.db.Query(q, args...)
	if err != nil {
		return nil, err
	}
	return scanEvents(rows)
}

// scanEvents reads rows of eventColumns and closes rows.
func scanEvents(rows *sql.Rows) ([]Event, error) {
	defer rows.Close()
	var es []Event
	for rows.Next() {
		var e Event
		var t, used, limit int64
		if err := rows.Scan(&e.ID, &t, &e.Protocol, &e.Name, &e.Action, &e.Reason, &e.Logged,
			&used, &limit, &e.Status, &e.Detail); err != nil {
			return nil, err
		}
		e.Time = fromUnixNano(t)
		e.Used, e.Limit = uint64(used), uint64(limit)
		es = append(es, e)
	}
	return es, rows.Err()
}

// Meta returns the value stored under key, and whether there is one.
func (s *Store) Meta(key string) (string, bool, error) {
	var v string
	err := s.db.QueryRow("SELECT value FROM meta WHERE key = ?", key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", false, nil
	}
	if err != nil {
		return "", false, s.wrap("read meta from", err)
	}
	return v, true, nil
}

// Check reads the whole database and verifies its structure with SQLite's
// quick_check. Open does not, because it takes time in proportion to the
// file (about 0.1 s for 100,000 users); damage elsewhere is reported by the
// read that meets it. A damaged database gives an error wrapping
// [ErrCorrupt].
func (s *Store) Check() error {
	problems, err := s.check()
	if err != nil {
		return s.wrap("check", err)
	}
	if n := len(problems); n > 0 {
		msg := strings.Join(problems[:min(n, 3)], "; ")
		if n > 3 {
			msg += fmt.Sprintf(" (and %d more)", n-3)
		}
		return s.wrap("check", fmt.Errorf("%w: %s; %s", ErrCorrupt, msg, corruptHint))
	}
	return nil
}

func (s *Store) check() ([]string, error) {
	rows, err := s.db.Query("PRAGMA quick_check(100)")
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var problems []string
	for rows.Next() {
		var p string
		if err := rows.Scan(&p); err != nil {
			return nil, err
		}
		for _, line := range strings.Split(p, "\n") {
			if line != "ok" && line != "*** in database main ***" {
				problems = append(problems, line)
			}
		}
	}
	return problems, rows.Err()
}
