package nft

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"net"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	nettest.Register("udpsend", udpSend)
	nettest.Main(m)
}

// udpSend sends a datagram to itself over loopback and prints "SEND ok" if
// it arrived, or "SEND EPERM" if the kernel refused to send it.
func udpSend([]string) error {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.WriteToUDP([]byte("ping"), c.LocalAddr().(*net.UDPAddr))
	if errors.Is(err, syscall.EPERM) {
		fmt.Println("SEND EPERM")
		return nil
	}
	if err != nil {
		return err
	}
	if err := c.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return err
	}
	if _, _, err := c.ReadFromUDP(make([]byte, 16)); err != nil {
		return err
	}
	fmt.Println("SEND ok")
	return nil
}

// newFirewall returns a Firewall for a uniquely named table in ns, removed
// and closed in t.Cleanup.
func newFirewall(t *testing.T, ns netns.NsHandle, cfg Config) *Firewall {
	t.Helper()
	cfg.NetNS = int(ns)
	if cfg.Table == "" {
		cfg.Table = nettest.Name("bwtest")
	}
	fw, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := fw.Remove(); err != nil && !errors.Is(err, ErrClosed) {
			t.Errorf("Remove: %v", err)
		}
		if err := fw.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return fw
}

// nftCLI runs nft(8) in ns with args, and script as its input, and returns
// its output.
func nftCLI(t *testing.T, ns netns.NsHandle, script string, args ...string) string {
	t.Helper()
	cmd := exec.Command("nft", args...)
	cmd.Stdin = strings.NewReader(script)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	// The child is forked from the thread in ns, so it runs there.
	if err := nettest.Do(ns, cmd.Run); err != nil {
		t.Fatalf("nft %s: %v\n%s", strings.Join(args, " "), err, out.String())
	}
	return out.String()
}

// generation returns the nftables ruleset generation of ns, which every
// committed transaction advances.
func generation(t *testing.T, ns netns.NsHandle) uint32 {
	t.Helper()
	c, err := dialGeneration(int(ns))
	if err != nil {
		t.Fatalf("dial netfilter: %v", err)
	}
	defer c.Close()
	gen, err := readGeneration(c)
	if err != nil {
		t.Fatalf("get generation: %v", err)
	}
	return gen
}

func reconcile(t *testing.T, fw *Firewall, desired []uint32, want Result) {
	t.Helper()
	got, err := fw.Reconcile(desired)
	if err != nil {
		t.Fatalf("Reconcile(%d UIDs): %v", len(desired), err)
	}
	if got != want {
		t.Fatalf("Reconcile(%d UIDs) = %+v, want %+v", len(desired), got, want)
	}
}

// brief formats uids, or the first ones of many.
func brief(uids []uint32) string {
	if len(uids) > 10 {
		return fmt.Sprintf("%v... (%d)", uids[:10], len(uids))
	}
	return fmt.Sprint(uids)
}

func checkBlocked(t *testing.T, fw *Firewall, want ...uint32) {
	t.Helper()
	got, err := fw.Blocked()
	if err != nil {
		t.Fatalf("Blocked: %v", err)
	}
	if !slices.Equal(got, want) {
		add, del := diff(want, got)
		t.Fatalf("Blocked() = %d UIDs, want %d: missing %s, extra %s", len(got), len(want), brief(add), brief(del))
	}
}

// checkListing checks that nft list shows the table of fw, blocking
// elements (as nft prints them), and nothing else.
func checkListing(t *testing.T, ns netns.NsHandle, fw *Firewall, elements string) {
	t.Helper()
	out := nftCLI(t, ns, "", "list", "table", "inet", fw.table.Name)
	want := regexp.MustCompile(`^table inet ` + fw.table.Name + ` \{
	set blocked_uids \{
		type uid` + elements + `
	\}

	chain output \{
		type filter hook output priority filter; policy accept;
		meta skuid @blocked_uids counter packets \d+ bytes \d+ drop comment "bwagent: drop blocked UIDs"
	\}
\}
$`)
	if !want.MatchString(out) {
		t.Fatalf("nft list table inet %s:\n%s\nwant match for\n%s", fw.table.Name, out, want)
	}
}

