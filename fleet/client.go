// Package fleet is bwagent's fleet mode: one quota per user across many
// servers (nodes), kept in one PostgreSQL database (15 or later) that every
// node reaches with github.com/jackc/pgx/v5.
//
// The database holds the global plans (limits, schedules, expiries, the
// administrator's switches and resets), every node's cumulative count of
// each user per usage period, the leases and the events; the schema is in
// schema.go, the lease rule in lease.go. A node talks to it through one
// Client: one Sync per tick (its report in, the changes and its grants
// out, in two round trips and one transaction), and one short transaction
// per operator command.
//
// The package keeps no state of the agent's: the agent's loop builds the
// reports and applies the results (agent/fleet.go).
package fleet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
)

// Errors of Connect and the commands.
var (
	ErrNodeTaken   = errors.New("node name in use")
	ErrUnknownUser = errors.New("unknown user")
	ErrMetric      = errors.New("fleet metric differs")
)

// Options configure a Client.
type Options struct {
	// DSN is a pgx connection string: a URL (postgres://...) or key=value
	// pairs (host=... dbname=...).
	DSN string
	// Node is this node's name, unique in the fleet.
	Node string
	// Metric is the traffic leases count; every node must use the same.
	Metric quota.Metric
	// Fresh is how long a lease's rate counts for the grants of other
	// nodes after its last renewal (default 10 s).
	Fresh time.Duration
	// Version is the agent's version, shown in the nodes table.
	Version string
}

// Client is one node's connection to the fleet database. Sync must not be
// called concurrently with itself; the commands may run at any time, each
// on a connection of its own.
type Client struct {
	o        Options
	instance string
	host     string

	mu   sync.Mutex // held during Sync
	conn *pgx.Conn  // Sync's, also holding the node name's advisory lock
	xmin string     // the snapshot xmin of the last fetch ("" : none yet)

	// RoundTrips counts Sync's round trips to the server (for the
	// benchmark).
	RoundTrips int
}

// Connect is New and Open.
func Connect(ctx context.Context, o Options) (*Client, error) {
	c := New(o)
	if err := c.Open(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// New returns a node's client without connecting: Sync connects when it
// has no connection.
func New(o Options) *Client {
	if o.Fresh == 0 {
		o.Fresh = 10 * time.Second
	}
	host, _ := os.Hostname()
	var b [8]byte
	rand.Read(b[:])
	return &Client{o: o, instance: hex.EncodeToString(b[:]), host: host}
}

// Open opens the node's connection, creates or migrates the schema (or
// refuses a newer one, ErrSchemaVersion), takes the node's name (or refuses
// it while another running agent holds it, ErrNodeTaken) and records the
// node. The context bounds all of it.
func (c *Client) Open(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		return nil
	}
	return c.connect(ctx)
}

// Fatal reports whether err is one no retry mends: a newer schema, a name
// in use, another metric.
func Fatal(err error) bool {
	return errors.Is(err, ErrSchemaVersion) || errors.Is(err, ErrNodeTaken) || errors.Is(err, ErrMetric)
}

// Node returns the node's name.
func (c *Client) Node() string { return c.o.Node }

// nodeLock is the advisory lock key of a node name.
func nodeLock(name string) int64 {
	h := fnv.New64a()
	h.Write([]byte("bwagent node\x00" + name))
	return int64(h.Sum64())
}

func (c *Client) dial(ctx context.Context) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(c.o.DSN)
	if err != nil {
		return nil, fmt.Errorf("fleet.database: %w", err)
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 5 * time.Second
	}
	cfg.RuntimeParams["application_name"] = "bwagent " + c.o.Node
	return pgx.ConnectConfig(ctx, cfg)
}

