package agent

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/sockkill"
)

// TestSpeedPolicies (on fakes): the kernel policy of each user carries the
// caps in force: the user's speed=, else the configured default; the
// throttle rate while THROTTLED, with no budget and no block; nothing
// while blocked. Bad speed= and throttle= values are logged once each with
// their line number and the rest of the line applies. A SIGHUP-style
// change of the defaults applies at the next tick.
func TestSpeedPolicies(t *testing.T) {
	e := newEnv(t)
	e.write("bw-limit.conf", "john 1 speed=20mbit throttle=4mbit/1mbit\nmary 100 speed=20mb throttle=fast devices=2\n")
	e.step(time.Second)
	mb := func(n float64) uint64 { return uint64(n * 1e6 / 8) }
	pol := func(uid uint32) bpf.Policy {
		e.dp.mu.Lock()
		defer e.dp.mu.Unlock()
		return e.dp.policies[uid]
	}
	if p := pol(1001); p.Rate != (bpf.Rate{Rx: mb(20), Tx: mb(20)}) || p.Quota == 0 || p.Blocked {
		t.Errorf("john's policy under the limit: %+v", p)
	}
	if p := pol(1002); p.Rate != (bpf.Rate{}) || p.Quota == 0 {
		t.Errorf("mary's policy: %+v", p)
	}
	if v := e.user("mary"); v.Limit != 100*quota.MiB || v.DevicesLimit != 2 || !v.Speed.IsZero() {
		t.Errorf("mary: %+v", v)
	}
	e.step(time.Second)
	logs := e.logs.String()
	for _, want := range []string{
		`bw-limit.conf:2: speed= ignored, the rest of the line applies: invalid rate \"20mb\": no unit`,
		`bw-limit.conf:2: throttle= ignored, the rest of the line applies: invalid rate \"fast\"`,
	} {
		if strings.Count(logs, want) != 1 {
			t.Errorf("%q logged %d times:\n%s", want, strings.Count(logs, want), logs)
		}
	}

	// john over the limit: THROTTLED, his throttle rate, no budget, no
	// block, not in the nft set; the block log says throttled.
	e.dp.blast(1001, 2*quota.MiB, 1000, false)
	e.step(time.Second)
	if v := e.user("john"); v.Status != quota.Throttled || v.Speed != (quota.Speed{Down: 4e6, Up: 1e6}) {
		t.Fatalf("john over the limit: %+v", v)
	}
	if p := pol(1001); p != (bpf.Policy{Rate: bpf.Rate{Rx: mb(4), Tx: mb(1)}}) {
		t.Errorf("john's policy while throttled: %+v", p)
	}
	if e.fw.has(1001) {
		t.Error("throttled john in the nft set")
	}
	if u := e.usage("john"); u.Blocked || u.Status != "THROTTLED" || u.SpeedDown == nil || *u.SpeedDown != 4e6 || *u.SpeedUp != 1e6 {
		t.Errorf("john's usage file: %+v", u)
	}
	if l := e.logLines(); !strings.HasSuffix(l[len(l)-1], "| ssh | john | Bandwidth Limit Reached (throttled)") {
		t.Errorf("block log: %q", l)
	}
	if !e.dp.send(1001, 1000, false) {
		t.Error("throttled john's packet refused by the fake kernel")
	}

	// A manual unblock: full speed, not the throttle rate.
	if err := e.a.Unblock(context.Background(), "john", 0); err != nil {
		t.Fatal(err)
	}
	if p := pol(1001); p.Rate != (bpf.Rate{Rx: mb(20), Tx: mb(20)}) {
		t.Errorf("john's policy after a manual unblock: %+v", p)
	}

	// Defaults from the configuration, applied at the next tick.
	cfg := e.a.cfg
	cfg.Speed.Default = quota.Speed{Down: 5e6, Up: 5e6}
	e.a.applyConfig(cfg)
	e.step(time.Second)
	if p := pol(1002); p.Rate != (bpf.Rate{Rx: mb(5), Tx: mb(5)}) {
		t.Errorf("mary's policy with a default speed: %+v", p)
	}
	if v := e.user("mary"); v.Speed != (quota.Speed{Down: 5e6, Up: 5e6}) {
		t.Errorf("mary's caps with a default speed: %v", v.Speed)
	}

	// bwctl speed / throttle, through the limits file.
	if err := e.a.SetSpeed(context.Background(), "mary", false, quota.Speed{Down: 8e6, Up: 2e6}); err != nil {
		t.Fatal(err)
	}
	if p := pol(1002); p.Rate != (bpf.Rate{Rx: mb(8), Tx: mb(2)}) {
		t.Errorf("mary's policy after SetSpeed: %+v", p)
	}
	if err := e.a.SetSpeed(context.Background(), "mary", false, quota.Speed{Down: 5, Up: 5}); err == nil {
		t.Error("SetSpeed took a rate below 1kbit")
	}
}

