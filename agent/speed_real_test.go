package agent

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/sshtest"
	"github.com/myvpn/bwagent/internal/xraytest"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
)

// fast is a stream rate the path cannot reach: as fast as it goes.
const fast = 1 << 40

// flow is a group of streams whose payload is measured together, one way.
type flow struct {
	name string
	ss   []*xraytest.Stream
	up   bool // measure what they send, else what they receive
	// downloads are HTTPS downloads through Xray, measured as received.
	ds []*xraytest.Download
	// acked, if set, measures instead the payload that the sockets of
	// this namespace connected to this address had acknowledged: what
	// reached the far end (an upload's writer only sees its buffers fill).
	acked netip.AddrPort
}

func (f *flow) bytes() int64 {
	var n int64
	if f.acked.IsValid() {
		conns, err := nettest.TCPConns()
		if err != nil {
			panic(err)
		}
		for _, c := range conns {
			if c.Remote == f.acked {
				n += int64(c.BytesAcked)
			}
		}
		return n
	}
	for _, s := range f.ss {
		sent, recv := s.Progress()
		if f.up {
			n += sent
		} else {
			n += recv
		}
	}
	for _, d := range f.ds {
		n += d.Received()
	}
	return n
}

// measure samples the flows once a second for n seconds and returns each
// one's rate in Mbit/s of payload in each second.
func measure(fs []*flow, n int) [][]float64 {
	out := make([][]float64, len(fs))
	last := make([]int64, len(fs))
	for i, f := range fs {
		last[i] = f.bytes()
		out[i] = make([]float64, n)
	}
	start := time.Now()
	for s := range n {
		time.Sleep(time.Until(start.Add(time.Duration(s+1) * time.Second)))
		for i, f := range fs {
			b := f.bytes()
			out[i][s] = float64(b-last[i]) * 8 / 1e6
			last[i] = b
		}
	}
	return out
}

// TestSpeedCapsSSH (issue 15, points 1, 3 and 4): through real OpenSSH and
// Dropbear tunnels (ssh -N -D), at once for 12 s: speed=20mbit holds a
// download at 20 Mbit/s (within 10% over the last 10 s, no second under
// half the cap) and speed=20mbit/8mbit an upload at 8 Mbit/s (within 10%
// on average: policed at ingress, where a drop is a loss), four
// tunnels of one user together at 20, while a user without a cap
// downloads at five times that. Then SetSpeed (what bwctl speed calls)
// brings the first download to 8 Mbit/s within two seconds, and the cap
// holds with the agent stopped and after it starts again.
func TestSpeedCapsSSH(t *testing.T) {
	for _, kind := range sshtest.Kinds {
		t.Run(string(kind), func(t *testing.T) {
			t.Parallel()
			down, up, multi, free := sshtest.NewAccount(t), sshtest.NewAccount(t), sshtest.NewAccount(t), sshtest.NewAccount(t)
			passwd := down.PasswdLine() + "\n" + up.PasswdLine() + "\n" + multi.PasswdLine() + "\n" + free.PasswdLine() + "\n"
			limits := down.Name + " unlimited speed=20mbit\n" + up.Name + " unlimited speed=20mbit/8mbit\n" +
				multi.Name + " 10240 speed=20mbit\n"
			k := newKernelEnv(t, passwd, limits)
			if !k.dp.SupportsServerTagging() {
				t.Skip("SSH sessions are counted from their connection on Linux 6.0 and later")
			}
			srv := sshtest.Start(t, kind, sshtest.Options{Cgroup: k.cg})
			k.a.cfg.SSH.AuthLogs = []string{srv.LogFile}
			k.run(t)

			dt := srv.Tunnel(t, down, sshtest.ClientOptions{})
			ut := srv.Tunnel(t, up, sshtest.ClientOptions{})
			ft := srv.Tunnel(t, free, sshtest.ClientOptions{})
			var mts []*sshtest.Session
			for range 4 {
				mts = append(mts, srv.Tunnel(t, multi, sshtest.ClientOptions{}))
			}
			waitFor(t, "seven sessions counted", 10*time.Second, func() bool { return k.a.Health().Kernel.SSHSessions == 7 })
			if v := k.user(t, down.Name); v.Speed != (quota.Speed{Down: 20e6, Up: 20e6}) {
				t.Errorf("%s's caps in the view: %v", down.Name, v.Speed)
			}

			fd := &flow{name: "download", ss: []*xraytest.Stream{dt.Stream(t, 0, fast)}}
			// The upload as the sink acknowledged it, on the server's
			// forwarded sockets to the sink (the downloads' add their
			// 17-byte requests).
			fu := &flow{name: "upload", acked: netip.MustParseAddrPort(srv.Sink.Addr)}
			ut.Stream(t, fast, 0)
			fm := &flow{name: "4 tunnels"}
			for _, mt := range mts {
				fm.ss = append(fm.ss, mt.Stream(t, 0, fast))
			}
			ff := &flow{name: "no cap", ss: []*xraytest.Stream{ft.Stream(t, 0, fast)}}
			r := measure([]*flow{fd, fu, fm, ff}, 12)
			nettest.CheckRate(t, "speed=20mbit download", r[0][2:], 20, 0.10)
			nettest.CheckAverage(t, "speed=20mbit/8mbit upload", r[1][2:], 8, 0.10)
			nettest.CheckRate(t, "speed=20mbit, 4 tunnels together", r[2][2:], 20, 0.10)
			nettest.CheckAtLeast(t, "no cap, at the same time", r[3][2:], 5*20)
			ff.ss[0].Close()
			if h := k.a.Health(); h.Components["speed caps"] != "ok: policing (a token bucket per user and direction in the packet programs; no EDT pacing), 3 kernel IDs capped" ||
				h.Kernel.DroppedRate == 0 {
				t.Errorf("health: speed caps %q, %d packets dropped over a cap", h.Components["speed caps"], h.Kernel.DroppedRate)
			}

			// bwctl speed USER 8mbit during the download.
			if err := k.a.SetSpeed(context.Background(), down.Name, false, quota.Speed{Down: 8e6, Up: 8e6}); err != nil {
				t.Fatal(err)
			}
			measure([]*flow{fd}, 2)
			nettest.CheckRate(t, "changed to 8mbit, from 2 s after", measure([]*flow{fd}, 4)[0], 8, 0.10)
			if l, _ := os.ReadFile(k.cfg.Paths.Limits); !strings.Contains(string(l), down.Name+" unlimited speed=8mbit\n") {
				t.Errorf("limits file after SetSpeed:\n%s", l)
			}

			// The agent down: the kernel keeps the cap; a new agent too.
			k.stop()
			nettest.CheckRate(t, "8mbit, agent stopped", measure([]*flow{fd}, 4)[0], 8, 0.10)
			k.restart(t)
			nettest.CheckRate(t, "8mbit, agent restarted", measure([]*flow{fd}, 4)[0], 8, 0.10)
		})
	}
}

