package xraystats_test

// Tests against real Xray processes, run by internal/xraytest.

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/xraytest"
	. "github.com/myvpn/bwagent/xraystats"
)

// apiTimeout is the per-call timeout of the tests' API clients.
const apiTimeout = 500 * time.Millisecond

// lab is an Xray server with xraytest's default users, its clients, and an
// API client of it.
type lab struct {
	*xraytest.Server
	api *Client
}

// newLab starts a lab, stopped in t.Cleanup.
func newLab(t *testing.T) *lab {
	t.Helper()
	srv := xraytest.StartServer(t, xraytest.DefaultUsers())
	return &lab{Server: srv, api: srv.Dial(t, WithTimeout(apiTimeout))}
}

// client returns the client of the user with this email.
func (l *lab) client(t testing.TB, email string) *xraytest.Client {
	t.Helper()
	return l.Client(t, l.User(t, email))
}

// within fails t unless d <= limit.
func within(t *testing.T, what string, d, limit time.Duration) {
	t.Helper()
	if d > limit {
		t.Errorf("%s took %v, more than %v", what, d, limit)
	}
}

// tolerance is how far a counter may be above the payload that the test
// sent: 1% and 4 KiB. (Measured: it is exact, but nothing in Xray promises
// that.)
func tolerance(n int64) int64 { return n/100 + 4096 }

// checkCounter fails t unless got is within the tolerance above want.
func checkCounter(t *testing.T, what string, got, want int64) {
	t.Helper()
	if got < want || got > want+tolerance(want) {
		t.Errorf("%s = %d, want %d (+%d at most)", what, got, want, tolerance(want))
	}
}

// TestUserTraffic sends a different amount up and down as each user of each
// protocol and reads it back from Xray's counters.
func TestUserTraffic(t *testing.T) {
	l := newLab(t)
	ctx := t.Context()

	type want struct{ up, down int64 }
	wants := map[string]want{}
	for i, u := range l.Users {
		up := int64(1<<20 + i*37*1024 + i)
		down := int64(2<<20 - i*53*1024 + 3*i)
		sent, recvd, err := l.Client(t, u).Transfer(up, down)
		if err != nil {
			t.Fatalf("%s (%s): %v", u.Email, u.Protocol, err)
		}
		wants[u.Email] = want{sent, recvd}
	}

	all, err := l.api.UserTraffic(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != len(l.Users) {
		t.Errorf("UserTraffic has %d users, want %d: %v", len(all), len(l.Users), all)
	}
	for _, u := range l.Users {
		w, got := wants[u.Email], all[u.Email]
		checkCounter(t, u.Email+" uplink", got.Uplink, w.up)
		checkCounter(t, u.Email+" downlink", got.Downlink, w.down)
		t.Logf("%-16s %-9s uplink %8d (sent %8d, %+d)  downlink %8d (sent %8d, %+d)",
			u.Protocol, u.Email, got.Uplink, w.up, got.Uplink-w.up, got.Downlink, w.down, got.Downlink-w.down)

		one, err := l.api.UserTrafficOf(ctx, u.Email)
		if err != nil {
			t.Fatal(err)
		}
		if one != got {
			t.Errorf("UserTrafficOf(%q) = %+v, UserTraffic has %+v", u.Email, one, got)
		}
	}
	// alice is a prefix of alice2: their counters stay apart.
	alice, _ := l.api.UserTrafficOf(ctx, "alice")
	alice2, _ := l.api.UserTrafficOf(ctx, "alice2")
	if alice.Uplink != wants["alice"].up || alice2.Uplink != wants["alice2"].up {
		t.Errorf("alice %+v alice2 %+v, want uplinks %d and %d", alice, alice2, wants["alice"].up, wants["alice2"].up)
	}
	for _, missing := range []string{"alic", "lice", "alice3", "nobody"} {
		if _, err := l.api.UserTrafficOf(ctx, missing); !errors.Is(err, ErrNotFound) {
			t.Errorf("UserTrafficOf(%q): %v, want ErrNotFound", missing, err)
		}
	}
	if _, err := l.api.UserTrafficOf(ctx, ""); !errors.Is(err, ErrInvalid) {
		t.Errorf("UserTrafficOf(\"\"): %v, want ErrInvalid", err)
	}

	// Reads do not reset: a second transfer adds to the first.
	sent, recvd, err := l.client(t, "alice").Transfer(1000, 2000)
	if err != nil {
		t.Fatal(err)
	}
	again, err := l.api.UserTrafficOf(ctx, "alice")
	if err != nil {
		t.Fatal(err)
	}
	checkCounter(t, "alice uplink after a second transfer", again.Uplink, wants["alice"].up+sent)
	checkCounter(t, "alice downlink after a second transfer", again.Downlink, wants["alice"].down+recvd)
}

// TestOnlineIPs: while a user has a connection open, Xray lists its source
// address; once closed, no more.
func TestOnlineIPs(t *testing.T) {
	l := newLab(t)
	ctx := t.Context()
	c := l.client(t, "vmess-a")
	email := c.User.Email

	if _, err := l.api.OnlineIPs(ctx, email); !errors.Is(err, ErrNotFound) {
		t.Errorf("OnlineIPs before any connection: %v, want ErrNotFound", err)
	}
	e, err := c.Echo()
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := e.RoundTrip(100); err != nil {
		t.Fatal(err)
	}
	ips, err := l.api.OnlineIPs(ctx, email)
	if err != nil {
		t.Fatal(err)
	}
	seen, ok := ips[c.Source]
	if !ok || len(ips) != 1 {
		t.Fatalf("OnlineIPs(%q) = %v, want just %s", email, ips, c.Source)
	}
	if d := time.Since(time.Unix(seen, 0)); d < -time.Second || d > 10*time.Second {
		t.Errorf("OnlineIPs(%q): %s last seen %v ago", email, c.Source, d)
	}
	t.Logf("open connection: OnlineIPs(%q) = %v", email, ips)

	e.Close()
	var last map[string]int64
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if last, err = l.api.OnlineIPs(ctx, email); err != nil {
			t.Fatal(err)
		}
		if len(last) == 0 {
			break
		}
	}
	if len(last) != 0 {
		t.Errorf("OnlineIPs(%q) after the connection closed = %v, want none", email, last)
	}
}

