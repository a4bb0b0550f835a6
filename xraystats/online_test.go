package xraystats_test

// OnlineUsers against a fake StatsService at the wire: a real gRPC server
// that can lack GetAllOnlineUsers, as Xray before September 2025 does, and
// whose requests can fail or hang, which a real Xray cannot be made to do.

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	. "github.com/myvpn/bwagent/xraystats"
	"github.com/myvpn/bwagent/xraystats/internal/xraypb/statscmdpb"
)

// fakeStats is a StatsService whose online maps the test sets.
type fakeStats struct {
	statscmdpb.UnimplementedStatsServiceServer

	names []string                    // the answer to GetAllOnlineUsers
	stats []*statscmdpb.Stat          // the counters QueryStats matches
	ips   map[string]map[string]int64 // online maps by name; missing: NotFound
	fail  map[string]error            // GetStatsOnlineIpList fails for these names
	hang  map[string]bool             // GetStatsOnlineIpList waits for its end for these

	mu          sync.Mutex
	asked       []string // names GetStatsOnlineIpList was asked for
	inFlight    int
	maxInFlight int
}

func (f *fakeStats) GetSysStats(context.Context, *statscmdpb.SysStatsRequest) (*statscmdpb.SysStatsResponse, error) {
	return &statscmdpb.SysStatsResponse{Uptime: 1}, nil
}

// QueryStats answers with the counters whose names contain the pattern, as
// Xray does.
func (f *fakeStats) QueryStats(_ context.Context, r *statscmdpb.QueryStatsRequest) (*statscmdpb.QueryStatsResponse, error) {
	resp := &statscmdpb.QueryStatsResponse{}
	for _, s := range f.stats {
		if strings.Contains(s.GetName(), r.GetPattern()) {
			resp.Stat = append(resp.Stat, s)
		}
	}
	return resp, nil
}

func (f *fakeStats) GetAllOnlineUsers(context.Context, *statscmdpb.GetAllOnlineUsersRequest) (*statscmdpb.GetAllOnlineUsersResponse, error) {
	return &statscmdpb.GetAllOnlineUsersResponse{Users: f.names}, nil
}

