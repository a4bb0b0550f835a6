package nettest

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const helperEnv = "BWTEST_HELPER"

var (
	helpersMu sync.Mutex
	helpers   = map[string]func(args []string) error{}
)

// Register adds a helper mode that Start can run in a child process. Call it
// from an init function or from TestMain before Main.
func Register(name string, fn func(args []string) error) {
	helpersMu.Lock()
	defer helpersMu.Unlock()
	helpers[name] = fn
}

// Main runs the test binary as a helper when Start asked for one, and the
// tests otherwise. Call it from TestMain.
func Main(m *testing.M) {
	if name := os.Getenv(helperEnv); name != "" {
		helpersMu.Lock()
		fn := helpers[name]
		helpersMu.Unlock()
		if fn == nil {
			fmt.Fprintf(os.Stderr, "nettest: no helper %q\n", name)
			os.Exit(3)
		}
		if err := fn(os.Args[1:]); err != nil {
			fmt.Printf("ERR %v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	code := m.Run()
	if exeDir != "" {
		os.RemoveAll(exeDir)
	}
	os.Exit(code)
}

var (
	exeOnce sync.Once
	exePath string
	exeErr  error
	exeDir  string
)

// selfCopy returns a copy of the test binary that any UID can execute: the
// go tool builds it in a directory only root can enter.
func selfCopy() (string, error) {
	exeOnce.Do(func() {
		var src string
		if src, exeErr = os.Executable(); exeErr != nil {
			return
		}
		if exeDir, exeErr = os.MkdirTemp("", "bwtest-exe-"); exeErr != nil {
			return
		}
		if exeErr = os.Chmod(exeDir, 0o755); exeErr != nil {
			return
		}
		exePath = filepath.Join(exeDir, "helper")
		var in, out *os.File
		if in, exeErr = os.Open(src); exeErr != nil {
			return
		}
		defer in.Close()
		if out, exeErr = os.OpenFile(exePath, os.O_CREATE|os.O_WRONLY, 0o755); exeErr != nil {
			return
		}
		if _, exeErr = io.Copy(out, in); exeErr == nil {
			exeErr = out.Close()
		} else {
			out.Close()
		}
	})
	return exePath, exeErr
}

// Proc is a helper process. Its stdout lines arrive on Lines; the last one
// is kept in Last.
type Proc struct {
	Cmd   *exec.Cmd
	Lines chan string
	done  chan struct{}
	err   error

	mu   sync.Mutex
	last string
}

// Spec says where and as whom a helper runs.
type Spec struct {
	NS     netns.NsHandle // network namespace; 0 for the test's own
	Cgroup string         // cgroup v2 directory to start in; "" for the test's own
	UID    uint32         // user and group the process runs as
}

// Start runs helper mode name with args as spec says, and kills it in
// t.Cleanup if it is still running.
func Start(t testing.TB, spec Spec, name string, args ...string) *Proc {
	t.Helper()
	exe, err := selfCopy()
	if err != nil {
		t.Fatalf("helper binary: %v", err)
	}
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), helperEnv+"="+name)
	return start(t, spec, name, cmd)
}

// Exec runs an external command as spec says, like Start.
func Exec(t testing.TB, spec Spec, name string, args ...string) *Proc {
	t.Helper()
	return start(t, spec, name, exec.Command(name, args...))
}

func start(t testing.TB, spec Spec, name string, cmd *exec.Cmd) *Proc {
	t.Helper()
	cmd.Stderr = &prefixWriter{t: t, prefix: name + ": "}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: spec.UID, Gid: spec.UID},
		Pdeathsig:  syscall.SIGKILL,
	}
	if spec.Cgroup != "" {
		fd, err := unix.Open(spec.Cgroup, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatalf("open cgroup: %v", err)
		}
		defer unix.Close(fd)
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = fd
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := func() error { return Spawn(cmd.Start) }
	if spec.NS != 0 {
		// The child is forked from the calling thread and so is born in
		// its network namespace. That thread ends right after, which
		// would fire a parent-death signal: Cleanup kills the child instead.
		cmd.SysProcAttr.Pdeathsig = 0
		start = func() error { return Do(spec.NS, cmd.Start) }
	}
	if err := start(); err != nil {
		t.Fatalf("start helper %s: %v", name, err)
	}
	p := &Proc{Cmd: cmd, Lines: make(chan string, 4096), done: make(chan struct{})}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.last = line
			p.mu.Unlock()
			select {
			case p.Lines <- line:
			default: // nobody reads progress lines: drop them, keep Last
			}
		}
		p.err = cmd.Wait()
		close(p.Lines)
		close(p.done)
	}()
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

// Last returns the last line the helper printed.
func (p *Proc) Last() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last
}

// Expect waits for a line that starts with prefix and returns it.
func (p *Proc) Expect(t testing.TB, prefix string, timeout time.Duration) string {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case line, ok := <-p.Lines:
			if !ok {
				t.Fatalf("helper exited (%v) before printing %q; last line %q", p.err, prefix, p.Last())
			}
			if strings.HasPrefix(line, prefix) {
				return line
			}
		case <-deadline:
			t.Fatalf("no %q line from helper within %v; last line %q", prefix, timeout, p.Last())
		}
	}
}

// Done waits up to 30 s for a traffic helper's "DONE sent received" line
// and returns its payload bytes each way.
func (p *Proc) Done(t testing.TB) (sent, received uint64) {
	t.Helper()
	sent, received, err := ParseDone(p.Expect(t, "DONE", 30*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	return sent, received
}

// Wait waits for the helper to exit and returns its exit error.
func (p *Proc) Wait(timeout time.Duration) error {
	select {
	case <-p.done:
		return p.err
	case <-time.After(timeout):
		p.Cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("helper killed after %v", timeout)
	}
}

type prefixWriter struct {
	t      testing.TB
	prefix string
}

func (w *prefixWriter) Write(b []byte) (int, error) {
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		w.t.Log(w.prefix + line)
	}
	return len(b), nil
}

// Progress reads a streaming helper's "P sent received" lines for settle and
// returns the last one's counts.
func (p *Proc) Progress(t testing.TB, settle time.Duration) (sent, recv uint64) {
	t.Helper()
	deadline := time.After(settle)
	for {
		select {
		case line, ok := <-p.Lines:
			if !ok {
				t.Fatalf("stream ended: %q", p.Last())
			}
			if strings.HasPrefix(line, "P ") {
				var err error
				if sent, recv, err = ParseDone(line); err != nil {
					t.Fatal(err)
				}
			}
		case <-deadline:
			return sent, recv
		}
	}
}
