package xraytest_test

import (
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/xraytest"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/xrayconf"
)

// TestConfig: xrayconf reads the server's config file as an operator's,
// finding every user with its protocol, inbound and account, the API
// address, and the stats, without problems; in both forms of the API.
func TestConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []xraytest.Option
	}{
		{"api.listen", nil},
		{"classic", []xraytest.Option{xraytest.ClassicAPI()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			users := xraytest.DefaultUsers()
			level1 := xraytest.NewUser("level1", xraytest.Trojan)
			level1.Level = 1
			users = append(users, level1)
			srv := xraytest.StartServer(t, users, tc.opts...)
			cfg, err := xrayconf.Load([]string{srv.ConfigPath}, "")
			if err != nil {
				t.Fatal(err)
			}
			if cfg.API != srv.API {
				t.Errorf("API = %q, want %q", cfg.API, srv.API)
			}
			if !cfg.Stats || !cfg.UserStats || !cfg.UserOnline {
				t.Errorf("Stats %v, UserStats %v, UserOnline %v; want all", cfg.Stats, cfg.UserStats, cfg.UserOnline)
			}
			for _, s := range []string{"HandlerService", "StatsService"} {
				if !cfg.HasAPIService(s) {
					t.Errorf("no %s in %q", s, cfg.APIServices)
				}
			}
			// The one problem: level 1 is not counted.
			if len(cfg.Problems) != 1 || !strings.Contains(cfg.Problems[0].Msg, "level 1") {
				t.Errorf("Problems = %q, want one about level 1", cfg.Problems)
			}
			got := cfg.Users()
			if len(got) != len(users) {
				t.Errorf("%d users, want %d: %+v", len(got), len(users), got)
			}
			for _, u := range users {
				want := quota.Protocol(u.Protocol)
				if u.Protocol == xraytest.Shadowsocks2022 {
					want = quota.Shadowsocks
				}
				found := cfg.Lookup(u.Email)
				if len(found) != 1 {
					t.Errorf("%s: found %+v, want one", u.Email, found)
					continue
				}
				f := found[0]
				if f.Protocol != want || f.Inbound != u.Inbound || f.Account() != u.Account || f.Level != u.Level {
					t.Errorf("%s: found %+v, want %s, %s, %+v, level %d", u.Email, f, want, u.Inbound, u.Account, u.Level)
				}
				if !f.Alterable() {
					t.Errorf("%s: not alterable", u.Email)
				}
				if in, ok := cfg.Inbound(u.Inbound); !ok || in.Port != srv.InboundPort(u.Inbound) {
					t.Errorf("%s: inbound %+v, want port %d", u.Email, in, srv.InboundPort(u.Inbound))
				}
			}
			// The API works, and Xray counts every user of level 0.
			api := srv.Dial(t)
			for _, u := range users {
				if _, _, err := srv.Client(t, u).Transfer(1000, 1000); err != nil {
					t.Fatalf("%s: %v", u.Email, err)
				}
			}
			traffic, err := api.UserTraffic(t.Context())
			if err != nil {
				t.Fatal(err)
			}
			for _, u := range users {
				if _, ok := traffic[u.Email]; ok != (u.Level == 0) {
					t.Errorf("%s, level %d: counted %v", u.Email, u.Level, ok)
				}
			}
		})
	}
}