// TestThrottleSSH (issue 15, point 2): a user with a 16 MiB limit and
// throttle=4mbit downloads through an OpenSSH tunnel past the limit: within
// two ticks THROTTLED in the view, the usage JSON (not blocked) and the
// block log, and the download goes on at 4 Mbit/s (within 15%) while the
// usage grows; a reset brings ACTIVE and the full rate back within two
// ticks.
func TestThrottleSSH(t *testing.T) {
	th := sshtest.NewAccount(t)
	k := newKernelEnv(t, th.PasswdLine()+"\n", th.Name+" 16 throttle=4mbit\n")
	if !k.dp.SupportsServerTagging() {
		t.Skip("SSH sessions are counted from their connection on Linux 6.0 and later")
	}
	srv := sshtest.Start(t, sshtest.OpenSSH, sshtest.Options{Cgroup: k.cg})
	k.run(t)
	tun := srv.Tunnel(t, th, sshtest.ClientOptions{})
	waitFor(t, "the session counted", 10*time.Second, func() bool { return k.a.Health().Kernel.SSHSessions == 1 })
	s := tun.Stream(t, 0, fast)
	f := &flow{ss: []*xraytest.Stream{s}}

	// The kernel stops the download at the limit; the next tick throttles.
	waitFor(t, "16 MiB received", 20*time.Second, func() bool { _, r := s.Progress(); return r >= 15*mib })
	reached := time.Now()
	waitFor(t, th.Name+" THROTTLED", 2500*time.Millisecond, func() bool { return k.user(t, th.Name).Status == quota.Throttled })
	t.Logf("THROTTLED %v after 15 MiB were received", time.Since(reached).Round(time.Millisecond))
	if v := k.user(t, th.Name); v.Speed != (quota.Speed{Down: 4e6, Up: 4e6}) || v.Reason != quota.ReasonLimit {
		t.Errorf("throttled view: %+v", v)
	}
	usageFile := filepath.Join(k.cfg.Paths.UsageDir, th.Name+".json")
	waitFor(t, "the usage file THROTTLED, not blocked", 2500*time.Millisecond, func() bool {
		u, err := opsfiles.ReadUsage(usageFile)
		return err == nil && u.Status == "THROTTLED" && !u.Blocked
	})
	if b, _ := os.ReadFile(usageFile); !strings.Contains(string(b), `"speed_down": 4000000`) {
		t.Errorf("usage file lacks the throttle rate:\n%s", b)
	}
	waitFor(t, "the block log line", 2500*time.Millisecond, func() bool {
		l, _ := os.ReadFile(k.cfg.Paths.BlockLog)
		return strings.Contains(string(l), "| ssh | "+th.Name+" | Bandwidth Limit Reached (throttled)\n")
	})

	// Slowed, not stopped; counted on.
	used := k.user(t, th.Name).Used
	measure([]*flow{f}, 2) // TCP's backoff from the drops at the limit
	nettest.CheckRate(t, "throttled download", measure([]*flow{f}, 8)[0], 4, 0.15)
	if now := k.user(t, th.Name).Used; now < used+3*mib {
		t.Errorf("usage while throttled: %d, was %d", now, used)
	}

	// A reset: ACTIVE, full rate. Unpaced, the download would spend the
	// new 16 MiB in a fraction of a second: a new one paced at 3 MiB/s
	// (six times the throttle rate) shows the rate is back.
	if err := k.a.Reset(context.Background(), th.Name); err != nil {
		t.Fatal(err)
	}
	s.Close()
	waitFor(t, th.Name+" ACTIVE", 2500*time.Millisecond, func() bool { return k.user(t, th.Name).Status == quota.Active })
	if v := k.user(t, th.Name); !v.Speed.IsZero() {
		t.Errorf("caps after the reset: %v", v.Speed)
	}
	f = &flow{ss: []*xraytest.Stream{tun.Stream(t, 0, 3*mib)}}
	measure([]*flow{f}, 1)
	nettest.CheckRate(t, "after the reset, paced at 3 MiB/s", measure([]*flow{f}, 3)[0], 3*mib*8/1e6, 0.10)
	if v := k.user(t, th.Name); v.Status != quota.Active && v.Status != quota.Warning {
		t.Errorf("after the paced download (12 MiB of 16): %s", v.Status)
	}
}

