package fleet

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// migrations[i] takes the schema from version i to version i+1. Version 0
// is a database without bwagent's tables; the current version is
// len(migrations). Append, never edit: a released migration has run on
// operators' databases.
//
// Every table is keyed by the user's name first, so that partitioning by
// user (PARTITION BY HASH (name)) or a distributed engine sharding on the
// first key column keeps one user's rows together: a tick's transaction
// touches one partition per user.
var migrations = []string{
	// 0 -> 1: the initial schema.
	`
CREATE TABLE schema_version (
	version integer NOT NULL
);
INSERT INTO schema_version (version) VALUES (0);

-- One row per running or past node. The instance is the random id of the
-- process holding the name; the name itself is held by a session advisory
-- lock (see Connect).
CREATE TABLE nodes (
	name        text PRIMARY KEY,
	instance    text NOT NULL,
	host        text NOT NULL,
	pid         integer NOT NULL,
	version     text NOT NULL,
	started_at  timestamptz NOT NULL,
	last_report timestamptz,
	reports     bigint NOT NULL DEFAULT 0
);

-- The user's global plan and state: the limits line (has_line, limit_bytes,
-- reset, expires, devices; plan_at is when it last changed, NULL for a row
-- only a report created), the current usage period (bumped by every reset),
-- the administrator's switches, the sum of the nodes' usage in the period
-- (used_up, used_down: kept with the usage rows, in the same statement).
-- rev is bumped by every change a command makes; xid is the transaction
-- that last wrote the row, for the nodes' incremental reads.
CREATE TABLE plans (
	name          text PRIMARY KEY,
	period        bigint NOT NULL DEFAULT 1,
	rev           bigint NOT NULL DEFAULT 0,
	has_line      boolean NOT NULL DEFAULT false,
	limit_bytes   bigint NOT NULL DEFAULT 0,
	reset         text NOT NULL DEFAULT '',
	expires       text NOT NULL DEFAULT '',
	devices       integer NOT NULL DEFAULT 0,
	plan_at       timestamptz,
	disabled      boolean NOT NULL DEFAULT false,
	unblocked     boolean NOT NULL DEFAULT false,
	unblock_limit bigint NOT NULL DEFAULT 0,
	unblock_until timestamptz,
	last_reset    timestamptz,
	used_up       bigint NOT NULL DEFAULT 0,
	used_down     bigint NOT NULL DEFAULT 0,
	xid           xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX plans_xid ON plans (xid);

-- Each node's cumulative count of the user in one usage period. Reports are
-- absolute and applied with GREATEST: a repeated report changes nothing.
CREATE TABLE usage (
	name       text NOT NULL,
	period     bigint NOT NULL,
	node       text NOT NULL,
	up         bigint NOT NULL,
	down       bigint NOT NULL,
	updated_at timestamptz NOT NULL,
	xid        xid8 NOT NULL,
	PRIMARY KEY (name, period, node)
);
CREATE INDEX usage_xid ON usage (xid);

-- The lease of each node: the absolute ceiling on its own count (in the
-- configured metric) in the period, the most the node may enforce; rate
-- is its recent rate, bytes a second, which the next grants follow.
CREATE TABLE leases (
	name       text NOT NULL,
	node       text NOT NULL,
	period     bigint NOT NULL,
	ceiling    bigint NOT NULL,
	rate       bigint NOT NULL,
	updated_at timestamptz NOT NULL,
	PRIMARY KEY (name, node)
);

-- One row per event, whichever nodes record it: a block for the limit in
-- a period under one revision of the plan is one event.
CREATE TABLE events (
	id     bigserial PRIMARY KEY,
	name   text NOT NULL,
	period bigint NOT NULL,
	kind   text NOT NULL,
	rev    bigint NOT NULL,
	node   text NOT NULL,
	at     timestamptz NOT NULL,
	reason text NOT NULL,
	UNIQUE (name, period, kind, rev)
);

-- Settings every node must agree on (the metric the leases count).
CREATE TABLE settings (
	key   text PRIMARY KEY,
	value text NOT NULL
);
`,
	// 1 → 2: the speed caps of the limits line (speed=, throttle=; '' for
	// none), as the limits file writes them.
	`
ALTER TABLE plans ADD COLUMN speed text NOT NULL DEFAULT '';
ALTER TABLE plans ADD COLUMN throttle text NOT NULL DEFAULT '';
`,
}

// SchemaVersion is the schema version this package writes and reads.
var SchemaVersion = len(migrations)

// ErrSchemaVersion is returned by Connect for a database whose schema a
// newer bwagent wrote.
var ErrSchemaVersion = errors.New("fleet database has a newer schema")

// migrateLock is the advisory lock key that serialises migrations of nodes
// starting at once ("bwmigrat").
const migrateLock = 0x62776d6967726174

// migrate creates or upgrades the schema in one transaction, or refuses a
// newer one, changing nothing.
func migrate(ctx context.Context, conn *pgx.Conn) (int, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(migrateLock)); err != nil {
		return 0, err
	}
	var exists bool
	if err := tx.QueryRow(ctx, "SELECT to_regclass('schema_version') IS NOT NULL").Scan(&exists); err != nil {
		return 0, err
	}
	version := 0
	if exists {
		if err := tx.QueryRow(ctx, "SELECT version FROM schema_version").Scan(&version); err != nil {
			return 0, fmt.Errorf("read schema_version: %w", err)
		}
	}
	if version > len(migrations) {
		return version, fmt.Errorf("%w: version %d, this bwagent knows versions up to %d; upgrade bwagent on this node (the database was left as it is)",
			ErrSchemaVersion, version, len(migrations))
	}
	if version == len(migrations) {
		return version, nil
	}
	for v := version; v < len(migrations); v++ {
		if _, err := tx.Exec(ctx, migrations[v]); err != nil {
			return version, fmt.Errorf("migrate the fleet schema from version %d to %d: %w", v, v+1, err)
		}
	}
	if _, err := tx.Exec(ctx, "UPDATE schema_version SET version = $1", len(migrations)); err != nil {
		return version, err
	}
	return len(migrations), tx.Commit(ctx)
}
