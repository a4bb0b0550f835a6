package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/myvpn/bwagent/internal/nettest"
)

// buildBinary builds the real bwagent binary, static as make build makes
// it, into a temporary directory (the go tool's cache makes it a link step).
func buildBinary(t *testing.T) string {
	t.Helper()
	gotool, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the real-binary tests build bwagent with the go tool: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "bwagent")
	cmd := exec.Command(gotool, "build", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// binProc is a real binary started by startBinary.
type binProc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// startBinary runs argv in network namespace ns with env added to the
// test's environment and stderr to stderr (nil: the test's log). It is
// killed in t.Cleanup if it still runs.
func startBinary(t *testing.T, ns netns.NsHandle, env []string, stderr io.Writer, argv ...string) *binProc {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout = testLog{t, filepath.Base(argv[0]) + ": "}
	cmd.Stderr = stderr
	if stderr == nil {
		cmd.Stderr = cmd.Stdout
	}
	// Forked from a thread in ns, which ends right after: no parent-death
	// signal (it would fire then); Cleanup kills the process instead.
	if err := nettest.Do(ns, cmd.Start); err != nil {
		t.Fatalf("start %v: %v", argv, err)
	}
	p := &binProc{cmd: cmd, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// signal sends sig to the process.
func (p *binProc) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// wait waits for the process to exit and returns its exit error; after
// timeout it kills it and says so.
func (p *binProc) wait(timeout time.Duration) error {
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("killed after %v", timeout)
	}
}

// testLog writes each line to the test's log.
type testLog struct {
	t      *testing.T
	prefix string
}

func (w testLog) Write(b []byte) (int, error) {
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		w.t.Log(w.prefix + line)
	}
	return len(b), nil
}
