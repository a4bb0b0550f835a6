package store

import (
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"strings"
	"time"
)

// The events table is also the outbox of notifications: an event is
// committed in the same transaction as the change that caused it, and each
// notification channel delivers the events after its cursor, in id order.
// A channel's row in deliveries says how far it got and how its retries
// stand; it is written by the channel's sender, beside the agent's commits.

// Delivery is one notification channel's progress through the events.
type Delivery struct {
	// Channel is the channel's key, stable across restarts.
	Channel string
	// Cursor is the id of the last event the channel is done with
	// (delivered, given up, or not of a type it sends): it sends the
	// events after it.
	Cursor int64
	// Attempts counts the failed attempts at the event after Cursor; 0
	// when the last attempt succeeded.
	Attempts int
	// NextTry is when the next attempt is due; zero: at once.
	NextTry time.Time
	// LastError is the error of the last failed attempt, kept after a
	// success; ErrorTime is when it happened (zero: never).
	LastError string
	ErrorTime time.Time
	// Delivered and Expired count the events delivered, and those given
	// up because they were older than the maximum age.
	Delivered, Expired uint64
}

// EventIDPrefix returns the random prefix of this database's event ids, set
// when the database was created or migrated to schema version 2: an event's
// id for receivers is the prefix, "-" and its row id, unique across
// databases (a state database moved aside and started afresh gets another
// prefix).
func (s *Store) EventIDPrefix() (string, error) {
	v, ok, err := s.Meta(eventPrefixKey)
	if err != nil {
		return "", err
	}
	if !ok || v == "" {
		return "", s.wrap("read event id prefix from", fmt.Errorf("%w: no %s in meta; %s", ErrCorrupt, eventPrefixKey, corruptHint))
	}
	return v, nil
}

const deliveryColumns = "channel, cursor, attempts, next_try, last_error, error_time, delivered, expired"

func scanDelivery(scan func(...any) error) (Delivery, error) {
	var d Delivery
	var next, errTime, delivered, expired int64
	if err := scan(&d.Channel, &d.Cursor, &d.Attempts, &next, &d.LastError, &errTime, &delivered, &expired); err != nil {
		return Delivery{}, err
	}
	d.NextTry, d.ErrorTime = fromUnixNano(next), fromUnixNano(errTime)
	d.Delivered, d.Expired = uint64(delivered), uint64(expired)
	return d, nil
}

// Deliveries returns every channel's row, ordered by channel, including
// channels no longer configured.
func (s *Store) Deliveries() ([]Delivery, error) {
	rows, err := s.db.Query("SELECT " + deliveryColumns + " FROM deliveries ORDER BY channel")
	if err != nil {
		return nil, s.wrap("read deliveries from", err)
	}
	defer rows.Close()
	var ds []Delivery
	for rows.Next() {
		d, err := scanDelivery(rows.Scan)
		if err != nil {
			return nil, s.wrap("read deliveries from", err)
		}
		ds = append(ds, d)
	}
	if err := rows.Err(); err != nil {
		return nil, s.wrap("read deliveries from", err)
	}
	return ds, nil
}

// OpenDelivery returns channel's row, creating it if there is none: a new
// channel starts after the last event committed so far, so it is sent the
// events from now on, not the whole history.
func (s *Store) OpenDelivery(channel string) (Delivery, error) {
	if channel == "" {
		return Delivery{}, s.wrap("open delivery in", fmt.Errorf("%w: empty channel key", ErrInvalid))
	}
	var d Delivery
	err := s.write(func(c *sql.Conn) error {
		var err error
		d, err = scanDelivery(c.QueryRowContext(bg, "SELECT "+deliveryColumns+" FROM deliveries WHERE channel = ?", channel).Scan)
		if !errors.Is(err, sql.ErrNoRows) {
			return err
		}
		d = Delivery{Channel: channel}
		if err := c.QueryRowContext(bg, "SELECT coalesce(max(id), 0) FROM events").Scan(&d.Cursor); err != nil {
			return err
		}
		return saveDelivery(c, d)
	})
	if err != nil {
		return Delivery{}, s.wrap("open delivery in", err)
	}
	return d, nil
}

// SaveDelivery writes d, in a transaction of its own.
func (s *Store) SaveDelivery(d Delivery) error {
	if d.Channel == "" {
		return s.wrap("save delivery in", fmt.Errorf("%w: empty channel key", ErrInvalid))
	}
	if err := s.write(func(c *sql.Conn) error { return saveDelivery(c, d) }); err != nil {
		return s.wrap("save delivery in", err)
	}
	return nil
}

