package control_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/internal/nettest"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
)

func init() {
	nettest.Register("hog", hogHelper)
	nettest.Register("hold", holdHelper)
}

// hogHelper is a hostile local user: it opens args[1] clients, each
// checked with a call, then args[2] more bare connections that it keeps
// open, and prints how many of those the server closed without a byte
// ("READY closed"), then what one more client gets ("EXTRA code"). On
// SIGUSR1 it calls again on each of its first clients ("STILL n").
func hogHelper(args []string) error {
	path := args[0]
	n, _ := strconv.Atoi(args[1])
	m, _ := strconv.Atoi(args[2])
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	ctx := context.Background()
	var clients []*control.Client
	for i := range n {
		c, err := control.Dial(ctx, path)
		if err != nil {
			return err
		}
		if _, err := c.User(ctx, ""); err != nil {
			return fmt.Errorf("client %d: %w", i+1, err)
		}
		clients = append(clients, c)
	}
	fmt.Println("OPEN", len(clients))

	conns := make([]net.Conn, 0, m)
	for range m {
		c, err := net.Dial("unix", path)
		if err != nil {
			return fmt.Errorf("connection %d: %w", len(conns)+1, err)
		}
		conns = append(conns, c)
	}
	closed := 0
	for _, c := range conns {
		got, _ := closedUnread(c, 5*time.Second)
		if got {
			closed++
		}
	}
	fmt.Println("READY", closed)

	c, err := control.Dial(ctx, path)
	if err == nil {
		_, err = c.User(ctx, "")
		c.Close()
	}
	fmt.Println("EXTRA", control.Code(err))

	select {
	case <-usr1:
	case <-time.After(time.Minute):
		return errors.New("no SIGUSR1")
	}
	ok := 0
	for i, c := range clients {
		if _, err := c.User(ctx, ""); err != nil {
			return fmt.Errorf("client %d after the flood: %w", i+1, err)
		}
		ok++
	}
	fmt.Println("STILL", ok)
	for _, c := range conns {
		c.Close()
	}
	fmt.Println("DONE")
	return nil
}

// closedUnread reads c until EOF or timeout and reports whether the server
// closed it without sending a byte, as the listener closes a refused
// connection. An admitted one gets gRPC's SETTINGS frame first.
func closedUnread(c net.Conn, timeout time.Duration) (closed bool, n int64) {
	c.SetReadDeadline(time.Now().Add(timeout))
	n, err := io.Copy(io.Discard, c)
	return err == nil && n == 0, n
}

// holdHelper opens args[1] bare connections, keeps them open, and prints
// "HELD admitted refused pending": admitted ones got the server's first
// bytes, refused ones were closed without any, pending ones neither
// within 2s (not accepted yet).
func holdHelper(args []string) error {
	path := args[0]
	m, _ := strconv.Atoi(args[1])
	conns := make([]net.Conn, 0, m)
	for range m {
		c, err := net.Dial("unix", path)
		if err != nil {
			return fmt.Errorf("connection %d: %w", len(conns)+1, err)
		}
		conns = append(conns, c)
	}
	var admitted, refused, pending int
	buf := make([]byte, 1)
	deadline := time.Now().Add(2 * time.Second)
	for _, c := range conns {
		c.SetReadDeadline(deadline)
		switch n, err := c.Read(buf); {
		case n > 0:
			admitted++
		case errors.Is(err, io.EOF):
			refused++
		case errors.Is(err, os.ErrDeadlineExceeded):
			pending++
		default:
			return err
		}
	}
	fmt.Println("HELD", admitted, refused, pending)
	time.Sleep(time.Minute) // killed by the test
	return nil
}

// liveHeap returns the bytes of live heap objects after a collection.
func liveHeap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// openFDs counts the test process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents) - 1 // the directory's own
}

// refusals counts Options.ConnRefused's reports by error.
type refusals struct {
	mu sync.Mutex
	n  map[error]int
}

func (r *refusals) hook(c control.Caller, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n == nil {
		r.n = map[error]int{}
	}
	r.n[err]++
}

func (r *refusals) count(err error) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n[err]
}

// statusWithin checks that root can connect and read the status within d.
func statusWithin(t *testing.T, path string, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	c, err := control.Dial(ctx, path)
	if err != nil {
		t.Fatalf("root's Dial: %v", err)
	}
	defer c.Close()
	if _, err := c.Status(ctx); err != nil {
		t.Errorf("root's Status within %v: %v", d, err)
	}
}

