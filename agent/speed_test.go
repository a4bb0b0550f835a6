package agent

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/quota"
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