// TestSpeedCapsXray (issue 15, point 1 for Xray): HTTPS downloads through
// a real Xray, VLESS over TLS and VLESS over TLS with XTLS Vision (which
// splices: the bytes Xray counts only at the close are capped live), each
// user at speed=20mbit, four connections of one user from four addresses
// together, and an upload at speed=20mbit/8mbit, for 12 s at once with a
// user without a cap.
func TestSpeedCapsXray(t *testing.T) {
	tlsUser := xraytest.NewUser("tls", xraytest.VLESS)
	tlsUser.Inbound = xraytest.VisionInbound // a TLS inbound, no flow
	vis, par, up, free := xraytest.NewVisionUser("vis"), xraytest.NewVisionUser("par"), xraytest.NewVisionUser("up"), xraytest.NewVisionUser("free")
	k, srv := xrayKernelEnv(t, "", "tls unlimited speed=20mbit\nvis unlimited speed=20mbit\npar unlimited speed=20mbit\n"+
		"up unlimited speed=20mbit/8mbit\n", tlsUser, vis, par, up, free)
	waitFor(t, "the users' kernel accounts", 5*time.Second, func() bool {
		for _, n := range []string{"tls", "vis", "par", "up", "free"} {
			if _, ok := k.dp.AccountOf(n); !ok {
				return false
			}
		}
		return true
	})
	const size = 1 << 30
	ft := &flow{ds: []*xraytest.Download{srv.Client(t, tlsUser).Download(t, size, 0)}}
	fv := &flow{ds: []*xraytest.Download{srv.Client(t, vis).Download(t, size, 0)}}
	fp := &flow{}
	for _, from := range []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"} {
		fp.ds = append(fp.ds, srv.ClientFrom(t, par, from).Download(t, size, 0))
	}
	ff := &flow{ds: []*xraytest.Download{srv.Client(t, free).Download(t, 64*size, 0)}}
	// The upload as the sink acknowledged it, on Xray's sockets to the
	// sink (the downloads go to the HTTPS origin).
	srv.Client(t, up).Stream(t, fast, 0)
	fu := &flow{acked: netip.MustParseAddrPort(srv.Sink)}
	r := measure([]*flow{ft, fv, fp, ff, fu}, 12)
	nettest.CheckRate(t, "VLESS+TLS, speed=20mbit", r[0][2:], 20, 0.10)
	nettest.CheckRate(t, "VLESS+TLS+Vision, speed=20mbit", r[1][2:], 20, 0.10)
	nettest.CheckRate(t, "Vision, 4 connections from 4 addresses together", r[2][2:], 20, 0.10)
	nettest.CheckAtLeast(t, "no cap, at the same time", r[3][2:], 5*20)
	nettest.CheckAverage(t, "Vision upload, speed=20mbit/8mbit", r[4][2:], 8, 0.10)
}

