package bpf_test

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

// A blocked UID's new connection fails at once with EPERM from the connect
// hooks, IPv4 and IPv6, instead of waiting out the caller's timeout for a
// SYN that the egress program drops; another UID connects meanwhile, and
// unblocking lets the UID connect again.
func TestBlockedConnectFailsAtOnce(t *testing.T) {
	e := newEnv(t)
	const victim, other, server = 2211, 2212, 2213
	for _, fam := range []struct {
		name string
		addr netip.Addr
	}{{"ipv4", e.net.B4}, {"ipv6", e.net.B6}} {
		t.Run(fam.name, func(t *testing.T) {
			srv := e.start(t, true, server, "tcp-serve", listenAddr(fam.addr))
			addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
			block(t, e.dp, victim, true)
			start := time.Now()
			c := e.start(t, false, victim, "tcp-client", addr, "1", "0")
			err := c.Wait(10 * time.Second)
			took := time.Since(start)
			if err == nil {
				t.Fatalf("blocked UID connected: %q", c.Last())
			}
			// The helper dials with a 3 s timeout: a dropped SYN would take
			// that long and fail with a timeout.
			if !strings.Contains(c.Last(), "operation not permitted") || took > 2*time.Second {
				t.Errorf("blocked connect failed after %v with %q, want EPERM at once", took, c.Last())
			}
			o := e.start(t, false, other, "tcp-client", addr, "1", "0")
			if err := o.Wait(10 * time.Second); err != nil {
				t.Errorf("another UID could not connect: %v %q", err, o.Last())
			}
			block(t, e.dp, victim, false)
			c2 := e.start(t, false, victim, "tcp-client", addr, "1", "0")
			if err := c2.Wait(10 * time.Second); err != nil {
				t.Errorf("unblocked UID could not connect: %v %q", err, c2.Last())
			}
		})
	}
}
