package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"time"
)

// migrations[i] takes the schema from version i to version i+1. Version 0 is
// an empty database; the current version is len(migrations). Append, never
// edit: a released migration has already run on operators' machines.
var migrations = []string{
	// 0 -> 1: the initial schema.
	`
CREATE TABLE meta (
	key   TEXT PRIMARY KEY,
	value TEXT NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE users (
	name          TEXT PRIMARY KEY,
	protocol      TEXT NOT NULL,
	uid           INTEGER NOT NULL,
	up            INTEGER NOT NULL,
	down          INTEGER NOT NULL,
	day           TEXT NOT NULL,
	day_up        INTEGER NOT NULL,
	day_down      INTEGER NOT NULL,
	blocked       INTEGER NOT NULL,
	block_reason  TEXT NOT NULL,
	block_time    INTEGER NOT NULL,
	disabled      INTEGER NOT NULL,
	last_reset    INTEGER NOT NULL,
	unblocked     INTEGER NOT NULL,
	unblock_limit INTEGER NOT NULL,
	unblock_until INTEGER NOT NULL,
	schedule      TEXT NOT NULL,
	next_reset    INTEGER NOT NULL,
	updated_at    INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE baselines (
	source TEXT PRIMARY KEY,
	epoch  TEXT NOT NULL,
	rx     INTEGER NOT NULL,
	tx     INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE history (
	name TEXT NOT NULL,
	day  TEXT NOT NULL,
	up   INTEGER NOT NULL,
	down INTEGER NOT NULL,
	PRIMARY KEY (name, day)
) STRICT, WITHOUT ROWID;

-- AUTOINCREMENT: an id is never reused, even if old events are pruned, so
-- Batch.Logged can never mark the wrong event.
CREATE TABLE events (
	id       INTEGER PRIMARY KEY AUTOINCREMENT,
	time     INTEGER NOT NULL,
	protocol TEXT NOT NULL,
	name     TEXT NOT NULL,
	action   TEXT NOT NULL,
	reason   TEXT NOT NULL,
	logged   INTEGER NOT NULL
) STRICT;
CREATE INDEX events_by_name ON events (name, id);
CREATE INDEX events_unlogged ON events (id) WHERE logged = 0;
`,
	// 1 -> 2: notifications. Each event keeps the user's usage, limit and
	// status when it happened, and a detail of its action (the threshold,
	// the expiry); deliveries is the outbox's state per channel; the event
	// id prefix makes event ids unique across databases.
	`
ALTER TABLE events ADD COLUMN used INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN usage_limit INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN status TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN detail TEXT NOT NULL DEFAULT '';
CREATE INDEX events_by_action ON events (action, name, id);

CREATE TABLE deliveries (
	channel    TEXT PRIMARY KEY,
	cursor     INTEGER NOT NULL,
	attempts   INTEGER NOT NULL,
	next_try   INTEGER NOT NULL,
	last_error TEXT NOT NULL,
	error_time INTEGER NOT NULL,
	delivered  INTEGER NOT NULL,
	expired    INTEGER NOT NULL,
	updated_at INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

INSERT INTO meta (key, value) VALUES ('event_id_prefix', lower(hex(randomblob(8))));
`,
	// 2 -> 3: no table changes. An Xray user's debt ("owed:" baselines)
	// may now be kept as a point on the counters of the user's kernel
	// account (epoch "paid/ACCOUNT@START"), which an agent of version 2
	// would take for the debt itself: the version keeps those agents out.
	`
UPDATE meta SET value = value WHERE key = 'schema_version';
`,
}

// SchemaVersion is the schema version this package writes and reads.
const SchemaVersion = 3

// schemaVersionKey is the meta key holding the schema version. Batch.Meta
// may not set it.
const schemaVersionKey = "schema_version"

// eventPrefixKey is the meta key holding the prefix of event ids (see
// [Store.EventIDPrefix]), set once by the migration to version 2. Batch.Meta
// may not set it.
const eventPrefixKey = "event_id_prefix"

// walCheckpointPages is the WAL size, in pages, past which a commit copies
// the WAL back into the database file. When many users change per tick,
// nearly every page of the users and baselines tables is in every commit,
// so a checkpoint per commit (SQLite's default of 1000 pages) writes each
// page twice per commit; letting the WAL hold a few commits writes each page
// to the database file once for all of them. Measured at 100,000 users with
// 10% changing per commit: 33 MiB written per commit with 1000, 22 MiB with
// 10000.
const walCheckpointPages = 10000

// walSizeLimit is the size, in bytes, the WAL file is truncated to after a
// checkpoint, so that a one-off large commit (an import) does not leave a
// large file behind.
const walSizeLimit = 64 << 20

