package notify

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Exec runs a program once per event: the event as JSON (and a newline) on
// its standard input and in BWAGENT_* environment variables (Payload.Env)
// besides the agent's own, in directory /. Exit status 0 delivers it. The
// program runs in a process group of its own, which is killed (SIGKILL)
// when the attempt's context ends: at the channel's timeout, or when the
// notifier stops.
type Exec struct {
	argv []string
	name string
}

var _ Sender = (*Exec)(nil)

// NewExec returns a sender running argv (the program's path and its
// arguments).
func NewExec(argv []string) *Exec {
	return &Exec{argv: argv, name: "exec " + argv[0]}
}

// waitDelay is how long Send waits for the program's output to close after
// it exited (or was killed): a background child it left may hold it open.
const waitDelay = time.Second

// Send runs the program.
func (x *Exec) Send(ctx context.Context, p *Payload, body []byte) error {
	cmd := exec.CommandContext(ctx, x.argv[0], x.argv[1:]...)
	cmd.Dir = "/"
	cmd.Env = append(ownEnv(), p.Env()...)
	cmd.Stdin = bytes.NewReader(append(body[:len(body):len(body)], '\n'))
	out := &tailBuffer{max: 4096}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = waitDelay
	err := cmd.Run()
	if ctx.Err() != nil && cmd.ProcessState != nil && !cmd.ProcessState.Success() {
		return fmt.Errorf("%s: killed with its process group: %w", x.name, ctx.Err())
	}
	if errors.Is(err, exec.ErrWaitDelay) && cmd.ProcessState.Success() {
		return nil // exited 0; a child it left holds its output
	}
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			err = fmt.Errorf("%w: %s", ErrRefused, ee.ProcessState)
		}
		if line := out.lastLine(); line != "" {
			err = fmt.Errorf("%w: %s", err, line)
		}
		return fmt.Errorf("%s: %w", x.name, err)
	}
	return nil
}

// ownEnv returns the agent's environment without BWAGENT_* variables, which
// are the event's.
func ownEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "BWAGENT_") {
			env = append(env, kv)
		}
	}
	return env
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if over := len(t.b) - t.max; over > 0 {
		t.b = t.b[over:]
	}
	return len(p), nil
}

// lastLine returns the last non-empty line written, at most 200 bytes.
func (t *tailBuffer) lastLine() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := strings.TrimSpace(string(t.b))
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return firstLine([]byte(s))
}