// connect (re)opens Sync's connection: schema, name lock, node row.
func (c *Client) connect(ctx context.Context) (err error) {
	conn, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			conn.Close(context.Background())
		}
	}()
	if _, err := migrate(ctx, conn); err != nil {
		return err
	}
	var metric string
	if err := conn.QueryRow(ctx, `INSERT INTO settings (key, value) VALUES ('metric', $1)
		ON CONFLICT (key) DO UPDATE SET value = settings.value RETURNING value`, c.o.Metric.String()).Scan(&metric); err != nil {
		return err
	}
	if metric != c.o.Metric.String() {
		return fmt.Errorf("%w: the fleet counts %s, this node's metric is %s; give every node the same metric", ErrMetric, metric, c.o.Metric)
	}
	var ok bool
	if err := conn.QueryRow(ctx, "SELECT pg_try_advisory_lock($1)", nodeLock(c.o.Node)).Scan(&ok); err != nil {
		return err
	}
	if !ok {
		var host, since string
		var pid int
		conn.QueryRow(ctx, "SELECT host, pid, to_char(started_at, 'YYYY-MM-DD HH24:MI:SS TZ') FROM nodes WHERE name = $1", c.o.Node).Scan(&host, &pid, &since)
		return fmt.Errorf("%w: node %q is already run by another agent connected to the fleet database (host %s, pid %d, since %s); give each node its own [fleet] node",
			ErrNodeTaken, c.o.Node, host, pid, since)
	}
	if _, err := conn.Exec(ctx, `INSERT INTO nodes (name, instance, host, pid, version, started_at) VALUES ($1, $2, $3, $4, $5, now())
		ON CONFLICT (name) DO UPDATE SET instance = excluded.instance, host = excluded.host, pid = excluded.pid,
			version = excluded.version, started_at = CASE WHEN nodes.instance = excluded.instance THEN nodes.started_at ELSE now() END`,
		c.o.Node, c.instance, c.host, os.Getpid(), c.o.Version); err != nil {
		return err
	}
	c.conn = conn
	return nil
}

// Close closes the connection, which frees the node's name.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil {
		return nil
	}
	err := c.conn.Close(context.Background())
	c.conn = nil
	return err
}

// Usage is a node's cumulative count of a user in a usage period.
type Usage struct {
	Name     string
	Period   uint64
	Up, Down uint64
}

// LeaseReq asks for a user's lease in the period: Held is the ceiling the
// node enforces now (0: none), Rate its recent rate in bytes a second.
type LeaseReq struct {
	Name   string
	Period uint64
	Held   uint64
	Rate   uint64
}

// Event is a change of a user's standing a node records; the database
// keeps one row per (user, period, kind, rev), whichever nodes report it.
type Event struct {
	Name   string
	Period uint64
	Rev    uint64
	Kind   string
	Reason string
	At     time.Time
}

// Import is a hand edit of a node's limits file: the user's line as the
// file now has it (Line false: the file has none), applied unless the
// fleet's plan changed after At (the file's time).
type Import struct {
	Entry opsfiles.Entry
	Line  bool
	At    time.Time
}

// Rollover is a scheduled reset a node saw due: the user's period goes
// from From to From+1, once, whichever nodes report it.
type Rollover struct {
	Name string
	From uint64
	At   time.Time
}

// Report is what a node sends at a tick.
type Report struct {
	Usage     []Usage
	Leases    []LeaseReq
	Events    []Event
	Imports   []Import
	Rollovers []Rollover
}

// User is a user's global state as the database has it.
type User struct {
	Name   string
	Period uint64
	Rev    uint64
	// Line and Entry are the user's limits line (Entry.User is Name).
	Line         bool
	Entry        opsfiles.Entry
	PlanAt       time.Time // zero: never set
	Disabled     bool
	Unblocked    bool
	UnblockLimit uint64
	UnblockUntil time.Time
	LastReset    time.Time
	// Used is the sum of every node's usage in Period.
	Used quota.Usage
	// Nodes is how many nodes counted some of Used.
	Nodes int
}

// Grant is a node's new lease: the ceiling on its own count of the user in
// the period, in the metric.
type Grant struct {
	Name    string
	Period  uint64
	Ceiling uint64
}

// Result is what Sync returns.
type Result struct {
	// Users are the users that changed since the last Sync (every user at
	// the first), with the other nodes' usage.
	Users []User
	Full  bool
	// Grants are the leases granted for the report's LeaseReqs whose
	// user has a limit the leases enforce.
	Grants []Grant
	// Refused are the imports the fleet refused: its plan changed later.
	Refused []Import
	At      time.Time
}

