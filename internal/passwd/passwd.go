// Package passwd reads the passwd file (passwd(5), /etc/passwd): the one
// parser of bwagent's SSH accounts, for the agent (the accounts of a UID
// range, [Accounts]) and for the control socket (a caller's account,
// [NameOf]), so that both see the same accounts.
//
// A line is "name:password:UID:GID:GECOS:home:shell". [Parse] skips what
// glibc's files backend does not take for an account: empty lines, comments
// ('#' first), NIS compat lines ('+' or '-' first), lines with fewer than
// four fields, an empty name, and a UID or GID that is not a decimal number
// below 2^32. The other fields are not read. A line end may be "\r\n".
//
// When several entries share a UID or a name, the first in the file owns it,
// as getpwuid(3) and getpwnam(3) find the first: [Lookup] and [NameOf]
// return the first entry of a UID, and [Accounts] accounts an entry only if
// it is the first of both its UID and its name, reporting the later ones as
// [Duplicate]s for the caller to log.
//
// The package does not log and keeps no state. Its errors: [ErrTooLarge],
// [ErrNoAccount], and the os package's for a file that cannot be read.
package passwd

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"syscall"

	"github.com/myvpn/bwagent/quota"
)

// Errors of Read and NameOf, wrapped with the file's path.
var (
	// ErrTooLarge means the file is larger than MaxSize; it is not read.
	ErrTooLarge = errors.New("larger than 16 MiB; not read as a passwd file")

	// ErrNoAccount means no entry of the passwd file has the UID.
	ErrNoAccount = errors.New("no account has this UID")
)

// MaxSize is the largest passwd file Read reads: 16 MiB, about 250,000
// accounts of typical length.
const MaxSize = 16 << 20

// Entry is one account of the passwd file.
type Entry struct {
	Name string
	UID  uint32
	GID  uint32
	Line int // 1-based line number in the file
}

// Parse returns the entries of a passwd file, in file order, skipping the
// lines the package documentation lists. It never fails: a malformed line
// is skipped, as the system skips it.
func Parse(data []byte) []Entry {
	entries := make([]Entry, 0, countLines(data))
	line := 0
	for len(data) > 0 {
		line++
		var text []byte
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			text, data = data[:i], data[i+1:]
		} else {
			text, data = data, nil
		}
		if e, ok := parseLine(text); ok {
			e.Line = line
			entries = append(entries, e)
		}
	}
	return entries
}

// countLines returns the number of lines in data, an upper bound of its
// entries.
func countLines(data []byte) int {
	n := bytes.Count(data, []byte{'\n'})
	if len(data) > 0 && data[len(data)-1] != '\n' {
		n++
	}
	return n
}

// parseLine parses one line, without its "\n".
func parseLine(text []byte) (Entry, bool) {
	if n := len(text); n > 0 && text[n-1] == '\r' {
		text = text[:n-1]
	}
	if len(text) == 0 || text[0] == '#' || text[0] == '+' || text[0] == '-' {
		return Entry{}, false
	}
	var f [4][]byte
	rest := text
	for i := range f {
		j := bytes.IndexByte(rest, ':')
		switch {
		case j >= 0:
			f[i], rest = rest[:j], rest[j+1:]
		case i == len(f)-1:
			f[i], rest = rest, nil
		default:
			return Entry{}, false // fewer than four fields
		}
	}
	if len(f[0]) == 0 {
		return Entry{}, false
	}
	uid, err := strconv.ParseUint(string(f[2]), 10, 32)
	if err != nil {
		return Entry{}, false
	}
	gid, err := strconv.ParseUint(string(f[3]), 10, 32)
	if err != nil {
		return Entry{}, false
	}
	// A copy of the name, not a slice of the file: a name kept for long
	// must not keep the whole file alive.
	return Entry{Name: string(f[0]), UID: uint32(uid), GID: uint32(gid)}, true
}

