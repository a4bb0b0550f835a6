package sshtest

import (
	"bufio"
	"crypto/rand"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/internal/nettest"
)

// FirstUID and LastUID bound the UIDs of the accounts that [NewAccount]
// creates. No other test of the project uses UIDs in this range (the
// real-kernel tests use 2100-3001, 10000-15000 and others far from it),
// so a test may configure an agent's SSH UID range to it; but test
// packages run in parallel, and each may have accounts here at the same
// time, so a test that reads /etc/passwd must pick out its own accounts
// (see [Account.PasswdLine]).
const (
	FirstUID = 4300
	LastUID  = 4399
)

// gecosTag starts the comment (GECOS) field of every account NewAccount
// creates; the creating process's PID and start time follow, so that
// accounts left behind by a test binary that was killed can be told apart
// and removed.
const gecosTag = "bwagent sshtest"

// Account is a real Linux account in /etc/passwd and /etc/shadow, with a
// home directory, the shell /bin/sh and a password: one that both SSH
// servers let log in.
type Account struct {
	// Name is the login name: "bwsh-" and 8 random hex digits.
	Name string
	// UID and GID are the account's user and (own) group.
	UID, GID uint32
	// Password is the account's password, random.
	Password string
	// Home is the home directory, created for the account.
	Home string

	passwdLine string
}

// NewAccount creates an account with a free UID from [FirstUID] to
// [LastUID] (useradd, chpasswd). In t.Cleanup every process that runs as
// its UID is killed and the account is removed with its home directory
// and group (userdel -r), also when t failed. Accounts that an earlier test
// binary left behind, killed before its cleanup, are removed first (once
// per test binary).
func NewAccount(t testing.TB) *Account {
	t.Helper()
	nettest.RequireRoot(t)
	for _, tool := range []string{"useradd", "userdel", "chpasswd"} {
		need(t, tool)
	}
	if !shellListed("/bin/sh") {
		t.Fatal("sshtest: /bin/sh is not in /etc/shells: Dropbear refuses such accounts")
	}
	sweepOnce.Do(func() { sweep(t) })

	pid, start := owner()
	gecos := fmt.Sprintf("%s pid=%d start=%d", gecosTag, pid, start)
	a := &Account{Password: rand.Text()}
	deadline := time.Now().Add(20 * time.Second)
	for {
		uid := FirstUID + mrand.IntN(LastUID-FirstUID+1)
		name := nettest.Name("bwsh-")
		out, err := exec.Command("useradd", "-m", "-U", "-u", strconv.Itoa(uid), "-s", "/bin/sh", "-c", gecos, name).CombinedOutput()
		if err == nil {
			a.Name, a.UID = name, uint32(uid)
			break
		}
		// 4: the UID is taken; 9: the name is; 1 and 10: the password or
		// group file is locked by another useradd or userdel.
		if code := exitCode(err); (code != 4 && code != 9 && code != 1 && code != 10) || time.Now().After(deadline) {
			t.Fatalf("useradd %s: %v: %s", name, err, out)
		}
		time.Sleep(time.Duration(10+mrand.IntN(40)) * time.Millisecond)
	}
	t.Cleanup(func() {
		if err := removeAccount(a.Name, a.UID); err != nil {
			t.Error(err)
		}
	})

	chpasswd := exec.Command("chpasswd")
	chpasswd.Stdin = strings.NewReader(a.Name + ":" + a.Password + "\n")
	if out, err := chpasswd.CombinedOutput(); err != nil {
		t.Fatalf("chpasswd %s: %v: %s", a.Name, err, out)
	}
	entries, err := readPasswd()
	if err != nil {
		t.Fatal(err)
	}
	e, ok := entries[a.Name]
	if !ok || e.uid != a.UID {
		t.Fatalf("sshtest: account %s (UID %d) not in /etc/passwd after useradd: %+v", a.Name, a.UID, e)
	}
	a.GID, a.Home, a.passwdLine = e.gid, e.home, e.line
	return a
}

// PasswdLine returns the account's line of /etc/passwd, without the
// newline: "NAME:x:UID:GID:COMMENT:HOME:/bin/sh". A test gives an agent a
// passwd file of its own accounts made of these lines.
func (a *Account) PasswdLine() string { return a.passwdLine }

