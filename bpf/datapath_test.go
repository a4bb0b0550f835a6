package bpf_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
)

func TestMain(m *testing.M) {
	nettest.Register("bpf-load", func(args []string) error {
		_, err := bpf.Load(bpf.Config{CgroupPath: args[0], PinPath: args[1]})
		if errors.Is(err, bpf.ErrPermission) {
			fmt.Println("PERM", err)
			return nil
		}
		return fmt.Errorf("want ErrPermission, got %v", err)
	})
	nettest.Main(m)
}

// env is one test's private data plane: its own cgroup, pin directory and
// pair of network namespaces.
type env struct {
	cgroup, pin string
	cfg         bpf.Config // what load loads
	dp          *bpf.Datapath
	net         *nettest.Pair
}

// newEnv loads a data plane with the default configuration.
func newEnv(t *testing.T) *env {
	t.Helper()
	return newEnvWith(t, bpf.Config{})
}

// newEnvWith loads a data plane configured as cfg, on the env's own cgroup
// and pin directory.
func newEnvWith(t *testing.T, cfg bpf.Config) *env {
	t.Helper()
	nettest.RequireRoot(t)
	root, err := bpf.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	e := &env{
		cgroup: nettest.NewCgroup(t, root),
		pin:    filepath.Join("/sys/fs/bpf", nettest.Name("bwtest-")),
		net:    nettest.NewPair(t),
	}
	cfg.CgroupPath, cfg.PinPath = e.cgroup, e.pin
	e.cfg = cfg
	t.Cleanup(func() {
		if err := bpf.Uninstall(e.pin); err != nil {
			t.Errorf("uninstall: %v", err)
		}
	})
	e.dp = e.load(t)
	return e
}

func (e *env) load(t *testing.T) *bpf.Datapath {
	t.Helper()
	dp, err := bpf.Load(e.cfg)
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	t.Cleanup(func() { dp.Close() })
	return dp
}

// start runs a helper as uid inside the test cgroup, in namespace A or B.
func (e *env) start(t *testing.T, inB bool, uid uint32, mode string, args ...string) *nettest.Proc {
	ns := e.net.A
	if inB {
		ns = e.net.B
	}
	return nettest.Start(t, nettest.Spec{NS: ns, Cgroup: e.cgroup, UID: uid}, mode, args...)
}

func (e *env) counters(t *testing.T, uid uint32) bpf.Counters {
	t.Helper()
	all := map[uint32]bpf.Counters{}
	if err := e.dp.Counters(all); err != nil {
		t.Fatal(err)
	}
	return all[uid]
}

// setPolicy writes one UID's policy through the agent's write path.
func setPolicy(t *testing.T, dp *bpf.Datapath, uid uint32, p bpf.Policy) {
	t.Helper()
	if err := dp.ApplyPolicies(map[uint32]bpf.Policy{uid: p}); err != nil {
		t.Fatalf("policy of UID %d: %v", uid, err)
	}
}

// block blocks or unblocks uid, keeping its budget.
func block(t *testing.T, dp *bpf.Datapath, uid uint32, blocked bool) {
	t.Helper()
	p, err := dp.Policy(uid)
	if err != nil {
		t.Fatal(err)
	}
	p.Blocked = blocked
	setPolicy(t, dp, uid, p)
}

// setBudget lets uid move remaining more bytes in dirs, keeping its
// blocked state.
func setBudget(t *testing.T, dp *bpf.Datapath, uid uint32, remaining uint64, dirs bpf.Direction) {
	t.Helper()
	p, err := dp.Policy(uid)
	if err != nil {
		t.Fatal(err)
	}
	used, err := dp.QuotaUsed(uid)
	if err != nil {
		t.Fatal(err)
	}
	setPolicy(t, dp, uid, bpf.Policy{Blocked: p.Blocked, Quota: dirs, Ceiling: bpf.Ceiling(used, remaining)})
}

func listenAddr(a netip.Addr) string { return net.JoinHostPort(a.String(), "0") }

// within checks that counted bytes cover payload plus headers: at least
// payload, at most payload plus 8% and 64 KiB (headers of every segment, ACKs
// of the other direction, handshake and teardown).
func within(t *testing.T, what string, counted, payload uint64) {
	t.Helper()
	if counted < payload || float64(counted) > float64(payload)*1.08+64*1024 {
		t.Errorf("%s: counted %d bytes for %d bytes of payload", what, counted, payload)
	}
}

