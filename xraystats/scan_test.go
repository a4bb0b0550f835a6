package xraystats_test

import (
	"fmt"
	"testing"

	. "github.com/myvpn/bwagent/xraystats"
	"github.com/myvpn/bwagent/xraystats/internal/xraypb/statscmdpb"
)

// TestScanUserTrafficWire: ScanUserTraffic reads every user's two counters
// from an answer of many HTTP/2 frames (20,000 users: about 1 MB), users
// whose emails contain ">>>" or look like other names included, and
// nothing else; UserTraffic, built on it, agrees; and a read allocates a
// few hundred objects (gRPC's, the fake server's), not one per counter.
func TestScanUserTrafficWire(t *testing.T) {
	for _, n := range []int{10, 20_000} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			f := &fakeStats{}
			want := map[string]Traffic{}
			add := func(email string, up, down int64) {
				f.stats = append(f.stats,
					&statscmdpb.Stat{Name: "user>>>" + email + ">>>traffic>>>uplink", Value: up},
					&statscmdpb.Stat{Name: "user>>>" + email + ">>>traffic>>>downlink", Value: down})
				want[email] = Traffic{Uplink: up, Downlink: down}
			}
			for i := range n {
				add(fmt.Sprintf("user-%05d@example.com", i), int64(i)*1000+1, int64(i)<<33)
			}
			add("a>>>b", 7, 8)
			add("inbound>>>x", 9, 10)
			f.stats = append(f.stats,
				&statscmdpb.Stat{Name: "inbound>>>user>>>traffic>>>uplink", Value: 1},
				&statscmdpb.Stat{Name: "outbound>>>direct>>>traffic>>>downlink", Value: 2},
				&statscmdpb.Stat{Name: "user>>>>>>traffic>>>uplink", Value: 3},
				&statscmdpb.Stat{Name: "user>>>bob>>>traffic>>>sideways", Value: 4})
			c := startFake(t, f, true)

			got := map[string]Traffic{}
			calls := 0
			err := c.ScanUserTraffic(t.Context(), func(email []byte, downlink bool, value int64) {
				calls++
				tr := got[string(email)]
				if downlink {
					tr.Downlink = value
				} else {
					tr.Uplink = value
				}
				got[string(email)] = tr
			})
			if err != nil {
				t.Fatal(err)
			}
			if calls != 2*len(want) || len(got) != len(want) {
				t.Fatalf("%d calls for %d users, want %d for %d", calls, len(got), 2*len(want), len(want))
			}
			for email, w := range want {
				if got[email] != w {
					t.Errorf("%q: %+v, want %+v", email, got[email], w)
				}
			}
			m, err := c.UserTraffic(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			if len(m) != len(want) || m["a>>>b"] != want["a>>>b"] {
				t.Errorf("UserTraffic: %d users, a>>>b %+v", len(m), m["a>>>b"])
			}

			allocs := testing.AllocsPerRun(5, func() {
				if err := c.ScanUserTraffic(t.Context(), func([]byte, bool, int64) {}); err != nil {
					t.Fatal(err)
				}
			})
			// gRPC's own and the fake server's, whatever the users: far
			// fewer than one per counter (40,000 at 20,000 users).
			t.Logf("%d users: %.0f allocations a read", n, allocs)
			if allocs > 2000 {
				t.Errorf("%.0f allocations a read of %d users", allocs, n)
			}
		})
	}
}
