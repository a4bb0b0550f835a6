// Package passwd reads the accounts of a passwd(5) file: the one parser of
// the agent (its SSH users) and of its control socket (a caller's account
// name). Lines that are comments, NIS entries ("+..." and "-...") or have
// fewer than four fields are skipped, as are UIDs that are not numbers.
package passwd

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/myvpn/bwagent/quota"
)

// MaxSize is the largest passwd file read (16 MiB); a larger one is an
// error rather than a memory sink.
const MaxSize = 16 << 20

// ErrTooLarge is returned for a file over MaxSize.
var ErrTooLarge = errors.New("passwd file too large")

// Entry is one account.
type Entry struct {
	Name     string
	UID, GID uint32
	Line     int // 1-based line number in the file
}

// Read returns the contents of the passwd file at path, at most MaxSize
// bytes.
func Read(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	if len(data) > MaxSize {
		return nil, fmt.Errorf("%s: %w (over %d bytes)", path, ErrTooLarge, MaxSize)
	}
	return data, nil
}

// Parse returns the accounts of a passwd file, in file order.
func Parse(data []byte) []Entry {
	var out []Entry
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if line == "" || line[0] == '#' || line[0] == '+' || line[0] == '-' {
			continue
		}
		f := strings.SplitN(line, ":", 5)
		if len(f) < 4 || f[0] == "" {
			continue
		}
		uid, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil {
			continue
		}
		gid, _ := strconv.ParseUint(f[3], 10, 32)
		out = append(out, Entry{Name: f[0], UID: uint32(uid), GID: uint32(gid), Line: n})
	}
	return out
}

// Accounts are the entries of a UID range, sorted out.
type Accounts struct {
	// Users are the accounts to account: in the range, not excluded, with a
	// safe name, and the first entry of their UID.
	Users []Entry
	// Bad are entries whose name cannot be a file name (quota.ValidName).
	Bad []Entry
	// Shadowed are later entries of a UID an earlier entry already has.
	Shadowed []Entry
}

// Select sorts out the entries with uidMin <= UID < uidMax whose name is
// not in exclude.
func Select(entries []Entry, uidMin, uidMax uint32, exclude []string) Accounts {
	var a Accounts
	seen := make(map[uint32]bool)
	for _, e := range entries {
		if e.UID < uidMin || e.UID >= uidMax || slices.Contains(exclude, e.Name) {
			continue
		}
		switch {
		case quota.ValidName(e.Name) != nil:
			a.Bad = append(a.Bad, e)
		case seen[e.UID]:
			a.Shadowed = append(a.Shadowed, e)
		default:
			seen[e.UID] = true
			a.Users = append(a.Users, e)
		}
	}
	return a
}

// NameOf returns the name of uid's first account in the passwd file at
// path.
func NameOf(path string, uid uint32) (string, error) {
	data, err := Read(path)
	if err != nil {
		return "", err
	}
	for _, e := range Parse(data) {
		if e.UID == uid {
			return e.Name, nil
		}
	}
	return "", fmt.Errorf("UID %d has no account in %s", uid, path)
}