// Test 1: both directions of TCP and UDP, IPv4 and IPv6, are counted per UID.
func TestCountsPerUID(t *testing.T) {
	e := newEnv(t)
	for i, fam := range []struct {
		name  string
		addr  netip.Addr
		ipHdr uint64
	}{
		{"ipv4", e.net.B4, 20},
		{"ipv6", e.net.B6, 40},
	} {
		t.Run("tcp-"+fam.name, func(t *testing.T) {
			client, server := uint32(2100+10*i), uint32(2101+10*i)
			srv := e.start(t, true, server, "tcp-serve", listenAddr(fam.addr))
			addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
			const up, down = 8 << 20, 3 << 20
			cli := e.start(t, false, client, "tcp-client", addr, fmt.Sprint(up), fmt.Sprint(down))
			cs, cr := cli.Done(t)
			ss, sr := srv.Done(t)
			if cs != up || cr != down || ss != down || sr != up {
				t.Fatalf("transfer incomplete: client %d/%d server %d/%d", cs, cr, ss, sr)
			}
			c, s := e.counters(t, client), e.counters(t, server)
			t.Logf("client %+v server %+v", c, s)
			// Both directions move at once: each carries the other's
			// ACKs, and under load retransmissions, which the kernel
			// counts as it sends them (a CI run counted 1.27 times the
			// 3 MiB download, 2,851 packets, while 8 MiB went up). So
			// at least the payload and at most half as much again:
			// counted twice would be twice.
			loaded := func(what string, counted, payload uint64) {
				t.Helper()
				if counted < payload || counted > payload+payload/2+64<<10 {
					t.Errorf("%s: counted %d bytes for %d bytes of payload", what, counted, payload)
				}
			}
			loaded("client sent", c.TxBytes, up)
			loaded("client received", c.RxBytes, down)
			loaded("server sent", s.TxBytes, down)
			loaded("server received", s.RxBytes, up)
			if c.TxPackets < up/65536 || c.RxPackets < down/65536 {
				t.Errorf("packet counts too low: %+v", c)
			}
		})
		t.Run("udp-"+fam.name, func(t *testing.T) {
			client, server := uint32(2102+10*i), uint32(2103+10*i)
			srv := e.start(t, true, server, "udp-echo", listenAddr(fam.addr))
			addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
			const count, size = 3000, 1000
			cli := e.start(t, false, client, "udp-client", addr, fmt.Sprint(count), fmt.Sprint(size))
			cs, cr := cli.Done(t)
			ss, sr := srv.Done(t)
			wire := func(payload uint64) uint64 { return payload / size * (size + fam.ipHdr + 8) }
			c, s := e.counters(t, client), e.counters(t, server)
			t.Logf("client sent %d received %d, counted %+v", cs, cr, c)
			// What a socket sent is counted to the byte. What it received
			// is counted when the kernel delivers it to the socket, so a
			// datagram dropped at a full receive buffer is counted too:
			// received counts lie between what the application read and
			// what the peer sent.
			if c.TxBytes != wire(cs) || c.TxPackets != cs/size {
				t.Errorf("client sent %d datagrams = %d wire bytes; counted %d bytes %d packets", cs/size, wire(cs), c.TxBytes, c.TxPackets)
			}
			if s.TxBytes != wire(ss) || s.TxPackets != ss/size {
				t.Errorf("server sent %d wire bytes; counted %d", wire(ss), s.TxBytes)
			}
			for _, rx := range []struct {
				who                 string
				counted, read, sent uint64
			}{{"client", c.RxBytes, cr, ss}, {"server", s.RxBytes, sr, cs}} {
				if rx.counted < wire(rx.read) || rx.counted > wire(rx.sent) {
					t.Errorf("%s counted %d received bytes; read %d, peer sent %d", rx.who, rx.counted, wire(rx.read), wire(rx.sent))
				}
				if rx.counted%(size+fam.ipHdr+8) != 0 {
					t.Errorf("%s counted %d received bytes: not whole datagrams", rx.who, rx.counted)
				}
			}
			if sr < count*size*9/10 {
				t.Errorf("only %d of %d bytes arrived: the test did not exercise receiving", sr, count*size)
			}
		})
	}
}

// resumes reports whether a streaming helper's received count grows past
// from within timeout.
func resumes(t *testing.T, p *nettest.Proc, from uint64, timeout time.Duration) bool {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if _, r := p.Progress(t, 100*time.Millisecond); r > from {
			return true
		}
	}
	return false
}

