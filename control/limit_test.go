package control

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

func TestConnLimits(t *testing.T) {
	open := 10 // the process's open descriptors, as the listener would count them
	fds := func() int { return open }
	l := newConnLimits(2, 3, 100)
	admit := func(uid uint32, want error) {
		t.Helper()
		if err := l.admit(uid, fds); !errors.Is(err, want) {
			t.Fatalf("admit(%d) = %v, want %v", uid, err, want)
		}
	}

	admit(1000, nil)
	admit(1000, nil)
	admit(1000, ErrUIDConns) // the UID's cap
	admit(1001, nil)
	admit(1002, ErrConns) // every non-root UID's cap
	for range 50 {
		admit(0, nil) // root is never counted nor refused
	}
	if got := l.nonRoot; got != 3 {
		t.Errorf("non-root connections %d, want 3", got)
	}

	l.release(1000)
	admit(1000, nil) // a closed connection frees its place
	admit(1002, ErrConns)
	l.release(1001)
	admit(1002, nil)
	l.release(0) // root's release is a no-op
	if got := l.nonRoot; got != 3 {
		t.Errorf("non-root connections %d, want 3", got)
	}

	l.release(1000)
	l.release(1002)
	open = 101 // past the descriptors non-root may use
	admit(1003, ErrFDReserve)
	admit(0, nil)
	open = 100
	admit(1003, nil)
	l.release(1000)
	l.release(1003)
	if l.nonRoot != 0 || len(l.byUID) != 0 {
		t.Errorf("after every release: %d connections, per UID %v", l.nonRoot, l.byUID)
	}

	// The descriptors are counted only when the caps let a connection in:
	// a flood from one UID costs no stat of /proc.
	l = newConnLimits(1, 10, 100)
	admit(1000, nil)
	counted := 0
	if err := l.admit(1000, func() int { counted++; return 0 }); !errors.Is(err, ErrUIDConns) || counted != 0 {
		t.Errorf("over the UID's cap: %v, descriptors counted %d times", err, counted)
	}
}

func TestFDMax(t *testing.T) {
	for _, c := range []struct {
		soft    uint64
		reserve int
		want    int
	}{
		{1024, 0, 1024 - 128}, // an eighth
		{256, 0, 256 - 64},    // at least 64
		{20000, 0, 20000 - 2500},
		{20000, 100, 19900},
		{50, 0, -14}, // no room: every non-root connection is refused
		{1 << 40, 0, 1<<31 - 1<<28},
	} {
		if got := fdMax(c.soft, c.reserve); got != c.want {
			t.Errorf("fdMax(%d, %d) = %d, want %d", c.soft, c.reserve, got, c.want)
		}
	}
}

func TestOpenFDs(t *testing.T) {
	n := openFDs()
	if n == 0 {
		t.Skip("this kernel does not report the open descriptors as the size of /proc/self/fd (Linux 6.2)")
	}
	fds := make([]int, 0, 20)
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	for range 20 {
		fd, err := unix.Dup(0)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, fd)
	}
	if got := openFDs(); got != n+20 {
		t.Errorf("open descriptors %d after opening 20 more than %d", got, n)
	}
}