// TestOnlineUsers: OnlineUsers lists exactly the users with a connection
// open, each with its own source address, as OnlineIPs does; alice and
// alice2 (one's name a prefix of the other's) stay apart.
func TestOnlineUsers(t *testing.T) {
	l := newLab(t)
	ctx := t.Context()
	alice, alice2, vmess, trojan := l.client(t, "alice"), l.client(t, "alice2"), l.client(t, "vmess-a"), l.client(t, "trojan-a")

	// waitFor polls OnlineUsers until it has exactly the users of want,
	// each with just its client's address; it fails t after 5 s.
	waitFor := func(what string, want ...*xraytest.Client) map[string]map[string]int64 {
		t.Helper()
		var got map[string]map[string]int64
		var err error
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			if got, err = l.api.OnlineUsers(ctx); err != nil {
				t.Fatalf("%s: OnlineUsers: %v", what, err)
			}
			if onlineAre(got, want) {
				return got
			}
			if time.Now().After(deadline) {
				break
			}
		}
		var emails []string
		for _, c := range want {
			emails = append(emails, c.User.Email+" from "+c.Source)
		}
		t.Fatalf("%s: OnlineUsers = %v, want %s", what, got, emails)
		return nil
	}

	if got, err := l.api.OnlineUsers(ctx); err != nil || got == nil || len(got) != 0 {
		t.Errorf("OnlineUsers before any connection = %#v, %v; want an empty map", got, err)
	}

	e2, err := alice2.Echo()
	if err != nil {
		t.Fatal(err)
	}
	defer e2.Close()
	waitFor("alice2 connected", alice2)

	ea, err := alice.Echo()
	if err != nil {
		t.Fatal(err)
	}
	defer ea.Close()
	ev, err := vmess.Echo()
	if err != nil {
		t.Fatal(err)
	}
	defer ev.Close()
	// trojan-a was online for a moment, and is no more.
	if _, _, err := trojan.Transfer(1000, 1000); err != nil {
		t.Fatal(err)
	}
	got := waitFor("alice, alice2 and vmess-a connected", alice, alice2, vmess)
	t.Logf("OnlineUsers = %v", got)
	for _, c := range []*xraytest.Client{alice, alice2, vmess} {
		seen := got[c.User.Email][c.Source]
		if d := time.Since(time.Unix(seen, 0)); d < -time.Second || d > 10*time.Second {
			t.Errorf("%s: %s last seen %v ago", c.User.Email, c.Source, d)
		}
		one, err := l.api.OnlineIPs(ctx, c.User.Email)
		if err != nil {
			t.Fatal(err)
		}
		if !maps.Equal(one, got[c.User.Email]) {
			t.Errorf("OnlineIPs(%q) = %v, OnlineUsers has %v", c.User.Email, one, got[c.User.Email])
		}
	}

	ea.Close()
	waitFor("alice's connection closed", alice2, vmess)
}

