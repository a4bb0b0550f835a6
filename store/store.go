// Package store is bwagent's durable state: one embedded SQLite database
// (modernc.org/sqlite, pure Go) holding every user's totals and status, the
// counter baselines the totals were computed from, per-day usage history,
// the event log and a few key/value settings.
//
// # One transaction per tick
//
// The agent keeps its whole state in memory and, once per tick, hands
// [Store.Commit] a [Batch] with everything that changed since the previous
// tick. Commit applies the batch in a single SQLite transaction: either all
// of it is durable when Commit returns nil, or none of it is. Because a
// user's totals and the counter baselines they were computed from are in
// the same transaction, a crash (kill -9, power loss) at any moment leaves
// the database at the end of some tick: every byte counted once, none lost
// and none counted twice. The database runs in WAL mode with
// synchronous=FULL, so a commit that returned is on disk.
//
// # Schema
//
// All tables are STRICT. Unsigned 64-bit counters are stored in INTEGER
// columns as their two's-complement int64 bit pattern (values of 2^63 and
// above read as negative in SQL, and round-trip exactly through this
// package). Times are stored as Unix nanoseconds, the zero time as 0.
//
//	meta      (key PRIMARY KEY, value)             WITHOUT ROWID
//	users     (name PRIMARY KEY, protocol, uid, up, down, day, day_up,
//	           day_down, blocked, block_reason, block_time, disabled,
//	           last_reset, unblocked, unblock_limit, unblock_until,
//	           schedule, next_reset, updated_at)   WITHOUT ROWID
//	baselines (source PRIMARY KEY, epoch, rx, tx)  WITHOUT ROWID
//	history   (name, day, up, down,
//	           PRIMARY KEY (name, day))            WITHOUT ROWID
//	events    (id INTEGER PRIMARY KEY AUTOINCREMENT, time, protocol, name,
//	           action, reason, logged, used, usage_limit, status, detail)
//	deliveries (channel PRIMARY KEY, cursor, attempts, next_try,
//	           last_error, error_time, delivered, expired,
//	           updated_at)                         WITHOUT ROWID
//
// meta holds "schema_version", which [Open] uses to create or migrate the
// schema in place (version 1 to 2 added the events' used, usage_limit,
// status and detail, the deliveries table and "event_id_prefix"); a
// database written by a newer bwagent is refused with [ErrSchemaVersion].
//
// # Outbox
//
// The events table is also the outbox of notifications: an event is
// committed in the same transaction as the change that caused it, so no
// notification is lost and none is sent for a change that was not saved.
// Each channel's row in deliveries ([Delivery]) holds its cursor, the id of
// the last event it is done with, and its retries; [Store.PendingEvents]
// reads what comes after. An event's id for receivers is
// [Store.EventIDPrefix], "-", and its row id. The file carries SQLite application id 0x62776167
// ("bwag"), so another program's SQLite database is recognised and refused.
// Open decides this reading the file read-only, before anything writes to
// it: a file it refuses (another program's database, a newer schema, not
// SQLite at all) is left byte for byte as it was, in its journal mode, with
// no -wal or -shm file added. Only an empty file, an empty SQLite database
// (no application id, no schema) or a state database it knows is switched
// to WAL and written.
//
// # Times
//
// Times round-trip to the nanosecond, and the zero time round-trips as the
// zero time, but the location does not survive: times are returned in
// [time.Local] (as by time.Unix(0, n)) and carry no monotonic reading, so
// compare them with [time.Time.Equal]. A non-zero time must be within the
// range of Unix nanoseconds in an int64 (the years 1678 to 2262) and must not
// be exactly the Unix epoch, which is how the zero time is stored; Commit
// refuses other times with [ErrInvalid].
//
// # Damage
//
// A file that is not a usable state database (damaged, truncated, not SQLite,
// another program's) gives errors wrapping [ErrCorrupt] that name the file
// and say what to do: move it aside, and the agent re-imports its state
// from the operators' JSON files. Open reads only the pages it needs;
// [Store.Check] reads them all (about 0.1 s for 100,000 users), and Users or
// EachUser at start reads every user.
//
// # Cost
//
// Commit costs about 13 µs per row written on a 2-core VM, plus an fsync,
// so a tick in which 10,000 users of 100,000 had traffic (10,000 users and
// 10,000 baselines) takes about 0.27 s, and one with 1,000 of 10,000 about
// 27 ms (BenchmarkCommit). Reading 100,000 users takes about 0.65 s. Rows are written in key order, which matters once the
// tables outgrow the page cache (2 MiB per connection). When a tenth of the
// users change per commit, nearly every page of the users and baselines
// tables is rewritten: about 22 MiB of writes per commit at 100,000 users.
//
// # Concurrency
//
// A Store is safe for concurrent use. Commits are serialised on one
// dedicated connection; reads use up to two other connections and, thanks to
// WAL, neither wait for nor block a commit. Other processes may open the same
// file: SQLite's file locks keep it consistent, and a writer waits up to five
// seconds for another process's write lock before failing with [ErrLocked].
// The package does not log.
package store