func (f *fakeStats) GetStatsOnlineIpList(ctx context.Context, r *statscmdpb.GetStatsRequest) (*statscmdpb.GetStatsOnlineIpListResponse, error) {
	f.mu.Lock()
	f.asked = append(f.asked, r.GetName())
	f.inFlight++
	f.maxInFlight = max(f.maxInFlight, f.inFlight)
	f.mu.Unlock()
	defer func() {
		f.mu.Lock()
		f.inFlight--
		f.mu.Unlock()
	}()
	// Long enough for requests to overlap.
	time.Sleep(2 * time.Millisecond)
	if f.hang[r.GetName()] {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if err := f.fail[r.GetName()]; err != nil {
		return nil, err
	}
	ips, ok := f.ips[r.GetName()]
	if !ok {
		return nil, status.Error(codes.NotFound, r.GetName()+" not found.")
	}
	return &statscmdpb.GetStatsOnlineIpListResponse{Name: r.GetName(), Ips: ips}, nil
}

// startFake serves f on 127.0.0.1 until the end of the test and returns a
// client of it. Without withAll, the service has no GetAllOnlineUsers
// method at all, as an older Xray's.
func startFake(t *testing.T, f *fakeStats, withAll bool) *Client {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	desc := statscmdpb.StatsService_ServiceDesc
	if !withAll {
		desc.Methods = slices.DeleteFunc(slices.Clone(desc.Methods), func(m grpc.MethodDesc) bool {
			return m.MethodName == "GetAllOnlineUsers"
		})
	}
	srv := grpc.NewServer()
	srv.RegisterService(&desc, f)
	go srv.Serve(l)
	t.Cleanup(srv.Stop)
	c, err := Dial(t.Context(), l.Addr().String(), WithTimeout(apiTimeout))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// onlineName is the name of email's online map.
func onlineName(email string) string { return "user>>>" + email + ">>>online" }

// manyOnline returns a fakeStats with n online users u00, u01, ..., each
// from 192.0.2.i.
func manyOnline(n int) *fakeStats {
	f := &fakeStats{ips: map[string]map[string]int64{}}
	for i := range n {
		name := onlineName(fmt.Sprintf("u%02d", i))
		f.names = append(f.names, name)
		f.ips[name] = map[string]int64{fmt.Sprintf("192.0.2.%d", i): 1700000000 + int64(i)}
	}
	return f
}

// TestOnlineUsersWire: OnlineUsers asks for each online user's map once, a
// few at a time, and for nothing else; it takes the emails from the map
// names whole, leaves out users whose map emptied meanwhile, and gives IPv6
// addresses without Xray's brackets.
func TestOnlineUsersWire(t *testing.T) {
	f := manyOnline(40)
	f.names = append(f.names, onlineName("a>b>>>c"), onlineName("gone"), onlineName("v6"))
	f.ips[onlineName("a>b>>>c")] = map[string]int64{"192.0.2.200": 5}
	f.ips[onlineName("gone")] = map[string]int64{}
	f.ips[onlineName("v6")] = map[string]int64{"[2001:db8::1]": 6, "192.0.2.201": 7}
	f.ips[onlineName("offline")] = map[string]int64{"192.0.2.202": 8} // not listed
	c := startFake(t, f, true)

	got, err := c.OnlineUsers(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]map[string]int64{
		"a>b>>>c": {"192.0.2.200": 5},
		"v6":      {"2001:db8::1": 6, "192.0.2.201": 7},
	}
	for i := range 40 {
		want[fmt.Sprintf("u%02d", i)] = map[string]int64{fmt.Sprintf("192.0.2.%d", i): 1700000000 + int64(i)}
	}
	if !maps.EqualFunc(got, want, maps.Equal) {
		t.Errorf("OnlineUsers = %v, want %v", got, want)
	}
	asked := slices.Sorted(slices.Values(f.asked))
	if names := slices.Sorted(slices.Values(f.names)); !slices.Equal(asked, names) {
		t.Errorf("asked for %q, want each listed name once: %q", asked, names)
	}
	if f.maxInFlight > OnlineIPListsInFlight {
		t.Errorf("%d requests in flight at once, want at most %d", f.maxInFlight, OnlineIPListsInFlight)
	}
	t.Logf("at most %d requests in flight", f.maxInFlight)
}

// TestOnlineUsersUnsupported: an Xray without GetAllOnlineUsers makes
// OnlineUsers fail with ErrUnsupported (Unimplemented), while OnlineIPs, the
// fallback, still works.
func TestOnlineUsersUnsupported(t *testing.T) {
	f := manyOnline(3)
	c := startFake(t, f, false)
	got, err := c.OnlineUsers(t.Context())
	if !errors.Is(err, ErrUnsupported) || status.Code(err) != codes.Unimplemented || got != nil {
		t.Errorf("OnlineUsers = %v, %v; want nil and ErrUnsupported (Unimplemented)", got, err)
	}
	t.Logf("OnlineUsers: %v", err)
	ips, err := c.OnlineIPs(t.Context(), "u01")
	if err != nil || !maps.Equal(ips, map[string]int64{"192.0.2.1": 1700000001}) {
		t.Errorf("OnlineIPs(u01) = %v, %v", ips, err)
	}
}

// TestOnlineUsersFailsClosed: when any one request fails, or hangs, the
// whole call fails, with no map.
func TestOnlineUsersFailsClosed(t *testing.T) {
	for _, tc := range []struct {
		name    string
		set     func(*fakeStats)
		want    error  // nil: any error
		text    string // in the error
		asks    bool   // GetStatsOnlineIpList is asked at all
		minTime time.Duration
	}{
		{
			name: "one fails",
			set:  func(f *fakeStats) { f.fail = map[string]error{onlineName("u17"): status.Error(codes.Internal, "boom")} },
			text: `"u17"`, asks: true,
		},
		{
			name: "one is gone",
			set:  func(f *fakeStats) { delete(f.ips, onlineName("u33")) },
			want: ErrNotFound, text: `"u33"`, asks: true,
		},
		{
			name: "one hangs",
			set:  func(f *fakeStats) { f.hang = map[string]bool{onlineName("u23"): true} },
			want: ErrUnavailable, asks: true, minTime: apiTimeout,
		},
		{
			name: "not a user's map",
			set:  func(f *fakeStats) { f.names = append(f.names, "inbound>>>vless-in>>>online") },
			want: ErrBadName, text: "inbound>>>vless-in>>>online",
		},
		{
			name: "not an online map",
			set:  func(f *fakeStats) { f.names = append(f.names, "user>>>bob>>>traffic>>>uplink") },
			want: ErrBadName, text: "user>>>bob>>>traffic>>>uplink",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := manyOnline(40)
			tc.set(f)
			c := startFake(t, f, true)
			start := time.Now()
			got, err := c.OnlineUsers(t.Context())
			took := time.Since(start)
			switch {
			case err == nil || got != nil:
				t.Fatalf("OnlineUsers = %v, %v; want an error and no map", got, err)
			case tc.want != nil && !errors.Is(err, tc.want):
				t.Errorf("OnlineUsers: %v, want %v", err, tc.want)
			case !strings.Contains(err.Error(), tc.text):
				t.Errorf("OnlineUsers: %v, want it to name %s", err, tc.text)
			}
			if took < tc.minTime {
				t.Errorf("failed after %v, before %v", took, tc.minTime)
			}
			within(t, "OnlineUsers", took, apiTimeout+200*time.Millisecond)
			f.mu.Lock()
			defer f.mu.Unlock()
			if asked := len(f.asked) > 0; asked != tc.asks {
				t.Errorf("asked for %d online maps", len(f.asked))
			}
			t.Logf("OnlineUsers: %v after %v (%d maps asked for)", err, took.Round(time.Millisecond), len(f.asked))
		})
	}
}
