package opsfiles

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/quota"
)

// Errors of the limits file's lines, besides quota.ErrBadName,
// quota.ErrBadLimit, quota.ErrBadSchedule and quota.ErrBadDevices.
var (
	// ErrSyntax is a line that is not "USER LIMIT [reset=SCHEDULE]
	// [expires=YYYY-MM-DD] [devices=N]": a missing limit, an unknown or
	// repeated option, a bad date.
	ErrSyntax = errors.New("syntax error")
	// ErrDuplicate is a line for a user that a later valid line sets again;
	// the later line applies.
	ErrDuplicate = errors.New("duplicate")
)

// Entry is a user's line of the limits file.
type Entry struct {
	Line    int            // 1-based line number; ignored by Set
	User    string         // a valid user name (quota.ValidName)
	Limit   uint64         // bytes; 0 is unlimited
	Reset   quota.Schedule // automatic usage reset; the zero Schedule is none
	Expires string         // "" or YYYY-MM-DD: the user is blocked from that local day on
	// Devices is the user's device limit (devices=N or devices=unlimited);
	// quota.DevicesDefault when the line has none.
	Devices quota.DeviceLimit
	// Speed is the user's speed caps (speed=RATE or speed=DOWN/UP); zero
	// when the line has none.
	Speed quota.Speed
	// Throttle is the user's throttle rate (throttle=RATE or DOWN/UP): at
	// the limit they are slowed to it instead of blocked; zero when none.
	Throttle quota.Speed
}

// Plan returns the entry as a quota.Plan, the expiry at the start of its day
// in loc (UTC if nil). An invalid Expires (Set and the parser refuse one) is
// ignored.
func (e Entry) Plan(loc *time.Location) quota.Plan {
	p := quota.Plan{Limit: e.Limit, Reset: e.Reset, Devices: e.Devices, Speed: e.Speed, Throttle: e.Throttle}
	if e.Expires != "" {
		if loc == nil {
			loc = time.UTC
		}
		if t, err := time.ParseInLocation(time.DateOnly, e.Expires, loc); err == nil {
			p.Expires = quota.At(t)
		}
	}
	return p
}

// LineError is a line of the limits file that was skipped, or an option
// of a line that was ignored while the rest of the line applies (Partial).
type LineError struct {
	File string // the file's name as given to ParseLimits (ReadLimits: its base name); may be ""
	Line int    // 1-based
	Text string // the line as written, without its line end
	Err  error
	// Partial: only the option Err names was ignored (a bad devices=
	// value); the rest of the line applies, so that a typo in it never
	// lifts the user's data limit.
	Partial bool
}

// Error returns "bw-limit.conf:7: problem" (or "line 7: problem" when the
// file's name is unknown).
func (e LineError) Error() string {
	if e.File == "" {
		return "line " + strconv.Itoa(e.Line) + ": " + e.Err.Error()
	}
	return e.File + ":" + strconv.Itoa(e.Line) + ": " + e.Err.Error()
}

// Unwrap returns the line's problem.
func (e LineError) Unwrap() error { return e.Err }

// Limits is the limits file, /etc/xray/bw-limit.conf: the operator-editable
// source of the users' limits. Each line is "USER LIMIT" with optional
// "reset=SCHEDULE" (quota.ParseSchedule), "expires=YYYY-MM-DD" and
// "devices=N" (quota.ParseDevices) after the limit, separated by spaces or
// tabs; LIMIT is read by quota.ParseLimit (a
// bare number is MiB: "john 10240" is 10 GiB; also 500M, 10G, 1.5T,
// unlimited, 0). '#' starts a comment at the start of a line or after a
// space or tab, so a '#' inside a name is part of it; blank lines, CRLF
// line ends and a leading UTF-8 byte order mark are fine.
//
// Limits keeps every line as it was read, so Marshal gives back the file
// byte for byte, and Set and Remove change only the lines they touch. The
// zero value is an empty file.
type Limits struct {
	name  string
	bom   string // a UTF-8 byte order mark the file started with, kept
	lines []limitLine
	index map[string]int // user → index in lines of the line that applies
}

// limitLine is one line of the file.
type limitLine struct {
	text string // as read, without the line end
	eol  string // "\n", "\r\n", or "" for a last line without one
	user string // the first token if it is a valid name, valid line or not
	ok   bool   // the line is a valid entry
	e    Entry  // the entry (Line unset) if ok
}