// Sync sends a node's report and returns what changed, in one transaction
// and two round trips: the report applied and the users to grant locked
// and read, then the grants written and the changes read. On any error
// nothing of the report is applied; the next report (cumulative) carries it
// again. A lost connection is reopened at the next Sync.
func (c *Client) Sync(ctx context.Context, r *Report) (res *Result, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn == nil || c.conn.IsClosed() {
		if c.conn != nil {
			c.conn.Close(context.Background())
			c.conn = nil
		}
		if err := c.connect(ctx); err != nil {
			return nil, err
		}
	}
	defer func() {
		if err != nil && c.conn != nil {
			// An error leaves the transaction open or aborted; the
			// connection is not worth saving.
			c.conn.Close(context.Background())
			c.conn = nil
		}
	}()
	return c.sync(ctx, r)
}

func (c *Client) sync(ctx context.Context, r *Report) (*Result, error) {
	me := c.o.Node
	// The users whose plan rows this transaction locks, in name order (no
	// deadlock between nodes): every name of the report.
	lock := make([]string, 0, len(r.Usage)+len(r.Leases))
	for _, u := range r.Usage {
		lock = append(lock, u.Name)
	}
	for _, l := range r.Leases {
		lock = append(lock, l.Name)
	}
	for _, e := range r.Events {
		lock = append(lock, e.Name)
	}
	for _, i := range r.Imports {
		lock = append(lock, i.Entry.User)
	}
	for _, ro := range r.Rollovers {
		lock = append(lock, ro.Name)
	}
	slices.Sort(lock)
	lock = slices.Compact(lock)
	leaseNames := make([]string, len(r.Leases))
	for i, l := range r.Leases {
		leaseNames[i] = l.Name
	}

	// Round trip 1.
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	b.Queue("INSERT INTO plans (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING", lock)
	b.Queue("SELECT 1 FROM plans WHERE name = ANY($1) ORDER BY name FOR UPDATE", lock)
	if len(r.Rollovers) > 0 {
		names, from, at := rolloverCols(r.Rollovers)
		b.Queue(`UPDATE plans SET `+newPeriod("r.at")+`, rev = rev + 1, xid = pg_current_xact_id()
			FROM unnest($1::text[], $2::bigint[], $3::timestamptz[]) AS r(name, from_period, at)
			WHERE plans.name = r.name AND plans.period = r.from_period`, names, from, at)
	}
	if len(r.Imports) > 0 {
		cols := importCols(r.Imports)
		b.Queue(`UPDATE plans SET has_line = i.line, limit_bytes = i.lim, reset = i.reset, expires = i.expires, devices = i.devices,
				plan_at = i.at, speed = i.speed, throttle = i.throttle, rev = rev + 1, xid = pg_current_xact_id()
			FROM unnest($1::text[], $2::boolean[], $3::bigint[], $4::text[], $5::text[], $6::integer[], $7::timestamptz[],
				$8::text[], $9::text[])
				AS i(name, line, lim, reset, expires, devices, at, speed, throttle)
			WHERE plans.name = i.name AND (plans.plan_at IS NULL OR plans.plan_at < i.at)
			RETURNING plans.name`, cols...)
	}
	if len(r.Usage) > 0 {
		names := make([]string, len(r.Usage))
		period, up, down := make([]int64, len(r.Usage)), make([]int64, len(r.Usage)), make([]int64, len(r.Usage))
		for i, u := range r.Usage {
			names[i], period[i], up[i], down[i] = u.Name, int64(u.Period), int64(u.Up), int64(u.Down)
		}
		b.Queue(`INSERT INTO usage (name, period, node, up, down, updated_at, xid)
			SELECT n, p, $5, u, d, now(), pg_current_xact_id() FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS r(n, p, u, d)
			ON CONFLICT (name, period, node) DO UPDATE SET up = GREATEST(usage.up, excluded.up), down = GREATEST(usage.down, excluded.down),
				updated_at = excluded.updated_at, xid = excluded.xid
			WHERE usage.up < excluded.up OR usage.down < excluded.down`, names, period, up, down, me)
		// The period's sums in the plans rows (locked above), from the
		// rows: exact whatever any report did before.
		b.Queue(`UPDATE plans p SET used_up = s.up, used_down = s.down, xid = pg_current_xact_id()
			FROM (SELECT u.name, sum(u.up)::bigint AS up, sum(u.down)::bigint AS down FROM usage u
				JOIN plans q ON q.name = u.name AND q.period = u.period WHERE u.name = ANY($1) GROUP BY u.name) s
			WHERE p.name = s.name AND (p.used_up <> s.up OR p.used_down <> s.down)`, names)
	}
	if len(r.Events) > 0 {
		n := len(r.Events)
		names, kinds, reasons := make([]string, n), make([]string, n), make([]string, n)
		period, rev := make([]int64, n), make([]int64, n)
		at := make([]time.Time, n)
		for i, e := range r.Events {
			names[i], kinds[i], reasons[i], period[i], rev[i], at[i] = e.Name, e.Kind, e.Reason, int64(e.Period), int64(e.Rev), e.At
		}
		b.Queue(`INSERT INTO events (name, period, kind, rev, node, at, reason)
			SELECT n, p, k, r, $7, a, why FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::timestamptz[], $6::text[]) AS e(n, p, k, r, a, why)
			ON CONFLICT DO NOTHING`, names, period, kinds, rev, at, reasons, me)
	}
	if len(leaseNames) > 0 {
		b.Queue(`SELECT name, period, limit_bytes, disabled OR unblocked OR NOT has_line OR limit_bytes = 0 FROM plans WHERE name = ANY($1)`, leaseNames)
		b.Queue(`SELECT l.name, l.node, l.ceiling, l.rate, l.updated_at > now() - $2::interval
			FROM leases l JOIN plans p ON p.name = l.name AND p.period = l.period WHERE l.name = ANY($1)`, leaseNames, c.o.Fresh)
		b.Queue(`SELECT u.name, u.node, u.up, u.down, u.updated_at > now() - $2::interval FROM usage u JOIN plans p ON p.name = u.name AND p.period = u.period
			WHERE u.name = ANY($1)`, leaseNames, c.o.Fresh)
	}
	res := &Result{}
	type planRow struct {
		period  uint64
		limit   uint64
		nolease bool
	}
	plans := map[string]planRow{}
	holders := map[string][]holder{}
	br := c.conn.SendBatch(ctx, b)
	c.RoundTrips++
	err := func() error {
		for range 3 {
			if _, err := br.Exec(); err != nil {
				return err
			}
		}
		if len(r.Rollovers) > 0 {
			if _, err := br.Exec(); err != nil {
				return err
			}
		}
		if len(r.Imports) > 0 {
			rows, err := br.Query()
			if err != nil {
				return err
			}
			accepted := map[string]bool{}
			for rows.Next() {
				var n string
				if err := rows.Scan(&n); err != nil {
					return err
				}
				accepted[n] = true
			}
			if err := rows.Err(); err != nil {
				return err
			}
			for _, i := range r.Imports {
				if !accepted[i.Entry.User] {
					res.Refused = append(res.Refused, i)
				}
			}
		}
		for _, n := range []int{len(r.Usage), len(r.Usage), len(r.Events)} {
			if n > 0 {
				if _, err := br.Exec(); err != nil {
					return err
				}
			}
		}
		if len(leaseNames) == 0 {
			return nil
		}
		rows, err := br.Query()
		if err != nil {
			return err
		}
		for rows.Next() {
			var n string
			var p planRow
			var period, limit int64
			if err := rows.Scan(&n, &period, &limit, &p.nolease); err != nil {
				return err
			}
			p.period, p.limit = uint64(period), uint64(limit)
			plans[n] = p
		}
		if err := rows.Err(); err != nil {
			return err
		}
		type key struct{ name, node string }
		idx := map[key]int{}
		at := func(name, node string) *holder {
			k := key{name, node}
			i, ok := idx[k]
			if !ok {
				i = len(holders[name])
				idx[k] = i
				holders[name] = append(holders[name], holder{node: node})
			}
			return &holders[name][i]
		}
		if rows, err = br.Query(); err != nil {
			return err
		}
		for rows.Next() {
			var n, node string
			var ceiling, rate int64
			var fresh bool
			if err := rows.Scan(&n, &node, &ceiling, &rate, &fresh); err != nil {
				return err
			}
			h := at(n, node)
			h.ceiling, h.rate, h.fresh = uint64(ceiling), uint64(rate), fresh
		}
		if err := rows.Err(); err != nil {
			return err
		}
		if rows, err = br.Query(); err != nil {
			return err
		}
		for rows.Next() {
			var n, node string
			var up, down int64
			var fresh bool
			if err := rows.Scan(&n, &node, &up, &down, &fresh); err != nil {
				return err
			}
			h := at(n, node)
			h.used = c.o.Metric.Of(quota.Usage{Up: uint64(up), Down: uint64(down)})
			h.fresh = h.fresh || fresh
		}
		return rows.Err()
	}()
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}

	// The grants, then round trip 2.
	var gNames, gNodes []string
	var gPeriod, gCeil, gRate []int64
	var touch []string
	for _, l := range r.Leases {
		p, ok := plans[l.Name]
		if !ok || p.nolease || p.period != l.Period {
			continue
		}
		ceiling, record, starved := grant(p.limit, me, l.Held, l.Rate, holders[l.Name])
		if starved || ceiling < l.Held {
			// Another node holds what this one needs, or this one gives
			// room back: the user's row changes, so every node renews its
			// lease at its next sync (an idle one gives room back, a
			// starved one takes it).
			touch = append(touch, l.Name)
		}
		res.Grants = append(res.Grants, Grant{Name: l.Name, Period: l.Period, Ceiling: ceiling})
		gNames, gNodes = append(gNames, l.Name), append(gNodes, me)
		gPeriod, gCeil, gRate = append(gPeriod, int64(l.Period)), append(gCeil, int64(record)), append(gRate, int64(l.Rate))
	}
	b = &pgx.Batch{}
	if len(gNames) > 0 {
		b.Queue(`INSERT INTO leases (name, node, period, ceiling, rate, updated_at)
			SELECT n, node, p, c, r, now() FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[]) AS g(n, node, p, c, r)
			ON CONFLICT (name, node) DO UPDATE SET period = excluded.period, ceiling = excluded.ceiling, rate = excluded.rate, updated_at = excluded.updated_at`,
			gNames, gNodes, gPeriod, gCeil, gRate)
	}
	if len(touch) > 0 {
		b.Queue("UPDATE plans SET xid = pg_current_xact_id() WHERE name = ANY($1)", touch)
	}
	b.Queue("UPDATE nodes SET last_report = now(), reports = reports + 1 WHERE name = $1 AND instance = $2", me, c.instance)
	b.Queue("SELECT pg_snapshot_xmin(pg_current_snapshot())::text, now()")
	full, since := c.xmin == "", c.xmin
	if full {
		b.Queue(userSelect)
	} else {
		b.Queue(userSelect+` WHERE p.xid >= $1::text::xid8`, since)
	}
	b.Queue("COMMIT")
	br = c.conn.SendBatch(ctx, b)
	c.RoundTrips++
	var xmin string
	err = func() error {
		for _, n := range []int{len(gNames), len(touch)} {
			if n > 0 {
				if _, err := br.Exec(); err != nil {
					return err
				}
			}
		}
		if _, err := br.Exec(); err != nil {
			return err
		}
		if err := br.QueryRow().Scan(&xmin, &res.At); err != nil {
			return err
		}
		rows, err := br.Query()
		if err != nil {
			return err
		}
		res.Users, err = scanUsers(rows)
		if err != nil {
			return err
		}
		_, err = br.Exec()
		return err
	}()
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	c.xmin, res.Full = xmin, full
	return res, nil
}