// AuthorizeKey makes a new ed25519 key pair without a passphrase, adds its
// public key to the account's ~/.ssh/authorized_keys, and returns the
// private key's file, for [ClientOptions.Identity]. The key is removed in
// t.Cleanup.
func (a *Account) AuthorizeKey(t testing.TB) string {
	t.Helper()
	need(t, "ssh-keygen")
	dir, err := os.MkdirTemp("", "bwsshkey-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	// A client that runs as another UID must reach the key (see
	// ClientOptions.Identity); the key file itself stays 0600.
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	key := filepath.Join(dir, "id_ed25519")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", a.Name, "-f", key).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v: %s", err, out)
	}
	pub, err := os.ReadFile(key + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	sshDir := filepath.Join(a.Home, ".ssh")
	authorized := filepath.Join(sshDir, "authorized_keys")
	if err := os.MkdirAll(sshDir, 0o700); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(authorized, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.Write(pub)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{sshDir, authorized} {
		if err := os.Chown(p, int(a.UID), int(a.GID)); err != nil {
			t.Fatal(err)
		}
	}
	return key
}

// passwdEntry is a line of /etc/passwd.
type passwdEntry struct {
	uid, gid    uint32
	gecos, home string
	line        string
}

// readPasswd reads /etc/passwd by name.
func readPasswd() (map[string]passwdEntry, error) {
	f, err := os.Open("/etc/passwd")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	entries := map[string]passwdEntry{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) != 7 {
			continue
		}
		uid, err1 := strconv.ParseUint(fields[2], 10, 32)
		gid, err2 := strconv.ParseUint(fields[3], 10, 32)
		if err1 != nil || err2 != nil {
			continue
		}
		entries[fields[0]] = passwdEntry{uint32(uid), uint32(gid), fields[4], fields[5], sc.Text()}
	}
	return entries, sc.Err()
}

// shellListed tells whether shell is in /etc/shells.
func shellListed(shell string) bool {
	b, err := os.ReadFile("/etc/shells")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.TrimSpace(line) == shell {
			return true
		}
	}
	return false
}

var sweepOnce sync.Once

// sweep removes the accounts in the UID range that a test binary created
// and did not remove because it was killed: their creator, by PID and
// start time, is gone.
func sweep(t testing.TB) {
	entries, err := readPasswd()
	if err != nil {
		return
	}
	for name, e := range entries {
		if e.uid < FirstUID || e.uid > LastUID {
			continue
		}
		rest, ok := strings.CutPrefix(e.gecos, gecosTag+" ")
		if !ok {
			continue
		}
		var pid int
		var start uint64
		if _, err := fmt.Sscanf(rest, "pid=%d start=%d", &pid, &start); err != nil {
			continue
		}
		if running(pid, start) {
			continue
		}
		if err := removeAccount(name, e.uid); err != nil {
			t.Logf("sshtest: stale account %s: %v", name, err)
		} else {
			t.Logf("sshtest: removed stale account %s (UID %d) of a test binary that was killed", name, e.uid)
		}
	}
}

// removeAccount kills every process of uid, then removes the account name
// with its home and group, retrying while the password files are locked
// by another useradd or userdel. An account already gone is no error.
func removeAccount(name string, uid uint32) error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		killUID(uid, deadline)
		// -f: the account's killed processes may be zombies until
		// their parent reaps them, which userdel refuses (exit 8)
		// without it.
		out, err := exec.Command("userdel", "-f", "-r", name).CombinedOutput()
		code := exitCode(err)
		if err == nil || code == 6 { // 6: no such user
			return nil
		}
		// 1 and 10: a password or group file is locked. Anything else
		// (such as 12, a home directory that could not be removed) is
		// left.
		if (code != 1 && code != 10) || time.Now().After(deadline) {
			return fmt.Errorf("userdel -r %s: %v: %s", name, err, out)
		}
		time.Sleep(time.Duration(10+mrand.IntN(40)) * time.Millisecond)
	}
}

// killUID kills every process that has uid as its real, effective, saved
// or file system UID, until there is none (but zombies) or the deadline
// passes.
func killUID(uid uint32, deadline time.Time) {
	for {
		found := false
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			uids, ok := uidsOf(pid)
			if ok && !zombie(pid) && (uids[0] == uid || uids[1] == uid || uids[2] == uid || uids[3] == uid) {
				unix.Kill(pid, unix.SIGKILL)
				found = true
			}
		}
		if !found || time.Now().After(deadline) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// exitCode returns the exit code of a command's error, -1 if it did not
// exit with one.
func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// need skips t unless the program is installed, or fails it in CI
// (CI=true), where scripts/install-deps.sh --test must have installed it.
func need(t testing.TB, program string) string {
	t.Helper()
	path, err := exec.LookPath(program)
	if err != nil {
		msg := fmt.Sprintf("sshtest: no %s (run ./scripts/install-deps.sh --test): %v", program, err)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return path
}