// TestSpeedCapOneUserSSHAndXray: a user who is both an SSH account and an
// Xray client has one cap: a download as the account's UID and a Vision
// download through Xray, at once, share 20 Mbit/s (the account's policy
// names the UID's buckets).
func TestSpeedCapOneUserSSHAndXray(t *testing.T) {
	const mixUID, server = 2621, 2623
	mix := xraytest.NewVisionUser("mix")
	k, srv, acct := mixedUserEnv(t, mix, mixUID, server, "mix unlimited speed=20mbit\n")
	waitFor(t, "both of mix's IDs capped", 5*time.Second, func() bool {
		pu, _ := k.dp.Policy(mixUID)
		pa, _ := k.dp.Policy(acct)
		return pu.Rate.Rx != 0 && pa.Rate.Rx != 0 && pa.QuotaKey == mixUID
	})

	sink := k.start(t, true, server, "tcp-serve", net.JoinHostPort(k.pair.B4.String(), "0"))
	addr := strings.Fields(sink.Expect(t, "ADDR", 5*time.Second))[1]
	c := k.start(t, false, mixUID, "tcp-client", addr, "0", "inf")
	c.Expect(t, "CONNECTED", 5*time.Second)
	d := srv.Client(t, mix).Download(t, 1<<30, 0)
	// The UID's stream by its socket's tcp_info in its namespace, the Xray
	// download by what it received.
	sinkAddr := netip.MustParseAddrPort(addr)
	uidBytes := func() int64 {
		var conns []nettest.TCPConn
		if err := nettest.Do(k.pair.A, func() (err error) {
			conns, err = nettest.TCPConns()
			return err
		}); err != nil {
			t.Fatal(err)
		}
		var n int64
		for _, c := range conns {
			if c.Remote == sinkAddr {
				n += int64(c.BytesReceived)
			}
		}
		return n
	}
	var last, lastX int64
	var per []float64
	measureBoth := func(n int) {
		per = per[:0]
		last, lastX = uidBytes(), d.Received()
		start := time.Now()
		for i := range n {
			time.Sleep(time.Until(start.Add(time.Duration(i+1) * time.Second)))
			u, x := uidBytes(), d.Received()
			per = append(per, float64(u-last+x-lastX)*8/1e6)
			last, lastX = u, x
		}
	}
	measureBoth(2)
	measureBoth(8)
	nettest.CheckRate(t, "SSH account's UID and Xray client together", per, 20, 0.10)
	u, x := uidBytes(), d.Received()
	t.Logf("moved as the UID %d bytes, through Xray %d", u, x)
	if u < 1<<20 || x < 1<<20 {
		t.Errorf("one of the two hardly moved: UID %d bytes, Xray %d", u, x)
	}
}

// TestSpeedCapXrayWhereCarried: a Vision client's cap is in force and
// shown while the kernel counts Xray's connections (its account carries
// the rate); with xray.connections turned off at run time its account has
// no rate and no cap is shown (TestSpeedCapsNeedAKernelID has the rest, on
// fakes).
func TestSpeedCapXrayWhereCarried(t *testing.T) {
	u := xraytest.NewVisionUser("capped")
	k, srv := xrayKernelEnv(t, "", "capped unlimited speed=20mbit\n", u)
	caps := quota.Speed{Down: 20e6, Up: 20e6}
	rate := func() bpf.Rate {
		id, ok := k.dp.AccountOf("capped")
		if !ok {
			return bpf.Rate{}
		}
		p, _ := k.dp.Policy(id)
		return p.Rate
	}
	waitFor(t, "capped's account carrying the cap, shown", 5*time.Second, func() bool {
		return rate().Rx != 0 && k.user(t, "capped").Speed == caps
	})
	cfg := k.cfg
	cfg.Xray.Configs, cfg.Xray.Connections, cfg.Interval = []string{srv.ConfigPath}, false, time.Second
	if err := k.a.Reload(context.Background(), cfg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "no cap carried nor shown with xray.connections off", 5*time.Second, func() bool {
		return rate() == (bpf.Rate{}) && k.user(t, "capped").Speed.IsZero()
	})
}
