package agent

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
)

// user is the agent's record of one user.
type user struct {
	name    string
	proto   quota.Protocol
	uid     uint32 // SSH users
	present bool   // an account in /etc/passwd (or an Xray client) right now
	st      quota.State
	status  quota.Status
	plan    quota.Plan // from the limits file

	anchor    anchor // kernel budget granted (SSH users)
	hasAnchor bool

	enforcedBlock bool // the block the nft set and markers were last built with

	queued  bool          // in the agent's evaluation queue
	dirty   bool          // the state row must be committed
	json    jsonState     // what the usage file needs
	updated quota.Instant // last change of usage or state
}

// jsonState says how soon a user's usage file must be rewritten.
type jsonState uint8

const (
	jsonClean  jsonState = iota
	jsonUsage            // usage moved: written at the next JSON interval
	jsonUrgent           // status or record changed: written this tick
)

// stamp identifies a version of a file cheaply, to re-read it only when it
// changed.
type stamp struct {
	ino, size int64
	mtime     time.Time
	missing   bool
	valid     bool
}

func statStamp(path string) (stamp, error) {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return stamp{missing: true, valid: true}, nil
	}
	if err != nil {
		return stamp{}, err
	}
	s := stamp{size: fi.Size(), mtime: fi.ModTime(), valid: true}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.ino = int64(st.Ino)
	}
	return s, nil
}

// account is one line of /etc/passwd in the SSH UID range.
type account struct {
	name string
	uid  uint32
}

// parsePasswd returns the accounts with uidMin <= UID < uidMax, skipping
// excluded names; names that cannot be file names are returned in bad.
func parsePasswd(data []byte, uidMin, uidMax uint32, exclude []string) (accts []account, bad []string) {
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' || line[0] == '+' || line[0] == '-' {
			continue
		}
		f := strings.SplitN(line, ":", 4)
		if len(f) < 4 {
			continue
		}
		uid, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil || uint32(uid) < uidMin || uint32(uid) >= uidMax {
			continue
		}
		if slices.Contains(exclude, f[0]) {
			continue
		}
		if quota.ValidName(f[0]) != nil {
			bad = append(bad, f[0])
			continue
		}
		accts = append(accts, account{name: f[0], uid: uint32(uid)})
	}
	return accts, bad
}

// loadAccounts re-reads the SSH accounts when the passwd file changed.
func (a *Agent) loadAccounts() error {
	if !a.cfg.SSH.Enabled {
		return nil
	}
	path := a.cfg.Paths.Passwd
	s, err := statStamp(path)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if s == a.passwdStamp {
		return nil
	}
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%s: %w", path, err)
	}
	accts, bad := parsePasswd(data, a.cfg.SSH.UIDMin, a.cfg.SSH.UIDMax, a.cfg.SSH.Exclude)
	for _, name := range bad {
		a.warnOnce("badname:"+name, "account name is not a safe file name; not accounted", "name", fmt.Sprintf("%q", name), "err", quota.ValidName(name))
	}
	now := a.now().In(a.loc)
	seen := make(map[string]bool, len(accts))
	clear(a.byUID)
	for _, ac := range accts {
		if other := a.byUID[ac.uid]; other != nil {
			a.warnOnce(fmt.Sprintf("dupuid:%d", ac.uid), "two accounts share a UID; the first is accounted",
				"uid", ac.uid, "accounted", other.name, "ignored", ac.name)
			continue
		}
		u := a.users[ac.name]
		switch {
		case u == nil:
			u = &user{name: ac.name, proto: quota.SSH, plan: a.plans[ac.name]}
			delete(a.plans, ac.name)
			a.users[ac.name] = u
			a.touch(u, now, jsonUrgent)
		case u.proto != quota.SSH && u.proto != "" && u.present:
			a.warnOnce("clash:"+ac.name, "an SSH account has the name of an Xray user; the SSH account is not accounted",
				"name", ac.name, "protocol", u.proto)
			continue
		}
		if u.proto != quota.SSH || u.uid != ac.uid || !u.present {
			if u.present && u.proto == quota.SSH && u.uid != ac.uid {
				a.setPolicy(u.uid, bpf.Policy{}) // the old UID is no longer this user's
				a.nftBlock(u.uid, false)
			}
			u.proto, u.uid, u.present = quota.SSH, ac.uid, true
			u.hasAnchor = false
			a.touch(u, now, jsonUrgent)
			a.queue(u)
			a.nftDirty = true
		}
		a.byUID[ac.uid] = u
		seen[ac.name] = true
	}
	for name, u := range a.users {
		if u.proto == quota.SSH && u.present && !seen[name] {
			u.present = false // the account is gone; its record and usage stay
			u.hasAnchor = false
			a.setPolicy(u.uid, bpf.Policy{})
			a.nftBlock(u.uid, false)
		}
	}
	a.passwdStamp = s
	return nil
}

// loadLimits re-reads the limits file when it changed. A bad line is logged
// once with its line number and skipped; the other lines still apply.
func (a *Agent) loadLimits() error {
	path := a.cfg.Paths.Limits
	s, err := statStamp(path)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if s == a.limitsStamp {
		return nil
	}
	l, lineErrs, err := opsfiles.ReadLimits(path)
	if err != nil {
		return err
	}
	for _, le := range lineErrs {
		a.warnOnce(fmt.Sprintf("limits:%v:%s", s.mtime.UnixNano(), le.Error()), "limits file: bad line skipped", "err", le.Error())
	}
	plans := make(map[string]quota.Plan)
	for _, e := range l.Entries() {
		plans[e.User] = e.Plan(a.loc)
	}
	// Each user keeps its plan; a.plans keeps only the lines of names that
	// are no user yet (an account created later takes its line then).
	now := a.now().In(a.loc)
	for name, u := range a.users {
		if p := plans[name]; u.plan != p {
			u.plan = p
			a.touch(u, now, jsonUrgent)
			a.queue(u)
		}
	}
	// A new map: Go maps keep their size after deletes.
	a.plans = make(map[string]quota.Plan)
	for name, p := range plans {
		if a.users[name] == nil {
			a.plans[name] = p
		}
	}
	a.limitsStamp = s
	return nil
}