// TestSpeedCapsNeedAKernelID (on fakes): caps are shown only where one of
// the user's IDs in the kernel carries them. An Xray client whose
// connections the kernel does not count (Linux before 6.0; the access log
// not followed yet; xray.connections off) shows none, in the view and the
// usage file, and a warning says why, once however many ticks and users
// (every client alike, naming the first); its account in the kernel gets no rate. An SSH account shows its
// caps, as does a user who is both (with a warning that their Xray
// connections escape them), and an Xray client from the tick the kernel
// counts its connections, with no other change to it.
func TestSpeedCapsNeedAKernelID(t *testing.T) {
	e, _, _ := newXrayEnv(t, "alice 100 speed=20mbit\njohn 100 speed=20mbit\n")
	e.write("xray.json", strings.Replace(xrayConfigJSON, `"api":`, `"log": {"access": "/var/log/xray/access.log"}, "api":`, 1))
	e.write("passwd", passwd+"carol:x:1005:1005::/:/bin/false\n") // also an Xray client
	e.xray.Listeners = func([]uint16) ([]sockkill.Conn, error) { return nil, nil }
	e.cfg.Speed.Default = quota.Speed{Down: 5e6, Up: 5e6} // bob, carol, mary
	e.start()
	caps, def := quota.Speed{Down: 20e6, Up: 20e6}, quota.Speed{Down: 5e6, Up: 5e6}
	shown := func(name string, want quota.Speed) {
		t.Helper()
		if v := e.user(name); v.Speed != want {
			t.Errorf("%s shown with caps %q, want %q", name, v.Speed, want)
		}
		u := e.usage(name)
		var got quota.Speed
		if u.SpeedDown != nil {
			got.Down = quota.Rate(*u.SpeedDown)
		}
		if u.SpeedUp != nil {
			got.Up = quota.Rate(*u.SpeedUp)
		}
		if got != want || (u.SpeedDown == nil) != want.IsZero() || (u.SpeedUp == nil) != want.IsZero() {
			t.Errorf("%s.json: speed_down %v, speed_up %v; want %q", name, u.SpeedDown, u.SpeedUp, want)
		}
	}
	warned := func(msg, name, why string) int {
		n := 0
		for _, l := range strings.Split(e.logs.String(), "\n") {
			if strings.Contains(l, "level=WARN") && strings.Contains(l, msg) && (name == "" || strings.Contains(l, " user="+name+" ")) && strings.Contains(l, why) {
				n++
			}
		}
		return n
	}
	const none, part = "speed caps not enforced", "speed caps enforced on part"
	mb := func(n float64) uint64 { return uint64(n * 1e6 / 8) }

	// Linux before 6.0: no Xray account at all.
	for range 3 {
		e.step(time.Second)
	}
	shown("john", caps)
	shown("mary", def)
	shown("carol", def)
	shown("alice", quota.Speed{})
	shown("bob", quota.Speed{})
	if p := e.dp.policies[1001]; p.Rate != (bpf.Rate{Rx: mb(20), Tx: mb(20)}) {
		t.Errorf("john's policy: %+v", p)
	}
	if n := warned(none, "", "Linux before 6.0"); n != 1 {
		t.Errorf("alice's and bob's caps not enforced: warned %d times, want once for both:\n%s", n, e.logs)
	}
	if n := warned(part, "carol", "Xray: the kernel cannot count"); n != 1 {
		t.Errorf("carol's Xray connections uncapped: warned %d times, want once:\n%s", n, e.logs)
	}
	if n := warned("speed caps", "john", ""); n != 0 {
		t.Errorf("john's caps warned of:\n%s", e.logs)
	}

	// The kernel counts Xray's connections, once the access log is
	// followed (as Run makes it).
	fk := newFakeXrayKernel()
	e.xk = fk
	e.start()
	for range 2 {
		e.step(time.Second)
	}
	shown("alice", quota.Speed{})
	if n := warned(none, "", "the kernel does not count Xray's connections now"); n != 1 {
		t.Errorf("alice's and bob's caps before the access log is followed: warned %d times, want once for both:\n%s", n, e.logs)
	}
	done := make(chan struct{})
	close(done)
	e.a.xr.conns.fol = &follower{path: "/var/log/xray/access.log", cancel: func() {}, done: done}
	e.a.xr.conns.tagged = map[uint32]bool{0: true}
	e.step(time.Second)
	shown("alice", caps)
	shown("bob", def)
	acct, ok := fk.AccountOf("alice")
	if p := e.dp.policies[acct]; !ok || p.Rate != (bpf.Rate{Rx: mb(20), Tx: mb(20)}) {
		t.Errorf("alice's account %d (%v): policy %+v, want her caps", acct, ok, p)
	}

	// xray.connections off: the accounts stay, without a rate.
	cfg := e.a.cfg
	cfg.Xray.Connections = false
	e.a.applyConfig(cfg)
	for range 2 {
		e.step(time.Second)
	}
	shown("alice", quota.Speed{})
	if p := e.dp.policies[acct]; p.Rate != (bpf.Rate{}) {
		t.Errorf("alice's account with xray.connections off: policy %+v", p)
	}
	if n := warned(none, "", "xray.connections = false"); n != 1 {
		t.Errorf("alice's and bob's caps with xray.connections off: warned %d times, want once for both:\n%s", n, e.logs)
	}
	shown("john", caps)
}
