// Command bwctl controls bwagent, the bandwidth-quota agent, through its
// control socket.
//
// Usage:
//
//	bwctl [global flags] COMMAND [ARGS] [global flags]
//
// Commands:
//
//	set USER LIMIT [--protocol P]
//	                          set USER's limit: a bare number is MiB (10240),
//	                          or 500M, 10G, 1.5T, unlimited; with --protocol
//	                          only if USER connects with P (ssh, vmess, vless,
//	                          trojan or shadowsocks), else nothing changes
//	remove-limit USER         remove USER's limit (a device limit and speed
//	                          caps stay)
//	devices [USER]            list USER's devices (default: your own)
//	devices USER N|off|unlimited
//	                          allow USER N devices at once (1 to 1000); off:
//	                          the configured default applies; unlimited:
//	                          no device limit for USER
//	speed USER RATE|DOWN/UP|off
//	                          cap USER's speed, each direction: 20mbit, or
//	                          10mbit/2mbit (download/upload), as tc writes
//	                          rates (kbit, mbit, gbit); off: the default
//	throttle USER RATE|DOWN/UP|off
//	                          at the limit, slow USER to RATE (THROTTLED)
//	                          instead of blocking; off: the default
//	usage [USER]              show one user's usage (default: your own)
//	list [--status STATUS]    list users (STATUS: active, warning, blocked,
//	                          throttled, unlimited or disabled)
//	blocked                   list blocked and disabled users
//	reset USER | --all        zero the usage of USER, or of every user
//	disable USER              block USER until enabled
//	enable USER               lift disable
//	unblock USER [--for D]    let a blocked USER back in, for D (1h, 2d) or
//	                          until the next reset
//	history USER [--from DAY] [--to DAY]
//	                          daily usage (DAY: YYYY-MM-DD)
//	status                    the agent's health
//	check                     run a check (tick) now
//	version                   print bwctl's version
//	menu                      interactive menu of the commands
//	completion bash|zsh|fish  print a shell completion script
//
// Global flags, before or after the command:
//
//	-o table|json   output format (default table)
//	--socket PATH   control socket (default: control socket of
//	                /etc/bwagent/bwagent.toml, else /run/bwagent/bwagent.sock)
//	--bytes         print byte counts instead of KiB, MiB, GiB, TiB
//
// Exit status: 0 on success, 1 when an operation failed (also when bwagent
// is not running), 2 on wrong usage. Arguments are checked before bwctl
// connects, so wrong usage changes nothing.
//
// # JSON output
//
// With -o json every command prints exactly one JSON document followed by a
// newline. Sizes are numbers of bytes; times are RFC 3339 strings in UTC, or
// null for none. The documents are:
//
//   - list, blocked: an array of user objects; usage: one user object:
//     {"name", "protocol", "uid", "present", "status", "used", "limit"
//     (0 = unlimited), "remaining" (0 when unlimited), "upload", "download",
//     "today", "reason", "block_time", "last_reset", "next_reset", "expires",
//     "updated", "manual_unblock" (bool), "manual_unblock_until",
//     "protocols" (the user's sources now: ["ssh"], ["vless"], or
//     ["ssh", "vless"] for a user who is both; [] for one who left),
//     "devices" (devices connected now), "devices_limit" (null without a
//     device limit), "speed_down" and "speed_up" (the caps in force now in
//     bits per second, the throttle rate while THROTTLED; null without
//     one)}.
//   - devices USER: an array of {"address" ("203.0.113.7",
//     "2001:db8:1:2::/64", or "127.0.0.1:40312" for a connection through a
//     proxy on the server), "protocols", "connections", "since" (its
//     oldest open connection; null if open before the agent started),
//     "bytes" (TCP payload its open connections moved, both ways),
//     "refused" (over the limit: its connections are being cut)}.
//   - history: an array of {"day", "upload", "download", "total"}.
//   - status: {"last_tick", "tick_duration_ns", "users", "errors",
//     "notify"} where errors is an object of subject → message ({} when
//     healthy) and notify an array of the notification channels: {"name",
//     "backlog", "delivered", "expired", "attempts", "next_try",
//     "last_error", "last_error_time"} ([] when none is configured).
//   - reset --all: {"ok": true, "count": N}.
//   - version: {"version"}.
//   - every other changing command: {"ok": true}.
//
// Errors go to standard error as text in both modes.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/quota"
	"google.golang.org/grpc/codes"
)