func TestReconcileCreates(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNetNS(t)
	fw := newFirewall(t, ns, Config{})

	if _, err := fw.Blocked(); !errors.Is(err, ErrNotInstalled) {
		t.Fatalf("Blocked before Reconcile: %v, want ErrNotInstalled", err)
	}
	if _, _, err := fw.DropCounter(); !errors.Is(err, ErrNotInstalled) {
		t.Fatalf("DropCounter before Reconcile: %v, want ErrNotInstalled", err)
	}

	reconcile(t, fw, []uint32{1002, 1001, 1002}, Result{Recreated: true, Added: 2})
	checkListing(t, ns, fw, "\n\t\telements = \\{ 1001, 1002 \\}")
	t.Logf("nft list table:\n%s", nftCLI(t, ns, "", "list", "table", "inet", fw.table.Name))
	checkBlocked(t, fw, 1001, 1002)
	if p, b, err := fw.DropCounter(); err != nil || p != 0 || b != 0 {
		t.Fatalf("DropCounter() = %d, %d, %v; want 0, 0, nil", p, b, err)
	}

	// Nothing to do: no transaction at all.
	gen := generation(t, ns)
	reconcile(t, fw, []uint32{1001, 1002}, Result{})
	reconcile(t, fw, []uint32{1002, 1001, 1001}, Result{})
	if got := generation(t, ns); got != gen {
		t.Fatalf("ruleset generation went from %d to %d on reconciles without changes", gen, got)
	}

	// An empty set is a valid state too.
	reconcile(t, fw, nil, Result{Removed: 2})
	checkListing(t, ns, fw, "")
	checkBlocked(t, fw)
	gen = generation(t, ns)
	reconcile(t, fw, []uint32{}, Result{})
	if got := generation(t, ns); got != gen {
		t.Fatalf("ruleset generation went from %d to %d on a reconcile without changes", gen, got)
	}
}

func TestReconcileDiff(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNetNS(t)
	fw := newFirewall(t, ns, Config{Set: "uids", Chain: "out"})

	steps := []struct {
		desired []uint32
		want    Result
	}{
		{[]uint32{5, 3, 1}, Result{Recreated: true, Added: 3}},
		{[]uint32{1, 2, 3, 4, 5}, Result{Added: 2}},
		{[]uint32{2, 4}, Result{Removed: 3}},
		{[]uint32{4, 6, 8, 4294967295}, Result{Added: 3, Removed: 1}},
		{[]uint32{4, 6, 8, 4294967295}, Result{}},
		{nil, Result{Removed: 4}},
		{[]uint32{7}, Result{Added: 1}},
	}
	for _, s := range steps {
		gen := generation(t, ns)
		reconcile(t, fw, s.desired, s.want)
		want := slices.Sorted(slices.Values(s.desired))
		if want == nil {
			want = []uint32{}
		}
		checkBlocked(t, fw, want...)

		// One transaction per change, none without.
		wantGen := gen + 1
		if s.want == (Result{}) {
			wantGen = gen
		}
		if got := generation(t, ns); got != wantGen {
			t.Errorf("Reconcile(%v): ruleset generation %d, want %d", s.desired, got, wantGen)
		}
	}

	out := nftCLI(t, ns, "", "list", "chain", "inet", fw.table.Name, "out")
	if !strings.Contains(out, "meta skuid @uids counter") {
		t.Errorf("nft list chain with custom names:\n%s", out)
	}
}

