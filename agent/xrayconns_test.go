package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/xraytest"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/xraystats"
)

// xrayKernelEnv is a kernel environment over a real Xray server that runs
// in the environment's cgroup and writes an access log, with the users.
func xrayKernelEnv(t *testing.T, passwd, limits string, users ...xraytest.User) (*kernelEnv, *xraytest.Server) {
	t.Helper()
	k := newKernelEnv(t, passwd, limits)
	if !k.dp.SupportsServerTagging() {
		t.Skip("counting Xray's connections in the kernel needs Linux 6.0")
	}
	xraytest.Bin(t)
	srv := xraytest.StartServer(t, users, xraytest.AccessLog(), xraytest.Cgroup(k.cg))
	k.a.cfg.Xray.Configs = []string{srv.ConfigPath}
	k.run(t)
	return k, srv
}

// stalled reports whether d receives nothing for quiet, within timeout.
func stalled(d *xraytest.Download, quiet, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	last, since := d.Received(), time.Now()
	for time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		if n := d.Received(); n != last {
			last, since = n, time.Now()
		} else if time.Since(since) >= quiet {
			return true
		}
	}
	return false
}

// xrayDownlink returns Xray's own count of email's download.
func xrayDownlink(t *testing.T, api *xraystats.Client, email string) int64 {
	t.Helper()
	tr, err := api.UserTrafficOf(context.Background(), email)
	if errors.Is(err, xraystats.ErrNotFound) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	return tr.Downlink
}

// TestXrayVision: an XTLS Vision user's spliced download, which Xray counts
// only when the connection closes, is counted live from the kernel, stopped
// by the kernel at the limit, and not counted again when Xray reports it;
// a kill -9 of Xray in the middle of a download loses nothing the kernel
// counted; a plain VLESS user beside them is counted as before.
func TestXrayVision(t *testing.T) {
	vis, free := xraytest.NewVisionUser("vis"), xraytest.NewVisionUser("free")
	plain := xraytest.NewUser("plain", xraytest.VLESS)
	k, srv := xrayKernelEnv(t, "", "vis 24M\n", vis, free, plain)
	api := srv.Dial(t)
	waitFor(t, "the users' kernel accounts", 5*time.Second, func() bool {
		_, ok1 := k.dp.AccountOf("vis")
		_, ok2 := k.dp.AccountOf("free")
		return ok1 && ok2
	})

	// 1. Live: the usage follows the bytes received within a tick (the
	// agent ticks every second), while Xray's counter stays flat.
	d := srv.Client(t, vis).Download(t, 48*mib, 4*mib)
	waitFor(t, "8 MiB received", 10*time.Second, func() bool { return d.Received() >= 8*mib })
	at := d.Received()
	waitFor(t, "the usage to follow the download", 2500*time.Millisecond, func() bool {
		return int64(k.user(t, "vis").Download) >= at
	})
	if x := xrayDownlink(t, api, "vis"); x > 2*mib {
		t.Logf("Xray counted %d bytes of the live Vision download (expected next to none)", x)
	}

	// 2. The kernel stops it at the limit: a tick later it would be 4 MiB
	// over.
	waitFor(t, "vis blocked", 15*time.Second, func() bool { return k.user(t, "vis").Status == quota.Blocked })
	if !stalled(d, time.Second, 5*time.Second) {
		t.Error("the blocked Vision download goes on")
	}
	if got := d.Received(); got > 24*mib {
		t.Errorf("received %d bytes through a 24 MiB limit", got)
	}
	live := k.user(t, "vis")
	if live.Used > 24*mib || live.Used < 24*mib-256<<10 {
		t.Errorf("used %d at the block, limit %d", live.Used, 24*mib)
	}
	if j, err := opsfiles.ReadUsage(filepath.Join(k.cfg.Paths.UsageDir, "vis.json")); err != nil || !j.Blocked || j.Protocol != "vless" {
		t.Errorf("vis.json: %+v, %v", j, err)
	}

	// 3. Closed: Xray reports the spliced bytes, which the kernel counted
	// already.
	d.Close()
	waitFor(t, "Xray to report the Vision download", 10*time.Second, func() bool {
		return xrayDownlink(t, api, "vis") > 16*mib
	})
	settle(t, srv, "vis")
	time.Sleep(2500 * time.Millisecond) // two ticks
	after := k.user(t, "vis")
	x := xrayDownlink(t, api, "vis")
	t.Logf("Vision download: kernel (wire) %d bytes down, Xray (payload) %d: %.4f", live.Download, x, float64(live.Download)/float64(x))
	if after.Used != live.Used {
		t.Errorf("used %d after Xray reported the download, %d before: counted twice", after.Used, live.Used)
	}

	// 4. kill -9 of Xray in the middle of a download: what the client
	// received was counted.
	before := k.user(t, "free").Download
	d2 := srv.Client(t, free).Download(t, 64*mib, 8*mib)
	waitFor(t, "16 MiB received", 10*time.Second, func() bool { return d2.Received() >= 16*mib })
	srv.Stop(t)
	<-d2.Done()
	got := d2.Received()
	waitFor(t, "every byte received counted", 3*time.Second, func() bool {
		return int64(k.user(t, "free").Download-before) >= got
	})
	srv.Restart(t)

	// 5. A plain VLESS user: counted by the kernel and then by Xray, once.
	pc := srv.Client(t, plain)
	sent, recv, err := pc.Transfer(2*mib, 3*mib)
	if err != nil {
		t.Fatal(err)
	}
	settle(t, srv, "plain")
	time.Sleep(2500 * time.Millisecond)
	v := k.user(t, "plain")
	if int64(v.Upload) < sent || int64(v.Upload) > sent*103/100 || int64(v.Download) < recv || int64(v.Download) > recv*103/100 {
		t.Errorf("plain: counted %d up, %d down for %d sent, %d received (want the wire bytes, within 3%%)", v.Upload, v.Download, sent, recv)
	}
	if h := k.a.Health(); h.Errors["xray connections"] != "" || !strings.Contains(h.Components["xray"], "connections counted in the kernel") ||
		h.Kernel.XrayClaimed < 3 {
		t.Errorf("health: %+v, xray %q, kernel %+v", h.Errors, h.Components["xray"], h.Kernel)
	}
}

