package agent

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/xraytest"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/xraystats"
)

// realXrayEnv is an agent (SSH side off) over a real Xray server with the
// default test users, discovered from the server's config file.
func realXrayEnv(t *testing.T, limits string) (*env, *xraytest.Server) {
	t.Helper()
	xraytest.Bin(t)
	e := newEnv(t)
	srv := xraytest.StartServer(t, xraytest.DefaultUsers())
	e.cfg.SSH.Enabled = false
	e.cfg.Xray.Configs = []string{srv.ConfigPath}
	e.write("bw-limit.conf", limits)
	e.start()
	return e, srv
}

// now steps the agent on the real clock: Xray's uptime is real time.
func (e *env) now() {
	e.t.Helper()
	e.step(time.Since(e.clock))
}

// settle waits until Xray's counters of email stop moving: Xray adds a
// connection's bytes to them as it relays, a little after the client saw
// them through.
func settle(t *testing.T, srv *xraytest.Server, emails ...string) {
	t.Helper()
	xc := srv.Dial(t)
	for _, email := range emails {
		var last xraystats.Traffic
		for i := 0; i < 50; i++ {
			tr, _ := xc.UserTrafficOf(context.Background(), email)
			if i > 0 && tr == last {
				break
			}
			last = tr
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func within1(t *testing.T, what string, got, want int64) {
	t.Helper()
	if d := got - want; d < -want/100 || d > want/100 {
		t.Errorf("%s: counted %d, moved %d (more than 1%% apart)", what, got, want)
	}
}

// TestRealXray: against a real Xray server, each user's traffic is counted
// within 1%; a user over the limit is removed within one tick (new
// connections fail, other users go on, marker, JSON and log agree); reset
// lets them back; an Xray restart counts nothing twice and the blocked user
// stays blocked; a stopped Xray is reported while the agent goes on, and
// accounting resumes when it is back; a manual unblock follows the rule.
func TestRealXray(t *testing.T) {
	e, srv := realXrayEnv(t, "alice 1\n")
	e.clock = time.Now()
	e.now()
	if v := e.user("alice"); v.Protocol != quota.VLESS || v.Limit != quota.MiB {
		t.Fatalf("alice from the xray config: %+v", v)
	}

	// 1. Counted within 1% of the payload.
	moved := map[string][2]int64{}
	for _, email := range []string{"alice", "vmess-a", "trojan-a", "ss-a", "ss22-a"} {
		up, down := int64(300_000), int64(200_000)
		sent, recv, err := srv.Client(t, srv.User(t, email)).Transfer(up, down)
		if err != nil {
			t.Fatalf("%s: %v", email, err)
		}
		moved[email] = [2]int64{sent, recv}
		settle(t, srv, email)
	}
	e.now()
	for email, m := range moved {
		v := e.user(email)
		within1(t, email+" upload", int64(v.Upload), m[0])
		within1(t, email+" download", int64(v.Download), m[1])
	}

	// 2. Over the limit: blocked within one tick; her running download
	// is cut, alice2's (same inbound, another address) goes on.
	alice := srv.Client(t, srv.User(t, "alice"))
	download := alice.Stream(t, 0, 20_000)
	other := srv.Client(t, srv.User(t, "alice2")).Stream(t, 0, 20_000)
	if _, _, err := alice.Transfer(700_000, 0); err != nil {
		t.Fatal(err)
	}
	settle(t, srv, "alice")
	e.now()
	if v := e.user("alice"); v.Status != quota.Blocked {
		t.Fatalf("alice after 1.2 MB of a 1 MiB limit: %+v", v)
	}
	select {
	case <-download.Done():
	case <-time.After(5 * time.Second):
		t.Error("blocked alice's running download was not cut")
	}
	if !other.Flowing(time.Second) {
		t.Errorf("alice2's download stopped too: %v", other.Err())
	}
	other.Close()
	if err := alice.Probe(); err == nil {
		t.Error("blocked alice opened a new connection")
	}
	if _, _, err := srv.Client(t, srv.User(t, "alice2")).Transfer(10_000, 10_000); err != nil {
		t.Errorf("alice2 (same inbound) disturbed: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.cfg.Paths.MarkerDir, "alice")); err != nil {
		t.Errorf("marker: %v", err)
	}
	if j := e.usage("alice"); !j.Blocked || j.Protocol != "vless" {
		t.Errorf("alice.json: %+v", j)
	}
	if log := strings.Join(e.logLines(), "\n"); !strings.Contains(log, "| vless | alice | Bandwidth Limit Reached") {
		t.Errorf("log: %s", log)
	}

	// 3. Reset lets her back.
	if err := e.a.Reset(context.Background(), "alice"); err != nil {
		t.Fatal(err)
	}
	if err := alice.Probe(); err != nil {
		t.Errorf("alice after reset: %v", err)
	}
	// Over again, blocked again.
	if _, _, err := alice.Transfer(1_200_000, 0); err != nil {
		t.Fatal(err)
	}
	settle(t, srv, "alice")
	e.now()
	if v := e.user("alice"); v.Status != quota.Blocked {
		t.Fatalf("alice over again: %+v", v)
	}

	// 4. Xray restarts in the middle of a stream: counters from zero,
	// nothing counted twice, and alice (reloaded by Xray from its config)
	// removed again in one tick. Bytes Xray relayed after the agent's last
	// read die with its counters: the stream is read just before.
	vm := srv.Client(t, srv.User(t, "vmess-a"))
	before := e.user("vmess-a")
	stream := vm.Stream(t, 100_000, 100_000)
	if !stream.Flowing(time.Second) {
		t.Fatalf("stream: %v", stream.Err())
	}
	e.now()
	srv.Restart(t)
	<-stream.Done()
	sent, recv := stream.Progress()
	sent2, recv2, err := vm.Transfer(100_000, 50_000)
	if err != nil {
		t.Fatal(err)
	}
	settle(t, srv, "vmess-a")
	e.now()
	after := e.user("vmess-a")
	up, down := int64(after.Upload-before.Upload), int64(after.Download-before.Download)
	if up > (sent+sent2)*101/100 || down > (recv+recv2)*101/100 {
		t.Errorf("vmess-a across a restart: counted %d/%d for %d/%d moved: counted twice", up, down, sent+sent2, recv+recv2)
	}
	if up < sent+sent2-64<<10 || down < recv+recv2-64<<10 {
		t.Errorf("vmess-a across a restart: counted %d/%d for %d/%d moved: more lost than one read's worth", up, down, sent+sent2, recv+recv2)
	}
	if err := alice.Probe(); err == nil {
		t.Error("alice got in after the Xray restart")
	}

	// 5. Xray stopped: reported, the agent goes on; back: accounting resumes.
	srv.Stop(t)
	e.now()
	if h := e.a.Health(); h.Errors["xray api"] == "" {
		t.Errorf("stopped xray not reported: %+v", h.Errors)
	}
	srv.Restart(t)
	sent, _, err = vm.Transfer(80_000, 0)
	if err != nil {
		t.Fatal(err)
	}
	settle(t, srv, "vmess-a")
	e.now()
	if v := e.user("vmess-a"); int64(v.Upload-after.Upload) < sent {
		t.Errorf("accounting did not resume: %d more bytes counted, %d sent", v.Upload-after.Upload, sent)
	}
	if h := e.a.Health(); h.Errors["xray api"] != "" {
		t.Errorf("still reported after xray came back: %+v", h.Errors)
	}

	// A hung Xray (SIGSTOP) holds a tick up no longer than the call
	// timeout, a fraction of the interval.
	srv.Freeze(t)
	start := time.Now()
	e.now()
	if d := time.Since(start); d > 2*e.cfg.Xray.Timeout+200*time.Millisecond {
		t.Errorf("a tick with a hung xray took %v (timeout %v)", d, e.cfg.Xray.Timeout)
	}
	if h := e.a.Health(); h.Errors["xray api"] == "" {
		t.Errorf("hung xray not reported: %+v", h.Errors)
	}
	srv.Thaw(t)

	// 6. Manual unblock: back in at once, and not blocked again for the
	// same limit while still over it.
	e.now()
	if err := e.a.Unblock(context.Background(), "alice", 0); err != nil {
		t.Fatal(err)
	}
	if err := alice.Probe(); err != nil {
		t.Errorf("alice after a manual unblock: %v", err)
	}
	if _, _, err := alice.Transfer(100_000, 0); err != nil {
		t.Fatal(err)
	}
	settle(t, srv, "alice")
	e.now()
	e.now()
	if v := e.user("alice"); v.Status == quota.Blocked || !v.Override.Active {
		t.Errorf("manually unblocked alice blocked again: %+v", v)
	}
}
