package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/quota"
)

// ANSI colours of the STATUS column. Every coloured cell has a 5-byte
// prefix and a 4-byte suffix, so that tabwriter, which counts bytes, still
// aligns the columns.
const (
	red    = "\x1b[31m"
	yellow = "\x1b[33m"
	plain  = "\x1b[39m" // the default colour: same length as the others
	reset  = "\x1b[0m"
)

// colorful reports whether w is a terminal and NO_COLOR is not set.
func colorful(w io.Writer) bool {
	if _, set := os.LookupEnv("NO_COLOR"); set {
		return false
	}
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// status returns s for the STATUS column, coloured when on.
func (e *env) status(s string) string {
	if !e.o.color {
		return s
	}
	c := plain
	switch quota.Status(s) {
	case quota.Blocked, quota.Disabled:
		c = red
	case quota.Warning, quota.Throttled:
		c = yellow
	}
	return c + s + reset
}

// size formats a byte count: with --bytes the number, else B below 1 KiB
// and KiB..TiB with one decimal.
func (e *env) size(b uint64) string {
	if e.o.bytes {
		return strconv.FormatUint(b, 10)
	}
	return humanSize(b)
}

func humanSize(b uint64) string {
	if b < quota.KiB {
		return fmt.Sprintf("%d B", b)
	}
	units := []struct {
		n string
		u uint64
	}{{"TiB", quota.TiB}, {"GiB", quota.GiB}, {"MiB", quota.MiB}, {"KiB", quota.KiB}}
	for _, u := range units {
		if b >= u.u {
			return fmt.Sprintf("%.1f %s", float64(b)/float64(u.u), u.n)
		}
	}
	return "" // unreachable
}

// fmtTime formats a time for tables, in the local zone.
func fmtTime(t time.Time) string {
	return t.Local().Format("2006-01-02 15:04:05 MST")
}

// timeOr formats t, or none when it is zero.
func timeOr(t time.Time, none string) string {
	if t.IsZero() {
		return none
	}
	return fmtTime(t)
}

// jsonTime is a time in JSON: RFC 3339 in UTC, or null when zero.
type jsonTime time.Time

// MarshalJSON implements json.Marshaler.
func (t jsonTime) MarshalJSON() ([]byte, error) {
	tt := time.Time(t)
	if tt.IsZero() {
		return []byte("null"), nil
	}
	return json.Marshal(tt.UTC().Format(time.RFC3339))
}

// userOut is a user in JSON output.
type userOut struct {
	Name               string   `json:"name"`
	Protocol           string   `json:"protocol"`
	UID                uint32   `json:"uid"`
	Present            bool     `json:"present"`
	Status             string   `json:"status"`
	Used               uint64   `json:"used"`
	Limit              uint64   `json:"limit"`
	Remaining          uint64   `json:"remaining"`
	Upload             uint64   `json:"upload"`
	Download           uint64   `json:"download"`
	Today              uint64   `json:"today"`
	Reason             string   `json:"reason"`
	BlockTime          jsonTime `json:"block_time"`
	LastReset          jsonTime `json:"last_reset"`
	NextReset          jsonTime `json:"next_reset"`
	Expires            jsonTime `json:"expires"`
	Updated            jsonTime `json:"updated"`
	ManualUnblock      bool     `json:"manual_unblock"`
	ManualUnblockUntil jsonTime `json:"manual_unblock_until"`
	Protocols          []string `json:"protocols"`
	Devices            int      `json:"devices"`
	DevicesLimit       *int     `json:"devices_limit"`
	SpeedDown          *uint64  `json:"speed_down"`
	SpeedUp            *uint64  `json:"speed_up"`
}

// userProtocols are u's sources now (ssh, an Xray protocol, or both); a
// present user of an agent that does not say has its one protocol.
func userProtocols(u control.User) []string {
	out := []string{}
	for _, p := range u.Protocols {
		out = append(out, string(p))
	}
	if len(out) == 0 && u.Present {
		out = append(out, string(u.Protocol))
	}
	return out
}

func userJSON(u control.User) userOut {
	rem := u.Remaining
	if u.Limit == 0 {
		rem = 0
	}
	return userOut{
		Name: u.Name, Protocol: string(u.Protocol), UID: u.UID, Present: u.Present, Status: string(u.Status),
		Used: u.Used, Limit: u.Limit, Remaining: rem, Upload: u.Upload, Download: u.Download, Today: u.Today,
		Reason: u.Reason, BlockTime: jsonTime(u.BlockTime), LastReset: jsonTime(u.LastReset),
		NextReset: jsonTime(u.NextReset), Expires: jsonTime(u.Expires), Updated: jsonTime(u.Updated),
		ManualUnblock: u.Override.Active, ManualUnblockUntil: jsonTime(u.Override.Until),
		Protocols: userProtocols(u),
		Devices:   u.Devices, DevicesLimit: devicesLimit(u),
		SpeedDown: rateJSON(u.Speed.Down), SpeedUp: rateJSON(u.Speed.Up),
	}
}

// rateJSON is a cap for JSON: bits per second, nil for none.
func rateJSON(r quota.Rate) *uint64 {
	if r == 0 {
		return nil
	}
	n := uint64(r)
	return &n
}

// speedCell shows u's caps in force: "20mbit", "10mbit/2mbit" (download/
// upload), "-" for none; "off" for a direction without one.
func speedCell(u control.User) string { return speedOf(u.Speed) }

// speedOf formats caps for a table (see speedCell).
func speedOf(s quota.Speed) string {
	switch {
	case s.IsZero():
		return "-"
	case s.Down == 0:
		return "off/" + s.Up.String()
	case s.Up == 0:
		return s.Down.String() + "/off"
	}
	return s.String()
}

// devicesLimit is u's device limit for JSON: nil for none.
func devicesLimit(u control.User) *int {
	if u.DevicesLimit <= 0 {
		return nil
	}
	n := u.DevicesLimit
	return &n
}

// devicesCell shows u's devices and their limit: "1/2", or "1/-" without
// a limit.
func devicesCell(u control.User) string {
	if u.DevicesLimit <= 0 {
		return fmt.Sprintf("%d/-", u.Devices)
	}
	return fmt.Sprintf("%d/%d", u.Devices, u.DevicesLimit)
}

// deviceOut is a device in JSON output.
type deviceOut struct {
	Address     string   `json:"address"`
	Protocols   []string `json:"protocols"`
	Connections int      `json:"connections"`
	Since       jsonTime `json:"since"`
	Bytes       uint64   `json:"bytes"`
	Refused     bool     `json:"refused"`
}

func deviceJSON(d control.Device) deviceOut {
	ps := []string{}
	for _, p := range d.Protocols {
		ps = append(ps, string(p))
	}
	return deviceOut{Address: d.Address, Protocols: ps, Connections: d.Connections, Since: jsonTime(d.Since), Bytes: d.Bytes, Refused: d.Refused}
}

// printDevices prints u's devices: how many of how many, then a table.
func (e *env) printDevices(u control.User, ds []control.Device) error {
	limit := "no device limit"
	if u.DevicesLimit > 0 {
		limit = fmt.Sprintf("limit %d", u.DevicesLimit)
	}
	if len(ds) == 0 {
		_, err := fmt.Fprintf(e.out, "%s: no device connected (%s)\n", u.Name, limit)
		return err
	}
	fmt.Fprintf(e.out, "%s: %d devices (%s)\n", u.Name, len(ds), limit)
	// A NOTE column only when a device is refused but still connected
	// (its connections could not be cut).
	refused := slices.ContainsFunc(ds, func(d control.Device) bool { return d.Refused })
	tw := tabwriter.NewWriter(e.out, 0, 0, 2, ' ', 0)
	fmt.Fprint(tw, "ADDRESS\tPROTOCOLS\tCONNECTIONS\tSINCE\tBYTES")
	if refused {
		fmt.Fprint(tw, "\tNOTE")
	}
	fmt.Fprintln(tw)
	for _, d := range ds {
		ps := make([]string, len(d.Protocols))
		for i, p := range d.Protocols {
			ps[i] = string(p)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s", d.Address, strings.Join(ps, "+"), d.Connections,
			timeOr(d.Since, "before the agent started"), e.size(d.Bytes))
		switch {
		case d.Refused:
			fmt.Fprint(tw, "\trefused: its connections cannot be cut")
		case refused:
			fmt.Fprint(tw, "\t-")
		}
		fmt.Fprintln(tw)
	}
	return tw.Flush()
}

// writeJSON writes v as one indented JSON document and a newline.
func writeJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// limitCells returns the LIMIT, USED% and REMAINING cells of u.
func (e *env) limitCells(u control.User) (limit, pct, rem string) {
	if u.Limit == 0 {
		return "unlimited", "-", "-"
	}
	return e.size(u.Limit), fmt.Sprintf("%.1f%%", float64(u.Used)*100/float64(u.Limit)), e.size(u.Remaining)
}

// printList prints users as a table.
func (e *env) printList(users []control.User) error {
	tw := tabwriter.NewWriter(e.out, 0, 0, 2, ' ', 0)
	head := "STATUS"
	if e.o.color { // the header gets the colour cells' extra bytes too
		head = plain + head + reset
	}
	fmt.Fprintf(tw, "USER\tPROTOCOL\t%s\tUSED\tLIMIT\tUSED%%\tREMAINING\tTODAY\tDEVICES\tSPEED\n", head)
	for _, u := range users {
		limit, pct, rem := e.limitCells(u)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", u.Name, u.Protocol, e.status(string(u.Status)),
			e.size(u.Used), limit, pct, rem, e.size(u.Today), devicesCell(u), speedCell(u))
	}
	return tw.Flush()
}