// Test 2 (data plane part): a blocked UID can neither send nor receive,
// new connections fail, another UID's stream is untouched, and unblocking
// restores it. The nft side is covered by the dataplane integration test.
func TestBlockStopsBothDirections(t *testing.T) {
	e := newEnv(t)
	const victim, bystander, server = 2201, 2202, 2203
	srv := e.start(t, true, server, "tcp-serve", listenAddr(e.net.B4))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	v := e.start(t, false, victim, "tcp-client", addr, "inf", "inf")
	b := e.start(t, false, bystander, "tcp-client", addr, "inf", "inf")
	v.Expect(t, "CONNECTED", 5*time.Second)
	b.Expect(t, "CONNECTED", 5*time.Second)
	v.Progress(t, 300*time.Millisecond)

	block(t, e.dp, victim, true)
	// Let in-flight data drain, then measure a quiet window.
	vs1, vr1 := v.Progress(t, 500*time.Millisecond)
	_, br1 := b.Progress(t, 10*time.Millisecond)
	vs2, vr2 := v.Progress(t, time.Second)
	_, br2 := b.Progress(t, 10*time.Millisecond)
	if vr2 != vr1 {
		t.Errorf("blocked UID still receives: %d -> %d bytes", vr1, vr2)
	}
	if d := vs2 - vs1; d > 4<<20 {
		// Writes only fill the socket buffer; nothing leaves the host.
		t.Errorf("blocked UID wrote %d bytes in a second", d)
	}
	if br2 <= br1 {
		t.Errorf("bystander stalled too: %d -> %d", br1, br2)
	}
	st, err := e.dp.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.DroppedBlocked == 0 {
		t.Errorf("no drops recorded: %+v", st)
	}
	// A new connection from the blocked UID fails.
	c := e.start(t, false, victim, "tcp-client", addr, "1", "0")
	if err := c.Wait(10 * time.Second); err == nil {
		t.Errorf("blocked UID connected: %q", c.Last())
	}
	// A new connection to a listener of the blocked UID fails too.
	l := e.start(t, false, victim, "tcp-serve", listenAddr(e.net.A4))
	laddr := strings.Fields(l.Expect(t, "ADDR", 5*time.Second))[1]
	in := e.start(t, true, server, "tcp-client", laddr, "1", "0")
	if err := in.Wait(10 * time.Second); err == nil {
		t.Errorf("connected to a blocked UID's listener: %q", in.Last())
	}

	block(t, e.dp, victim, false)
	// TCP retransmits after its backoff, which grew while blocked.
	if !resumes(t, v, vr2, 20*time.Second) {
		t.Errorf("unblocked stream did not resume")
	}
	ok := e.start(t, false, victim, "tcp-client", addr, "1000", "1000")
	if s, r := ok.Done(t); s != 1000 || r != 1000 {
		t.Errorf("new connection after unblock moved %d/%d", s, r)
	}
}

// UIDs above the range of the policy bits take the hash lookup every time:
// blocking them works the same.
func TestBlockHighUID(t *testing.T) {
	e := newEnv(t)
	const user, server = 3_000_000, 2702
	block(t, e.dp, user, true)
	srv := e.start(t, true, server, "udp-echo", listenAddr(e.net.B4))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	c := e.start(t, false, user, "udp-client", addr, "10", "100")
	if err := c.Wait(10 * time.Second); err == nil || !strings.Contains(c.Last(), "operation not permitted") {
		t.Errorf("blocked UID %d sent: %v %q", user, err, c.Last())
	}
	block(t, e.dp, user, false)
	e.start(t, false, user, "udp-client", addr, "10", "100").Done(t)
}