// Read reads and parses the passwd file at path. A file larger than MaxSize
// gives ErrTooLarge, anything but a regular file (reached through symbolic
// links: /etc/passwd is root's) an error, both naming the file; a missing
// file gives the os package's error, for which errors.Is(err,
// fs.ErrNotExist) holds.
func Read(path string) ([]Entry, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !info.Mode().IsRegular() {
		return nil, &fs.PathError{Op: "read passwd", Path: path, Err: errors.New("not a regular file")}
	}
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, &fs.PathError{Op: "read passwd", Path: path, Err: err}
	}
	if len(data) > MaxSize {
		return nil, &fs.PathError{Op: "read passwd", Path: path, Err: ErrTooLarge}
	}
	return Parse(data), nil
}

// Lookup returns the entry that owns uid, the first entry with that UID,
// and whether there is one.
func Lookup(entries []Entry, uid uint32) (Entry, bool) {
	for _, e := range entries {
		if e.UID == uid {
			return e, true
		}
	}
	return Entry{}, false
}

// NameOf returns the name of uid's account in the passwd file at path: the
// name of the first entry with that UID. A UID without an entry gives
// ErrNoAccount; see Read for the other errors.
func NameOf(path string, uid uint32) (string, error) {
	entries, err := Read(path)
	if err != nil {
		return "", err
	}
	e, ok := Lookup(entries, uid)
	if !ok {
		return "", fmt.Errorf("UID %d in %s: %w", uid, path, ErrNoAccount)
	}
	return e.Name, nil
}

// Selection is what Accounts makes of the entries of a UID range. Each
// slice is in file order.
type Selection struct {
	// Accounts are the entries to account: the first entry of their UID
	// and of their name, not excluded, and with a name that is a safe file
	// name (quota.ValidName).
	Accounts []Entry
	// BadNames are entries that would be accounted but for their names,
	// which quota.ValidName refuses (it gives the reason).
	BadNames []Entry
	// Duplicates are entries not accounted because an earlier entry owns
	// their UID or their name.
	Duplicates []Duplicate
}

// Duplicate is an entry whose UID or name an earlier entry owns.
type Duplicate struct {
	Entry       // the later entry, not accounted
	Owner Entry // the first entry of the UID (if Owner.UID == UID) or else of the name
}

// Accounts selects the entries with uidMin <= UID < uidMax whose names are
// not in exclude. Excluded names are left out silently. Of the others, an
// entry whose UID or name an earlier entry of the file owns (any entry,
// excluded or out of the range included: the first owns it) is a
// Duplicate; then an entry whose name is not a safe file name is a BadName;
// the rest are Accounts. An excluded account's UID is therefore accounted
// for no one.
func Accounts(entries []Entry, uidMin, uidMax uint32, exclude []string) Selection {
	// One pass: the first entry of a UID or name owns it, so an entry's
	// owner is known when it is reached.
	uidOwner := make(map[uint32]int, len(entries))
	nameOwner := make(map[string]int, len(entries))
	s := Selection{Accounts: make([]Entry, 0, len(entries))}
	for i, e := range entries {
		uo, uidTaken := uidOwner[e.UID]
		if !uidTaken {
			uidOwner[e.UID] = i
		}
		no, nameTaken := nameOwner[e.Name]
		if !nameTaken {
			nameOwner[e.Name] = i
		}
		if e.UID < uidMin || e.UID >= uidMax || slices.Contains(exclude, e.Name) {
			continue
		}
		switch {
		case uidTaken:
			s.Duplicates = append(s.Duplicates, Duplicate{Entry: e, Owner: entries[uo]})
		case nameTaken:
			s.Duplicates = append(s.Duplicates, Duplicate{Entry: e, Owner: entries[no]})
		case quota.ValidName(e.Name) != nil:
			s.BadNames = append(s.BadNames, e)
		default:
			s.Accounts = append(s.Accounts, e)
		}
	}
	return s
}