// userSelect reads users.
const userSelect = `SELECT p.name, p.period, p.rev, p.has_line, p.limit_bytes, p.reset, p.expires, p.devices, p.plan_at,
	p.disabled, p.unblocked, p.unblock_limit, p.unblock_until, p.last_reset, p.used_up, p.used_down, p.speed, p.throttle,
	(SELECT count(*) FROM usage u WHERE u.name = p.name AND u.period = p.period AND (u.up > 0 OR u.down > 0))
	FROM plans p`

func scanUsers(rows pgx.Rows) ([]User, error) {
	var out []User
	for rows.Next() {
		var u User
		var period, rev, limit, ulimit, up, down, nodes int64
		var reset, expires, speed, throttle string
		var devices int32
		var planAt, until, lastReset *time.Time
		if err := rows.Scan(&u.Name, &period, &rev, &u.Line, &limit, &reset, &expires, &devices, &planAt,
			&u.Disabled, &u.Unblocked, &ulimit, &until, &lastReset, &up, &down, &speed, &throttle, &nodes); err != nil {
			return nil, err
		}
		u.Period, u.Rev, u.UnblockLimit = uint64(period), uint64(rev), uint64(ulimit)
		sched, err := quota.ParseSchedule(reset)
		if err != nil {
			return nil, fmt.Errorf("plan of %q in the fleet database: reset %q: %w", u.Name, reset, err)
		}
		u.Entry = opsfiles.Entry{User: u.Name, Limit: uint64(limit), Reset: sched, Expires: expires, Devices: quota.DeviceLimit(devices)}
		for _, c := range []struct {
			what, text string
			dst        *quota.Speed
		}{{"speed", speed, &u.Entry.Speed}, {"throttle", throttle, &u.Entry.Throttle}} {
			if c.text == "" {
				continue
			}
			if *c.dst, err = quota.ParseSpeed(c.text); err != nil {
				return nil, fmt.Errorf("plan of %q in the fleet database: %s %q: %w", u.Name, c.what, c.text, err)
			}
		}
		for _, p := range []struct {
			src *time.Time
			dst *time.Time
		}{{planAt, &u.PlanAt}, {until, &u.UnblockUntil}, {lastReset, &u.LastReset}} {
			if p.src != nil {
				*p.dst = *p.src
			}
		}
		u.Used, u.Nodes = quota.Usage{Up: uint64(up), Down: uint64(down)}, int(nodes)
		out = append(out, u)
	}
	return out, rows.Err()
}

