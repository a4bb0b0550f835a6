package xraytest

import (
	"encoding/binary"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// sink is the destination of the clients' traffic, on 127.0.0.1. A
// connection starts with a mode byte:
//
//   - 'T' then two big-endian uint64s, up and down: it answers with one
//     byte, reads up bytes, writes down bytes and closes;
//   - 'E': it answers with one byte and echoes everything;
//   - 'P': it answers with one byte and reads all the rest;
//   - 'S' then a big-endian uint64 rate: it answers with one byte, reads
//     all the rest, and meanwhile writes rate bytes a second (none if 0),
//     until the client closes.
//
// Connections other than 'S' ones are closed after a minute.
type sink struct {
	addr string
	l    net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	open map[net.Conn]struct{}
}

// newSink starts a sink on 127.0.0.1, closed with its connections in
// t.Cleanup.
func newSink(t testing.TB) *sink {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serveSink(t, l)
}

// serveSink serves a sink on l, closed with its connections in t.Cleanup.
func serveSink(t testing.TB, l net.Listener) *sink {
	s := &sink{addr: l.Addr().String(), l: l, open: map[net.Conn]struct{}{}}
	s.wg.Add(1)
	go s.serve()
	t.Cleanup(s.close)
	return s
}

// Sink is the sink of [Server] for the harnesses of other proxies (package
// sshtest): the far end of connections through the proxy under test, which
// moves exactly the bytes it is asked to, at a set rate if need be.
type Sink struct {
	// Addr is the "host:port" that the sink listens on.
	Addr string
}

// ServeSink serves a sink on l until t's end, when l and the sink's
// connections are closed. l may listen in any network namespace.
func ServeSink(t testing.TB, l net.Listener) *Sink {
	t.Helper()
	return &Sink{Addr: serveSink(t, l).addr}
}

// Transfer sends up bytes to the sink and receives down bytes back, on one
// new connection that dial opens to k.Addr, within 10 s, as
// [Client.Transfer] does. It returns the payload bytes that went each way:
// sent includes the request's 17-byte header, and received the sink's
// one-byte answer to it.
func (k *Sink) Transfer(dial func(addr string) (net.Conn, error), up, down int64) (sent, received int64, err error) {
	return transfer(func() (net.Conn, error) { return dial(k.Addr) }, up, down)
}

// Stream opens a [Stream] to the sink on a connection that dial opens to
// k.Addr, as [Client.Stream] does; who names the stream's user in t's
// failure messages.
func (k *Sink) Stream(t testing.TB, who string, dial func(addr string) (net.Conn, error), up, down int64) *Stream {
	t.Helper()
	return openStream(t, who, func() (net.Conn, error) { return dial(k.Addr) }, up, down)
}

func (s *sink) serve() {
	defer s.wg.Done()
	for {
		c, err := s.l.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.open[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				s.mu.Lock()
				delete(s.open, c)
				s.mu.Unlock()
				c.Close()
			}()
			handle(c)
		}()
	}
}

func handle(c net.Conn) {
	c.SetDeadline(time.Now().Add(time.Minute))
	var mode [1]byte
	if _, err := io.ReadFull(c, mode[:]); err != nil {
		return
	}
	switch mode[0] {
	case 'T':
		var hdr [16]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		up := int64(binary.BigEndian.Uint64(hdr[:8]))
		down := int64(binary.BigEndian.Uint64(hdr[8:]))
		if _, err := c.Write([]byte{'K'}); err != nil {
			return
		}
		if n, err := io.CopyN(io.Discard, c, up); err != nil || n != up {
			return
		}
		io.CopyN(c, zeroReader{}, down)
	case 'E':
		if _, err := c.Write([]byte{'K'}); err != nil {
			return
		}
		io.Copy(c, c)
	case 'P':
		if _, err := c.Write([]byte{'K'}); err != nil {
			return
		}
		io.Copy(io.Discard, c)
	case 'S':
		var hdr [8]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		rate := int64(binary.BigEndian.Uint64(hdr[:]))
		c.SetDeadline(time.Time{})
		if _, err := c.Write([]byte{'K'}); err != nil {
			return
		}
		done := make(chan struct{})
		if rate > 0 {
			go func() {
				defer close(done)
				pace(c, rate, nil)
			}()
		} else {
			close(done)
		}
		io.Copy(io.Discard, c)
		c.Close() // ends pace
		<-done
	}
}

func (s *sink) close() {
	s.l.Close()
	s.mu.Lock()
	for c := range s.open {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// pace writes zeros to w at rate bytes a second, in writes of a fiftieth
// of a second's worth (1 byte to 16 KiB), and bursts of at most a tenth of a
// second's worth (16 KiB at least) after a write blocked, until a write
// fails. It adds what it wrote to count, if not nil.
func pace(w io.Writer, rate int64, count *atomic.Int64) error {
	buf := make([]byte, 16<<10)
	burst := max(float64(rate)/10, float64(len(buf)))
	minWrite := min(max(float64(rate)/50, 1), float64(len(buf)))
	tokens, last := 0.0, time.Now()
	for {
		now := time.Now()
		tokens = min(tokens+now.Sub(last).Seconds()*float64(rate), burst)
		last = now
		if tokens < minWrite {
			time.Sleep(5 * time.Millisecond)
			continue
		}
		n, err := w.Write(buf[:int(min(tokens, float64(len(buf))))])
		tokens -= float64(n)
		if count != nil {
			count.Add(int64(n))
		}
		if err != nil {
			return err
		}
	}
}