// ParseLimits parses a limits file; name (the file's base name, or "") is
// used in the line errors. A bad line is reported with its number and
// skipped; the other lines still apply. A bad devices= value is reported
// too, as Partial: the rest of its line applies. If a user has several valid lines,
// the last one applies and each earlier one is reported as a duplicate
// (ErrDuplicate). The errors are in line order.
func ParseLimits(name string, data []byte) (*Limits, []LineError) {
	l := &Limits{name: name}
	rest := string(data)
	if r, ok := strings.CutPrefix(rest, "\ufeff"); ok {
		l.bom, rest = "\ufeff", r
	}
	for rest != "" {
		var ln limitLine
		text, after, found := strings.Cut(rest, "\n")
		ln.text, rest = text, after
		if found {
			ln.eol = "\n"
			if t, ok := strings.CutSuffix(text, "\r"); ok {
				ln.text, ln.eol = t, "\r\n"
			}
		}
		l.lines = append(l.lines, ln)
	}
	var errs []LineError
	for i := range l.lines {
		ln := &l.lines[i]
		e, user, ignored, err := parseLimitLine(ln.text)
		ln.user = user
		if err != nil {
			errs = append(errs, l.lineError(i, err))
			continue
		}
		for _, ig := range ignored {
			le := l.lineError(i, ig)
			le.Partial = true
			errs = append(errs, le)
		}
		if e.User != "" {
			ln.ok, ln.e = true, e
		}
	}
	l.reindex()
	for i, ln := range l.lines {
		if ln.ok && l.index[ln.e.User] != i {
			win := l.index[ln.e.User]
			errs = append(errs, l.lineError(i, fmt.Errorf("%w of line %d (user %q; the later line applies)", ErrDuplicate, win+1, ln.e.User)))
		}
	}
	sortLineErrors(errs)
	return l, errs
}

func (l *Limits) lineError(i int, err error) LineError {
	return LineError{File: l.name, Line: i + 1, Text: l.lines[i].text, Err: err}
}

// sortLineErrors sorts by line, keeping the order of errors of one line.
func sortLineErrors(errs []LineError) {
	for i := 1; i < len(errs); i++ {
		for j := i; j > 0 && errs[j].Line < errs[j-1].Line; j-- {
			errs[j], errs[j-1] = errs[j-1], errs[j]
		}
	}
}

// reindex rebuilds the user index: the last valid line of each user.
func (l *Limits) reindex() {
	l.index = make(map[string]int, len(l.lines))
	for i, ln := range l.lines {
		if ln.ok {
			l.index[ln.e.User] = i
		}
	}
}

// isSep reports whether c separates the tokens of a line. Only ASCII
// blanks: a name may hold other Unicode spaces that quota.ValidName allows.
func isSep(c rune) bool { return c == ' ' || c == '\t' || c == '\v' || c == '\f' || c == '\r' }

// commentStart returns the index of the '#' that starts the comment of
// text, or len(text).
func commentStart(text string) int {
	for i := 0; i < len(text); i++ {
		if text[i] == '#' && (i == 0 || isSep(rune(text[i-1]))) {
			return i
		}
	}
	return len(text)
}

// parseLimitLine parses the text of one line. A blank or comment line gives
// the zero Entry and no error. user is the first token if it is a valid
// name, even if the rest of the line is bad. ignored are bad devices=,
// speed= and throttle= values, left out of e: the rest of the line applies.
func parseLimitLine(text string) (e Entry, user string, ignored []error, err error) {
	tok := strings.FieldsFunc(text[:commentStart(text)], isSep)
	if len(tok) == 0 {
		return Entry{}, "", nil, nil
	}
	if err := quota.ValidName(tok[0]); err != nil {
		return Entry{}, "", nil, err
	}
	user = tok[0]
	if len(tok) < 2 {
		return Entry{}, user, nil, fmt.Errorf("%w: user %q has no limit (want USER LIMIT, e.g. %q)", ErrSyntax, user, user+" 10240")
	}
	e.User = user
	if e.Limit, err = quota.ParseLimit(tok[1]); err != nil {
		return Entry{}, user, nil, err
	}
	seen := map[string]bool{}
	for _, t := range tok[2:] {
		key, val, _ := strings.Cut(t, "=")
		if seen[key] {
			return Entry{}, user, nil, fmt.Errorf("%w: %s= given twice", ErrSyntax, key)
		}
		seen[key] = true
		switch key {
		case "reset":
			if e.Reset, err = quota.ParseSchedule(val); err != nil {
				return Entry{}, user, nil, err
			}
		case "expires":
			if err := checkDate(val); err != nil {
				return Entry{}, user, nil, err
			}
			e.Expires = val
		case "devices":
			d, err := quota.ParseDevices(val)
			if err != nil {
				ignored = append(ignored, fmt.Errorf("devices= ignored, the rest of the line applies: %w", err))
				continue
			}
			e.Devices = d
		case "speed", "throttle":
			sp, err := quota.ParseSpeed(val)
			if err != nil {
				ignored = append(ignored, fmt.Errorf("%s= ignored, the rest of the line applies: %w", key, err))
				continue
			}
			if key == "speed" {
				e.Speed = sp
			} else {
				e.Throttle = sp
			}
		default:
			return Entry{}, user, nil, fmt.Errorf("%w: unknown option %q after the limit (want reset=SCHEDULE, expires=YYYY-MM-DD, devices=N, speed=RATE or throttle=RATE)", ErrSyntax, t)
		}
	}
	return e, user, ignored, nil
}