// printUser prints one user as a key: value block.
func (e *env) printUser(u control.User) error {
	tw := tabwriter.NewWriter(e.out, 0, 0, 1, ' ', 0)
	limit, pct, rem := e.limitCells(u)
	used := e.size(u.Used)
	if pct != "-" {
		used += " (" + pct + ")"
	}
	reason := u.Reason
	if reason == "" {
		reason = "-"
	}
	unblock := "-"
	if u.Override.Active {
		unblock = timeOr(u.Override.Until, "the next reset or a higher limit")
	}
	rows := [][2]string{
		{"user", u.Name},
		{"protocol", protocolCell(u)},
		{"status", e.status(string(u.Status))},
		{"used", used},
		{"limit", limit},
		{"remaining", rem},
		{"upload", e.size(u.Upload)},
		{"download", e.size(u.Download)},
		{"today", e.size(u.Today)},
		{"reason", reason},
		{"blocked since", timeOr(u.BlockTime, "-")},
		{"last reset", timeOr(u.LastReset, "never")},
		{"next reset", timeOr(u.NextReset, "-")},
		{"expires", timeOr(u.Expires, "never")},
		{"manual unblock until", unblock},
		{"devices", devicesCell(u)},
		{"speed", speedCell(u)},
	}
	for _, r := range rows {
		fmt.Fprintf(tw, "%s:\t%s\n", r[0], r[1])
	}
	return tw.Flush()
}

