package main

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/myvpn/bwagent/internal/nettest"
)

// buildRealAgent builds the real bwagent binary, static as make build makes
// it, into a temporary directory (the go tool's cache makes it a link step).
func buildRealAgent(t *testing.T) string {
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

// realProc is a real binary started by startRealAgent.
type realProc struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error
}

// startRealAgent runs argv in network namespace ns, in a process group of its
// own, with env added to the test's environment and stderr to stderr (nil:
// the test's log). The group is killed in t.Cleanup if it still runs.
func startRealAgent(t *testing.T, ns netns.NsHandle, env []string, stderr io.Writer, argv ...string) *realProc {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout = realLog{t, filepath.Base(argv[0]) + ": "}
	cmd.Stderr = stderr
	if stderr == nil {
		cmd.Stderr = cmd.Stdout
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = 5 * time.Second // a child left holding the output
	// Forked from a thread in ns, which ends right after: no parent-death
	// signal (it would fire then); Cleanup kills the process instead.
	if err := nettest.Do(ns, cmd.Start); err != nil {
		t.Fatalf("start %v: %v", argv, err)
	}
	p := &realProc{cmd: cmd, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	})
	return p
}

// pid returns the process running exe: the started process when it
// execs exe (setpriv), else its first child (strace's tracee).
func (p *realProc) pid(exe string) int {
	pid := p.cmd.Process.Pid
	if path, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); path == exe {
		return pid
	}
	children, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if f := strings.Fields(string(children)); len(f) > 0 {
		if child, err := strconv.Atoi(f[0]); err == nil {
			return child
		}
	}
	return pid
}

// signal sends sig to the process running exe (see pid).
func (p *realProc) signal(t *testing.T, exe string, sig syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(p.pid(exe), sig); err != nil {
		t.Fatal(err)
	}
}

// wait waits for the process to exit and returns its exit error; after
// timeout it kills it and says so.
func (p *realProc) wait(timeout time.Duration) error {
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("killed after %v", timeout)
	}
}

// realLog writes each line to the test's log.
type realLog struct {
	t      *testing.T
	prefix string
}

func (w realLog) Write(b []byte) (int, error) {
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		w.t.Log(w.prefix + line)
	}
	return len(b), nil
}