import (
	"database/sql"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// Errors returned by the store. They are wrapped with the operation and the
// database's path; test for them with [errors.Is].
var (
	// ErrCorrupt means the file is not a usable state database: it is
	// damaged or truncated, not an SQLite database at all, or another
	// program's database. Move the file aside and restart the agent: it
	// re-imports its state from the operators' JSON files.
	ErrCorrupt = errors.New("not a usable state database (corrupt, truncated, or not a bwagent SQLite database)")

	// ErrSchemaVersion means the database was written by a newer bwagent
	// whose schema this one does not know.
	ErrSchemaVersion = errors.New("state database schema is newer than this bwagent supports")

	// ErrLocked means another process held the database's write lock for
	// longer than the busy timeout. Nothing was changed; try again later.
	ErrLocked = errors.New("state database is locked by another process")

	// ErrClosed means the Store was used after Close.
	ErrClosed = errors.New("state database is closed")

	// ErrInvalid means a Batch holds a value the store cannot represent
	// (a time out of range, a reserved meta key). Nothing was changed, and
	// retrying the same batch fails the same way.
	ErrInvalid = errors.New("invalid value")
)

// corruptHint is appended to ErrCorrupt errors: what the operator should do.
const corruptHint = "move the file aside and restart bwagent, which re-imports its state from the JSON files"

// appID is the SQLite application id ("bwag") written into the file header.
const appID = 0x62776167

// busyTimeoutMS is how long, in milliseconds, a write waits for another
// process's lock.
const busyTimeoutMS = 5000

// cacheKiB bounds each connection's page cache. At most three connections are
// open, so the page caches stay under 3 x cacheKiB.
const cacheKiB = 2048

// pageSize is the page size of a new database.
const pageSize = 4096

// maxReaders bounds the connections used for reads, besides the writer.
const maxReaders = 2

// Store is an open state database. Create it with [Open]; it is safe for
// concurrent use.
type Store struct {
	path string
	db   *sql.DB

	mu     sync.Mutex  // serialises Commit and Close
	closed atomic.Bool // set by Close, under mu
	w      *writer

	// hook, when set by a test, runs after each step of Commit with the
	// step's name; an error aborts the commit there. It also runs, as
	// "rollback", before a failed commit's ROLLBACK: an error stands for a
	// ROLLBACK that failed.
	hook func(step string) error
}

// Open opens the state database at path, creating it (mode 0600, and its
// directory with mode 0700) if it does not exist, and creating or migrating
// its schema.
//
// An existing file is first read, read-only, and refused unless it is empty,
// an empty SQLite database or a state database of a known schema; a refused
// file is not changed. A file that is not a usable state database gives an
// error wrapping [ErrCorrupt]; one written by a newer bwagent gives
// [ErrSchemaVersion]; another process holding the write lock for more than
// five seconds gives [ErrLocked]. Open does not read every page: see
// [Store.Check].
func Open(path string) (*Store, error) {
	s, err := open(path)
	if err != nil {
		return nil, fmt.Errorf("open state database %s: %w", path, err)
	}
	return s, nil
}

func open(path string) (*Store, error) {
	if path == "" {
		return nil, errors.New("empty path")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(abs), 0o700); err != nil {
		return nil, err
	}
	// SQLite creates the file 0644; create it first so that it, and the
	// -wal and -shm files SQLite gives the same mode, are private. Only if
	// it is missing: closing a descriptor of a file this process has
	// SQLite locks on (another Store on the same file) would drop them.
	f, err := os.OpenFile(abs, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	switch {
	case err == nil:
		if err := f.Close(); err != nil {
			return nil, err
		}
	case !errors.Is(err, fs.ErrExist):
		return nil, err
	default:
		// Someone else's file: read it before anything writes to it.
		if err := vet(abs); err != nil {
			return nil, classify(err)
		}
	}

	db, err := sql.Open("sqlite", dsn(abs))
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1 + maxReaders)
	db.SetMaxIdleConns(1 + maxReaders)
	db.SetConnMaxIdleTime(idleTime)

	s := &Store{path: path, db: db}
	if s.w, err = newWriter(db); err != nil {
		db.Close()
		return nil, classify(err)
	}
	return s, nil
}

// sqliteMagic is how every SQLite database file starts.
const sqliteMagic = "SQLite format 3\x00"

// vet checks, only reading, that the existing file at abs is one Open may
// write to: an empty file, an empty SQLite database, or a state database of a
// schema version this package knows. Open runs it before the first statement
// that writes (switching to WAL rewrites the header of a database in
// rollback mode), so a file Open refuses is left exactly as it was.
//
// Without a -wal or -journal file beside it, the database is read as
// immutable: SQLite then takes no locks and creates no -wal or -shm file
// (a read-only connection to a WAL database would create both and, being
// read-only, could not remove them). With one, another process may be
// writing, or a crash left changes there, so it is read normally, read-only.
func vet(abs string) error {
	f, err := os.OpenFile(abs, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%w: not a regular file (%s); %s", ErrCorrupt, fi.Mode().Type(), corruptHint)
	}
	if fi.Size() == 0 {
		return nil // a new database
	}
	var header [100]byte
	if _, err := io.ReadFull(f, header[:]); err != nil || string(header[:len(sqliteMagic)]) != sqliteMagic {
		return fmt.Errorf("%w: not an SQLite database (no SQLite header); %s", ErrCorrupt, corruptHint)
	}

	q := url.Values{}
	q.Set("mode", "ro")
	q.Set("_busy_timeout", strconv.Itoa(busyTimeoutMS))
	q.Set("_query_only", "1")
	if !exists(abs+"-wal") && !exists(abs+"-journal") {
		q.Set("immutable", "1")
	}
	db, err := sql.Open("sqlite", uri(abs)+"?"+q.Encode())
	if err != nil {
		return err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	tx, err := db.BeginTx(bg, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer tx.Rollback()
	_, err = schemaVersion(tx)
	return err
}

// exists reports whether there is a file, of any kind, at path.
func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// Path returns the path the Store was opened with.
func (s *Store) Path() string { return s.path }

// Close closes the database after any Commit and reads in progress. Using
// the Store after Close returns [ErrClosed]; closing it again returns nil.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() {
		return nil
	}
	s.closed.Store(true)
	var err error
	if s.w != nil {
		err = s.w.close(false)
	}
	if e := s.db.Close(); err == nil {
		err = e
	}
	if err != nil {
		return fmt.Errorf("close state database %s: %w", s.path, err)
	}
	return nil
}

// wrap annotates err with the operation and the file, and classifies SQLite
// errors into the package's sentinel errors.
func (s *Store) wrap(op string, err error) error {
	if err == nil {
		return nil
	}
	if s.closed.Load() && !errors.Is(err, ErrClosed) {
		// database/sql's own "database is closed" error, or an error of
		// a read that Close interrupted.
		err = fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return fmt.Errorf("%s state database %s: %w", op, s.path, classify(err))
}

// classify wraps SQLite errors that callers act on in the matching sentinel.
func classify(err error) error {
	var se *sqlite.Error
	if !errors.As(err, &se) || errors.Is(err, ErrCorrupt) || errors.Is(err, ErrLocked) {
		return err
	}
	switch se.Code() & 0xff {
	case sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB:
		return fmt.Errorf("%w: %w; %s", ErrCorrupt, err, corruptHint)
	case sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED:
		return fmt.Errorf("%w: %w", ErrLocked, err)
	}
	return err
}