// onlineAre tells whether online has exactly the users of cs, each with
// just its client's source address.
func onlineAre(online map[string]map[string]int64, cs []*xraytest.Client) bool {
	if len(online) != len(cs) {
		return false
	}
	for _, c := range cs {
		ips := online[c.User.Email]
		if _, ok := ips[c.Source]; !ok || len(ips) != 1 {
			return false
		}
	}
	return true
}

// TestRemoveAddUser blocks and unblocks one user of each protocol while
// the other user of the same inbound goes on, and checks what happens to a
// connection of the removed user that is open at the time.
func TestRemoveAddUser(t *testing.T) {
	l := newLab(t)
	ctx := t.Context()
	for _, pair := range [][2]string{
		{"alice", "alice2"},
		{"vmess-a", "vmess-b"},
		{"trojan-a", "trojan-b"},
		{"ss-a", "ss-b"},
		{"ss22-a", "ss22-b"},
	} {
		ca, cb := l.client(t, pair[0]), l.client(t, pair[1])
		a, b := ca.User, cb.User
		t.Run(a.Protocol, func(t *testing.T) {
			// Both work, and a has a connection open.
			for _, c := range []*xraytest.Client{ca, cb} {
				if _, _, err := c.Transfer(10000, 10000); err != nil {
					t.Fatalf("%s before removal: %v", c.User.Email, err)
				}
			}
			live, err := ca.Echo()
			if err != nil {
				t.Fatal(err)
			}
			defer live.Close()
			if err := live.RoundTrip(16 << 10); err != nil {
				t.Fatal(err)
			}
			before, err := l.api.UserTrafficOf(ctx, a.Email)
			if err != nil {
				t.Fatal(err)
			}

			if err := l.api.RemoveUser(ctx, a.Inbound, a.Email); err != nil {
				t.Fatal(err)
			}
			users, err := l.api.InboundUsers(ctx, a.Inbound)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(users, []string{b.Email}) {
				t.Errorf("InboundUsers(%q) after removing %s = %q, want [%s]", a.Inbound, a.Email, users, b.Email)
			}
			// New connections of a fail, b's work.
			start := time.Now()
			if err := ca.Probe(); err == nil {
				t.Errorf("%s: a new connection works after RemoveUser", a.Email)
			} else {
				t.Logf("%s: a new connection after RemoveUser fails after %v: %v", a.Email, time.Since(start).Round(time.Millisecond), err)
			}
			if _, _, err := cb.Transfer(10000, 10000); err != nil {
				t.Errorf("%s, not removed: %v", b.Email, err)
			}
			// The connection that was open goes on, and is counted.
			if err := live.RoundTrip(16 << 10); err != nil {
				t.Errorf("%s: open connection after RemoveUser: %v", a.Email, err)
			} else {
				after, err := l.api.UserTrafficOf(ctx, a.Email)
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("%s: open connection still flows after RemoveUser; counters %+v -> %+v", a.Email, before, after)
				checkCounter(t, a.Email+" uplink growth on the open connection", after.Uplink-before.Uplink, 16<<10)
				checkCounter(t, a.Email+" downlink growth on the open connection", after.Downlink-before.Downlink, 16<<10)
			}
			live.Close()

			if err := l.api.RemoveUser(ctx, a.Inbound, a.Email); !errors.Is(err, ErrNotFound) {
				t.Errorf("RemoveUser of a removed user: %v, want ErrNotFound", err)
			} else {
				t.Logf("RemoveUser of a removed user: %v", err)
			}

			// Back again.
			if err := l.api.AddUser(ctx, a.Inbound, a.Email, a.Account); err != nil {
				t.Fatal(err)
			}
			if _, _, err := ca.Transfer(10000, 10000); err != nil {
				t.Errorf("%s after AddUser: %v", a.Email, err)
			}
			users, err = l.api.InboundUsers(ctx, a.Inbound)
			if err != nil {
				t.Fatal(err)
			}
			if want := []string{a.Email, b.Email}; !slices.Equal(users, want) {
				t.Errorf("InboundUsers(%q) after AddUser = %q, want %q", a.Inbound, users, want)
			}
			if err := l.api.AddUser(ctx, a.Inbound, a.Email, a.Account); !errors.Is(err, ErrExists) {
				t.Errorf("AddUser of an existing user: %v, want ErrExists", err)
			}
			if err := l.api.AddUser(ctx, a.Inbound, b.Email, a.Account); !errors.Is(err, ErrExists) {
				t.Errorf("AddUser of an existing email with another account: %v, want ErrExists", err)
			}
			// Pointers to accounts do as well.
			if err := l.api.AddUser(ctx, a.Inbound, a.Email, pointerTo(a.Account)); !errors.Is(err, ErrExists) {
				t.Errorf("AddUser of an existing user, account by pointer: %v, want ErrExists", err)
			}
		})
	}

	// Xray's own answer to adding an email that is there, without
	// AddUser's check first: what classify maps to ErrExists.
	t.Run("xray duplicate check", func(t *testing.T) {
		for _, email := range []string{"alice2", "vmess-b", "trojan-b", "ss-b", "ss22-b"} {
			c := l.client(t, email)
			u := c.User
			err := RawAddUser(ctx, l.api, u.Inbound, u.Email, u.Account)
			users, lerr := l.api.InboundUsers(ctx, u.Inbound)
			if lerr != nil {
				t.Fatal(lerr)
			}
			t.Logf("%s: adding %s again: %v; users now %q", u.Protocol, u.Email, err, users)
			switch {
			case err == nil:
				// Xray took the duplicate (its Shadowsocks inbound does):
				// remove one of the two.
				if err := l.api.RemoveUser(ctx, u.Inbound, u.Email); err != nil {
					t.Fatal(err)
				}
			case !errors.Is(err, ErrExists):
				t.Errorf("%s: adding %s again: %v, want ErrExists", u.Protocol, u.Email, err)
			}
			if _, _, err := c.Transfer(1000, 1000); err != nil {
				t.Errorf("%s after the duplicate add: %v", u.Email, err)
			}
		}
	})

	t.Run("errors", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			err  error
			want error
		}{
			{"RemoveUser, no such inbound", l.api.RemoveUser(ctx, "nope-in", "alice"), ErrNotFound},
			{"AddUser, no such inbound", l.api.AddUser(ctx, "nope-in", "carol", VLESS{ID: xraytest.NewUUID()}), ErrNotFound},
			{"InboundUsers, no such inbound", func() error { _, err := l.api.InboundUsers(ctx, "nope-in"); return err }(), ErrNotFound},
			// Xray maps IDs of 1 to 30 bytes to UUIDs; longer ones must be UUIDs.
			{"AddUser, bad UUID", l.api.AddUser(ctx, "vless-in", "carol", VLESS{ID: "this-is-not-a-uuid-and-too-long-for-one"}), ErrInvalid},
			{"AddUser, unknown cipher", l.api.AddUser(ctx, "ss-in", "carol", Shadowsocks{Method: "rc4-md5", Password: "x"}), ErrInvalid},
			{"AddUser, nil account", l.api.AddUser(ctx, "vless-in", "carol", nil), ErrInvalid},
			{"AddUser, nil *VLESS", l.api.AddUser(ctx, "vless-in", "carol", (*VLESS)(nil)), ErrInvalid},
			{"AddUser, empty email", l.api.AddUser(ctx, "vless-in", "", VLESS{ID: xraytest.NewUUID()}), ErrInvalid},
			{"RemoveUser, empty tag", l.api.RemoveUser(ctx, "", "alice"), ErrInvalid},
		} {
			if !errors.Is(tc.err, tc.want) {
				t.Errorf("%s: %v, want %v", tc.name, tc.err, tc.want)
			} else {
				t.Logf("%s: %v", tc.name, tc.err)
			}
		}
		// The failed adds added nobody.
		users, err := l.api.InboundUsers(ctx, "vless-in")
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"alice", "alice2"}; !slices.Equal(users, want) {
			t.Errorf("InboundUsers(vless-in) = %q, want %q", users, want)
		}
	})
}