// A local user opening far more connections than its cap keeps only the
// cap's worth: the rest are closed at accept, the server holds no more
// descriptors, goroutines or heap for them, and root is served at once.
func TestHostileUID(t *testing.T) {
	const (
		perUID = control.DefaultMaxConnsPerUID
		flood  = 2000
	)
	var refused refusals
	path := serve(t, newFake(), control.Options{ConnRefused: refused.hook})
	statusWithin(t, path, 2*time.Second)
	fdsBefore, goBefore, heapBefore := openFDs(t), runtime.NumGoroutine(), liveHeap()

	p := nettest.Start(t, nettest.Spec{UID: johnUID}, "hog", path, strconv.Itoa(perUID), strconv.Itoa(flood))
	p.Expect(t, fmt.Sprintf("OPEN %d", perUID), 20*time.Second)
	line := p.Expect(t, "READY ", 60*time.Second)
	if closed, _ := strconv.Atoi(strings.TrimPrefix(line, "READY ")); closed != flood {
		t.Errorf("the server closed %d of the UID's %d connections past its cap of %d, want all", closed, flood, perUID)
	}
	if line := p.Expect(t, "EXTRA ", 20*time.Second); line != "EXTRA "+codes.Unavailable.String() {
		t.Errorf("a client past the cap: %q, want Unavailable", line)
	}

	// While the UID holds its cap and its 2,000 closed connections:
	statusWithin(t, path, 2*time.Second)
	fds, gos := openFDs(t)-fdsBefore, runtime.NumGoroutine()-goBefore
	heap := int64(liveHeap()) - int64(heapBefore)
	if fds < perUID || fds > perUID+8 { // + the helper's pipe and pidfd, root's closing connection
		t.Errorf("the server holds %d more descriptors with the UID's %d connections (and %d refused) open, want %d to %d",
			fds, perUID, flood, perUID, perUID+8)
	}
	if gos > 8*perUID {
		t.Errorf("%d more goroutines for the UID's %d connections", gos, perUID)
	}
	if heap > 8<<20 {
		t.Errorf("the live heap grew by %d KiB with the UID's %d connections (and %d refused)", heap>>10, perUID, flood)
	}
	t.Logf("with %d connections of the UID held and %d refused: %d more descriptors, %d more goroutines, live heap %+d KiB",
		perUID, flood, fds, gos, heap>>10)
	if n := refused.count(control.ErrUIDConns); n < flood+1 {
		t.Errorf("ConnRefused told of %d connections over the UID's cap, want at least %d", n, flood+1)
	}

	if err := p.Cmd.Process.Signal(syscall.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	p.Expect(t, fmt.Sprintf("STILL %d", perUID), 20*time.Second)
	p.Expect(t, "DONE", 20*time.Second)
	if err := p.Wait(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	// Its connections closed, the UID has its places back.
	if got := runAs(t, johnUID, path, "get:john")["get:john"]; got != "OK " {
		t.Errorf("the UID after its connections closed: %q", got)
	}
}

// Non-root connections stop short of the descriptors kept for the agent
// and root; root's are still accepted.
func TestFDReserve(t *testing.T) {
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	const room, reserve = 100, 64
	lim := old
	lim.Cur = uint64(openFDs(t) + room)
	if lim.Cur > lim.Max {
		t.Skipf("hard limit %d too low", lim.Max)
	}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Setrlimit(unix.RLIMIT_NOFILE, &old) })

	var refused refusals
	path := serve(t, newFake(), control.Options{
		MaxConnsPerUID: 1000, MaxConns: 1000, FDReserve: reserve,
		HandshakeTimeout: time.Minute, // the bare connections stay
		ConnRefused:      refused.hook,
	})
	p := nettest.Start(t, nettest.Spec{UID: johnUID}, "hold", path, strconv.Itoa(room))
	var admitted, closed, pending int
	if _, err := fmt.Sscanf(p.Expect(t, "HELD ", 30*time.Second), "HELD %d %d %d", &admitted, &closed, &pending); err != nil {
		t.Fatal(err)
	}
	if admitted == 0 || closed == 0 || admitted+closed != room {
		t.Errorf("of %d connections with %d descriptors free and %d reserved, %d admitted, %d closed, %d not accepted",
			room, room, reserve, admitted, closed, pending)
	}
	if n := openFDs(t); n > int(lim.Cur)-reserve {
		t.Errorf("%d descriptors open, more than the limit %d minus the reserve %d", n, lim.Cur, reserve)
	}
	if refused.count(control.ErrFDReserve) != closed {
		t.Errorf("ConnRefused told of %d connections refused for the reserve, the helper saw %d closed", refused.count(control.ErrFDReserve), closed)
	}
	statusWithin(t, path, 2*time.Second)
}

// Out of descriptors (EMFILE), as it can be by root's connections, the
// server neither stops nor refuses: it accepts again once descriptors are
// free (gRPC retries a failed accept after at most 1s).
func TestAcceptEMFILE(t *testing.T) {
	path := serve(t, newFake(), control.Options{})
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	const room, conns = 20, 60
	lim := old
	lim.Cur = uint64(openFDs(t) + room)
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			unix.Setrlimit(unix.RLIMIT_NOFILE, &old)
			restored = true
		}
	}
	t.Cleanup(restore)
	p := nettest.Start(t, nettest.Spec{UID: 0}, "hold", path, strconv.Itoa(conns))
	var admitted, closed, pending int
	if _, err := fmt.Sscanf(p.Expect(t, "HELD ", 30*time.Second), "HELD %d %d %d", &admitted, &closed, &pending); err != nil {
		t.Fatal(err)
	}
	restore()
	if admitted == 0 || pending == 0 || closed != 0 {
		t.Errorf("root's %d connections with %d descriptors free: %d admitted, %d closed, %d not accepted; want some admitted, some not accepted, none closed",
			conns, room, admitted, closed, pending)
	}
	statusWithin(t, path, 5*time.Second) // within gRPC's backoff of 1s
}

// A connection that sends nothing is closed after HandshakeTimeout.
func TestSilentConnection(t *testing.T) {
	path := serve(t, newFake(), control.Options{HandshakeTimeout: 200 * time.Millisecond})
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, c) // the server's SETTINGS, then EOF
	if err != nil {
		t.Errorf("a silent connection is still open after 10s (read %d bytes): %v", n, err)
	}
}