func TestReconcileRepairs(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNetNS(t)
	fw := newFirewall(t, ns, Config{})
	name := fw.table.Name
	desired := []uint32{1001, 1002, 1003}
	repaired := func(t *testing.T, want Result) {
		t.Helper()
		reconcile(t, fw, desired, want)
		checkListing(t, ns, fw, "\n\t\telements = \\{ 1001, 1002, 1003 \\}")
		checkBlocked(t, fw, desired...)
		reconcile(t, fw, desired, Result{})
	}
	reconcile(t, fw, desired, Result{Recreated: true, Added: 3})

	t.Run("flush ruleset", func(t *testing.T) {
		nftCLI(t, ns, "", "flush", "ruleset")
		repaired(t, Result{Recreated: true, Added: 3})
	})

	// Tables of others, one of them with our name in another family.
	nftCLI(t, ns, `
table inet other {
	set s {
		type ipv4_addr
		elements = { 192.0.2.1 }
	}
	chain output {
		type filter hook output priority 10; policy accept;
		ip daddr @s drop
	}
}
table ip `+name+` {
	chain output {
		type filter hook output priority filter; policy accept;
		meta skuid 4242 drop
	}
}
`, "-f", "-")
	others := func() string {
		return nftCLI(t, ns, "", "list", "table", "inet", "other") +
			nftCLI(t, ns, "", "list", "table", "ip", name)
	}
	before := others()

	damages := []struct {
		name   string
		script string
		want   Result
	}{
		{"delete rule", "", Result{Recreated: true}}, // handle looked up below
		{"flush chain", "flush chain inet " + name + " output", Result{Recreated: true}},
		{"foreign rule", "add rule inet " + name + " output ip daddr 192.0.2.2 accept", Result{Recreated: true}},
		{"foreign rule first", "insert rule inet " + name + " output accept", Result{Recreated: true}},
		{"second drop rule", "add rule inet " + name + " output meta skuid @blocked_uids counter drop", Result{Recreated: true}},
		{"policy drop", "add chain inet " + name + " output { policy drop; }", Result{Recreated: true}},
		{"chain replaced", `flush chain inet ` + name + ` output
delete chain inet ` + name + ` output
add chain inet ` + name + ` output { type filter hook output priority 10; policy accept; }
add rule inet ` + name + ` output meta skuid @blocked_uids counter drop`, Result{Recreated: true}},
		{"extra chain", "add chain inet " + name + " extra", Result{Recreated: true}},
		{"extra set", "add set inet " + name + " extra { type ipv4_addr; }", Result{Recreated: true}},
		{"dormant", "add table inet " + name + " { flags dormant; }", Result{Recreated: true}},
		{"set flushed", "flush set inet " + name + " blocked_uids", Result{Added: 3}},
		{"element deleted", "delete element inet " + name + " blocked_uids { 1002 }", Result{Added: 1}},
		{"element added", "add element inet " + name + " blocked_uids { 5000, 5001 }", Result{Removed: 2}},
		{"set and chain replaced", `delete table inet ` + name + `
table inet ` + name + ` {
	set blocked_uids { type ipv4_addr; elements = { 10.0.0.1 } }
	chain output { type filter hook output priority filter; policy accept; }
}`, Result{Recreated: true, Added: 3}},
		{"table deleted", "delete table inet " + name, Result{Recreated: true, Added: 3}},
	}
	for _, d := range damages {
		t.Run(d.name, func(t *testing.T) {
			script := d.script
			if script == "" {
				out := nftCLI(t, ns, "", "-a", "list", "chain", "inet", name, "output")
				m := regexp.MustCompile(`drop comment ".*" # handle (\d+)`).FindStringSubmatch(out)
				if m == nil {
					t.Fatalf("no rule handle in\n%s", out)
				}
				script = "delete rule inet " + name + " output handle " + m[1]
			}
			nftCLI(t, ns, script, "-f", "-")
			repaired(t, d.want)
			if after := others(); after != before {
				t.Fatalf("other tables changed from\n%s\nto\n%s", before, after)
			}
		})
	}

	if err := fw.Remove(); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if err := fw.Remove(); err != nil {
		t.Fatalf("Remove of a removed table: %v", err)
	}
	if after := others(); after != before {
		t.Fatalf("Remove changed other tables from\n%s\nto\n%s", before, after)
	}
	if out := nftCLI(t, ns, "", "list", "tables"); out != "table inet other\ntable ip "+name+"\n" {
		t.Fatalf("nft list tables after Remove:\n%s", out)
	}
	if _, err := fw.Blocked(); !errors.Is(err, ErrNotInstalled) {
		t.Fatalf("Blocked after Remove: %v, want ErrNotInstalled", err)
	}
}

