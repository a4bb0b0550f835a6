package sshsess

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Journal follows the systemd journal for Dropbear's logins, as AuthLog
// follows a file: where a system keeps its logs only in the journal
// (Debian 12 without rsyslog), that is where Dropbear's login lines are. It
// runs `journalctl --follow` for the messages of processes named dropbear
// and reads each login with the PID the journal took from the kernel
// (_PID, a trusted field): unlike in a syslog file, no one can write a
// line for another process's PID (and a Tracker takes a login only for a
// PID that runs Dropbear's program).
type Journal struct {
	namespace string

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{} // closed when cmd ended
	logins  []Login
	err     error     // why the last journalctl ended
	started time.Time // when journalctl was last started
}

// restartEvery bounds how often a journalctl that keeps ending is started
// again: Read runs every few milliseconds while logins are under way.
const restartEvery = 5 * time.Second

// maxQueued bounds the logins a Journal holds between two Reads.
const maxQueued = 4096

// NewJournal returns a Journal of the system journal, or of the journal
// namespace namespace (journalctl --namespace) if it is not "".
func NewJournal(namespace string) *Journal { return &Journal{namespace: namespace} }

// socketPath is where journald listens: there is a journal to read when it
// exists.
func (j *Journal) socketPath() string {
	if j.namespace == "" {
		return "/run/systemd/journal/socket"
	}
	return "/run/systemd/journal." + j.namespace + "/socket"
}

// Read returns the logins the journal received since the last Read. The
// first Read starts following it from now on; a journalctl that ended is
// started again, at most every 5 s (what was logged in between is not
// read). A system without
// a journal, or without journalctl, has nothing to read: no error.
func (j *Journal) Read() ([]Login, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	running := j.cmd != nil
	if running {
		select {
		case <-j.done:
			running = false
		default:
		}
	}
	var err error
	if !running && time.Since(j.started) >= restartEvery {
		err, j.err = j.err, nil
		j.started = time.Now()
		if serr := j.start(); serr != nil {
			err = serr
		}
	}
	logins := j.logins
	j.logins = nil
	return logins, err
}

// start runs journalctl if there is a journal. j.mu must be held.
func (j *Journal) start() error {
	j.cmd = nil
	if _, err := os.Stat(j.socketPath()); err != nil {
		return nil // no journal here
	}
	bin, err := exec.LookPath("journalctl")
	if err != nil {
		return nil
	}
	args := []string{"--follow", "--lines=0", "--output=json", "--no-pager", "--quiet"}
	if j.namespace != "" {
		args = append(args, "--namespace="+j.namespace)
	}
	cmd := exec.Command(bin, append(args, "_COMM=dropbear")...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	j.cmd, j.done = cmd, make(chan struct{})
	go j.read(cmd, out, j.done)
	return nil
}

// read takes journalctl's entries until it ends.
func (j *Journal) read(cmd *exec.Cmd, out io.Reader, done chan struct{}) {
	defer close(done)
	r := bufio.NewReaderSize(out, 64<<10)
	for {
		line, err := r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			skipLine(r) // an entry too long for a login line
			continue
		}
		if len(line) > 0 {
			if l, ok := parseJournalEntry(line); ok {
				j.mu.Lock()
				if len(j.logins) < maxQueued {
					j.logins = append(j.logins, l)
				}
				j.mu.Unlock()
			}
		}
		if err != nil {
			werr := cmd.Wait()
			j.mu.Lock()
			j.err = fmt.Errorf("journal: journalctl ended: %v", errors.Join(werr, ignoreEOF(err)))
			j.mu.Unlock()
			return
		}
	}
}

func ignoreEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// skipLine drops the rest of an over-long entry.
func skipLine(r *bufio.Reader) {
	for {
		_, err := r.ReadSlice('\n')
		if !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
	}
}

// Close stops following the journal.
func (j *Journal) Close() error {
	j.mu.Lock()
	cmd, done := j.cmd, j.done
	j.cmd = nil
	j.mu.Unlock()
	if cmd == nil {
		return nil
	}
	cmd.Process.Kill()
	<-done
	return nil
}

// parseJournalEntry reads a login from one entry of `journalctl --output=json`:
// its MESSAGE, with the PID from _PID. A MESSAGE that is not text (the
// journal writes those as arrays of bytes) is no login.
func parseJournalEntry(line []byte) (Login, bool) {
	var e struct {
		Message json.RawMessage `json:"MESSAGE"`
		PID     string          `json:"_PID"`
	}
	if err := json.Unmarshal(line, &e); err != nil {
		return Login{}, false
	}
	var msg string
	if err := json.Unmarshal(e.Message, &msg); err != nil {
		return Login{}, false
	}
	pid, err := strconv.Atoi(e.PID)
	if err != nil || pid <= 0 || strings.ContainsAny(msg, "\n") {
		return Login{}, false
	}
	return ParseLoginMessage(pid, msg)
}