// TestStream: a stream flows both ways until the server stops, which cuts
// it; after a restart on the same ports, new connections work again, also
// of a user added through the API and reached through a client of its own.
func TestStream(t *testing.T) {
	srv := xraytest.StartServer(t, xraytest.DefaultUsers())
	c := srv.Client(t, srv.User(t, "vmess-b"))
	if c2 := srv.Client(t, srv.User(t, "vmess-b")); c2 != c {
		t.Errorf("two Clients of one user: %+v, %+v", c, c2)
	}
	if srv.Client(t, srv.User(t, "alice")).Source == c.Source {
		t.Errorf("alice and vmess-b have one source address %s", c.Source)
	}

	const rate = 1 << 20
	s := c.Stream(t, rate, rate)
	if !s.Flowing(2 * time.Second) {
		t.Fatalf("stream not flowing: %v", s.Err())
	}
	time.Sleep(500 * time.Millisecond)
	sent, received := s.Progress()
	t.Logf("after 0.5 s more: sent %d, received %d", sent, received)
	if received < rate/4 || received > 2*rate || sent < rate/4 || sent > 2*rate {
		t.Errorf("sent %d, received %d, want about %d each", sent, received, rate)
	}
	if s.Stopped(200*time.Millisecond, 500*time.Millisecond) {
		t.Errorf("running stream stopped: %v", s.Err())
	}

	// A download only, which the server's stop cuts.
	d := c.Stream(t, 0, rate)
	if !d.Flowing(2 * time.Second) {
		t.Fatalf("download not flowing: %v", d.Err())
	}
	pid := srv.PID()
	srv.Stop(t)
	if srv.PID() != 0 {
		t.Errorf("PID %d after Stop", srv.PID())
	}
	select {
	case <-d.Done():
		t.Logf("download cut: %v", d.Err())
		if !errors.Is(d.Err(), io.EOF) {
			t.Errorf("download cut with %v, want EOF", d.Err())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("download not cut 5 s after the server stopped")
	}
	if !d.Stopped(time.Second, time.Second) {
		t.Error("Stopped false after Done")
	}

	srv.Restart(t)
	if srv.PID() == 0 || srv.PID() == pid {
		t.Errorf("PID %d after Restart, %d before", srv.PID(), pid)
	}
	if _, _, err := c.Transfer(1000, 1000); err != nil {
		t.Fatalf("after Restart: %v", err)
	}
	api := srv.Dial(t)
	carol := xraytest.NewUser("carol", xraytest.Shadowsocks2022)
	cc := srv.Client(t, carol)
	if err := cc.Probe(); err == nil {
		t.Error("carol gets through before she is added")
	}
	if err := api.AddUser(t.Context(), carol.Inbound, carol.Email, carol.Account); err != nil {
		t.Fatal(err)
	}
	e, err := cc.Echo()
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := e.RoundTrip(1000); err != nil {
		t.Fatal(err)
	}
	ips, err := api.OnlineIPs(t.Context(), carol.Email)
	if err != nil || len(ips) != 1 || ips[cc.Source] == 0 {
		t.Errorf("OnlineIPs(carol) = %v, %v; want just %s", ips, err, cc.Source)
	}

	// The first stream was cut too; a new one ends with Close.
	if s.Err() == nil {
		t.Error("stream through the stopped server not cut")
	}
	s2 := c.Stream(t, rate, 0)
	if !s2.Flowing(2 * time.Second) {
		t.Fatalf("upload not flowing: %v", s2.Err())
	}
	s2.Close()
	if !errors.Is(s2.Err(), net.ErrClosed) {
		t.Errorf("Err after Close: %v, want net.ErrClosed", s2.Err())
	}
}

// TestDialVLESS: without a client Xray, a VLESS user's connection from an
// address of its own reaches the sink, is counted by Xray as the user's
// payload, and is logged from that address.
func TestDialVLESS(t *testing.T) {
	u := xraytest.NewUser("v1", xraytest.VLESS)
	srv := xraytest.StartServer(t, []xraytest.User{u, xraytest.NewUser("v2", xraytest.VLESS)}, xraytest.NoClient(), xraytest.AccessLog())
	sent, recv, err := srv.TransferVLESS(u, "127.1.0.7", 5000, 3000)
	if err != nil {
		t.Fatal(err)
	}
	api := srv.Dial(t)
	deadline := time.Now().Add(5 * time.Second)
	for {
		tr, err := api.UserTrafficOf(t.Context(), "v1")
		if err == nil && tr.Uplink == sent && tr.Downlink == recv {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("v1's counters: %+v, %v; want %d up, %d down", tr, err, sent, recv)
		}
		time.Sleep(50 * time.Millisecond)
	}
	log, err := os.ReadFile(srv.AccessLogPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "from 127.1.0.7:") || !strings.Contains(string(log), "email: v1") {
		t.Errorf("access log: %s", log)
	}
	if _, err := srv.DialVLESS(xraytest.NewUser("t", xraytest.Trojan), "", srv.Sink); err == nil {
		t.Error("DialVLESS of a Trojan user: no error")
	}
}