// version is bwctl's version, set at build time with
// -ldflags "-X main.version=...".
var version = "dev"

// Exit statuses.
const (
	exitOK    = 0
	exitFail  = 1
	exitUsage = 2
)

func main() { os.Exit(run(os.Args[1:], os.Stdout, os.Stderr)) }

// stdin is the input of interactive commands; tests replace it.
var stdin io.Reader = os.Stdin

// errWrongProtocol is set --protocol's refusal: the user connects with
// another protocol.
var errWrongProtocol = errors.New("wrong protocol")

// usageError is wrong usage: exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// opts are the global flags.
type opts struct {
	output string
	socket string
	bytes  bool
	color  bool
}

func (o *opts) register(fs *flag.FlagSet) {
	fs.StringVar(&o.output, "o", o.output, "output `format`: table or json")
	fs.StringVar(&o.socket, "socket", o.socket, "control socket `path`")
	fs.BoolVar(&o.bytes, "bytes", o.bytes, "print byte counts instead of KiB..TiB")
}

// command is one bwctl command.
type command struct {
	args  string // usage of the arguments
	flags func(fs *flag.FlagSet) func() any
	run   func(ctx context.Context, e *env) error
}

// env is what a command runs with.
type env struct {
	o      *opts
	args   []string
	flags  any // the command's own flag values
	out    io.Writer
	errOut io.Writer
	in     io.Reader // standard input, for interactive commands
	client func(ctx context.Context) (*control.Client, error)
}

const usageText = `usage: bwctl [-o table|json] [--socket PATH] [--bytes] COMMAND [ARGS]

commands:
  set USER LIMIT [--protocol P]
                           set a limit: MiB (10240) or 500M, 10G, 1.5T, unlimited;
                           with --protocol only if the user connects with P
  remove-limit USER        remove a user's limit (devices and speed stay)
  devices [USER]           list a user's devices (default: your own)
  devices USER N|off|unlimited
                           allow a user N devices at once; off: the default
  speed USER RATE|DOWN/UP|off
                           cap a user's speed: 20mbit, 10mbit/2mbit (down/up)
  throttle USER RATE|DOWN/UP|off
                           at the limit, slow a user to RATE instead of blocking
  usage [USER]             show a user's usage (default: your own)
  list [--status STATUS]   list users
  blocked                  list blocked and disabled users
  reset USER | --all       zero a user's usage, or every user's
  disable USER             block a user until enabled
  enable USER              lift disable
  unblock USER [--for D]   let a blocked user back in (for D: 1h, 2d)
  history USER [--from DAY] [--to DAY]
                           daily usage (DAY: YYYY-MM-DD)
  status                   the agent's health
  check                    run a check now
  version                  print bwctl's version
  menu                     interactive menu of the commands
  monitor                  live view of every user's rate and usage; q quits
  completion bash|zsh|fish print a shell completion script
`

// run runs bwctl with args (without the program name) and returns the exit
// status.
func run(args []string, stdout, stderr io.Writer) int {
	o := &opts{output: "table"}
	gfs := flag.NewFlagSet("bwctl", flag.ContinueOnError)
	gfs.SetOutput(io.Discard)
	o.register(gfs)
	if err := gfs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(stdout, usageText)
			return exitOK
		}
		fmt.Fprintf(stderr, "bwctl: %v\n%s", err, usageText)
		return exitUsage
	}
	rest := gfs.Args()
	if len(rest) == 0 {
		fmt.Fprintf(stderr, "bwctl: no command given\n%s", usageText)
		return exitUsage
	}
	name := rest[0]
	if name == "help" {
		fmt.Fprint(stdout, usageText)
		return exitOK
	}
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(stderr, "bwctl: unknown command %q: run `bwctl help` for the list of commands\n", name)
		return exitUsage
	}
	e := &env{o: o, out: stdout, errOut: stderr, in: stdin}
	err := prepare(name, cmd, rest[1:], e)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(stdout, "usage: bwctl %s %s\n", name, cmd.args)
		return exitOK
	}
	if err == nil {
		err = run1(cmd, e)
	}
	if err != nil {
		var ue *usageError
		if errors.As(err, &ue) {
			fmt.Fprintf(stderr, "bwctl %s: %v\nusage: bwctl %s %s\n", name, err, name, cmd.args)
			return exitUsage
		}
		fmt.Fprintf(stderr, "bwctl %s: %v\n", name, explain(err))
		return exitFail
	}
	return exitOK
}