// pointerTo returns a pointer to a copy of acct.
func pointerTo(acct Account) Account {
	switch a := acct.(type) {
	case VLESS:
		return &a
	case VMess:
		return &a
	case Trojan:
		return &a
	case Shadowsocks:
		return &a
	case Shadowsocks2022:
		return &a
	}
	panic(fmt.Sprintf("account %T", acct))
}

// TestXrayDownAndRestart: calls fail fast while Xray is hung or stopped,
// and after a restart the client reconnects by itself, the uptime went down
// and the counters started again from zero.
func TestXrayDownAndRestart(t *testing.T) {
	l := newLab(t)
	ctx := t.Context()
	c := l.client(t, "trojan-a")
	u := c.User

	sent, _, err := c.Transfer(300000, 200000)
	if err != nil {
		t.Fatal(err)
	}
	before, err := l.api.UserTrafficOf(ctx, u.Email)
	if err != nil {
		t.Fatal(err)
	}
	checkCounter(t, "uplink", before.Uplink, sent)
	// Uptime has a resolution of a second: wait for it to be 1 s at least,
	// so that going down shows.
	var sys SysStats
	for deadline := time.Now().Add(3 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if sys, err = l.api.SysStats(ctx); err != nil {
			t.Fatal(err)
		}
		if sys.Uptime >= time.Second || time.Now().After(deadline) {
			break
		}
	}
	if sys.Uptime < time.Second || sys.NumGoroutine == 0 || sys.Sys == 0 {
		t.Fatalf("SysStats = %+v", sys)
	}

	// Every call fails with ErrUnavailable within the per-call timeout.
	calls := map[string]func() error{
		"UserTraffic":   func() error { _, err := l.api.UserTraffic(ctx); return err },
		"UserTrafficOf": func() error { _, err := l.api.UserTrafficOf(ctx, u.Email); return err },
		"SysStats":      func() error { _, err := l.api.SysStats(ctx); return err },
		"OnlineIPs":     func() error { _, err := l.api.OnlineIPs(ctx, u.Email); return err },
		"OnlineUsers": func() error {
			m, err := l.api.OnlineUsers(ctx)
			if m != nil {
				t.Errorf("OnlineUsers failed with a map: %v", m)
			}
			return err
		},
		"InboundUsers": func() error { _, err := l.api.InboundUsers(ctx, u.Inbound); return err },
		"RemoveUser":   func() error { return l.api.RemoveUser(ctx, u.Inbound, u.Email) },
		"AddUser":      func() error { return l.api.AddUser(ctx, u.Inbound, "carol", Trojan{Password: "x"}) },
	}
	checkUnavailable := func(state string, minTime time.Duration) {
		t.Helper()
		for name, call := range calls {
			start := time.Now()
			err := call()
			took := time.Since(start)
			if !errors.Is(err, ErrUnavailable) {
				t.Errorf("%s, Xray %s: %v, want ErrUnavailable", name, state, err)
			}
			if took < minTime {
				t.Errorf("%s, Xray %s: failed after %v, before the timeout", name, state, took)
			}
			within(t, fmt.Sprintf("%s, Xray %s", name, state), took, apiTimeout+200*time.Millisecond)
			t.Logf("%s, Xray %s: %v after %v", name, state, err, took.Round(time.Millisecond))
		}
	}

	// Hung (SIGSTOP): calls wait the timeout out, no longer.
	l.Freeze(t)
	checkUnavailable("hung", apiTimeout)
	l.Thaw(t)
	if _, err := l.api.SysStats(ctx); err != nil {
		t.Fatalf("SysStats after SIGCONT: %v", err)
	}

	// Stopped: calls fail at once.
	l.Stop(t)
	checkUnavailable("stopped", 0)
	start := time.Now()
	if _, err := Dial(ctx, l.API, WithTimeout(apiTimeout)); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Dial, Xray stopped: %v, want ErrUnavailable", err)
	}
	within(t, "Dial, Xray stopped", time.Since(start), apiTimeout+200*time.Millisecond)

	// Restarted: the same Client reconnects.
	l.Restart(t)
	start = time.Now()
	var sys2 SysStats
	for {
		if sys2, err = l.api.SysStats(ctx); err == nil {
			break
		}
		if !errors.Is(err, ErrUnavailable) || time.Since(start) > 3*time.Second {
			t.Fatalf("SysStats after restart: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("reconnected %v after the restart; uptime %v -> %v", time.Since(start).Round(time.Millisecond), sys.Uptime, sys2.Uptime)
	if sys2.Uptime >= sys.Uptime {
		t.Errorf("uptime after restart %v, before %v: want it lower", sys2.Uptime, sys.Uptime)
	}
	// Counters start again: none until the user's first connection, then
	// only what came after the restart.
	if all, err := l.api.UserTraffic(ctx); err != nil || len(all) != 0 {
		t.Errorf("UserTraffic right after restart = %v, %v; want no users", all, err)
	}
	if _, err := l.api.UserTrafficOf(ctx, u.Email); !errors.Is(err, ErrNotFound) {
		t.Errorf("UserTrafficOf right after restart: %v, want ErrNotFound", err)
	}
	sent, recvd, err := c.Transfer(5000, 7000)
	if err != nil {
		t.Fatal(err)
	}
	after, err := l.api.UserTrafficOf(ctx, u.Email)
	if err != nil {
		t.Fatal(err)
	}
	if after != (Traffic{sent, recvd}) {
		t.Errorf("traffic after restart = %+v, want {%d %d} (before the restart: %+v)", after, sent, recvd, before)
	}
	t.Logf("traffic before restart %+v; after the restart and %d/%d bytes: %+v", before, sent, recvd, after)
}

// TestDialErrors: Dial fails fast on nothing listening, and on an Xray
// whose API lacks the StatsService.
func TestDialErrors(t *testing.T) {
	ctx := t.Context()
	port := xraytest.FreePort(t)
	start := time.Now()
	_, err := Dial(ctx, fmt.Sprintf("127.0.0.1:%d", port))
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("Dial to a closed port: %v, want ErrUnavailable", err)
	}
	within(t, "Dial to a closed port", time.Since(start), DefaultTimeout+200*time.Millisecond)
	if _, err := Dial(ctx, ""); !errors.Is(err, ErrInvalid) {
		t.Errorf("Dial(\"\"): %v, want ErrInvalid", err)
	}

	// An Xray with only the HandlerService.
	srv := xraytest.StartServer(t, nil, xraytest.APIServices("HandlerService"))
	_, err = Dial(ctx, srv.API)
	if !errors.Is(err, ErrUnsupported) {
		t.Errorf("Dial to an Xray without StatsService: %v, want ErrUnsupported", err)
	}
	t.Logf("Dial to an Xray without StatsService: %v", err)
}

// TestClosed: calls on a closed Client fail with ErrClosed.
func TestClosed(t *testing.T) {
	l := newLab(t)
	ctx := t.Context()
	c := l.Dial(t, WithTimeout(apiTimeout))
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := c.SysStats(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("SysStats after Close: %v, want ErrClosed", err)
	}
	// Another Client of the same server is not affected.
	if _, err := l.api.SysStats(ctx); err != nil {
		t.Error(err)
	}
}
