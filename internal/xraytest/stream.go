package xraytest

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Stream is a long-running transfer between a Client and the sink, at set
// rates in both directions, whose progress can be read and which tells
// when it is cut: a running upload or download.
type Stream struct {
	up, down       int64
	conn           net.Conn
	sent, received atomic.Int64
	once           sync.Once
	done           chan struct{}
	err            error // set before done is closed
	wg             sync.WaitGroup
}

// Stream opens a connection to the sink that sends up bytes a second and
// receives down bytes a second (0: nothing that way) until it is cut or
// closed; t fails if it cannot be opened within 5 s. A rate too high for the
// path, such as 1<<40, moves data as fast as the path allows. The stream is
// closed in t.Cleanup.
//
// Its opening carries 9 bytes up and 1 down, which [Stream.Progress] does
// not count.
func (c *Client) Stream(t testing.TB, up, down int64) *Stream {
	t.Helper()
	return openStream(t, c.User.Email, c.connect, up, down)
}

// TryStream is [Client.Stream] for a connection that may be refused or cut
// while it opens (a device over its user's limit): it returns why instead
// of failing t.
func (c *Client) TryStream(t testing.TB, up, down int64) (*Stream, error) {
	t.Helper()
	return tryStream(t, c.connect, up, down)
}

// openStream opens a Stream on a connection to the sink that connect opens;
// who is the user, for t's failure messages.
func openStream(t testing.TB, who string, connect func() (net.Conn, error), up, down int64) *Stream {
	t.Helper()
	s, err := tryStream(t, connect, up, down)
	if err != nil {
		t.Fatalf("stream as %s: %v", who, err)
	}
	return s
}

// tryStream opens a Stream on a connection to the sink that connect opens.
func tryStream(t testing.TB, connect func() (net.Conn, error), up, down int64) (*Stream, error) {
	t.Helper()
	conn, err := connect()
	if err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	var hdr [9]byte
	hdr[0] = 'S'
	binary.BigEndian.PutUint64(hdr[1:], uint64(max(down, 0)))
	var ack [1]byte
	_, err = conn.Write(hdr[:])
	if err == nil {
		_, err = io.ReadFull(conn, ack[:])
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("open: %w", err)
	}
	conn.SetDeadline(time.Time{})

	s := &Stream{up: up, down: down, conn: conn, done: make(chan struct{})}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		_, err := io.Copy(counter{&s.received}, conn)
		if err == nil {
			err = io.EOF
		}
		s.end(fmt.Errorf("receive: %w", err))
	}()
	if up > 0 {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			err := pace(conn, up, &s.sent)
			s.end(fmt.Errorf("send: %w", err))
		}()
	}
	t.Cleanup(s.Close)
	return s, nil
}

// counter is a writer that counts what it gets, and drops it.
type counter struct{ n *atomic.Int64 }

func (c counter) Write(p []byte) (int, error) {
	c.n.Add(int64(len(p)))
	return len(p), nil
}

// end ends the stream with err, unless it has ended already.
func (s *Stream) end(err error) {
	s.once.Do(func() {
		s.err = err
		close(s.done)
		s.conn.Close()
	})
}

// Progress returns the payload bytes sent (written to the connection, which
// some MB of buffers along the path take before the sink reads them) and
// received so far.
func (s *Stream) Progress() (sent, received int64) {
	return s.sent.Load(), s.received.Load()
}

// Done is closed when the stream has ended: cut, as its connection was
// closed by the other end or failed, or closed by Close. When the server
// cuts its side, or is stopped, the client Xray passes that on about a
// second later (measured with Xray 26.3.27). A path that merely drops
// packets does not end the stream: see Stopped.
func (s *Stream) Done() <-chan struct{} { return s.done }

// Err returns nil while the stream runs, and then why it ended: an error
// wrapping io.EOF if the other end closed the connection (as the client
// Xray does when its connection to the server is cut), net.ErrClosed after
// Close, or the error of the connection.
func (s *Stream) Err() error {
	select {
	case <-s.done:
		return s.err
	default:
		return nil
	}
}

// Close ends the stream, if running, and waits for its goroutines.
func (s *Stream) Close() {
	s.end(net.ErrClosed)
	s.wg.Wait()
}

// Flowing waits up to d for the stream to move bytes in each direction that
// has a rate, and reports whether it did and is still running.
func (s *Stream) Flowing(d time.Duration) bool {
	sent0, received0 := s.Progress()
	deadline := time.Now().Add(d)
	for {
		sent, received := s.Progress()
		if (s.up <= 0 || sent > sent0) && (s.down <= 0 || received > received0) {
			return s.Err() == nil
		}
		if time.Now().After(deadline) {
			return false
		}
		select {
		case <-s.done:
			return false
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Stopped waits up to timeout for the stream to stop: to end, or to move
// no byte either way for quiet. It reports whether it stopped.
func (s *Stream) Stopped(quiet, timeout time.Duration) bool {
	start := time.Now()
	sent0, received0 := s.Progress()
	since := start
	for {
		if s.Err() != nil {
			return true
		}
		now := time.Now()
		if sent, received := s.Progress(); sent != sent0 || received != received0 {
			sent0, received0, since = sent, received, now
		} else if now.Sub(since) >= quiet {
			return true
		}
		if now.Sub(start) >= timeout {
			return false
		}
		select {
		case <-s.done:
		case <-time.After(10 * time.Millisecond):
		}
	}
}