// Test 3: a budget of B bytes lets at most B bytes through, however fast
// the UID sends.
func TestQuotaIsExact(t *testing.T) {
	e := newEnv(t)
	const budget = 1 << 20
	t.Run("tcp-both-directions", func(t *testing.T) {
		const user, server = 2301, 2302
		setBudget(t, e.dp, user, budget, bpf.Both)
		srv := e.start(t, true, server, "tcp-serve", listenAddr(e.net.B4))
		addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
		cli := e.start(t, false, user, "tcp-client", addr, fmt.Sprint(10*budget), "0", "3s")
		sent, _ := cli.Done(t)
		cli.Wait(5 * time.Second)
		// The client's FIN is over budget too: the server never sees the
		// end, so take its last progress line.
		time.Sleep(200 * time.Millisecond)
		srv.Cmd.Process.Kill()
		srv.Wait(5 * time.Second)
		_, got, err := nettest.ParseDone(srv.Last())
		if err != nil {
			t.Fatal(err)
		}
		c := e.counters(t, user)
		used, err := e.dp.QuotaUsed(user)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %d, server got %d, counted %+v, quota used %d", sent, got, c, used)
		if c.TxBytes+c.RxBytes > budget {
			t.Errorf("%d bytes passed a budget of %d", c.TxBytes+c.RxBytes, budget)
		}
		if used != c.TxBytes+c.RxBytes {
			t.Errorf("quota charged %d, counters say %d passed", used, c.TxBytes+c.RxBytes)
		}
		if got > budget || got < budget/2 {
			t.Errorf("server received %d bytes through a budget of %d", got, budget)
		}
	})
	t.Run("udp-upload-only", func(t *testing.T) {
		const user, server = 2303, 2304
		setBudget(t, e.dp, user, budget, bpf.Tx)
		srv := e.start(t, true, server, "udp-echo", listenAddr(e.net.B6))
		addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
		// 10 x budget as fast as it goes; sends fail once the budget is spent.
		cli := e.start(t, false, user, "udp-client", addr, fmt.Sprint(10*budget/1000), "1000")
		cli.Wait(30 * time.Second)
		_, got := srv.Done(t)
		c := e.counters(t, user)
		t.Logf("server got %d, counted %+v", got, c)
		if c.TxBytes > budget || got > budget {
			t.Errorf("upload of %d (server got %d) passed a budget of %d", c.TxBytes, got, budget)
		}
		if c.TxBytes < budget-1048 {
			t.Errorf("only %d of a %d budget was usable", c.TxBytes, budget)
		}
		if c.RxBytes == 0 {
			t.Errorf("echoes were not delivered: downloads must not be charged to an upload budget")
		}
		if !strings.Contains(cli.Last(), "operation not permitted") {
			t.Errorf("sender was not refused: %q", cli.Last())
		}
		// A new budget lets more through.
		setBudget(t, e.dp, user, 10_000, bpf.Tx)
		srv2 := e.start(t, true, server, "udp-echo", listenAddr(e.net.B6))
		addr2 := strings.Fields(srv2.Expect(t, "ADDR", 5*time.Second))[1]
		more := e.start(t, false, user, "udp-client", addr2, "5", "1000")
		if err := more.Wait(10 * time.Second); err != nil {
			t.Errorf("send within a renewed budget failed: %v %q", err, more.Last())
		}
		// Taking the policy away takes the quota accounting with it.
		setPolicy(t, e.dp, user, bpf.Policy{})
		if used, err := e.dp.QuotaUsed(user); err != nil || used != 0 {
			t.Errorf("quota used after the policy went: %d, %v", used, err)
		}
	})
}

