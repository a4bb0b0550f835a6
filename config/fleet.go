package config

import (
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// Fleet turns on fleet mode: one quota per user across servers, kept in a
// PostgreSQL database every node reaches (package fleet). Off while
// Database is "".
type Fleet struct {
	// Database is a PostgreSQL connection string as pgx takes it: a URL
	// (postgres://user:password@host:5432/bwagent) or key=value pairs
	// (host=db.example port=5432 dbname=bwagent user=bwagent). "" (the
	// default): no fleet, this server's limits are its own.
	Database string
	// Node is this server's name in the fleet, unique among the nodes:
	// 1 to 63 letters, digits, '.', '_' or '-'. "" (the default) is the
	// host name.
	Node string
}

// Enabled reports whether fleet mode is on.
func (f Fleet) Enabled() bool { return f.Database != "" }

var fleetTableDefs = []tableDef{
	{"fleet", `Fleet mode: one quota per user across many servers, in one PostgreSQL
database (15 or later) every server reaches. Off while database is "".
Changing a key here needs a restart.`},
}

var fleetKeyDefs = []*keyDef{
	stringKey("fleet.database", `The PostgreSQL connection string, a URL such as
"postgres://bwagent:secret@db.example:5432/bwagent" or key=value pairs
such as "host=db.example dbname=bwagent user=bwagent"; "" is no fleet.`,
		func(c *Config) *string { return &c.Fleet.Database }, checkDSN),
	stringKey("fleet.node", `This server's name in the fleet, unique among its servers: 1 to 63
letters, digits, '.', '_' or '-'; "" is the host name.`,
		func(c *Config) *string { return &c.Fleet.Node }, checkNodeName),
}

func checkDSN(s string) error {
	if s == "" {
		return nil
	}
	if _, err := pgconn.ParseConfig(s); err != nil {
		// pgconn's message quotes the string, password included.
		msg := err.Error()
		if i := strings.LastIndex(msg, ": "); i >= 0 {
			msg = msg[i+2:]
		}
		return invalidf("must be a PostgreSQL connection string (a postgres:// URL or key=value pairs): %s", msg)
	}
	return nil
}

// ValidNodeName reports whether s is a valid fleet.node.
func ValidNodeName(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return false
		}
	}
	return true
}

func checkNodeName(s string) error {
	if s == "" || ValidNodeName(s) {
		return nil
	}
	return invalidf("must be 1 to 63 letters, digits, '.', '_' or '-', or \"\" for the host name, got %s", fmt.Sprintf("%q", s))
}
