// Package bench holds the project's benchmarks. They need root and run real
// traffic through the kernel; `make bench` runs them and README.md records
// their results as ratios measured in the same run.
package bench

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/nft"
)

func TestMain(m *testing.M) { nettest.Main(m) }

const (
	blockedUIDs = 10_000
	firstUID    = 100_000 // blocked UIDs: never the sender's
	senderUID   = 3000
	receiverUID = 3001
	rounds      = 7
	seconds     = 1
	settle      = time.Second
)

// mode is one data plane configuration under test.
type mode struct {
	name     string
	up, down func(b *testing.B)
}

// BenchmarkDatapath measures one UID's throughput over veth between two
// network namespaces, TCP and UDP (1400-byte datagrams), with
//   - none: nothing attached;
//   - bwagent: our programs and nft table, 10,000 blocked UIDs;
//   - iptables: the old design, 10,000 `-m owner --uid-owner N -j DROP`
//     rules in OUTPUT (iptables' default backend, and legacy if installed).
//
// TCP reports the received rate; UDP reports the sender's rate, which is
// where per-packet OUTPUT work shows.
//
// Each mode's rate is paired with the rate with nothing attached, measured
// right before or after it; the ratio reported is the median over rounds.
// What the programs cost per packet is BenchmarkPacketCost's.
func BenchmarkDatapath(b *testing.B) {
	nettest.RequireRoot(b)
	for _, tool := range []string{"iperf3", "iptables-restore", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("needs %s: run `make deps`", tool)
		}
	}
	root, err := bpf.CgroupV2Root()
	if err != nil {
		b.Fatal(err)
	}
	cg := nettest.NewCgroup(b, root)
	net := nettest.NewPair(b)
	pin := filepath.Join("/sys/fs/bpf", nettest.Name("bwbench-"))
	b.Cleanup(func() { bpf.Uninstall(pin) })

	nettest.Exec(b, nettest.Spec{NS: net.B, Cgroup: cg, UID: receiverUID}, "iperf3", "-s", "-B", net.B4.String(), "-p", "5201", "-A", "1")
	time.Sleep(300 * time.Millisecond)

	blocked := make([]uint32, blockedUIDs)
	pol := make(map[uint32]bpf.Policy, blockedUIDs)
	for i := range blocked {
		blocked[i] = firstUID + uint32(i)
		pol[blocked[i]] = bpf.Policy{Blocked: true}
	}
	var (
		dp *bpf.Datapath
		fw *nft.Firewall
	)
	loadBPF := func(b *testing.B) {
		var err error
		if dp, err = bpf.Load(bpf.Config{CgroupPath: cg, PinPath: pin}); err != nil {
			b.Fatal(err)
		}
		if _, err := dp.ReconcilePolicies(pol); err != nil {
			b.Fatal(err)
		}
	}
	unloadBPF := func(b *testing.B) {
		if err := dp.Uninstall(); err != nil {
			b.Fatal(err)
		}
	}
	loadNFT := func(b *testing.B) {
		var err error
		if fw, err = nft.New(nft.Config{Table: nettest.Name("bwbench"), NetNS: int(net.A)}); err != nil {
			b.Fatal(err)
		}
		if _, err := fw.Reconcile(blocked); err != nil {
			b.Fatal(err)
		}
	}
	unloadNFT := func(b *testing.B) {
		if err := fw.Remove(); err != nil {
			b.Fatal(err)
		}
		fw.Close()
	}
	ours := mode{
		name: "bwagent",
		up:   func(b *testing.B) { loadBPF(b); loadNFT(b) },
		down: func(b *testing.B) { unloadNFT(b); unloadBPF(b) },
	}
	modes := []mode{
		ours,
		// The two halves of ours, to show where the cost is.
		{name: "bwagent-bpf-only", up: loadBPF, down: unloadBPF},
		{name: "bwagent-nft-only", up: loadNFT, down: unloadNFT},
	}
	rules := filepath.Join(b.TempDir(), "rules")
	var sb strings.Builder
	sb.WriteString("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n")
	for _, uid := range blocked {
		fmt.Fprintf(&sb, "-A OUTPUT -m owner --uid-owner %d -j DROP\n", uid)
	}
	sb.WriteString("COMMIT\n")
	if err := os.WriteFile(rules, []byte(sb.String()), 0o600); err != nil {
		b.Fatal(err)
	}
	for _, variant := range []struct{ name, restore, flush string }{
		{"iptables", "iptables-restore", "iptables"},
		{"iptables-legacy", "iptables-legacy-restore", "iptables-legacy"},
	} {
		if _, err := exec.LookPath(variant.restore); err != nil {
			continue
		}
		run := func(b *testing.B, argv ...string) {
			p := nettest.Exec(b, nettest.Spec{NS: net.A}, argv[0], argv[1:]...)
			if err := p.Wait(2 * time.Minute); err != nil {
				b.Fatalf("%v: %v", argv, err)
			}
		}
		modes = append(modes, mode{
			name: variant.name,
			up:   func(b *testing.B) { run(b, variant.restore, rules) },
			down: func(b *testing.B) {
				run(b, variant.flush, "-F", "OUTPUT")
				run(b, variant.flush, "-X")
			},
		})
	}

	protos := []struct {
		name string
		args []string
	}{
		{"tcp", nil},
		{"udp-1400", []string{"-u", "-b", "0", "-l", "1400"}},
	}
	// The machine's speed drifts (a VM's neighbours), so every measurement
	// of a mode is paired with one of nothing right next to it, in
	// alternating order, and a mode's result is the median over rounds of
	// its rate divided by its partner's.
	none := mode{name: "none", up: func(*testing.B) {}, down: func(*testing.B) {}}
	type pair struct{ rate, base float64 }
	res := map[string][]pair{} // mode/proto -> one pair per round
	measure := func(m mode) map[string]float64 {
		m.up(b)
		// Let the deferred work of the change (RCU frees, nft hash table
		// resizes) finish before measuring.
		time.Sleep(settle)
		out := map[string]float64{}
		for _, p := range protos {
			out[p.name] = iperf(b, net.A, cg, net.B4.String(), p.args)
		}
		m.down(b)
		return out
	}
	for range b.N {
		for r := range rounds {
			for _, m := range modes {
				var with, without map[string]float64
				if r%2 == 0 {
					with, without = measure(m), measure(none)
				} else {
					without, with = measure(none), measure(m)
				}
				for _, p := range protos {
					key := m.name + "/" + p.name
					res[key] = append(res[key], pair{with[p.name], without[p.name]})
				}
			}
		}
	}

	// Printed, not logged: the testing package cuts a benchmark's log.
	fmt.Printf("%-16s %-9s %8s %8s %6s  %s\n", "mode", "traffic", "Gbit/s", "none", "ratio", "per-round ratios")
	for _, p := range protos {
		for _, m := range modes {
			var rates, bases, ratios []float64
			for _, pr := range res[m.name+"/"+p.name] {
				rates = append(rates, pr.rate)
				bases = append(bases, pr.base)
				ratios = append(ratios, pr.rate/pr.base)
			}
			fmt.Printf("%-16s %-9s %8.2f %8.2f %6.3f  %.3f\n", m.name, p.name, median(rates), median(bases), median(ratios), ratios)
			b.ReportMetric(median(ratios), m.name+"/none-"+p.name)
		}
	}
}