// Test 4: a second Load on the same pins (an agent restart) keeps every
// counter and leaves exactly one program attached per direction, and
// EnsureAttached repairs a link detached or unpinned behind its back.
func TestReloadKeepsCountersAndOneAttachment(t *testing.T) {
	e := newEnv(t)
	const user, server = 2401, 2402
	udp := func() {
		srv := e.start(t, true, server, "udp-echo", listenAddr(e.net.B4))
		addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
		e.start(t, false, user, "udp-client", addr, "100", "500").Done(t)
		srv.Done(t)
	}
	udp()
	before := e.counters(t, user)
	if one, err := e.dp.CountersOf(user); err != nil || one != before {
		t.Errorf("CountersOf = %+v, %v; want %+v", one, err, before)
	}
	if none, err := e.dp.CountersOf(user + 100); err != nil || none != (bpf.Counters{}) {
		t.Errorf("CountersOf unseen UID = %+v, %v", none, err)
	}
	epoch, err := e.dp.Epoch()
	if err != nil {
		t.Fatal(err)
	}
	boot, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		t.Fatal(err)
	}
	counterMap, err := ebpf.LoadPinnedMap(filepath.Join(e.pin, "bw_hash_counts"), nil)
	if err != nil {
		t.Fatal(err)
	}
	info, err := counterMap.Info()
	counterMap.Close()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	if want := (bpf.Epoch{Boot: strings.TrimSpace(string(boot)), CounterMap: uint32(id)}); epoch != want {
		t.Fatalf("Epoch = %+v, want %+v", epoch, want)
	}
	if again, err := bpf.ParseEpoch(epoch.String()); err != nil || again != epoch {
		t.Errorf("ParseEpoch(%q) = %+v, %v", epoch, again, err)
	}
	// EachMoved reports the UIDs that moved since its last call, once.
	moved := map[uint32]bpf.Counters{}
	each := func() {
		t.Helper()
		clear(moved)
		if err := e.dp.EachMoved(func(uid uint32, c bpf.Counters) { moved[uid] = c }); err != nil {
			t.Fatal(err)
		}
	}
	each()
	if moved[user] != before {
		t.Errorf("EachMoved after traffic: %+v, want %d with %+v", moved, user, before)
	}
	each()
	if _, again := moved[user]; again {
		t.Errorf("EachMoved reported %d twice without traffic", user)
	}
	setBudget(t, e.dp, user, 1<<30, bpf.Both)
	usedBefore, _ := e.dp.QuotaUsed(user)
	if err := e.dp.Close(); err != nil {
		t.Fatal(err)
	}
	// Still counting with no agent running.
	udp()
	e.dp = e.load(t)
	if again, _ := e.dp.Epoch(); again != epoch {
		t.Errorf("epoch changed across a reload of the same pins: %q -> %q", epoch, again)
	}
	after := e.counters(t, user)
	if after.TxBytes != 2*before.TxBytes || after.TxPackets != 2*before.TxPackets {
		t.Errorf("counters across restart: before %+v after %+v", before, after)
	}
	if p, _ := e.dp.Policy(user); p.Quota != bpf.Both {
		t.Errorf("policy lost across restart: %+v", p)
	}
	if used, _ := e.dp.QuotaUsed(user); used <= usedBefore {
		t.Errorf("quota not charged while the agent was away: %d -> %d", usedBefore, used)
	}
	checkOne := func() {
		t.Helper()
		ing, eg, err := e.dp.ProgramIDs()
		if err != nil {
			t.Fatal(err)
		}
		for typ, want := range map[ebpf.AttachType]ebpf.ProgramID{
			ebpf.AttachCGroupInetIngress: ing, ebpf.AttachCGroupInetEgress: eg,
		} {
			ids, err := e.dp.AttachedPrograms(typ)
			if err != nil {
				t.Fatal(err)
			}
			if len(ids) != 1 || ids[0] != want {
				t.Errorf("%v: attached %v, want only our program %d", typ, ids, want)
			}
		}
		// The connect hooks: one each, after any number of loads.
		for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect} {
			if ids, err := e.dp.AttachedPrograms(typ); err != nil || len(ids) != 1 {
				t.Errorf("%v: attached %v, %v; want one program", typ, ids, err)
			}
		}
	}
	checkOne()

	// Someone detaches the egress link and deletes the ingress pin.
	l, err := link.LoadPinnedLink(filepath.Join(e.pin, "link_egress"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Detach(); err != nil {
		t.Fatal(err)
	}
	l.Close()
	if err := os.Remove(filepath.Join(e.pin, "link_ingress")); err != nil {
		t.Fatal(err)
	}
	if ids, _ := e.dp.AttachedPrograms(ebpf.AttachCGroupInetEgress); len(ids) != 0 {
		t.Fatalf("detach did not take: %v", ids)
	}
	repaired := func(want ...string) {
		t.Helper()
		got, err := e.dp.EnsureAttached()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, want) {
			t.Errorf("EnsureAttached repaired %q, want %q", got, want)
		}
	}
	repaired("pin link_ingress re-created", "egress program re-attached")
	repaired() // nothing left to do
	checkOne()
	if _, err := os.Stat(filepath.Join(e.pin, "link_ingress")); err != nil {
		t.Errorf("ingress pin not restored: %v", err)
	}
	udp()
	if got := e.counters(t, user); got.TxBytes != 3*before.TxBytes {
		t.Errorf("not counting after repair: %+v", got)
	}

	// Someone deletes map pins: they are pinned again from the agent's
	// handles, so the next agent finds the same maps (same epoch, same
	// counters and budget) instead of creating empty ones.
	for _, name := range []string{"bw_hash_counts", "bw_quota_used"} {
		if err := os.Remove(filepath.Join(e.pin, name)); err != nil {
			t.Fatal(err)
		}
	}
	repaired("pin bw_hash_counts re-created", "pin bw_quota_used re-created")
	// And then the whole directory.
	if err := os.RemoveAll(e.pin); err != nil {
		t.Fatal(err)
	}
	want := []string{"pin directory " + e.pin + " re-created",
		"pin link_ingress re-created", "pin link_egress re-created",
		"pin link_connect4 re-created", "pin link_connect6 re-created"}
	if e.dp.SupportsServerTagging() {
		want = append(want, "pin link_sock_create re-created", "pin link_sockops re-created")
	}
	want = append(want, "pin bw_hash_counts re-created", "pin bw_policy re-created", "pin bw_policy_bits re-created",
		"pin bw_quota_used re-created", "pin bw_stats re-created", "pin bw_moved re-created",
		"pin bw_sock re-created", "pin bw_tagged re-created", "pin bw_servers re-created", "pin bw_credit re-created",
		"pin bw_ssh_ports re-created", "pin bw_sstats re-created", "pin bw_claims re-created",
		"pin bw_accounts re-created", "pin bw_xmoved re-created", "pin bw_xstats re-created",
		"pin bw_slots re-created", "pin bw_slot_counts re-created", "pin bw_slot_moved re-created",
		"pin bw_rates re-created", "pin bw_rstats re-created")
	repaired(want...)
	repaired()
	checkOne()
	if _, err := bpf.Load(e.cfg); !errors.Is(err, bpf.ErrInUse) {
		t.Errorf("second agent on the re-created pin directory: %v, want ErrInUse", err)
	}
	usedBefore, _ = e.dp.QuotaUsed(user)
	if err := e.dp.Close(); err != nil {
		t.Fatal(err)
	}
	e.dp = e.load(t)
	if again, _ := e.dp.Epoch(); again != epoch {
		t.Errorf("epoch changed across repaired pins: %q -> %q", epoch, again)
	}
	if got := e.counters(t, user); got.TxBytes != 3*before.TxBytes {
		t.Errorf("counters across repaired pins: %+v, want %d bytes sent", got, 3*before.TxBytes)
	}
	if used, _ := e.dp.QuotaUsed(user); used != usedBefore {
		t.Errorf("quota used across repaired pins: %d, want %d", used, usedBefore)
	}
	checkOne()
}