func saveDelivery(c *sql.Conn, d Delivery) error {
	next, err := unixNano(d.NextTry)
	if err != nil {
		return fmt.Errorf("NextTry: %w", err)
	}
	errTime, err := unixNano(d.ErrorTime)
	if err != nil {
		return fmt.Errorf("ErrorTime: %w", err)
	}
	_, err = c.ExecContext(bg, `INSERT OR REPLACE INTO deliveries (channel, cursor, attempts, next_try, last_error,
	error_time, delivered, expired, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		d.Channel, d.Cursor, d.Attempts, next, d.LastError, errTime, int64(d.Delivered), int64(d.Expired), time.Now().UnixNano())
	return err
}

// write runs fn in an immediate transaction on the writer's connection,
// serialised with Commit, and commits it; an error of fn rolls it back.
func (s *Store) write(fn func(c *sql.Conn) error) (err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() {
		return ErrClosed
	}
	if s.w == nil {
		if s.w, err = newWriter(s.db); err != nil {
			return fmt.Errorf("reconnect: %w", err)
		}
	}
	c := s.w.c
	if _, err := c.ExecContext(bg, "BEGIN IMMEDIATE"); err != nil {
		if errors.Is(err, sql.ErrConnDone) || errors.Is(err, driver.ErrBadConn) {
			s.discardWriter()
		}
		return err
	}
	defer func() {
		if err == nil {
			return
		}
		if _, e := c.ExecContext(bg, "ROLLBACK"); e != nil && !strings.Contains(e.Error(), "no transaction is active") {
			s.discardWriter()
		}
	}()
	if err := fn(c); err != nil {
		return err
	}
	_, err = c.ExecContext(bg, "COMMIT")
	return err
}

// actionsIn returns the SQL list "(?, ?, ...)" for n actions.
func actionsIn(n int) string {
	return "(" + strings.TrimSuffix(strings.Repeat("?, ", n), ", ") + ")"
}

// PendingEvents returns, oldest first, at most limit events after the event
// id after whose action is one of actions, and the id the caller may move
// its cursor to once it is done with them: the last one returned if limit
// were returned, else the last event of any action committed so far (the
// events of other actions up to it need nothing).
func (s *Store) PendingEvents(after int64, actions []string, limit int) ([]Event, int64, error) {
	if len(actions) == 0 || limit <= 0 {
		return nil, after, nil
	}
	tx, err := s.db.BeginTx(bg, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return nil, 0, s.wrap("read events from", err)
	}
	defer tx.Rollback()
	args := []any{after}
	for _, a := range actions {
		args = append(args, a)
	}
	args = append(args, limit)
	rows, err := tx.Query("SELECT "+eventColumns+" FROM events WHERE id > ? AND action IN "+actionsIn(len(actions))+
		" ORDER BY id LIMIT ?", args...)
	if err != nil {
		return nil, 0, s.wrap("read events from", err)
	}
	es, err := scanEvents(rows)
	if err != nil {
		return nil, 0, s.wrap("read events from", err)
	}
	if len(es) == limit {
		return es, es[len(es)-1].ID, nil
	}
	last := after
	if err := tx.QueryRow("SELECT coalesce(max(id), 0) FROM events").Scan(&last); err != nil {
		return nil, 0, s.wrap("read events from", err)
	}
	return es, max(last, after), nil
}

// CountEvents returns how many events after the event id after have one of
// actions: a channel's backlog.
func (s *Store) CountEvents(after int64, actions []string) (int, error) {
	if len(actions) == 0 {
		return 0, nil
	}
	args := []any{after}
	for _, a := range actions {
		args = append(args, a)
	}
	var n int
	if err := s.db.QueryRow("SELECT count(*) FROM events WHERE id > ? AND action IN "+actionsIn(len(actions)), args...).Scan(&n); err != nil {
		return 0, s.wrap("count events in", err)
	}
	return n, nil
}

// LatestEvents returns, for each name, its latest event whose action is one
// of actions, ordered by name: what the agent last noticed of each user (or
// part of itself), read at start.
func (s *Store) LatestEvents(actions ...string) ([]Event, error) {
	if len(actions) == 0 {
		return nil, nil
	}
	args := make([]any, len(actions))
	for i, a := range actions {
		args[i] = a
	}
	es, err := s.events("SELECT "+eventColumns+" FROM events WHERE id IN (SELECT max(id) FROM events WHERE action IN "+
		actionsIn(len(actions))+" GROUP BY name) ORDER BY name", args...)
	if err != nil {
		return nil, s.wrap("read events from", err)
	}
	return es, nil
}