// idleTime is how long an idle read connection, and its page cache, is kept.
const idleTime = time.Minute

// dsn returns the driver's data source name for the absolute path abs. The
// path is a URI so that no character in it ('?', '#', '%') is taken for
// syntax. page_size applies only to a new database and must precede the
// switch to WAL, which _pragma values do.
func dsn(abs string) string {
	q := url.Values{}
	q.Set("_busy_timeout", strconv.Itoa(busyTimeoutMS))
	q.Add("_pragma", "page_size("+strconv.Itoa(pageSize)+")")
	q.Add("_pragma", "cache_size(-"+strconv.Itoa(cacheKiB)+")")
	q.Add("_pragma", "wal_autocheckpoint("+strconv.Itoa(walCheckpointPages)+")")
	q.Add("_pragma", "journal_size_limit("+strconv.Itoa(walSizeLimit)+")")
	q.Set("_journal_mode", "WAL")
	q.Set("_synchronous", "FULL")
	return uri(abs) + "?" + q.Encode()
}

// uri returns the SQLite URI of the absolute path abs, without parameters.
func uri(abs string) string {
	return "file:" + (&url.URL{Path: abs}).EscapedPath()
}

// queryRower is what schemaVersion reads through: a connection or a
// transaction.
type queryRower interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// schemaVersion returns the schema version of the database q reads: 0 for an
// empty database (no application id, no schema objects), the version in
// meta for a bwagent database. It only reads. Another program's database, or
// ours without a readable version, gives ErrCorrupt; a version newer than
// this package knows gives ErrSchemaVersion.
func schemaVersion(q queryRower) (int, error) {
	var id, objects int64
	if err := q.QueryRowContext(bg, "PRAGMA application_id").Scan(&id); err != nil {
		return 0, err
	}
	if err := q.QueryRowContext(bg, "SELECT count(*) FROM sqlite_schema").Scan(&objects); err != nil {
		return 0, err
	}
	switch {
	case id == 0 && objects == 0:
		return 0, nil
	case id != appID:
		return 0, fmt.Errorf("%w: SQLite application id %#x is not bwagent's; %s", ErrCorrupt, id, corruptHint)
	}
	var metas int64
	if err := q.QueryRowContext(bg, "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'meta'").Scan(&metas); err != nil {
		return 0, err
	}
	var v string
	err := sql.ErrNoRows
	if metas > 0 {
		err = q.QueryRowContext(bg, "SELECT value FROM meta WHERE key = ?", schemaVersionKey).Scan(&v)
	}
	if errors.Is(err, sql.ErrNoRows) {
		return 0, fmt.Errorf("%w: no schema version; %s", ErrCorrupt, corruptHint)
	}
	if err != nil {
		return 0, err
	}
	version, err := strconv.Atoi(v)
	if err != nil || version < 1 {
		return 0, fmt.Errorf("%w: schema version %q; %s", ErrCorrupt, v, corruptHint)
	}
	if version > len(migrations) {
		return 0, fmt.Errorf("%w: the file has version %d, this bwagent knows versions up to %d; upgrade bwagent or move the file aside", ErrSchemaVersion, version, len(migrations))
	}
	return version, nil
}

// migrate creates or upgrades the schema on the writer's connection, in one
// immediate transaction so that two processes opening a new file at once do
// not both create it.
func migrate(c *sql.Conn) (err error) {
	var mode string
	if err := c.QueryRowContext(bg, "PRAGMA journal_mode").Scan(&mode); err != nil {
		return err
	}
	if mode != "wal" {
		return fmt.Errorf("journal mode is %q, not WAL: the file system does not support it", mode)
	}

	if _, err := c.ExecContext(bg, "BEGIN IMMEDIATE"); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			c.ExecContext(bg, "ROLLBACK")
		}
	}()

	version, err := schemaVersion(c)
	if err != nil {
		return err
	}
	if version == 0 {
		// A new, empty database.
		if _, err := c.ExecContext(bg, "PRAGMA application_id = "+strconv.Itoa(appID)); err != nil {
			return err
		}
	}
	if version == len(migrations) {
		_, err := c.ExecContext(bg, "COMMIT")
		return err
	}
	for v := version; v < len(migrations); v++ {
		if _, err := c.ExecContext(bg, migrations[v]); err != nil {
			return fmt.Errorf("migrate schema from version %d to %d: %w", v, v+1, err)
		}
	}
	if _, err := c.ExecContext(bg, "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
		schemaVersionKey, strconv.Itoa(len(migrations))); err != nil {
		return err
	}
	_, err = c.ExecContext(bg, "COMMIT")
	return err
}