// Test 6: every error case names its cause.
func TestLoadErrors(t *testing.T) {
	nettest.RequireRoot(t)
	root, err := bpf.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	cg := nettest.NewCgroup(t, root)
	newPin := func() string {
		pin := filepath.Join("/sys/fs/bpf", nettest.Name("bwtest-"))
		t.Cleanup(func() { bpf.Uninstall(pin); os.RemoveAll(pin) })
		return pin
	}

	t.Run("not a cgroup2 directory", func(t *testing.T) {
		_, err := bpf.Load(bpf.Config{CgroupPath: t.TempDir(), PinPath: newPin()})
		if !errors.Is(err, bpf.ErrNotCgroup2) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("pin path not on bpffs", func(t *testing.T) {
		_, err := bpf.Load(bpf.Config{CgroupPath: cg, PinPath: t.TempDir()})
		if !errors.Is(err, bpf.ErrNotBPFFS) || !strings.Contains(err.Error(), "mount -t bpf") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("incompatible pinned map", func(t *testing.T) {
		pin := newPin()
		if err := os.MkdirAll(pin, 0o700); err != nil {
			t.Fatal(err)
		}
		// An "older version" of the counter map: 16-byte values.
		old, err := ebpf.NewMap(&ebpf.MapSpec{
			Name: "bw_counters", Type: ebpf.PerCPUHash, KeySize: 4, ValueSize: 16, MaxEntries: 1024,
		})
		if err != nil {
			t.Fatal(err)
		}
		defer old.Close()
		if err := old.Pin(filepath.Join(pin, "bw_counters")); err != nil {
			t.Fatal(err)
		}
		_, err = bpf.Load(bpf.Config{CgroupPath: cg, PinPath: pin})
		if !errors.Is(err, bpf.ErrIncompatiblePin) || !strings.Contains(err.Error(), "bwagent uninstall") {
			t.Fatalf("got %v", err)
		}
		// The advertised fix works.
		if err := bpf.Uninstall(pin); err != nil {
			t.Fatal(err)
		}
		dp, err := bpf.Load(bpf.Config{CgroupPath: cg, PinPath: pin})
		if err != nil {
			t.Fatalf("load after uninstall: %v", err)
		}
		dp.Close()
		// A different map size is incompatible too.
		_, err = bpf.Load(bpf.Config{CgroupPath: cg, PinPath: pin, MaxUIDs: 1000})
		if !errors.Is(err, bpf.ErrIncompatiblePin) {
			t.Fatalf("resized: got %v", err)
		}
	})
	t.Run("no permission", func(t *testing.T) {
		p := nettest.Start(t, nettest.Spec{UID: 65534}, "bpf-load", cg, newPin())
		if err := p.Wait(30 * time.Second); err != nil {
			t.Fatalf("%v: %s", err, p.Last())
		}
		if !strings.HasPrefix(p.Last(), "PERM") || !strings.Contains(p.Last(), "run as root") {
			t.Fatalf("got %q", p.Last())
		}
	})
	t.Run("pins in use", func(t *testing.T) {
		pin := newPin()
		dp, err := bpf.Load(bpf.Config{CgroupPath: cg, PinPath: pin})
		if err != nil {
			t.Fatal(err)
		}
		defer dp.Close()
		if _, err := bpf.Load(bpf.Config{CgroupPath: cg, PinPath: pin}); !errors.Is(err, bpf.ErrInUse) {
			t.Errorf("second agent on the same pins: %v", err)
		}
		if err := bpf.Uninstall(pin); !errors.Is(err, bpf.ErrInUse) || !strings.Contains(err.Error(), "stop it first") {
			t.Errorf("uninstall under a running agent: %v", err)
		}
		if _, err := os.Stat(filepath.Join(pin, "bw_hash_counts")); err != nil {
			t.Errorf("refused uninstall removed pins: %v", err)
		}
		dp.Close()
		if err := bpf.Uninstall(pin); err != nil {
			t.Errorf("uninstall after the agent stopped: %v", err)
		}
	})
	t.Run("protected UIDs", func(t *testing.T) {
		dp, err := bpf.Load(bpf.Config{CgroupPath: cg, PinPath: newPin(), ProtectedUIDs: []uint32{999}})
		if err != nil {
			t.Fatal(err)
		}
		defer dp.Close()
		for _, uid := range []uint32{0, 65534, 999} {
			for _, p := range []bpf.Policy{{Blocked: true}, {Quota: bpf.Both, Ceiling: 1}, {Quota: bpf.Rx}} {
				if err := dp.ApplyPolicies(map[uint32]bpf.Policy{1000: {Blocked: true}, uid: p}); !errors.Is(err, bpf.ErrProtectedUID) {
					t.Errorf("ApplyPolicies with %d: %+v = %v", uid, p, err)
				}
			}
			// Nothing to protect in taking a policy away.
			if err := dp.ApplyPolicies(map[uint32]bpf.Policy{uid: {}}); err != nil {
				t.Errorf("ApplyPolicies deleting %d's policy: %v", uid, err)
			}
			if _, err := dp.ReconcilePolicies(map[uint32]bpf.Policy{1000: {Blocked: true}, uid: {Blocked: true}}); !errors.Is(err, bpf.ErrProtectedUID) {
				t.Errorf("ReconcilePolicies with %d = %v", uid, err)
			}
		}
		if got, _ := dp.Policies(); len(got) != 0 {
			t.Errorf("a refused change left policies behind: %v", got)
		}
	})
}

func TestReconcilePolicies(t *testing.T) {
	e := newEnv(t)
	want := map[uint32]bpf.Policy{}
	for uid := uint32(10000); uid < 15000; uid++ {
		p := bpf.Policy{Blocked: uid%2 == 0, Quota: bpf.Direction(uid % 4)}
		if p.Quota != 0 {
			p.Ceiling = uint64(uid) * 1000
		}
		want[uid] = p
	}
	n, err := e.dp.ReconcilePolicies(want)
	if err != nil {
		t.Fatal(err)
	}
	nonZero := 0
	for _, p := range want {
		if p.Blocked || p.Quota != 0 {
			nonZero++
		}
	}
	if n != nonZero {
		t.Errorf("first reconcile wrote %d, want %d", n, nonZero)
	}
	if n, err := e.dp.ReconcilePolicies(want); err != nil || n != 0 {
		t.Errorf("repeat reconcile wrote %d (%v), want 0", n, err)
	}
	// Someone deletes one entry, changes one and adds a stray one: all
	// three are repaired.
	setPolicy(t, e.dp, 10002, bpf.Policy{})
	changed := want[10003]
	changed.Ceiling++
	setPolicy(t, e.dp, 10003, changed)
	setPolicy(t, e.dp, 20000, bpf.Policy{Blocked: true})
	if n, err := e.dp.ReconcilePolicies(want); err != nil || n != 3 {
		t.Errorf("repair wrote %d (%v), want 3", n, err)
	}
	for _, uid := range []uint32{10002, 10003, 20000} {
		if got, _ := e.dp.Policy(uid); got != want[uid] {
			t.Errorf("policy of %d after the repair: %+v, want %+v", uid, got, want[uid])
		}
	}
	// Someone clears a word of the policy bits: the policies of its 64 UIDs
	// would no longer be looked at. Reconcile puts it back.
	bits, err := ebpf.LoadPinnedMap(filepath.Join(e.pin, "bw_policy_bits"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer bits.Close()
	const word = 10048 / 64
	var before uint64
	if err := bits.Lookup(uint32(word), &before); err != nil || before == 0 {
		t.Fatalf("bits of UIDs 10048-10111: %x, %v", before, err)
	}
	if err := bits.Put(uint32(word), uint64(0)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.dp.ReconcilePolicies(want); err != nil {
		t.Fatal(err)
	}
	var after uint64
	if err := bits.Lookup(uint32(word), &after); err != nil || after != before {
		t.Errorf("bits not repaired: %x, want %x (%v)", after, before, err)
	}
	// ApplyPolicies changes only the UIDs it is given, with their bits.
	changes := map[uint32]bpf.Policy{10048: {}, 10049: {Blocked: true}, 30001: {Quota: bpf.Tx, Ceiling: 7}}
	if err := e.dp.ApplyPolicies(changes); err != nil {
		t.Fatal(err)
	}
	var word2 uint64
	if err := bits.Lookup(uint32(word), &word2); err != nil || word2 != (before&^1)|2 {
		t.Errorf("bits after ApplyPolicies: %x, want %x (%v)", word2, (before&^1)|2, err)
	}
	for uid, p := range changes {
		if got, _ := e.dp.Policy(uid); got != p {
			t.Errorf("policy of %d after ApplyPolicies: %+v, want %+v", uid, got, p)
		}
	}
	if got, _ := e.dp.Policy(10050); got != want[10050] {
		t.Errorf("ApplyPolicies touched another UID: %+v", got)
	}
	if err := e.dp.ApplyPolicies(map[uint32]bpf.Policy{0: {Blocked: true}}); !errors.Is(err, bpf.ErrProtectedUID) {
		t.Errorf("ApplyPolicies of root: %v", err)
	}
	// Bits of UIDs without a policy are cleared.
	if _, err := e.dp.ReconcilePolicies(nil); err != nil {
		t.Fatal(err)
	}
	if err := bits.Lookup(uint32(word), &after); err != nil || after != 0 {
		t.Errorf("bits left after every policy went: %x (%v)", after, err)
	}
	if _, err := e.dp.ReconcilePolicies(want); err != nil {
		t.Fatal(err)
	}

	got, err := e.dp.Policies()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != nonZero {
		t.Errorf("kernel has %d policies, want %d", len(got), nonZero)
	}
	for uid, p := range got {
		if want[uid] != p {
			t.Errorf("UID %d: kernel %+v, want %+v", uid, p, want[uid])
		}
	}
}

// An explicit uninstall detaches both programs and removes every pin; a
// plain Close (a normal stop) leaves both in place.
func TestUninstall(t *testing.T) {
	e := newEnv(t)
	const user, server = 2601, 2602
	srv := e.start(t, true, server, "udp-echo", listenAddr(e.net.B4))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	e.start(t, false, user, "udp-client", addr, "10", "100").Done(t)
	if e.counters(t, user).TxPackets != 10 {
		t.Fatalf("traffic not counted: %+v", e.counters(t, user))
	}
	if err := e.dp.Close(); err != nil {
		t.Fatal(err)
	}
	e.dp = e.load(t)
	if got := e.counters(t, user).TxPackets; got != 10 {
		t.Errorf("close and load lost counters: %d packets", got)
	}
	if err := e.dp.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(e.pin); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory left: %v", err)
	}
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInetIngress, ebpf.AttachCGroupInetEgress} {
		f, err := os.Open(e.cgroup)
		if err != nil {
			t.Fatal(err)
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: typ})
		f.Close()
		if err != nil || len(res.Programs) != 0 {
			t.Errorf("%v programs after uninstall: %v %v", typ, res, err)
		}
	}
	// A new install starts from zero.
	e.dp = e.load(t)
	if got := e.counters(t, user); got != (bpf.Counters{}) {
		t.Errorf("counters after uninstall: %+v", got)
	}
}