func rolloverCols(rs []Rollover) ([]string, []int64, []time.Time) {
	names, from, at := make([]string, len(rs)), make([]int64, len(rs)), make([]time.Time, len(rs))
	for i, r := range rs {
		names[i], from[i], at[i] = r.Name, int64(r.From), r.At
	}
	return names, from, at
}

func importCols(is []Import) []any {
	n := len(is)
	names, resets, expires := make([]string, n), make([]string, n), make([]string, n)
	lines := make([]bool, n)
	lims := make([]int64, n)
	devices := make([]int32, n)
	at := make([]time.Time, n)
	speeds, throttles := make([]string, n), make([]string, n)
	for i, im := range is {
		e := im.Entry
		names[i], lines[i], lims[i], devices[i], at[i] = e.User, im.Line, int64(e.Limit), int32(e.Devices), im.At
		expires[i] = e.Expires
		if e.Reset.Period != quota.NoReset {
			resets[i] = e.Reset.String()
		}
		if !e.Speed.IsZero() {
			speeds[i] = e.Speed.String()
		}
		if !e.Throttle.IsZero() {
			throttles[i] = e.Throttle.String()
		}
	}
	return []any{names, lines, lims, resets, expires, devices, at, speeds, throttles}
}

// command runs fn in a transaction on a connection of its own, bounded by
// ctx, and returns the user's state after it (with every node's usage).
func (c *Client) command(ctx context.Context, name string, fn func(tx pgx.Tx) (bool, error)) (User, error) {
	conn, err := c.dial(ctx)
	if err != nil {
		return User{}, fmt.Errorf("fleet database unreachable, nothing changed: %w", err)
	}
	defer conn.Close(context.Background())
	tx, err := conn.Begin(ctx)
	if err != nil {
		return User{}, err
	}
	defer tx.Rollback(ctx)
	found, err := fn(tx)
	if err != nil {
		return User{}, err
	}
	if !found {
		return User{}, fmt.Errorf("%w %q: no node of the fleet has seen it", ErrUnknownUser, name)
	}
	rows, err := tx.Query(ctx, userSelect+" WHERE p.name = $1", name)
	if err != nil {
		return User{}, err
	}
	us, err := scanUsers(rows)
	if err != nil {
		return User{}, err
	}
	if len(us) != 1 {
		return User{}, fmt.Errorf("%w %q", ErrUnknownUser, name)
	}
	return us[0], tx.Commit(ctx)
}

