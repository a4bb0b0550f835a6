package xraytest

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// origin is an HTTPS server on 127.0.0.1 with a self-signed certificate of
// its own, reached through the clients: the far end of downloads whose
// TLS (1.3) XTLS Vision sees inside the tunnel and splices.
//
//	GET /download?size=N&rate=R
//
// answers N bytes (Content-Length N) at R bytes a second (as fast as it
// can if R is 0 or absent).
type origin struct {
	addr string
	cert *selfSigned
}

// origin returns the server's HTTPS origin, started at the first call and
// closed with its connections in t.Cleanup.
func (s *Server) httpsOrigin(t testing.TB) *origin {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.origin != nil {
		return s.origin
	}
	cert := newSelfSigned(t, s.Dir, "origin")
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /download", serveDownload)
	srv := &http.Server{
		Handler: mux,
		TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{cert.cert},
			// Vision splices inner TLS 1.3 only.
			MinVersion: tls.VersionTLS13,
		},
		ReadHeaderTimeout: 5 * time.Second,
		ErrorLog:          log.New(io.Discard, "", 0), // aborted handshakes
	}
	go srv.ServeTLS(l, "", "")
	t.Cleanup(func() { srv.Close() })
	s.origin = &origin{addr: l.Addr().String(), cert: cert}
	return s.origin
}

// OriginAddr returns the "host:port" of the server's HTTPS origin,
// starting it if need be: an HTTPS server on 127.0.0.1 that clients reach
// through the tunnel with [Client.HTTPClient]. It serves
// GET /download?size=N&rate=R: N bytes at R bytes a second (0: as fast as
// it can).
func (s *Server) OriginAddr(t testing.TB) string {
	t.Helper()
	return s.httpsOrigin(t).addr
}

func serveDownload(w http.ResponseWriter, r *http.Request) {
	size, err := strconv.ParseInt(r.URL.Query().Get("size"), 10, 64)
	if err != nil || size < 0 {
		http.Error(w, "bad size", http.StatusBadRequest)
		return
	}
	rate := int64(0)
	if q := r.URL.Query().Get("rate"); q != "" {
		if rate, err = strconv.ParseInt(q, 10, 64); err != nil || rate < 0 {
			http.Error(w, "bad rate", http.StatusBadRequest)
			return
		}
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	w.WriteHeader(http.StatusOK)
	lw := &limitWriter{w: w, n: size}
	if rate == 0 {
		io.Copy(lw, io.LimitReader(zeroReader{}, size))
		return
	}
	pace(lw, rate, nil)
}

// errLimit ends a limitWriter's writes.
var errLimit = errors.New("limit reached")

// limitWriter passes n bytes on to w, then fails with errLimit.
type limitWriter struct {
	w io.Writer
	n int64
}

func (l *limitWriter) Write(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, errLimit
	}
	short := int64(len(p)) > l.n
	if short {
		p = p[:l.n]
	}
	n, err := l.w.Write(p)
	l.n -= int64(n)
	if err == nil && (short || l.n == 0) {
		err = errLimit
	}
	return n, err
}

// HTTPClient returns an HTTP client whose connections go through the
// client Xray, the server as c's user, and the server's freedom outbound,
// and that trusts the certificate of the server's HTTPS origin (see
// [Server.OriginAddr]), and nothing else, by the name [TLSServerName]:
// https://localhost:PORT/... with the origin's port. Each request opens a
// connection of its own (no keep-alive) and closes it at the end of the
// response body. TLS is 1.3, which XTLS Vision splices.
func (c *Client) HTTPClient(t testing.TB) *http.Client {
	t.Helper()
	o := c.srv.httpsOrigin(t)
	return &http.Client{
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				// Every name goes to the origin: the client Xray's SOCKS
				// inbound takes IPv4 destinations here.
				return c.Dial(o.addr)
			},
			TLSClientConfig: &tls.Config{
				RootCAs:    o.cert.pool(),
				ServerName: TLSServerName,
				MinVersion: tls.VersionTLS13,
			},
			DisableKeepAlives:   true,
			TLSHandshakeTimeout: 5 * time.Second,
		},
	}
}

// Download is an HTTPS download from the server's origin through a Client,
// running in the background.
type Download struct {
	size     int64
	received atomic.Int64
	body     io.ReadCloser
	done     chan struct{}
	err      error // set before done is closed
	once     sync.Once
}

// Download starts an HTTPS download of size bytes, sent by the origin at
// rate bytes a second (0: as fast as the path allows), through c: for a
// Vision user ([NewVisionUser]), a download that Vision splices. t fails
// if the response's header does not arrive within 5 s. The download is
// closed in t.Cleanup.
func (c *Client) Download(t testing.TB, size, rate int64) *Download {
	t.Helper()
	o := c.srv.httpsOrigin(t)
	url := fmt.Sprintf("https://%s:%s/download?size=%d&rate=%d", TLSServerName, portOf(o.addr), size, rate)
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := headerWithin(c.HTTPClient(t), req, 5*time.Second)
	if err != nil {
		t.Fatalf("download as %s: %v", c.User.Email, err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		t.Fatalf("download as %s: %s", c.User.Email, resp.Status)
	}
	d := &Download{size: size, body: resp.Body, done: make(chan struct{})}
	go func() {
		n, err := io.Copy(counter{&d.received}, resp.Body)
		if err == nil && n != size {
			err = fmt.Errorf("got %d of %d bytes: %w", n, size, io.ErrUnexpectedEOF)
		}
		d.end(err)
	}()
	t.Cleanup(d.Close)
	return d
}

// headerWithin sends req and waits up to timeout for the response's header.
func headerWithin(hc *http.Client, req *http.Request, timeout time.Duration) (*http.Response, error) {
	type result struct {
		resp *http.Response
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		resp, err := hc.Do(req)
		ch <- result{resp, err}
	}()
	select {
	case r := <-ch:
		return r.resp, r.err
	case <-time.After(timeout):
		hc.CloseIdleConnections()
		go func() {
			if r := <-ch; r.resp != nil {
				r.resp.Body.Close()
			}
		}()
		return nil, fmt.Errorf("no response header within %v", timeout)
	}
}

func portOf(addr string) string {
	_, port, _ := net.SplitHostPort(addr)
	return port
}

// end ends the download with err (nil: complete), unless it has ended.
func (d *Download) end(err error) {
	d.once.Do(func() {
		d.err = err
		d.body.Close()
		close(d.done)
	})
}

// Received returns the bytes of the body received so far.
func (d *Download) Received() int64 { return d.received.Load() }

// Done is closed when the download has ended: complete, failed or closed.
// Its connection is closed by then.
func (d *Download) Done() <-chan struct{} { return d.done }

// Err returns nil while the download runs and once it completed (all size
// bytes received); else why it ended (net.ErrClosed after Close).
func (d *Download) Err() error {
	select {
	case <-d.done:
		return d.err
	default:
		return nil
	}
}

// Wait waits up to timeout for the download to end, and returns Err, or an
// error if it is still running.
func (d *Download) Wait(timeout time.Duration) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-d.done:
		return d.err
	default:
	}
	select {
	case <-d.done:
		return d.err
	case <-t.C:
		return fmt.Errorf("download still running after %v: %d of %d bytes", timeout, d.Received(), d.size)
	}
}

// Close ends the download, if running, closing its connection.
func (d *Download) Close() { d.end(net.ErrClosed) }
