package xraytest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/nettest"
)

// proc is an Xray process.
type proc struct {
	name    string
	cmdline []string
	ports   []int // the TCP ports it listens on
	logPath string
	cgroup  string // the cgroup v2 directory it runs in; "" the caller's
	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{} // closed when cmd.Wait returned
	stopped bool
}

// errBind means that Xray exited while starting, or shares a port with
// another listener, likely because one of its ports was taken meanwhile: the
// caller retries with other ports.
var errBind = errors.New("xray exited while starting")

// writeConfig writes cfg as indented JSON to path.
func writeConfig(t testing.TB, path string, cfg any) {
	t.Helper()
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o600); err != nil {
		t.Fatal(err)
	}
}

// runXray runs `xray run -c cfgPath`, its output appended to logPath, until
// its ports all accept connections. It is killed and waited for in
// t.Cleanup, where the end of its log is logged if t failed.
func runXray(t testing.TB, name, cfgPath, logPath string, ports []int) (*proc, error) {
	t.Helper()
	return runXrayIn(t, name, cfgPath, logPath, ports, "")
}

// runXrayIn is runXray in the cgroup v2 directory cgroup ("": the caller's).
func runXrayIn(t testing.TB, name, cfgPath, logPath string, ports []int, cgroup string) (*proc, error) {
	t.Helper()
	p := &proc{
		name:    name,
		cmdline: []string{Bin(t), "run", "-c", cfgPath},
		ports:   ports,
		logPath: logPath,
		cgroup:  cgroup,
	}
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			if out, err := os.ReadFile(p.logPath); err == nil {
				t.Logf("%s log (%s):\n%s", name, p.logPath, tail(out, 12000))
			}
		}
	})
	return p, p.start(t)
}

// retry calls start up to three times, as long as it fails with errBind:
// start picks fresh ports each time.
func retry(t testing.TB, start func() (*proc, error)) *proc {
	t.Helper()
	for try := 0; ; try++ {
		p, err := start()
		if err == nil {
			return p
		}
		if try == 2 || !errors.Is(err, errBind) {
			t.Fatal(err)
		}
		t.Logf("retrying with other ports: %v", err)
	}
}

// start runs the process and waits until it accepts connections on all of
// its ports, or fails with errBind if it exits first.
func (p *proc) start(t testing.TB) error {
	t.Helper()
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(p.cmdline[0], p.cmdline[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Dies with the test binary, should that be killed (see nettest.Spawn).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if p.cgroup != "" {
		// Born in it (clone3 with CLONE_INTO_CGROUP): its first socket is
		// already the cgroup's.
		cg, err := os.Open(p.cgroup)
		if err != nil {
			t.Fatal(err)
		}
		defer cg.Close()
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, int(cg.Fd())
	}
	if err := nettest.Spawn(cmd.Start); err != nil {
		t.Fatalf("start %s: %v", p.name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	p.mu.Lock()
	p.cmd, p.done, p.stopped = cmd, done, false
	p.mu.Unlock()

	deadline := time.Now().Add(10 * time.Second)
	for _, port := range p.ports {
		for {
			c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second)
			if err == nil {
				c.Close()
				break
			}
			select {
			case <-done:
				out, _ := os.ReadFile(p.logPath)
				return fmt.Errorf("%w: %s: %s", errBind, p.name, tail(out, 2000))
			case <-time.After(20 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				p.kill()
				t.Fatalf("%s: port %d not listening after 10s", p.name, port)
			}
		}
	}
	// Its ports are its own: see FreePort.
	for _, port := range p.ports {
		if n := listeners(t, port); n != 1 {
			p.kill()
			return fmt.Errorf("%w: %s: %d listening sockets on port %d", errBind, p.name, n, port)
		}
	}
	return nil
}

// listeners counts the TCP sockets that listen on port, on any IPv4 or
// IPv6 address, per /proc/thread-self/net.
func listeners(t testing.TB, port int) int {
	t.Helper()
	// This thread's network namespace, not the main thread's (/proc/net):
	// a test that ran a helper in another namespace can leave the main
	// thread there (the runtime parks a locked main thread, never exits it).
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	n, err := nettest.Listeners("/proc/thread-self/net", port)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// pid returns the process ID, 0 if not running.
func (p *proc) pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.stopped {
		return 0
	}
	return p.cmd.Process.Pid
}

// kill kills the process, if running, and waits for it to exit.
func (p *proc) kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.stopped {
		return
	}
	p.cmd.Process.Signal(syscall.SIGCONT) // should it be frozen
	p.cmd.Process.Kill()
	<-p.done
	p.stopped = true
}

// freeze stops the process with SIGSTOP, as if it hung, and returns once
// all of its threads are stopped: the signal takes effect asynchronously.
func (p *proc) freeze(t testing.TB) {
	t.Helper()
	pid := p.pid()
	if pid == 0 {
		t.Fatalf("%s: freeze: not running", p.name)
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !allThreadsStopped(t, p.name, pid) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not stopped 5s after SIGSTOP", p.name)
		}
		time.Sleep(time.Millisecond)
	}
}

// thaw resumes the process after freeze.
func (p *proc) thaw(t testing.TB) {
	t.Helper()
	pid := p.pid()
	if pid == 0 {
		t.Fatalf("%s: thaw: not running", p.name)
	}
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
}

// allThreadsStopped tells whether every thread of process pid is in state
// T (stopped), per /proc.
func allThreadsStopped(t testing.TB, name string, pid int) bool {
	t.Helper()
	stats, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	if err != nil || len(stats) == 0 {
		t.Fatalf("%s: no threads in /proc: %v", name, err)
	}
	for _, path := range stats {
		b, err := os.ReadFile(path)
		if err != nil {
			return false // a thread that just exited: look again
		}
		// "pid (comm) S ...": the state follows the last ')'.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 || i+2 >= len(b) || b[i+2] != 'T' {
			return false
		}
	}
	return true
}

// tail returns the last n bytes of b, or b.
func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