// prepare parses the command's flags (and global flags among them) and
// checks the global flags.
func prepare(name string, cmd command, args []string, e *env) error {
	fs := flag.NewFlagSet("bwctl "+name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	e.o.register(fs)
	var vals func() any
	if cmd.flags != nil {
		vals = cmd.flags(fs)
	}
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usagef("%v", err)
	}
	e.args = pos
	if vals != nil {
		e.flags = vals()
	}
	switch e.o.output {
	case "table", "json":
	default:
		return usagef("unknown output format %q: use -o table or -o json", e.o.output)
	}
	e.o.color = e.o.output == "table" && colorful(e.out)
	return nil
}

// parseInterleaved parses flags anywhere among the positional arguments,
// which it returns. An argument that looks like a negative number is
// positional, so that `set john -5` is refused as a bad limit.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
		for len(args) > 0 && negative(args[0]) {
			pos = append(pos, args[0])
			args = args[1:]
		}
	}
}

func negative(s string) bool {
	return len(s) > 1 && s[0] == '-' && (s[1] >= '0' && s[1] <= '9' || s[1] == '.')
}

// run1 validates the arguments and runs the command against the socket.
func run1(cmd command, e *env) error {
	e.client = func(ctx context.Context) (*control.Client, error) {
		return control.Dial(ctx, socketPath(e.o.socket, e.errOut))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return cmd.run(ctx, e)
}

// socketPath is the --socket flag, else the configured socket. A broken
// configuration file is reported on warn and the default socket used.
func socketPath(flagged string, warn io.Writer) string {
	if flagged != "" {
		return flagged
	}
	c, err := config.Load("")
	if err != nil {
		def := config.Default().Paths.Socket
		fmt.Fprintf(warn, "bwctl: warning: %v; trying the default socket %s (give --socket PATH to choose)\n", err, def)
		return def
	}
	return c.Paths.Socket
}

// explain adds what to do to a failed call's message.
func explain(err error) string {
	msg := err.Error()
	switch control.Code(err) {
	case codes.NotFound:
		if strings.Contains(msg, "unknown user") {
			msg += "; `bwctl list` shows the users bwagent knows"
		}
	case codes.PermissionDenied:
		msg += "; run bwctl as root (sudo bwctl ...)"
	case codes.Unavailable:
		msg += "; is bwagent running? `systemctl status bwagent`"
	case codes.Internal:
		msg += "; see bwagent's log: `journalctl -u bwagent`"
	}
	return msg
}

// args checks the number of positional arguments.
func (e *env) want(min, max int) error {
	switch n := len(e.args); {
	case n < min:
		return usagef("missing argument")
	case n > max:
		return usagef("too many arguments: %q", e.args[max:])
	}
	return nil
}

// user checks that the command has exactly one user name argument.
func (e *env) user() (string, error) {
	if err := e.want(1, 1); err != nil {
		return "", err
	}
	return checkName(e.args[0])
}

func checkName(name string) (string, error) {
	if err := quota.ValidName(name); err != nil {
		return "", usagef("%v: give the user's account name or Xray email", err)
	}
	return name, nil
}

// do dials and runs f with the client.
func (e *env) do(ctx context.Context, f func(c *control.Client) error) error {
	c, err := e.client(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	return f(c)
}

// ok prints a changing command's confirmation.
func (e *env) ok(msg string) error {
	if e.o.output == "json" {
		return writeJSON(e.out, map[string]bool{"ok": true})
	}
	_, err := fmt.Fprintln(e.out, msg)
	return err
}

// simple is a command on one user that prints a confirmation.
func simple(call func(c *control.Client, ctx context.Context, name string) error, done string) command {
	return command{
		args: "USER",
		run: func(ctx context.Context, e *env) error {
			name, err := e.user()
			if err != nil {
				return err
			}
			if err := e.do(ctx, func(c *control.Client) error { return call(c, ctx, name) }); err != nil {
				return err
			}
			return e.ok(name + ": " + done)
		},
	}
}

var commands = map[string]command{
	"set": {args: "USER LIMIT [--protocol PROTOCOL]", run: cmdSet, flags: func(fs *flag.FlagSet) func() any {
		p := fs.String("protocol", "", "only if the user connects with this `protocol`")
		return func() any { return *p }
	}},
	"remove-limit": simple(func(c *control.Client, ctx context.Context, n string) error {
		return c.RemoveLimit(ctx, n)
	}, "limit removed"),
	"usage":    {args: "[USER]", run: cmdUsage},
	"devices":  {args: "[USER] | USER N|off|unlimited", run: cmdDevices},
	"speed":    {args: "USER RATE|DOWN/UP|off", run: cmdSpeed(false)},
	"throttle": {args: "USER RATE|DOWN/UP|off", run: cmdSpeed(true)},
	"list": {args: "[--status STATUS]", run: cmdList, flags: func(fs *flag.FlagSet) func() any {
		st := fs.String("status", "", "only users with this `status`")
		return func() any { return *st }
	}},
	"blocked": {run: cmdBlocked},
	"reset": {args: "USER | --all", run: cmdReset, flags: func(fs *flag.FlagSet) func() any {
		all := fs.Bool("all", false, "reset every user")
		return func() any { return *all }
	}},
	"disable": simple(func(c *control.Client, ctx context.Context, n string) error {
		return c.Disable(ctx, n)
	}, "disabled"),
	"enable": simple(func(c *control.Client, ctx context.Context, n string) error {
		return c.Enable(ctx, n)
	}, "enabled"),
	"unblock": {args: "USER [--for DURATION]", run: cmdUnblock, flags: func(fs *flag.FlagSet) func() any {
		d := fs.String("for", "", "unblock for this `duration` (1h, 2d)")
		return func() any { return *d }
	}},
	"history": {args: "USER [--from YYYY-MM-DD] [--to YYYY-MM-DD]", run: cmdHistory, flags: func(fs *flag.FlagSet) func() any {
		from := fs.String("from", "", "first `day`")
		to := fs.String("to", "", "last `day`")
		return func() any { return [2]string{*from, *to} }
	}},
	"status":  {run: cmdStatus},
	"check":   {run: cmdCheck},
	"version": {run: cmdVersion},
}

func cmdSet(ctx context.Context, e *env) error {
	if err := e.want(2, 2); err != nil {
		return err
	}
	name, err := checkName(e.args[0])
	if err != nil {
		return err
	}
	limit, err := quota.ParseLimit(e.args[1])
	if err != nil {
		return usagef("%v", err)
	}
	var proto quota.Protocol
	if p := e.flags.(string); p != "" {
		if proto, err = quota.ParseProtocol(p); err != nil {
			return usagef("%v", err)
		}
	}
	err = e.do(ctx, func(c *control.Client) error {
		if proto != "" {
			// The limits file has one line per name: the protocol is a
			// check that the name is the user meant, not a second key.
			u, err := c.User(ctx, name)
			if err != nil {
				return err
			}
			if !slices.Contains(u.Protocols, proto) && u.Protocol != proto {
				return fmt.Errorf("%w: %s connects with %s, not %s; nothing changed", errWrongProtocol, name, protocolCell(u), proto)
			}
		}
		return c.SetLimit(ctx, name, limit)
	})
	if err != nil {
		return err
	}
	if limit == 0 {
		return e.ok(name + ": limit set to unlimited")
	}
	return e.ok(name + ": limit set to " + e.size(limit))
}

// parseDevices parses the device limit of `devices USER N|off|unlimited`.
func parseDevices(s string) (quota.DeviceLimit, error) {
	if strings.EqualFold(s, "off") {
		return quota.DevicesDefault, nil
	}
	d, err := quota.ParseDevices(s)
	if err != nil {
		return 0, usagef("%v; or off, to leave the user to the configured default", err)
	}
	return d, nil
}

// parseSpeed parses the caps of `speed` and `throttle`: RATE, DOWN/UP or
// off (the zero Speed).
func parseSpeed(s string) (quota.Speed, error) {
	if strings.EqualFold(s, "off") {
		return quota.Speed{}, nil
	}
	sp, err := quota.ParseSpeed(s)
	if err != nil {
		return quota.Speed{}, usagef("%v; DOWN/UP for different caps, or off, to leave the user to the configured default", err)
	}
	return sp, nil
}

// cmdSpeed is `speed USER RATE|DOWN/UP|off` (throttle false: the speed
// caps) and `throttle USER ...` (the rate at the limit instead of a block).
func cmdSpeed(throttle bool) func(ctx context.Context, e *env) error {
	what := "speed cap"
	if throttle {
		what = "throttle rate"
	}
	return func(ctx context.Context, e *env) error {
		if err := e.want(2, 2); err != nil {
			return err
		}
		name, err := checkName(e.args[0])
		if err != nil {
			return err
		}
		sp, err := parseSpeed(e.args[1])
		if err != nil {
			return err
		}
		if err := e.do(ctx, func(c *control.Client) error { return c.SetSpeed(ctx, name, throttle, sp) }); err != nil {
			return err
		}
		if sp.IsZero() {
			return e.ok(name + ": " + what + " removed (the configured default applies)")
		}
		return e.ok(name + ": " + what + " set to " + sp.String() + " (download/upload)")
	}
}

func cmdDevices(ctx context.Context, e *env) error {
	if err := e.want(0, 2); err != nil {
		return err
	}
	var name string
	if len(e.args) > 0 {
		var err error
		if name, err = checkName(e.args[0]); err != nil {
			return err
		}
	}
	if len(e.args) == 2 {
		d, err := parseDevices(e.args[1])
		if err != nil {
			return err
		}
		if err := e.do(ctx, func(c *control.Client) error { return c.SetDevices(ctx, name, d) }); err != nil {
			return err
		}
		switch d {
		case quota.DevicesDefault:
			return e.ok(name + ": device limit removed (the configured default applies)")
		case quota.DevicesUnlimited:
			return e.ok(name + ": no device limit")
		}
		return e.ok(fmt.Sprintf("%s: device limit set to %d", name, d))
	}
	var u control.User
	var ds []control.Device
	err := e.do(ctx, func(c *control.Client) (err error) {
		if u, err = c.User(ctx, name); err != nil {
			return err
		}
		ds, err = c.Devices(ctx, u.Name)
		return err
	})
	if err != nil {
		return err
	}
	if e.o.output == "json" {
		out := make([]deviceOut, len(ds))
		for i, d := range ds {
			out[i] = deviceJSON(d)
		}
		return writeJSON(e.out, out)
	}
	return e.printDevices(u, ds)
}

func cmdUsage(ctx context.Context, e *env) error {
	if err := e.want(0, 1); err != nil {
		return err
	}
	var name string
	if len(e.args) == 1 {
		var err error
		if name, err = checkName(e.args[0]); err != nil {
			return err
		}
	}
	var u control.User
	err := e.do(ctx, func(c *control.Client) (err error) {
		u, err = c.User(ctx, name)
		return err
	})
	if err != nil {
		return err
	}
	if e.o.output == "json" {
		return writeJSON(e.out, userJSON(u))
	}
	return e.printUser(u)
}

func cmdList(ctx context.Context, e *env) error {
	if err := e.want(0, 0); err != nil {
		return err
	}
	st := e.flags.(string)
	if st != "" {
		s, err := quota.ParseStatus(st)
		if err != nil {
			return usagef("%v", err)
		}
		st = string(s)
	}
	return e.listUsers(ctx, func(c *control.Client) ([]control.User, error) { return c.ListUsers(ctx, st) })
}

func cmdBlocked(ctx context.Context, e *env) error {
	if err := e.want(0, 0); err != nil {
		return err
	}
	return e.listUsers(ctx, func(c *control.Client) ([]control.User, error) {
		users, err := c.ListUsers(ctx, "")
		return slices.DeleteFunc(users, func(u control.User) bool {
			return u.Status != quota.Blocked && u.Status != quota.Disabled
		}), err
	})
}

func (e *env) listUsers(ctx context.Context, get func(c *control.Client) ([]control.User, error)) error {
	var users []control.User
	err := e.do(ctx, func(c *control.Client) (err error) {
		users, err = get(c)
		return err
	})
	if err != nil {
		return err
	}
	if e.o.output == "json" {
		out := make([]userOut, len(users))
		for i, u := range users {
			out[i] = userJSON(u)
		}
		return writeJSON(e.out, out)
	}
	return e.printList(users)
}

func cmdReset(ctx context.Context, e *env) error {
	if e.flags.(bool) {
		if err := e.want(0, 0); err != nil {
			return usagef("--all takes no user name")
		}
		var n int
		err := e.do(ctx, func(c *control.Client) (err error) {
			n, err = c.ResetAll(ctx)
			return err
		})
		if err != nil {
			return err
		}
		if e.o.output == "json" {
			return writeJSON(e.out, struct {
				OK    bool `json:"ok"`
				Count int  `json:"count"`
			}{true, n})
		}
		return e.ok(fmt.Sprintf("usage reset for %d users", n))
	}
	if len(e.args) == 0 {
		return usagef("missing argument: give a user name, or --all for every user")
	}
	name, err := e.user()
	if err != nil {
		return err
	}
	if err := e.do(ctx, func(c *control.Client) error { return c.Reset(ctx, name) }); err != nil {
		return err
	}
	return e.ok(name + ": usage reset")
}

func cmdUnblock(ctx context.Context, e *env) error {
	name, err := e.user()
	if err != nil {
		return err
	}
	d, err := parseDuration(e.flags.(string))
	if err != nil {
		return err
	}
	if err := e.do(ctx, func(c *control.Client) error { return c.Unblock(ctx, name, d) }); err != nil {
		return err
	}
	if d == 0 {
		return e.ok(name + ": unblocked until the next reset or a higher limit")
	}
	return e.ok(name + ": unblocked for " + d.String())
}

// parseDuration parses --for: a Go duration (90m, 1h30m) or whole days (2d);
// "" is 0, no end time.
func parseDuration(s string) (time.Duration, error) {
	if s == "" {
		return 0, nil
	}
	bad := usagef("invalid duration %q: want a positive duration such as 30m, 12h or 2d", s)
	var d time.Duration
	if days, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.ParseUint(days, 10, 16)
		if err != nil {
			return 0, bad
		}
		d = time.Duration(n) * 24 * time.Hour
	} else {
		var err error
		if d, err = time.ParseDuration(s); err != nil {
			return 0, bad
		}
	}
	if d < time.Second {
		return 0, bad
	}
	return d, nil
}

func cmdHistory(ctx context.Context, e *env) error {
	name, err := e.user()
	if err != nil {
		return err
	}
	ft := e.flags.([2]string)
	for _, day := range ft {
		if day == "" {
			continue
		}
		if _, err := time.Parse(time.DateOnly, day); err != nil {
			return usagef("invalid day %q: want YYYY-MM-DD", day)
		}
	}
	var days []control.Day
	err = e.do(ctx, func(c *control.Client) (err error) {
		days, err = c.History(ctx, name, ft[0], ft[1])
		return err
	})
	if err != nil {
		return err
	}
	if e.o.output == "json" {
		type dayOut struct {
			Day      string `json:"day"`
			Upload   uint64 `json:"upload"`
			Download uint64 `json:"download"`
			Total    uint64 `json:"total"`
		}
		out := make([]dayOut, len(days))
		for i, d := range days {
			out[i] = dayOut{d.Day, d.Up, d.Down, d.Up + d.Down}
		}
		return writeJSON(e.out, out)
	}
	tw := tabwriter.NewWriter(e.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "DAY\tUPLOAD\tDOWNLOAD\tTOTAL")
	for _, d := range days {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", d.Day, e.size(d.Up), e.size(d.Down), e.size(d.Up+d.Down))
	}
	return tw.Flush()
}

func cmdStatus(ctx context.Context, e *env) error {
	if err := e.want(0, 0); err != nil {
		return err
	}
	var h control.Health
	err := e.do(ctx, func(c *control.Client) (err error) {
		h, err = c.Status(ctx)
		return err
	})
	if err != nil {
		return err
	}
	if e.o.output == "json" {
		errs, comps := h.Errors, h.Components
		if errs == nil {
			errs = map[string]string{}
		}
		if comps == nil {
			comps = map[string]string{}
		}
		type kernel struct {
			DroppedBlocked uint64 `json:"dropped_blocked"`
			DroppedQuota   uint64 `json:"dropped_quota"`
			CountersFull   uint64 `json:"counters_full"`
			QuotaFull      uint64 `json:"quota_full"`
			SSHHeld        uint64 `json:"ssh_held"`
			SSHUnattrib    uint64 `json:"ssh_unattributed"`
			XrayHeld       uint64 `json:"xray_held"`
			DroppedRate    uint64 `json:"dropped_rate"`
		}
		k := h.Kernel
		return writeJSON(e.out, struct {
			LastTick     jsonTime          `json:"last_tick"`
			TickDuration int64             `json:"tick_duration_ns"`
			Ticks        uint64            `json:"ticks"`
			Users        int               `json:"users"`
			SSHSessions  uint64            `json:"ssh_sessions"`
			SSHNever     uint64            `json:"ssh_never_attributed"`
			XrayClaimed  uint64            `json:"xray_claimed"`
			XrayNever    uint64            `json:"xray_unclaimed"`
			Kernel       kernel            `json:"kernel_packets"`
			Components   map[string]string `json:"components"`
			Errors       map[string]string `json:"errors"`
			Notify       []notifyOut       `json:"notify"`
		}{jsonTime(h.LastTick), int64(h.TickDuration), h.Ticks, h.Users, k.SSHSessions, k.SSHNeverAttributed,
			k.XrayClaimed, k.XrayUnclaimed,
			kernel{k.DroppedBlocked, k.DroppedQuota, k.CountersFull, k.QuotaFull, k.SSHHeld, k.SSHUnattributed, k.XrayHeld, k.DroppedRate},
			comps, errs, notifyJSON(h.Notify)})
	}
	tw := tabwriter.NewWriter(e.out, 0, 0, 1, ' ', 0)
	last := "never"
	if !h.LastTick.IsZero() {
		last = fmtTime(h.LastTick)
	}
	fmt.Fprintf(tw, "last tick:\t%s\n", last)
	fmt.Fprintf(tw, "tick duration:\t%s\n", h.TickDuration)
	fmt.Fprintf(tw, "users:\t%d\n", h.Users)
	k := h.Kernel
	fmt.Fprintf(tw, "kernel drops:\t%d packets of blocked users, %d over a budget, %d over a speed cap\n", k.DroppedBlocked, k.DroppedQuota, k.DroppedRate)
	noRoom := "none"
	if k.CountersFull+k.QuotaFull > 0 {
		noRoom = fmt.Sprintf("%d packets uncounted (counter map full), %d dropped (quota map full): raise kernel.max_uids", k.CountersFull, k.QuotaFull)
	}
	fmt.Fprintf(tw, "kernel no room:\t%s\n", noRoom)
	fmt.Fprintf(tw, "kernel ssh logins:\t%d packets held until attributed; %d connections never attributed (%d packets)\n",
		k.SSHHeld, k.SSHNeverAttributed, k.SSHUnattributed)
	fmt.Fprintf(tw, "kernel xray connections:\t%d counted for their users; %d packets held until claimed; %d connections never claimed (counted by Xray)\n",
		k.XrayClaimed, k.XrayHeld, k.XrayUnclaimed)
	for _, k := range slices.Sorted(maps.Keys(h.Components)) {
		fmt.Fprintf(tw, "%s:\t%s\n", k, h.Components[k])
	}
	if len(h.Errors) == 0 {
		fmt.Fprintf(tw, "errors:\tnone\n")
	} else {
		fmt.Fprintf(tw, "errors:\t%d\n", len(h.Errors))
		keys := make([]string, 0, len(h.Errors))
		for k := range h.Errors {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			fmt.Fprintf(tw, "  %s:\t%s\n", k, h.Errors[k])
		}
	}
	printNotify(tw, h.Notify)
	return tw.Flush()
}

func cmdCheck(ctx context.Context, e *env) error {
	if err := e.want(0, 0); err != nil {
		return err
	}
	if err := e.do(ctx, func(c *control.Client) error { return c.Check(ctx) }); err != nil {
		return err
	}
	return e.ok("check done")
}

func cmdVersion(_ context.Context, e *env) error {
	if err := e.want(0, 0); err != nil {
		return err
	}
	if e.o.output == "json" {
		return writeJSON(e.out, map[string]string{"version": version})
	}
	_, err := fmt.Fprintf(e.out, "bwctl %s\n", version)
	return err
}