// update runs an UPDATE of the user's plan row (set: the SET list, its
// arguments from $2 on) and reports whether the user exists.
func update(ctx context.Context, tx pgx.Tx, name, set string, args ...any) (bool, error) {
	ct, err := tx.Exec(ctx, "UPDATE plans SET "+set+", rev = rev + 1, xid = pg_current_xact_id() WHERE name = $1", append([]any{name}, args...)...)
	return ct.RowsAffected() == 1, err
}

func (c *Client) event(ctx context.Context, tx pgx.Tx, name, kind, reason string, at time.Time) error {
	_, err := tx.Exec(ctx, `INSERT INTO events (name, period, kind, rev, node, at, reason)
		SELECT name, period, $2, rev, $3, $4, $5 FROM plans WHERE name = $1 ON CONFLICT DO NOTHING`, name, kind, c.o.Node, at, reason)
	return err
}

// newPeriod is the SET list of a plan's new usage period, reset at the
// SQL expression at: a rollover, Reset and ResetAll.
func newPeriod(at string) string {
	return "period = period + 1, last_reset = " + at + ", unblocked = false, used_up = 0, used_down = 0"
}

// reasonReset is the reason of a reset's event.
const reasonReset = "Usage reset"

// Reset starts a new usage period for the user on every node: the usage
// counted against the limit restarts from zero, a manual unblock ends.
func (c *Client) Reset(ctx context.Context, name string, at time.Time) (User, error) {
	return c.command(ctx, name, func(tx pgx.Tx) (bool, error) {
		ok, err := update(ctx, tx, name, newPeriod("$2"), at)
		if ok && err == nil {
			err = c.event(ctx, tx, name, quota.ActReset, reasonReset, at)
		}
		return ok, err
	})
}

