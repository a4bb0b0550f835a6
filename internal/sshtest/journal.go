package sshtest

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/nettest"
)

// Journal is a systemd-journald of the test's own: a journal namespace
// (journald's first argument, read with `journalctl --namespace`), which a
// Dropbear server logs to through syslog (see [Options.Journal]) as it does
// on a system that keeps its logs only in the journal.
type Journal struct {
	// Namespace is the journal namespace's name.
	Namespace string
	// Dir is where it listens: /run/systemd/journal.NAMESPACE.
	Dir string
}

// StartJournal starts a journald for a new journal namespace and returns
// once it listens. In t.Cleanup it is stopped and its sockets and journal
// files are removed (and /var/log/journal, if it made it).
func StartJournal(t testing.TB) *Journal {
	t.Helper()
	nettest.RequireRoot(t)
	bin := need(t, "/lib/systemd/systemd-journald")
	need(t, "journalctl")
	need(t, "unshare")
	var b [4]byte
	rand.Read(b[:])
	j := &Journal{Namespace: "bwtest" + hex.EncodeToString(b[:])}
	j.Dir = "/run/systemd/journal." + j.Namespace
	_, statErr := os.Stat("/var/log/journal")
	madeVarLog := errors.Is(statErr, os.ErrNotExist)
	cmd := exec.Command(bin, j.Namespace)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := nettest.Spawn(cmd.Start); err != nil {
		t.Fatalf("start journald: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		os.RemoveAll(j.Dir)
		id, _ := os.ReadFile("/etc/machine-id")
		store := strings.TrimSpace(string(id)) + "." + j.Namespace
		os.RemoveAll(filepath.Join("/run/log/journal", store))
		os.RemoveAll(filepath.Join("/var/log/journal", store))
		if madeVarLog {
			os.Remove("/var/log/journal") // only if empty
		}
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(filepath.Join(j.Dir, "dev-log")); err == nil {
			return j
		}
		select {
		case <-done:
			t.Fatal("journald exited while starting")
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("journald of %s not listening after 10 s", j.Namespace)
		}
	}
}

// syslogTo is the shell script that runs a command whose syslog(3) goes to
// the journal listening in $1: in a mount namespace of its own, /dev is a
// copy of the devices a server needs and /dev/log leads to that journal
// (glibc's syslog writes to /dev/log, which this host may not even have).
// $2 is a scratch directory; the command follows.
const syslogTo = `set -e
j=$1; scratch=$2; shift 2
mkdir -p "$scratch/dev"
mount --bind /dev "$scratch/dev"
mount -t tmpfs -o mode=755 bwtestdev /dev
for n in null zero full random urandom tty ptmx; do touch /dev/$n; mount --bind "$scratch/dev/$n" /dev/$n; done
mkdir /dev/pts
mount --bind "$scratch/dev/pts" /dev/pts
ln -s "$j/dev-log" /dev/log
exec "$@"
`

// syslogArgv wraps argv in syslogTo for j, with scratch as its scratch
// directory.
func (j *Journal) syslogArgv(scratch string, argv []string) []string {
	return append([]string{"unshare", "--mount", "--propagation", "private", "sh", "-c", syslogTo, "sh", j.Dir, scratch}, argv...)
}
