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

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

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
	rounds      = 3
	seconds     = 3
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
// The modes run interleaved, rounds times; it reports the median of each
// as a ratio to none, and the programs' run time per packet.
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

	nettest.Exec(b, nettest.Spec{NS: net.B, Cgroup: cg, UID: receiverUID}, "iperf3", "-s", "-B", net.B4.String(), "-p", "5201")
	time.Sleep(300 * time.Millisecond)

	blocked := make([]uint32, blockedUIDs)
	pol := make(map[uint32]bpf.Policy, blockedUIDs)
	for i := range blocked {
		blocked[i] = firstUID + uint32(i)
		pol[blocked[i]] = bpf.Policy{Blocked: true}
	}
	var (
		dp       *bpf.Datapath
		fw       *nft.Firewall
		statsOff interface{ Close() error }
		runNs    uint64
		runs     uint64
	)
	ours := mode{
		name: "bwagent",
		up: func(b *testing.B) {
			var err error
			if dp, err = bpf.Load(bpf.Config{CgroupPath: cg, PinPath: pin}); err != nil {
				b.Fatal(err)
			}
			if _, err := dp.ReconcilePolicies(pol); err != nil {
				b.Fatal(err)
			}
			if fw, err = nft.New(nft.Config{Table: nettest.Name("bwbench"), NetNS: int(net.A)}); err != nil {
				b.Fatal(err)
			}
			if _, err := fw.Reconcile(blocked); err != nil {
				b.Fatal(err)
			}
			if statsOff, err = ebpf.EnableStats(unix.BPF_STATS_RUN_TIME); err != nil {
				b.Fatal(err)
			}
		},
		down: func(b *testing.B) {
			ns, n, err := dp.RunStats()
			if err != nil {
				b.Fatal(err)
			}
			runNs += ns
			runs += n
			statsOff.Close()
			if err := fw.Remove(); err != nil {
				b.Fatal(err)
			}
			fw.Close()
			if err := dp.Uninstall(); err != nil {
				b.Fatal(err)
			}
		},
	}
	modes := []mode{{name: "none", up: func(*testing.B) {}, down: func(*testing.B) {}}, ours}
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
	results := map[string][]float64{} // mode/proto -> Gbit/s per round
	for range b.N {
		for r := 0; r < rounds; r++ {
			for _, m := range modes {
				m.up(b)
				for _, p := range protos {
					gbps := iperf(b, net.A, cg, net.B4.String(), p.args)
					results[m.name+"/"+p.name] = append(results[m.name+"/"+p.name], gbps)
				}
				m.down(b)
			}
		}
	}

	b.Logf("rounds (Gbit/s): %v", results)
	b.Logf("%-16s %-9s %12s %8s", "mode", "traffic", "Gbit/s", "ratio")
	for _, p := range protos {
		base := median(results["none/"+p.name])
		for _, m := range modes {
			v := median(results[m.name+"/"+p.name])
			b.Logf("%-16s %-9s %12.2f %8.3f", m.name, p.name, v, v/base)
			if m.name != "none" {
				b.ReportMetric(v/base, m.name+"/none-"+p.name)
			}
		}
	}
	if runs > 0 {
		b.ReportMetric(float64(runNs)/float64(runs), "bpf-ns/run")
		b.Logf("bwagent programs: %.1f ns per run over %d runs", float64(runNs)/float64(runs), runs)
	}
}

// iperf runs one iperf3 client as the sender UID and returns its rate in
// Gbit/s.
func iperf(b *testing.B, ns netns.NsHandle, cg, server string, extra []string) float64 {
	b.Helper()
	args := append([]string{"-c", server, "-p", "5201", "-t", fmt.Sprint(seconds), "-J"}, extra...)
	p := nettest.Exec(b, nettest.Spec{NS: ns, Cgroup: cg, UID: senderUID}, "iperf3", args...)
	var out strings.Builder
	for line := range p.Lines {
		out.WriteString(line)
		out.WriteByte('\n')
	}
	if err := p.Wait(time.Minute); err != nil {
		b.Fatalf("iperf3 %v: %v\n%s", args, err, out.String())
	}
	var res struct {
		End map[string]struct {
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"end"`
	}
	if err := json.Unmarshal([]byte(out.String()), &res); err != nil {
		b.Fatalf("iperf3 output: %v\n%s", err, out.String())
	}
	// TCP: what arrived. UDP: what the sender got out; the receiver of a
	// flood on two cores loses most datagrams whatever the data plane.
	key := "sum_received"
	if slices.Contains(extra, "-u") {
		key = "sum_sent"
	}
	bps := res.End[key].BitsPerSecond
	return bps / 1e9
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}