// ResetAll resets every user the fleet knows and returns how many.
func (c *Client) ResetAll(ctx context.Context, at time.Time) (int, error) {
	conn, err := c.dial(ctx)
	if err != nil {
		return 0, fmt.Errorf("fleet database unreachable, nothing changed: %w", err)
	}
	defer conn.Close(context.Background())
	tx, err := conn.Begin(ctx)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, "SELECT 1 FROM plans ORDER BY name FOR UPDATE"); err != nil {
		return 0, err
	}
	ct, err := tx.Exec(ctx, "UPDATE plans SET "+newPeriod("$1")+", rev = rev + 1, xid = pg_current_xact_id()", at)
	if err != nil {
		return 0, err
	}
	if _, err := tx.Exec(ctx, `INSERT INTO events (name, period, kind, rev, node, at, reason)
		SELECT name, period, $3, rev, $1, $2, $4 FROM plans ON CONFLICT DO NOTHING`, c.o.Node, at, quota.ActReset, reasonReset); err != nil {
		return 0, err
	}
	return int(ct.RowsAffected()), tx.Commit(ctx)
}

// Disable disables the user on every node until Enable.
func (c *Client) Disable(ctx context.Context, name string, at time.Time) (User, error) {
	return c.command(ctx, name, func(tx pgx.Tx) (bool, error) {
		ok, err := update(ctx, tx, name, "disabled = true")
		if ok && err == nil {
			err = c.event(ctx, tx, name, quota.ActDisable, quota.ReasonDisabled, at)
		}
		return ok, err
	})
}

// Enable lifts Disable.
func (c *Client) Enable(ctx context.Context, name string, at time.Time) (User, error) {
	return c.command(ctx, name, func(tx pgx.Tx) (bool, error) {
		ok, err := update(ctx, tx, name, "disabled = false")
		if ok && err == nil {
			err = c.event(ctx, tx, name, quota.ActEnable, "Enabled by administrator", at)
		}
		return ok, err
	})
}

// Unblock lets the user past the limit of now on every node until a reset,
// a higher limit or until (zero: no end).
func (c *Client) Unblock(ctx context.Context, name string, until, at time.Time) (User, error) {
	var u *time.Time
	if !until.IsZero() {
		u = &until
	}
	return c.command(ctx, name, func(tx pgx.Tx) (bool, error) {
		ok, err := update(ctx, tx, name, "unblocked = true, unblock_limit = limit_bytes, unblock_until = $2", u)
		if ok && err == nil {
			err = c.event(ctx, tx, name, quota.ActUnblock, "Unblocked manually", at)
		}
		return ok, err
	})
}

// EditPlan changes the user's limits line: edit gets the current entry and
// whether the user has a line, and sets them.
func (c *Client) EditPlan(ctx context.Context, name string, at time.Time, edit func(e *opsfiles.Entry, line *bool) error) (User, error) {
	return c.command(ctx, name, func(tx pgx.Tx) (bool, error) {
		rows, err := tx.Query(ctx, userSelect+" WHERE p.name = $1 FOR UPDATE OF p", name)
		if err != nil {
			return false, err
		}
		us, err := scanUsers(rows)
		if err != nil || len(us) == 0 {
			return false, err
		}
		e, line := us[0].Entry, us[0].Line
		if err := edit(&e, &line); err != nil {
			return true, err
		}
		cols := importCols([]Import{{Entry: e, Line: line, At: at}})
		_, err = update(ctx, tx, name, "has_line = $2, limit_bytes = $3, reset = $4, expires = $5, devices = $6, plan_at = $7, speed = $8, throttle = $9",
			cols[1].([]bool)[0], cols[2].([]int64)[0], cols[3].([]string)[0], cols[4].([]string)[0], cols[5].([]int32)[0], at,
			cols[7].([]string)[0], cols[8].([]string)[0])
		return true, err
	})
}