// notifyOut is a notification channel in JSON output.
type notifyOut struct {
	Name          string   `json:"name"`
	Backlog       uint64   `json:"backlog"`
	Delivered     uint64   `json:"delivered"`
	Expired       uint64   `json:"expired"`
	Attempts      uint64   `json:"attempts"`
	NextTry       jsonTime `json:"next_try"`
	LastError     string   `json:"last_error"`
	LastErrorTime jsonTime `json:"last_error_time"`
}

func notifyJSON(chs []control.NotifyChannel) []notifyOut {
	out := make([]notifyOut, len(chs))
	for i, c := range chs {
		out[i] = notifyOut{c.Name, c.Backlog, c.Delivered, c.Expired, c.Attempts, jsonTime(c.NextTry), c.LastError, jsonTime(c.ErrorTime)}
	}
	return out
}

// printNotify writes the notification channels' lines of status: each
// channel's backlog and counts, its retries, and its last error.
func printNotify(tw io.Writer, chs []control.NotifyChannel) {
	if len(chs) == 0 {
		return
	}
	fmt.Fprintf(tw, "notify:\t%d channels\n", len(chs))
	// Lines without tabs: the channels' long names do not widen the
	// columns above.
	for _, c := range chs {
		fmt.Fprintf(tw, "  %s\n    %d waiting, %d delivered, %d expired", c.Name, c.Backlog, c.Delivered, c.Expired)
		if c.Attempts > 0 {
			fmt.Fprintf(tw, "; failing: %d attempts, next try %s", c.Attempts, timeOr(c.NextTry, "now"))
		}
		fmt.Fprintln(tw)
		if c.LastError != "" {
			fmt.Fprintf(tw, "    last error %s: %s\n", timeOr(c.ErrorTime, "at an unknown time"), c.LastError)
		}
	}
}

// protocolCell shows u's protocol, or its protocols joined with "+" for a
// user who is an SSH account and an Xray client.
func protocolCell(u control.User) string {
	if ps := userProtocols(u); len(ps) > 1 {
		return strings.Join(ps, "+")
	}
	return string(u.Protocol)
}