// mixedUserEnv starts an agent and Xray with mix (named "mix"), an SSH
// account of UID uid and an Xray client, and "srv", an account of UID
// server, with the limits file limits; it returns them and mix's kernel
// account.
func mixedUserEnv(t *testing.T, mix xraytest.User, uid, server uint32, limits string) (*kernelEnv, *xraytest.Server, uint32) {
	t.Helper()
	k, srv := xrayKernelEnv(t, fmt.Sprintf("mix:x:%d:%d::/:/bin/false\nsrv:x:%d:1::/:/bin/false\n", uid, uid, server),
		limits, mix)
	waitFor(t, "mix's kernel account", 5*time.Second, func() bool { _, ok := k.dp.AccountOf("mix"); return ok })
	acct, _ := k.dp.AccountOf("mix")
	return k, srv, acct
}

// TestXrayAndSSHOneUser: a user who is both an SSH account and an Xray
// client is counted from both, and when the sum reaches the limit the
// kernel stops the Xray download and the user is blocked on both.
func TestXrayAndSSHOneUser(t *testing.T) {
	const mixUID, server = 2611, 2613
	mix := xraytest.NewVisionUser("mix")
	k, srv, acct := mixedUserEnv(t, mix, mixUID, server, "mix 16M\n")
	if v := k.user(t, "mix"); len(v.Protocols) != 2 {
		t.Errorf("mix's protocols: %v", v.Protocols)
	}

	// 6 MiB as the SSH account's UID.
	sink := k.start(t, true, server, "tcp-serve", net.JoinHostPort(k.pair.B4.String(), "0"))
	addr := strings.Fields(sink.Expect(t, "ADDR", 5*time.Second))[1]
	c := k.start(t, false, mixUID, "tcp-client", addr, "0", "6291456")
	if _, _, err := nettest.ParseDone(c.Expect(t, "DONE", 20*time.Second)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the SSH download counted", 3*time.Second, func() bool { return k.user(t, "mix").Download >= 6*mib })

	// Then Xray: the kernel stops the download where the sum reaches the
	// limit.
	d := srv.Client(t, mix).Download(t, 32*mib, 4*mib)
	waitFor(t, "mix blocked", 15*time.Second, func() bool { return k.user(t, "mix").Status == quota.Blocked })
	if !stalled(d, time.Second, 5*time.Second) {
		t.Error("the blocked user's Xray download goes on")
	}
	if got := d.Received(); got > 10*mib || got < 8*mib {
		t.Errorf("the Xray download received %d bytes after 6 MiB over SSH of a 16 MiB limit", got)
	}
	if v := k.user(t, "mix"); v.Used > 16*mib {
		cu, _ := k.dp.CountersOf(mixUID)
		ca, _ := k.dp.CountersOf(acct)
		t.Errorf("used %d (%d up, %d down) of a 16 MiB limit; the UID's counters %+v, the account's %+v, Xray's download %d",
			v.Used, v.Upload, v.Download, cu, ca, xrayDownlink(t, srv.Dial(t), "mix"))
	}
	for _, id := range []uint32{mixUID, acct} {
		if p, _ := k.dp.Policy(id); !p.Blocked {
			t.Errorf("policy of %d: %+v, want blocked", id, p)
		}
	}
	if err := k.start(t, false, mixUID, "tcp-client", addr, "1000", "0").Wait(10 * time.Second); err == nil {
		t.Error("blocked mix connected as the SSH account")
	}
}
