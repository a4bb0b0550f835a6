package xraytest_test

import (
	"errors"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/xraytest"
	"github.com/myvpn/bwagent/xraystats"
)

// TestVisionCountedAtClose shows, against real Xray, what issue 10 stands
// on: Xray counts a VLESS + TLS + XTLS Vision user's spliced download only
// when the connection closes, while the kernel counts the bytes of the
// server's client-facing socket as they go. A plain VLESS user's download
// beside it is counted as it goes.
func TestVisionCountedAtClose(t *testing.T) {
	vis := xraytest.NewVisionUser("vis")
	plain := xraytest.NewUser("plain", xraytest.VLESS)
	srv := xraytest.StartServer(t, []xraytest.User{vis, plain})
	api := srv.Dial(t)
	vc, pc := srv.Client(t, vis), srv.Client(t, plain)

	const (
		size      = 64 << 20
		rate      = 8 << 20 // 8 s
		plainSize = 16 << 20
		plainRate = 4 << 20 // 4 s
	)
	downlink := func(email string) int64 {
		t.Helper()
		tr, err := api.UserTrafficOf(t.Context(), email)
		if errors.Is(err, xraystats.ErrNotFound) {
			return 0 // no counter until the user's first connection is dispatched
		}
		if err != nil {
			t.Fatal(err)
		}
		return tr.Downlink
	}
	kernel := func(c *xraytest.Client) (acked uint64) {
		for _, k := range c.ServerSockets(t) {
			acked += k.BytesAcked
		}
		return acked
	}

	start := time.Now()
	d := vc.Download(t, size, rate)
	p := pc.Download(t, plainSize, plainRate)
	type sample struct {
		at                   time.Duration
		received, counter    int64
		acked                uint64
		plainRcvd, plainCntr int64
	}
	var samples []sample
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for running := true; running; {
		select {
		case <-d.Done():
			running = false
		case <-tick.C:
			s := sample{at: time.Since(start), received: d.Received(), counter: downlink(vis.Email), acked: kernel(vc),
				plainRcvd: p.Received(), plainCntr: downlink(plain.Email)}
			samples = append(samples, s)
			t.Logf("%5.1fs vision: received %11d, Xray downlink %11d, kernel bytes_acked %11d | plain: received %9d, Xray downlink %9d",
				s.at.Seconds(), s.received, s.counter, s.acked, s.plainRcvd, s.plainCntr)
		case <-time.After(20 * time.Second):
			t.Fatal("no sample in 20 s")
		}
	}
	if err := d.Err(); err != nil {
		t.Fatalf("vision download: %v", err)
	}
	if err := p.Wait(time.Second); err != nil {
		t.Fatalf("plain download: %v", err)
	}
	closed := time.Since(start)
	var final int64
	for deadline := time.Now().Add(5 * time.Second); ; {
		final = downlink(vis.Email)
		if final >= size || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("%5.1fs vision download closed; Xray downlink %d at %.1fs", closed.Seconds(), final, time.Since(start).Seconds())

	// During the download: Xray's counter stays near zero (the inner TLS
	// handshake, before Vision splices), the kernel's grows with it.
	var mid []sample
	for _, s := range samples {
		if s.received >= size/4 && s.received < size {
			mid = append(mid, s)
		}
	}
	if len(mid) < 3 {
		t.Fatalf("%d samples between a quarter and all of the download, want 3 or more: %+v", len(mid), samples)
	}
	for i, s := range mid {
		if s.counter > 1<<20 {
			t.Errorf("%.1fs: Xray counted %d bytes of %d received: not near zero", s.at.Seconds(), s.counter, s.received)
		}
		// The kernel's count is what the client got (plus the TLS records'
		// overhead, minus ACKs not yet back), up to some MB of buffers
		// ahead.
		if s.acked+2<<20 < uint64(s.received) || s.acked > uint64(s.received)+16<<20 {
			t.Errorf("%.1fs: kernel bytes_acked %d, client received %d", s.at.Seconds(), s.acked, s.received)
		}
		if i > 0 && s.acked <= mid[i-1].acked {
			t.Errorf("%.1fs: kernel bytes_acked %d, not more than %d before", s.at.Seconds(), s.acked, mid[i-1].acked)
		}
	}
	// At the close, Xray adds what it spliced: the payload and its TLS
	// records' overhead (about 0.1%).
	if final < size || final > size+size/50 {
		t.Errorf("Xray downlink %d after the close, want %d to %d", final, size, size+size/50)
	}
	// The plain user is counted as it goes: at each sample Xray has counted
	// most of what the client received (Xray counts when it sends, about a
	// buffer ahead, and then up to its stats' delay behind).
	n := 0
	for _, s := range samples {
		if s.plainRcvd >= 4<<20 && s.plainRcvd < plainSize {
			n++
			if s.plainCntr < s.plainRcvd/2 {
				t.Errorf("%.1fs: plain user: Xray counted %d of %d received", s.at.Seconds(), s.plainCntr, s.plainRcvd)
			}
		}
	}
	if n == 0 {
		t.Errorf("no sample of the plain download in progress")
	}
}