func TestProtectedUID(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNetNS(t)
	fw := newFirewall(t, ns, Config{Protected: []uint32{1500, 1600}})

	refused := func(desired []uint32, uid string) {
		t.Helper()
		gen := generation(t, ns)
		_, err := fw.Reconcile(desired)
		if !errors.Is(err, ErrProtectedUID) {
			t.Fatalf("Reconcile(%v): %v, want ErrProtectedUID", desired, err)
		}
		if !strings.Contains(err.Error(), " "+uid+" ") {
			t.Errorf("Reconcile(%v): error %q does not name UID %s", desired, err, uid)
		}
		if got := generation(t, ns); got != gen {
			t.Fatalf("Reconcile(%v) changed the ruleset", desired)
		}
	}
	refused([]uint32{1001, 0}, "0")
	refused([]uint32{65534, 1001}, "65534") // the overflow UID, as in package bpf
	refused([]uint32{1500}, "1500")
	if _, err := fw.Blocked(); !errors.Is(err, ErrNotInstalled) {
		t.Fatalf("Blocked: %v, want ErrNotInstalled", err)
	}

	reconcile(t, fw, []uint32{1001}, Result{Recreated: true, Added: 1})
	refused([]uint32{1001, 1002, 1600}, "1600")
	checkBlocked(t, fw, 1001)
}

func TestInvalidName(t *testing.T) {
	long := strings.Repeat("x", 256)
	for _, cfg := range []Config{
		{Table: long},
		{Set: long},
		{Chain: long},
		{Table: "bw\x00agent"},
		{Set: "\x00"},
		{Chain: "out\x00"},
	} {
		fw, err := New(cfg)
		if !errors.Is(err, ErrInvalidName) {
			if err == nil {
				fw.Close()
			}
			t.Errorf("New(%+q): %v, want ErrInvalidName", []string{cfg.Table, cfg.Set, cfg.Chain}, err)
		}
	}
	if err := checkName(""); !errors.Is(err, ErrInvalidName) {
		t.Errorf(`checkName(""): %v, want ErrInvalidName`, err)
	}
}

func TestChunks(t *testing.T) {
	// google/nftables truncates the 16-bit length of a longer element list.
	if n := 4 + elemsPerMsg*elemBytes; n > math.MaxUint16 {
		t.Fatalf("a message of %d elements has an element list of %d bytes", elemsPerMsg, n)
	}
	var lens []int
	for _, c := range chunks(make([]uint32, 2*elemsPerMsg+1)) {
		lens = append(lens, len(c))
	}
	if want := []int{elemsPerMsg, elemsPerMsg, 1}; !slices.Equal(lens, want) {
		t.Fatalf("chunk lengths %v, want %v", lens, want)
	}
	if c := chunks(nil); len(c) != 0 {
		t.Fatalf("chunks(nil) = %v", c)
	}
}

func TestLongestNames(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNetNS(t)
	fw := newFirewall(t, ns, Config{
		Table: nettest.Name("t") + strings.Repeat("x", maxNameLen-9),
		Set:   strings.Repeat("s", maxNameLen),
		Chain: strings.Repeat("c", maxNameLen),
	})
	reconcile(t, fw, []uint32{1001}, Result{Recreated: true, Added: 1})
	reconcile(t, fw, []uint32{1001, 1002}, Result{Added: 1})
	checkBlocked(t, fw, 1001, 1002)
	if _, _, err := fw.DropCounter(); err != nil {
		t.Fatalf("DropCounter: %v", err)
	}
}

