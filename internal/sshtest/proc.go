package sshtest

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/sockkill"
)

// place is where a process runs: a network namespace (0: the test's own)
// and a cgroup v2 directory of its own, made for it under a parent.
type place struct {
	ns     netns.NsHandle
	cgroup string
}

// newPlace makes a cgroup of its own under parent ("": the cgroup v2
// root) in which every process started there is killed, and the cgroup
// removed, in t.Cleanup. Its name, "bwssh-PID-START-RANDOM", names the test
// binary that made it, so that the cgroups of one that was killed before
// its cleanup can be found and removed: the first newPlace of any test
// binary does so.
func newPlace(t testing.TB, ns netns.NsHandle, parent string) place {
	t.Helper()
	root, err := bpf.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	cgroupSweep.Do(func() { sweepCgroups(t, root) })
	if parent == "" {
		parent = root
	}
	pid, start := owner()
	dir := filepath.Join(parent, fmt.Sprintf("%s%d-%d-%s", cgroupPrefix, pid, start, nettest.Name("")))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	p := place{ns: ns, cgroup: dir}
	t.Cleanup(func() {
		if err := p.remove(5 * time.Second); err != nil {
			t.Error(err)
		}
	})
	return p
}

// cgroupPrefix starts the names of the cgroups that newPlace makes.
const cgroupPrefix = "bwssh-"

var cgroupSweep sync.Once

// sweepCgroups removes the cgroups directly under root that newPlace made
// in a test binary that is gone, with every process in them.
func sweepCgroups(t testing.TB, root string) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return
	}
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), cgroupPrefix)
		if !ok || !e.IsDir() {
			continue
		}
		var pid int
		var start uint64
		if _, err := fmt.Sscanf(rest, "%d-%d-", &pid, &start); err != nil || running(pid, start) {
			continue
		}
		p := place{cgroup: filepath.Join(root, e.Name())}
		if err := p.remove(2 * time.Second); err != nil {
			t.Logf("sshtest: stale cgroup: %v", err)
		} else {
			t.Logf("sshtest: removed stale cgroup %s of a test binary that was killed", p.cgroup)
		}
	}
}

// remove kills every process of p's cgroup and removes the cgroup, trying
// for up to timeout while its processes exit. A cgroup already gone is no
// error.
func (p place) remove(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		p.kill()
		err := os.Remove(p.cgroup)
		if err == nil || os.IsNotExist(err) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: %w", p.cgroup, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// owner returns this process's PID and start time, which name the test
// binary in the names of the cgroups and the comments of the accounts it
// makes.
func owner() (pid int, start uint64) {
	pid = os.Getpid()
	start, _ = startTime(pid)
	return pid, start
}

// running tells whether the process that owner returned pid and start for
// still runs.
func running(pid int, start uint64) bool {
	now, ok := startTime(pid)
	return ok && now == start
}

// start starts cmd as uid (and the group of the same number) in p.
// Without a network namespace the process dies with the test binary; in
// one, it is forked from a thread that ends at once, which would fire the
// parent-death signal, so it has none and dies with its cgroup instead (as
// in package nettest).
func (p place) start(cmd *exec.Cmd, uid uint32) error {
	fd, err := unix.Open(p.cgroup, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open cgroup: %w", err)
	}
	defer unix.Close(fd)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		UseCgroupFD: true,
		CgroupFD:    fd,
		Pdeathsig:   syscall.SIGKILL,
	}
	if uid != 0 {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uid, Gid: uid}
	}
	if p.ns == 0 {
		return nettest.Spawn(cmd.Start)
	}
	cmd.SysProcAttr.Pdeathsig = 0
	return p.do(cmd.Start)
}

// do runs fn on a thread in p's network namespace: the calling one for the
// test's own, a thread of its own that ends with fn for another (see
// nettest.Do).
func (p place) do(fn func() error) error {
	if p.ns == 0 {
		return fn()
	}
	return nettest.Do(p.ns, fn)
}

// kill kills every process of p's cgroup.
func (p place) kill() {
	if os.WriteFile(filepath.Join(p.cgroup, "cgroup.kill"), []byte("1"), 0) == nil {
		return
	}
	for _, pid := range p.pids() {
		unix.Kill(pid, unix.SIGKILL)
	}
}