// Node is a node of the fleet as the database has it.
type Node struct {
	Name       string
	Host       string
	PID        int
	Version    string
	Started    time.Time
	LastReport time.Time // zero: never
	Reports    uint64
	Online     bool // its connection holds the name now
}

// Nodes lists the fleet's nodes, and the database's clock, on Sync's
// connection when it has one (it waits for a Sync under way).
func (c *Client) Nodes(ctx context.Context) ([]Node, time.Time, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	conn := c.conn
	if conn == nil {
		var err error
		if conn, err = c.dial(ctx); err != nil {
			return nil, time.Time{}, err
		}
		defer conn.Close(context.Background())
	}
	var now time.Time
	if err := conn.QueryRow(ctx, "SELECT now()").Scan(&now); err != nil {
		return nil, now, err
	}
	rows, err := conn.Query(ctx, `SELECT name, host, pid, version, started_at, last_report, reports FROM nodes ORDER BY name`)
	if err != nil {
		return nil, now, err
	}
	defer rows.Close()
	var out []Node
	for rows.Next() {
		var n Node
		var last *time.Time
		var reports int64
		if err := rows.Scan(&n.Name, &n.Host, &n.PID, &n.Version, &n.Started, &last, &reports); err != nil {
			return nil, now, err
		}
		if last != nil {
			n.LastReport = *last
		}
		n.Reports = uint64(reports)
		out = append(out, n)
	}
	if err := rows.Err(); err != nil {
		return nil, now, err
	}
	// Online: the node's name lock is held by a live session. The granted
	// advisory locks, read once.
	lrows, err := conn.Query(ctx, `SELECT classid::bigint, objid::bigint FROM pg_locks
		WHERE locktype = 'advisory' AND granted AND objsubid = 1`)
	if err != nil {
		return nil, now, err
	}
	defer lrows.Close()
	held := make(map[uint64]bool)
	for lrows.Next() {
		var hi, lo int64
		if err := lrows.Scan(&hi, &lo); err != nil {
			return nil, now, err
		}
		held[uint64(hi)<<32|uint64(lo)] = true
	}
	if err := lrows.Err(); err != nil {
		return nil, now, err
	}
	for i := range out {
		out[i].Online = held[uint64(nodeLock(out[i].Name))]
	}
	return out, now, nil
}

// Share is one node's usage of a user in the current period.
type Share struct {
	Node     string
	Up, Down uint64
	Ceiling  uint64 // the node's lease (0: none)
}

// Shares returns each node's usage of the user in the current period.
func (c *Client) Shares(ctx context.Context, name string) ([]Share, error) {
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	var period int64
	if err := conn.QueryRow(ctx, "SELECT period FROM plans WHERE name = $1", name).Scan(&period); err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, fmt.Errorf("%w %q", ErrUnknownUser, name)
		}
		return nil, err
	}
	rows, err := conn.Query(ctx, `SELECT u.node, u.up, u.down, coalesce(l.ceiling, 0) FROM usage u
		LEFT JOIN leases l ON l.name = u.name AND l.node = u.node AND l.period = u.period
		WHERE u.name = $1 AND u.period = $2 ORDER BY u.node`, name, period)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Share
	for rows.Next() {
		var s Share
		var up, down, ceil int64
		if err := rows.Scan(&s.Node, &up, &down, &ceil); err != nil {
			return nil, err
		}
		s.Up, s.Down, s.Ceiling = uint64(up), uint64(down), uint64(ceil)
		out = append(out, s)
	}
	return out, rows.Err()
}

// Describe returns a DSN without its password, for logs.
func Describe(dsn string) string {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return "(invalid)"
	}
	host := cfg.Host
	if strings.HasPrefix(host, "/") {
		host = "unix:" + host
	}
	return fmt.Sprintf("%s@%s:%d/%s", cfg.User, host, cfg.Port, cfg.Database)
}