func TestLargeSet(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNetNS(t)
	fw := newFirewall(t, ns, Config{})
	uids := func(from, n uint32) []uint32 {
		s := make([]uint32, n)
		for i := range s {
			s[i] = from + uint32(i)
		}
		return s
	}

	for _, step := range []struct {
		desired []uint32
		want    Result
	}{
		{uids(100_000, 10_000), Result{Recreated: true, Added: 10_000}},
		{uids(200_000, 10_000), Result{Added: 10_000, Removed: 10_000}},
		{uids(205_000, 10_000), Result{Added: 5_000, Removed: 5_000}},
		// Larger than the default socket buffers.
		{uids(1_000_000, 100_000), Result{Added: 100_000, Removed: 10_000}},
	} {
		gen := generation(t, ns)
		start := time.Now()
		reconcile(t, fw, step.desired, step.want)
		t.Logf("Reconcile(%d UIDs) = %+v in %v", len(step.desired), step.want, time.Since(start))
		if got := generation(t, ns); got != gen+1 {
			t.Errorf("Reconcile took %d transactions, want 1", got-gen)
		}
		checkBlocked(t, fw, step.desired...)
	}
	out := nftCLI(t, ns, "", "get", "element", "inet", fw.table.Name, "blocked_uids", "{ 1054321 }")
	if !strings.Contains(out, "1054321") {
		t.Errorf("nft get element:\n%s", out)
	}

	// Rebuilding with a large set works too.
	nftCLI(t, ns, "", "flush", "chain", "inet", fw.table.Name, "output")
	reconcile(t, fw, uids(1_000_000, 100_000), Result{Recreated: true})
	checkBlocked(t, fw, uids(1_000_000, 100_000)...)
}