// checkDate checks an expiry date.
func checkDate(s string) error {
	if _, err := time.Parse(time.DateOnly, s); err != nil || len(s) != len(time.DateOnly) {
		return fmt.Errorf("%w: expires=%q: want a date YYYY-MM-DD", ErrSyntax, s)
	}
	return nil
}

// ReadLimits reads and parses the limits file at path (see ParseLimits); the
// line errors name the file's base name. A missing file is an empty Limits
// and no error.
//
// A symbolic link at path is followed as WriteLimits follows it, only if it
// is owned by root or by this process's user (ErrUntrustedLink otherwise,
// and nothing is read): the limits file is the operator's, and a link to it
// made by root is theirs too. Anything but a regular file is refused.
func ReadLimits(path string) (*Limits, []LineError, error) {
	name := filepath.Base(path)
	target, err := followTrusted(path)
	if err != nil {
		return nil, nil, err
	}
	data, err := readRegular(unix.AT_FDCWD, target, target, maxLimitsSize)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return &Limits{name: name, index: map[string]int{}}, nil, nil
		}
		return nil, nil, err
	}
	l, errs := ParseLimits(name, data)
	return l, errs, nil
}

// maxLimitsSize bounds the limits file: 64 MiB is a million users.
const maxLimitsSize = 64 << 20

// Entries returns the entry that applies for each user (the last valid line
// of the user), in file order.
func (l *Limits) Entries() []Entry {
	out := make([]Entry, 0, len(l.index))
	for i, ln := range l.lines {
		if ln.ok && l.index[ln.e.User] == i {
			e := ln.e
			e.Line = i + 1
			out = append(out, e)
		}
	}
	return out
}

// Lookup returns the entry that applies for user.
func (l *Limits) Lookup(user string) (Entry, bool) {
	i, ok := l.index[user]
	if !ok {
		return Entry{}, false
	}
	e := l.lines[i].e
	e.Line = i + 1
	return e, true
}