// iperf runs one iperf3 client as the sender UID and returns its rate in
// Gbit/s. A server still finishing the previous test refuses the next
// ("the server is busy running a test"): the client tries again.
func iperf(b *testing.B, ns netns.NsHandle, cg, server string, extra []string) float64 {
	b.Helper()
	// Sender on CPU 0, receiver (started with -A 1) on CPU 1: less noise.
	return iperfAs(b, nettest.Spec{NS: ns, Cgroup: cg, UID: senderUID}, server, "5201", "0", extra)
}

// iperfAs is iperf with the client run as spec says, against port on
// server, on CPU cpu.
func iperfAs(b *testing.B, spec nettest.Spec, server, port, cpu string, extra []string) float64 {
	b.Helper()
	args := []string{"-c", server, "-p", port, "-J", "-A", cpu}
	if !slices.Contains(extra, "-n") { // an amount instead of a time
		args = append(args, "-t", fmt.Sprint(seconds))
	}
	args = append(args, extra...)
	// TCP: what arrived. UDP: what the sender got out; the receiver of a
	// flood on two cores loses most datagrams whatever the data plane.
	key := "sum_received"
	if slices.Contains(extra, "-u") {
		key = "sum_sent"
	}
	for attempt := 1; ; attempt++ {
		p := nettest.Exec(b, spec, "iperf3", args...)
		var out strings.Builder
		for line := range p.Lines {
			out.WriteString(line)
			out.WriteByte('\n')
		}
		var res struct {
			Intervals []json.RawMessage          `json:"intervals"`
			End       map[string]json.RawMessage `json:"end"`
			Error     string                     `json:"error"`
		}
		if err := json.Unmarshal([]byte(out.String()), &res); err != nil {
			b.Fatalf("iperf3 output: %v\n%s", err, out.String())
		}
		// A server that has not finished the previous test answers "busy",
		// or, in a race, resets the new control connection before the
		// test starts ("unable to send cookie", "unable to receive control
		// message"): both are a try again.
		refused := strings.Contains(res.Error, "busy") ||
			strings.Contains(res.Error, "Connection reset by peer") && len(res.Intervals) == 0
		if refused && attempt < 20 {
			p.Wait(time.Minute)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if err := p.Wait(time.Minute); err != nil {
			b.Fatalf("iperf3 %v: %v\n%s", args, err, out.String())
		}
		var sum struct {
			BitsPerSecond float64 `json:"bits_per_second"`
		}
		if err := json.Unmarshal(res.End[key], &sum); err != nil {
			b.Fatalf("iperf3 output has no end.%s: %v\n%s", key, err, out.String())
		}
		return sum.BitsPerSecond / 1e9
	}
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}