func TestPermission(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNetNS(t)
	name := nettest.Name("bwtest")

	// nettest.Do runs this on a thread in ns that dies afterwards, so it
	// may drop its credentials: a raw setresuid changes only the calling
	// thread's (the libc and Go wrappers change every thread's). The
	// netlink socket is opened on this thread, and the kernel wants
	// CAP_NET_ADMIN both of the credentials a socket was opened with and
	// of the sender, so the outcome does not depend on which thread
	// google/nftables sends from.
	var reconcileErr, removeErr error
	err := nettest.Do(ns, func() error {
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, 65534, 65534, 65534); e != 0 {
			return fmt.Errorf("setresuid: %w", e)
		}
		fw, err := New(Config{Table: name})
		if err != nil {
			return err
		}
		defer fw.Close()
		_, reconcileErr = fw.Reconcile([]uint32{1001})
		removeErr = fw.Remove()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for op, err := range map[string]error{"Reconcile": reconcileErr, "Remove": removeErr} {
		if !errors.Is(err, ErrPermission) || !errors.Is(err, unix.EPERM) {
			t.Errorf("%s as nobody: %v, want ErrPermission wrapping EPERM", op, err)
		}
	}
	t.Logf("Reconcile as nobody: %v", reconcileErr)

	if out := nftCLI(t, ns, "", "list", "tables"); out != "" {
		t.Fatalf("nft list tables after refused Reconcile:\n%s", out)
	}
}

func TestDropsTraffic(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNetNS(t)
	fw := newFirewall(t, ns, Config{})
	send := func(uid uint32) string {
		t.Helper()
		p := nettest.Start(t, nettest.Spec{NS: ns, UID: uid}, "udpsend")
		line := p.Expect(t, "SEND ", 10*time.Second)
		if err := p.Wait(10 * time.Second); err != nil {
			t.Fatalf("udpsend as %d: %v", uid, err)
		}
		return strings.TrimPrefix(line, "SEND ")
	}
	counter := func() (uint64, uint64) {
		t.Helper()
		p, b, err := fw.DropCounter()
		if err != nil {
			t.Fatalf("DropCounter: %v", err)
		}
		return p, b
	}

	if got := send(1234); got != "ok" {
		t.Fatalf("send as 1234 before Reconcile: %s, want ok", got)
	}
	reconcile(t, fw, []uint32{1234}, Result{Recreated: true, Added: 1})
	if p, b := counter(); p != 0 || b != 0 {
		t.Fatalf("DropCounter after Reconcile = %d, %d; want 0, 0", p, b)
	}

	if got := send(1234); got != "EPERM" {
		t.Fatalf("send as blocked 1234: %s, want EPERM", got)
	}
	p, b := counter()
	if p != 1 || b == 0 {
		t.Fatalf("DropCounter after a dropped datagram = %d, %d; want 1, > 0", p, b)
	}
	if got := send(1235); got != "ok" {
		t.Fatalf("send as 1235: %s, want ok", got)
	}
	if p2, b2 := counter(); p2 != p || b2 != b {
		t.Fatalf("DropCounter went from %d, %d to %d, %d on traffic of an unblocked UID", p, b, p2, b2)
	}

	reconcile(t, fw, nil, Result{Removed: 1})
	if got := send(1234); got != "ok" {
		t.Fatalf("send as unblocked 1234: %s, want ok", got)
	}
}

func TestClosed(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNetNS(t)
	fw := newFirewall(t, ns, Config{})
	reconcile(t, fw, []uint32{1001}, Result{Recreated: true, Added: 1})
	if err := fw.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := fw.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	_, err1 := fw.Reconcile(nil)
	_, err2 := fw.Blocked()
	_, _, err3 := fw.DropCounter()
	err4 := fw.Remove()
	for i, err := range []error{err1, err2, err3, err4} {
		if !errors.Is(err, ErrClosed) {
			t.Errorf("call %d after Close: %v, want ErrClosed", i, err)
		}
	}
	// Close leaves the table in place.
	if out := nftCLI(t, ns, "", "list", "set", "inet", fw.table.Name, "blocked_uids"); !strings.Contains(out, "elements = { 1001 }") {
		t.Fatalf("set after Close:\n%s", out)
	}
}

func TestAbort(t *testing.T) {
	nettest.RequireRoot(t)
	ns := nettest.NewNetNS(t)
	fw := newFirewall(t, ns, Config{})
	gen := generation(t, ns)

	fw.conn.AddTable(fw.table)
	boom := errors.New("boom")
	if err := fw.abort("test", boom); !errors.Is(err, boom) {
		t.Fatalf("abort: %v, want boom", err)
	}
	if got := generation(t, ns); got != gen {
		t.Fatalf("abort committed a transaction")
	}
	if out := nftCLI(t, ns, "", "list", "tables"); out != "" {
		t.Fatalf("tables after abort:\n%s", out)
	}
	reconcile(t, fw, []uint32{1001}, Result{Recreated: true, Added: 1})
}

// BenchmarkReconcileUnchanged is the per-tick cost of Reconcile when nothing
// changed: the agent pays it every tick for the whole blocked set.
func BenchmarkReconcileUnchanged(b *testing.B) {
	nettest.RequireRoot(b)
	for _, n := range []int{100, 10_000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			ns := nettest.NewNetNS(b)
			fw, err := New(Config{Table: nettest.Name("bwbench"), NetNS: int(ns)})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { fw.Remove(); fw.Close() })
			uids := make([]uint32, n)
			for i := range uids {
				uids[i] = 100_000 + uint32(i)
			}
			if _, err := fw.Reconcile(uids); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for b.Loop() {
				if res, err := fw.Reconcile(uids); err != nil || res != (Result{}) {
					b.Fatalf("%+v %v", res, err)
				}
			}
		})
	}
}