// pids returns the processes in p's cgroup.
func (p place) pids() []int {
	b, _ := os.ReadFile(filepath.Join(p.cgroup, "cgroup.procs"))
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// listen opens a TCP listener on 127.0.0.1, port 0, in p's network
// namespace.
func (p place) listen() (net.Listener, error) {
	var l net.Listener
	err := p.do(func() (err error) {
		l, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	})
	return l, err
}

// freePort reserves a TCP port of addr (127.0.0.1 if zero) in p's
// network namespace for the rest of the test and returns it, as
// xraytest.FreePort does in the test's own: a socket bound to the port with
// SO_REUSEADDR and SO_REUSEPORT that never listens, which the SSH servers
// and clients, setting SO_REUSEADDR, can bind beside, while the kernel
// gives the port to no one who asks for a free one.
func (p place) freePort(t testing.TB, addr netip.Addr) int {
	t.Helper()
	if !addr.IsValid() {
		addr = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	}
	var fd, port int
	err := p.do(func() error {
		family := unix.AF_INET6
		var sa unix.Sockaddr = &unix.SockaddrInet6{Addr: addr.As16()}
		if addr.Is4() {
			family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: addr.As4()}
		}
		var err error
		if fd, err = unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		for _, opt := range []int{unix.SO_REUSEADDR, unix.SO_REUSEPORT} {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt, 1); err != nil {
				unix.Close(fd)
				return err
			}
		}
		if err := unix.Bind(fd, sa); err != nil {
			unix.Close(fd)
			return err
		}
		if sa, err = unix.Getsockname(fd); err != nil {
			unix.Close(fd)
			return err
		}
		switch sa := sa.(type) {
		case *unix.SockaddrInet4:
			port = sa.Port
		case *unix.SockaddrInet6:
			port = sa.Port
		}
		return nil
	})
	if err != nil {
		t.Fatalf("reserve a port of %s: %v", addr, err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return port
}

// listeners counts the TCP sockets that listen on port in the network
// namespace of process pid. It returns -1 if the process is gone.
func listeners(pid, port int) int {
	n, err := nettest.Listeners(fmt.Sprintf("/proc/%d/net", pid), port)
	if err != nil {
		return -1
	}
	return n
}

// socketInodes returns the inodes of the sockets that process pid holds.
func socketInodes(pid int) map[uint64]bool {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	inodes := map[uint64]bool{}
	for _, e := range ents {
		link, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue
		}
		var ino uint64
		if _, err := fmt.Sscanf(link, "socket:[%d]", &ino); err == nil {
			inodes[ino] = true
		}
	}
	return inodes
}

// holders returns the processes that hold the socket with this inode.
func holders(inode uint64) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if socketInodes(pid)[inode] {
			pids = append(pids, pid)
		}
	}
	return pids
}

// connections lists the TCP sockets of network namespace ns whose remote
// address is remote's (and, if port is not 0, whose local port is port).
func connections(ns netns.NsHandle, remote netip.Addr, port uint16) ([]sockkill.Conn, error) {
	h, err := sockkill.NewHandleAt(ns)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	f := sockkill.Filter{Remotes: []netip.Addr{remote}}
	if port != 0 {
		f.LocalPorts = []uint16{port}
	}
	return h.List(f)
}

// uidsOf returns the real, effective, saved and file system UIDs of process
// pid; ok is false if it is gone.
func uidsOf(pid int) (uids [4]uint32, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return uids, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, found := strings.CutPrefix(line, "Uid:"); found {
			n, _ := fmt.Sscan(rest, &uids[0], &uids[1], &uids[2], &uids[3])
			return uids, n == 4
		}
	}
	return uids, false
}

// zombie tells whether process pid has exited and waits for its parent to
// reap it (state Z).
func zombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && b[i+2] == 'Z'
}

// startTime returns the start time of process pid, in clock ticks after
// boot (field 22 of /proc/PID/stat); ok is false if it is gone.
func startTime(pid int) (ticks uint64, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	// "pid (comm) state ppid ...": comm may hold spaces; the fields
	// follow the last ')'. starttime is field 22, the 20th after comm.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, false
	}
	ticks, err = strconv.ParseUint(f[19], 10, 64)
	return ticks, err == nil
}

// lineLog collects the lines written to a pipe, for the life of every
// process that holds its write end.
type lineLog struct {
	copyTo  *os.File // each line is appended to it too, if not nil
	mu      sync.Mutex
	lines   []string
	changed chan struct{} // closed and replaced when a line arrives or the log ends
	ended   bool
}

// newLineLog returns a lineLog and the write end of its pipe, which the
// caller gives to its processes and then closes.
func newLineLog(copyTo *os.File) (*lineLog, *os.File, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, nil, err
	}
	l := &lineLog{changed: make(chan struct{}), copyTo: copyTo}
	go l.read(r)
	return l, w, nil
}

func (l *lineLog) read(r io.ReadCloser) {
	defer r.Close()
	if l.copyTo != nil {
		defer l.copyTo.Close()
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if l.copyTo != nil {
			l.copyTo.WriteString(sc.Text() + "\n")
		}
		l.mu.Lock()
		l.lines = append(l.lines, sc.Text())
		close(l.changed)
		l.changed = make(chan struct{})
		l.mu.Unlock()
	}
	l.mu.Lock()
	l.ended = true
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
}

// snapshot returns the lines so far, a channel closed when there are more,
// and whether no more will come. A nil lineLog is an empty log that has
// ended.
func (l *lineLog) snapshot() (lines []string, changed <-chan struct{}, ended bool) {
	if l == nil {
		return nil, nil, true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lines[:len(l.lines):len(l.lines)], l.changed, l.ended
}

// wait waits up to timeout for a line that match accepts, and returns the
// first; ok is false if none came.
func (l *lineLog) wait(match func(string) bool, timeout time.Duration) (line string, ok bool) {
	deadline := time.After(timeout)
	for {
		lines, changed, ended := l.snapshot()
		for _, line := range lines {
			if match(line) {
				return line, true
			}
		}
		if ended {
			return "", false
		}
		select {
		case <-changed:
		case <-deadline:
			return "", false
		}
	}
}

// tailWriter keeps the last bytes written to it.
type tailWriter struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (w *tailWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.b = append(w.b, p...)
	if len(w.b) > w.max {
		w.b = w.b[len(w.b)-w.max:]
	}
	return len(p), nil
}

func (w *tailWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return string(w.b)
}
