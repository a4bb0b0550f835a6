package agent

import (
	"context"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/sshtest"
	"github.com/myvpn/bwagent/internal/xraytest"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/sockkill"
)

// Device limits on the real kernel, with real servers. The agent ticks
// every second here (kernelEnv.run): "within two ticks" is within 2 s of a
// login, with room for the 2 shared cores.

// deviceAddrs returns the addresses of name's devices as the agent lists
// them (what `bwctl devices` prints).
func (k *kernelEnv) deviceAddrs(t *testing.T, name string) []string {
	t.Helper()
	ds, err := k.a.Devices(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, d := range ds {
		out = append(out, d.Address)
	}
	return out
}

// blockLog returns the lines of the block log.
func (k *kernelEnv) blockLog() []string {
	data, _ := os.ReadFile(k.cfg.Paths.BlockLog)
	return strings.Split(strings.TrimSpace(string(data)), "\n")
}

// waitLines waits until the block log has n lines ending with suffix.
func (k *kernelEnv) waitLines(t *testing.T, n int, suffix string) {
	t.Helper()
	waitFor(t, "the block log line", 5*time.Second, func() bool {
		c := 0
		for _, l := range k.blockLog() {
			if strings.HasSuffix(l, suffix) {
				c++
			}
		}
		return c == n
	})
}

// refusedLogin logs in as acct from src and checks that the server's end
// of the login's connection is cut within two ticks of its opening.
func refusedLogin(t *testing.T, srv *sshtest.Server, acct *sshtest.Account, src string) {
	t.Helper()
	h, err := sockkill.NewHandleAt(srv.NS)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	// Watch the server's connections from src: when the login's came, and
	// when it was gone.
	var opened, gone time.Time
	stop, watched := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(watched)
		f := sockkill.Filter{Remotes: []netip.Addr{netip.MustParseAddr(src)}, LocalPorts: []uint16{srv.Addr.Port()}}
		for {
			conns, err := h.List(f)
			now := time.Now()
			switch {
			case err != nil:
			case len(conns) > 0 && opened.IsZero():
				opened = now
			case len(conns) == 0 && !opened.IsZero():
				gone = now
				return
			}
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	tun, err := srv.TryTunnel(t, acct, sshtest.ClientOptions{Source: src}, 10*time.Second)
	if err == nil {
		select {
		case <-tun.Done():
		case <-time.After(2500 * time.Millisecond):
		}
		tun.Close()
	}
	select {
	case <-watched:
	case <-time.After(2500 * time.Millisecond):
	}
	close(stop)
	<-watched
	switch {
	case opened.IsZero():
		t.Fatalf("login from %s: no connection seen (%v)", src, err)
	case gone.IsZero():
		t.Fatalf("login from %s, a device over the limit, not cut", src)
	case gone.Sub(opened) > 2500*time.Millisecond:
		t.Errorf("login from %s cut %v after its connection opened, more than two ticks", src, gone.Sub(opened))
	default:
		t.Logf("login from %s cut %v after its connection opened (client: %v)", src, gone.Sub(opened).Round(time.Millisecond), err)
	}
}

// flowing checks that each stream still moves bytes.
func flowing(t *testing.T, what string, ss ...*xraytest.Stream) {
	t.Helper()
	for i, s := range ss {
		if !s.Flowing(3 * time.Second) {
			t.Errorf("%s: download %d stopped: %v", what, i+1, s.Err())
		}
	}
}

// TestDeviceLimitSSH (issue 16, 1 and 4): with OpenSSH and then Dropbear
// on 127.0.0.1, a user with devices=2 downloads through tunnels from
// 127.0.0.2 and 127.0.0.3; a login from 127.0.0.4 is cut within two ticks,
// and so is the next one, while the two downloads go on; the agent lists
// 127.0.0.2 and 127.0.0.3 and the block log has one line. A second tunnel
// from 127.0.0.2 is no new device. A restart of the agent cuts neither
// device. Once 127.0.0.3 disconnects, 127.0.0.4 logs in and stays. The
// user's status never changes.
func TestDeviceLimitSSH(t *testing.T) {
	for _, kind := range sshtest.Kinds {
		t.Run(string(kind), func(t *testing.T) {
			acct := sshtest.NewAccount(t)
			k := newKernelEnv(t, acct.PasswdLine()+"\n", acct.Name+" 10G devices=2\n")
			srv := sshtest.Start(t, kind, sshtest.Options{Cgroup: k.cg})
			k.a.cfg.SSH.AuthLogs = []string{srv.LogFile}
			stop := k.run(t)
			sessions := func(n uint64) func() bool {
				return func() bool { return k.a.Health().Kernel.SSHSessions == n }
			}

			t2 := srv.Tunnel(t, acct, sshtest.ClientOptions{Source: "127.0.0.2"})
			waitFor(t, "the first session counted", 5*time.Second, sessions(1))
			t3 := srv.Tunnel(t, acct, sshtest.ClientOptions{Source: "127.0.0.3"})
			waitFor(t, "two sessions counted", 5*time.Second, sessions(2))
			d2, d3 := t2.Stream(t, 0, 2*mib), t3.Stream(t, 0, 2*mib)
			waitFor(t, "two devices listed", 3*time.Second, func() bool {
				return slices.Equal(k.deviceAddrs(t, acct.Name), []string{"127.0.0.2", "127.0.0.3"})
			})

			// A third device: cut, twice; the downloads go on.
			refusedLogin(t, srv, acct, "127.0.0.4")
			line := "| ssh | " + acct.Name + " | Device Limit Exceeded (127.0.0.4)"
			k.waitLines(t, 1, line)
			refusedLogin(t, srv, acct, "127.0.0.4")
			flowing(t, "after the cuts", d2, d3)
			if got := k.deviceAddrs(t, acct.Name); !slices.Equal(got, []string{"127.0.0.2", "127.0.0.3"}) {
				t.Errorf("devices %v", got)
			}
			ds, _ := k.a.Devices(context.Background(), acct.Name)
			for _, d := range ds {
				if d.Bytes < mib || d.Connections != 1 || !slices.Equal(d.Protocols, []quota.Protocol{quota.SSH}) || d.Since.IsZero() {
					t.Errorf("device %+v", d)
				}
			}

			// A second tunnel from 127.0.0.2: the same device.
			t2b := srv.Tunnel(t, acct, sshtest.ClientOptions{Source: "127.0.0.2"})
			waitFor(t, "three sessions counted", 5*time.Second, sessions(3))
			time.Sleep(2500 * time.Millisecond) // two ticks
			select {
			case <-t2b.Done():
				t.Fatalf("a second tunnel from an allowed device was cut: %v", t2b.Err())
			default:
			}
			if _, got, err := t2b.Transfer(0, mib); err != nil || got != mib+1 {
				t.Errorf("second tunnel from 127.0.0.2: %d bytes, %v", got, err)
			}

			// A restart of the agent cuts no allowed device.
			stop()
			k.restart(t)
			waitFor(t, "the sessions found again", 5*time.Second, sessions(3))
			time.Sleep(2500 * time.Millisecond)
			flowing(t, "after the restart", d2, d3)
			if got := k.deviceAddrs(t, acct.Name); !slices.Equal(got, []string{"127.0.0.2", "127.0.0.3"}) {
				t.Errorf("devices after the restart %v", got)
			}
			refusedLogin(t, srv, acct, "127.0.0.4")
			flowing(t, "after the restart's cut", d2, d3)

			// 127.0.0.3 leaves: 127.0.0.4 comes in and stays.
			d3.Close()
			t3.Close()
			waitFor(t, "127.0.0.3 gone", 5*time.Second, func() bool {
				return slices.Equal(k.deviceAddrs(t, acct.Name), []string{"127.0.0.2"})
			})
			t4 := srv.Tunnel(t, acct, sshtest.ClientOptions{Source: "127.0.0.4"})
			d4 := t4.Stream(t, 0, 2*mib)
			time.Sleep(2500 * time.Millisecond)
			flowing(t, "127.0.0.4 with room for it", d2, d4)
			if got := k.deviceAddrs(t, acct.Name); !slices.Equal(got, []string{"127.0.0.2", "127.0.0.4"}) {
				t.Errorf("devices %v", got)
			}
			v := k.user(t, acct.Name)
			if v.Status != quota.Active || v.Devices != 2 || v.DevicesLimit != 2 {
				t.Errorf("%s: %s, %d/%d devices", acct.Name, v.Status, v.Devices, v.DevicesLimit)
			}
			if lines := k.blockLog(); len(lines) != 2 || !strings.HasSuffix(lines[0], line) || !strings.HasSuffix(lines[1], line) {
				// One refusal before the restart, one after it (a new agent
				// starts with no refusals).
				t.Errorf("block log %q", lines)
			}
		})
	}
}

// TestDeviceLimitIPv6 (issue 16, 3): in a network namespace of the test's,
// two addresses of one /64 are one device, and an address of another /64
// is a second one: with devices=1 it is cut.
func TestDeviceLimitIPv6(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNetNS(t)
	nettest.AddLoopbackAddrs(t, ns, "fd00:b1::1/64", "fd00:b1::2/64", "fd00:b1::3:7/64", "fd00:b2::2/64")
	server := netip.MustParseAddr("fd00:b1::1")
	acct := sshtest.NewAccount(t)
	k := newKernelEnv(t, acct.PasswdLine()+"\n", acct.Name+" unlimited devices=1\n")
	srv := sshtest.Start(t, sshtest.OpenSSH, sshtest.Options{NS: ns, Addr: server, Cgroup: k.cg})
	k.run(t)
	a := srv.Tunnel(t, acct, sshtest.ClientOptions{Source: "fd00:b1::2"})
	b := srv.Tunnel(t, acct, sshtest.ClientOptions{Source: "fd00:b1::3:7"})
	waitFor(t, "two sessions counted", 5*time.Second, func() bool { return k.a.Health().Kernel.SSHSessions == 2 })
	time.Sleep(2500 * time.Millisecond) // two ticks
	for _, tun := range []*sshtest.Session{a, b} {
		if _, got, err := tun.Transfer(0, mib); err != nil || got != mib+1 {
			t.Errorf("tunnel from %s: %d bytes, %v", tun.Local, got, err)
		}
	}
	if got := k.deviceAddrs(t, acct.Name); !slices.Equal(got, []string{"fd00:b1::/64"}) {
		t.Errorf("devices %v, want one: fd00:b1::/64", got)
	}
	refusedLogin(t, srv, acct, "fd00:b2::2")
	k.waitLines(t, 1, "| ssh | "+acct.Name+" | Device Limit Exceeded (fd00:b2::/64)")
	if _, got, err := a.Transfer(0, mib); err != nil || got != mib+1 {
		t.Errorf("tunnel from %s after the cut: %d bytes, %v", a.Local, got, err)
	}
}

// TestDeviceLimitXray (issue 16, 2 and 4): a real Xray, VLESS over TLS
// (XTLS Vision) and Trojan: a user with devices=2 downloads from 127.0.0.2
// and 127.0.0.3; the connections of a third client, from 127.0.0.4, are
// cut within two ticks, again and again, while the two go on, and another
// user whose client sends from 127.0.0.4 too is never touched. A restart
// of the agent cuts neither allowed device, and it still tells the third
// device from them: its next connection is cut.
func TestDeviceLimitXray(t *testing.T) {
	for _, c := range []struct {
		name       string
		dev, other xraytest.User
	}{
		{"vless-tls", xraytest.NewVisionUser("dev"), xraytest.NewVisionUser("other")},
		{"trojan", xraytest.NewUser("dev", xraytest.Trojan), xraytest.NewUser("other", xraytest.Trojan)},
	} {
		t.Run(c.name, func(t *testing.T) {
			k, srv := xrayKernelEnv(t, "", "dev unlimited devices=2\n", c.dev, c.other)
			proto := string(c.dev.Protocol)
			c2 := srv.ClientFrom(t, c.dev, "127.0.0.2")
			c3 := srv.ClientFrom(t, c.dev, "127.0.0.3")
			c4 := srv.ClientFrom(t, c.dev, "127.0.0.4")
			o4 := srv.ClientFrom(t, c.other, "127.0.0.4")
			d2 := c2.Stream(t, 0, 2*mib)
			d3 := c3.Stream(t, 0, 2*mib)
			od := o4.Stream(t, 0, 2*mib)
			waitFor(t, "dev's two devices listed", 5*time.Second, func() bool {
				return slices.Equal(k.deviceAddrs(t, "dev"), []string{"127.0.0.2", "127.0.0.3"})
			})

			refused := func(when string) {
				t.Helper()
				start := time.Now()
				s, err := c4.TryStream(t, 0, 2*mib)
				if err != nil {
					t.Logf("%s: 127.0.0.4's connection refused after %v: %v", when, time.Since(start).Round(time.Millisecond), err)
					return
				}
				select {
				case <-s.Done():
					t.Logf("%s: 127.0.0.4's connection cut after %v", when, time.Since(start).Round(time.Millisecond))
				case <-time.After(3 * time.Second): // the client Xray passes a cut on a second later
					t.Fatalf("%s: 127.0.0.4's connection, a third device, not cut", when)
				}
			}
			refused("first")
			line := "| " + proto + " | dev | Device Limit Exceeded (127.0.0.4)"
			k.waitLines(t, 1, line)
			refused("again")
			refused("and again")
			flowing(t, "after the cuts", d2, d3, od)
			if got := k.deviceAddrs(t, "dev"); !slices.Equal(got, []string{"127.0.0.2", "127.0.0.3"}) {
				t.Errorf("dev's devices %v", got)
			}
			if got := k.deviceAddrs(t, "other"); !slices.Equal(got, []string{"127.0.0.4"}) {
				t.Errorf("other's devices %v", got)
			}
			if v := k.user(t, "dev"); v.Status != quota.Unlimited || v.Devices != 2 || v.DevicesLimit != 2 {
				t.Errorf("dev: %s, %d/%d devices", v.Status, v.Devices, v.DevicesLimit)
			}

			// Restart: the open connections come back from the kernel.
			k.stop()
			k.restart(t)
			time.Sleep(2500 * time.Millisecond) // two ticks
			flowing(t, "after the restart", d2, d3, od)
			if got := k.deviceAddrs(t, "dev"); !slices.Equal(got, []string{"127.0.0.2", "127.0.0.3"}) {
				t.Errorf("dev's devices after the restart %v", got)
			}
			refused("after the restart")
			flowing(t, "after the restart's cut", d2, d3, od)
			// One refusal before the restart, one after it (a new agent
			// starts with no refusals).
			k.waitLines(t, 2, line)
		})
	}
}