// Set makes e the user's entry (e.Line is ignored). The line that applies
// for the user is rewritten in place, keeping its indentation and trailing
// comment, and left untouched if it already says the same. Without one, a
// line the user has that could not be parsed (a typo being fixed) is
// replaced instead; otherwise a line is appended, with the file's line end.
// Set refuses, changing nothing, an invalid user name (or one starting with
// '#', which would read as a comment), a limit above quota.MaxLimit or one
// that would not read back exactly (above 8 PiB and not whole MiB), an
// invalid schedule, expiry date or device limit.
func (l *Limits) Set(e Entry) error {
	if err := quota.ValidName(e.User); err != nil {
		return err
	}
	if e.User[0] == '#' {
		return fmt.Errorf("%w %q: starts with '#', which starts a comment in the limits file", quota.ErrBadName, e.User)
	}
	if e.Limit > quota.MaxLimit {
		return fmt.Errorf("%w: %d bytes is more than 1 EiB", quota.ErrBadLimit, e.Limit)
	}
	if n, err := quota.ParseLimit(quota.FormatLimit(e.Limit)); err != nil || n != e.Limit {
		// quota.ParseLimit reads through a float64: above 2^53 bytes (8 PiB)
		// only some byte counts survive; whole MiB always do.
		return fmt.Errorf("%w: %d bytes would read back as %d; use whole MiB", quota.ErrBadLimit, e.Limit, n)
	}
	reset, err := quota.ParseSchedule(e.Reset.String())
	if err != nil || (reset != e.Reset && e.Reset.Period != quota.NoReset) {
		return fmt.Errorf("%w: %+v", quota.ErrBadSchedule, e.Reset)
	}
	e.Reset = reset
	if e.Expires != "" {
		if err := checkDate(e.Expires); err != nil {
			return err
		}
	}
	if !e.Devices.Valid() {
		return fmt.Errorf("%w: %d: want 1 to %d, or unlimited", quota.ErrBadDevices, e.Devices, quota.MaxDevices)
	}
	for _, sp := range []quota.Speed{e.Speed, e.Throttle} {
		if err := sp.Check(); err != nil {
			return err
		}
	}
	e.Line = 0
	if l.index == nil {
		l.index = map[string]int{}
	}
	i, ok := l.index[e.User]
	if !ok {
		i = -1
		for j := len(l.lines) - 1; j >= 0; j-- {
			if !l.lines[j].ok && l.lines[j].user == e.User {
				i = j
				break
			}
		}
	}
	if i >= 0 {
		ln := &l.lines[i]
		if ln.ok && ln.e == e {
			return nil
		}
		text := ln.text
		lead := text[:len(text)-len(strings.TrimLeftFunc(text, isSep))]
		tail := ""
		if c := commentStart(text); c < len(text) {
			content := text[:c]
			tail = content[len(strings.TrimRightFunc(content, isSep)):] + text[c:]
		}
		ln.text = lead + formatEntry(e) + tail
		ln.ok, ln.e, ln.user = true, e, e.User
		l.index[e.User] = i
		return nil
	}
	eol := "\n"
	for _, ln := range l.lines {
		if ln.eol != "" {
			eol = ln.eol
			break
		}
	}
	if n := len(l.lines); n > 0 && l.lines[n-1].eol == "" {
		l.lines[n-1].eol = eol
	}
	l.lines = append(l.lines, limitLine{text: formatEntry(e), eol: eol, user: e.User, ok: true, e: e})
	l.index[e.User] = len(l.lines) - 1
	return nil
}

// formatEntry formats e's line, its limit by quota.FormatLimit.
func formatEntry(e Entry) string {
	s := e.User + " " + quota.FormatLimit(e.Limit)
	if e.Reset.Period != quota.NoReset {
		s += " reset=" + e.Reset.String()
	}
	if e.Expires != "" {
		s += " expires=" + e.Expires
	}
	if e.Devices != quota.DevicesDefault {
		s += " devices=" + e.Devices.String()
	}
	if !e.Speed.IsZero() {
		s += " speed=" + e.Speed.String()
	}
	if !e.Throttle.IsZero() {
		s += " throttle=" + e.Throttle.String()
	}
	return s
}

// Remove removes every line of user (valid or not; an earlier duplicate
// would otherwise apply in its place) and reports whether it removed any.
// Other lines are untouched.
func (l *Limits) Remove(user string) bool {
	kept := l.lines[:0]
	for _, ln := range l.lines {
		if ln.user != user || user == "" {
			kept = append(kept, ln)
		}
	}
	removed := len(kept) < len(l.lines)
	clear(l.lines[len(kept):])
	l.lines = kept
	if removed {
		l.reindex()
	}
	return removed
}

// Marshal returns the file's content: every line as read, except those Set
// or Remove changed.
func (l *Limits) Marshal() []byte {
	n := len(l.bom)
	for _, ln := range l.lines {
		n += len(ln.text) + len(ln.eol)
	}
	b := make([]byte, 0, n)
	b = append(b, l.bom...)
	for _, ln := range l.lines {
		b = append(b, ln.text...)
		b = append(b, ln.eol...)
	}
	return b
}

// WriteLimits writes l to path atomically (WriteFile), keeping the file's
// permission bits (0644 for a new file) and creating its directory (0755) if
// missing. If path is a symbolic link owned by root or by this process's
// user, the file it points to is replaced (created if missing) and the link
// kept; a link owned by anyone else gives ErrUntrustedLink and nothing is
// written.
//
// Limits are read, edited and written back: a concurrent edit by an
// operator between ReadLimits and WriteLimits is lost, so callers serialise
// their own edits and re-read right before editing.
func WriteLimits(path string, l *Limits) error {
	path, err := followTrusted(path)
	if err != nil {
		return err
	}
	perm := os.FileMode(0o644)
	if info, err := os.Lstat(path); err == nil && info.Mode().IsRegular() {
		perm = info.Mode().Perm()
	}
	if err := os.MkdirAll(rawDir(path), 0o755); err != nil {
		return err
	}
	return WriteFile(path, l.Marshal(), perm)
}
