package bench

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
)

const costRounds = 7

// costMode is one pair of cgroup-skb programs (ingress and egress) that
// BenchmarkPacketCost attaches to the sender's cgroup.
type costMode struct {
	name string
	// attach attaches the mode's programs to cg.
	attach func(b *testing.B, cg string) *attachedProgs
	// serves makes the measured socket the server's end of its
	// connection, as an Xray connection is: the iperf3 client runs in the
	// receiver's cgroup and namespace against the sender's iperf3 server
	// (claimPort), reversed, so that "tcp-up" is still the sender's cgroup
	// sending. Its UDP row is left out: claims are for TCP connections.
	serves bool
	// cold leaves the sender without a slot: our modes otherwise move a
	// little traffic and read the counters once before measuring, as the
	// agent's tick does, which gives the sender's UID (and the claimed
	// mode's account) its slot (see bw_slots).
	cold bool
}

// claimPort is the port of the sender's own iperf3 server, an Xray
// claim-only port in the claimed mode.
const claimPort = 5202

// attachedProgs is a mode's programs while they are attached.
type attachedProgs struct {
	ingress, egress *ebpf.Program // read for their run statistics
	// check, if set, runs after the traffic and fails if the packets did
	// not take the mode's path (a budget never charged, a packet dropped).
	check func() error
	// read, if set, reads the moved counters as the agent's tick does.
	read func() error
	// detach detaches the programs and frees what attach made.
	detach func() error
}

// runStats is the run time and run count of a mode's programs over one
// traffic pattern.
type runStats struct{ inNs, inRuns, egNs, egRuns uint64 }

func (s runStats) nsPerRun() float64 {
	if s.inRuns+s.egRuns == 0 {
		return 0
	}
	return float64(s.inNs+s.egNs) / float64(s.inRuns+s.egRuns)
}

func (s runStats) sub(o runStats) runStats {
	return runStats{s.inNs - o.inNs, s.inRuns - o.inRuns, s.egNs - o.egNs, s.egRuns - o.egRuns}
}

func (a *attachedProgs) stats() (runStats, error) {
	in, err := a.ingress.Stats()
	if err != nil {
		return runStats{}, fmt.Errorf("ingress program stats: %w", err)
	}
	eg, err := a.egress.Stats()
	if err != nil {
		return runStats{}, fmt.Errorf("egress program stats: %w", err)
	}
	return runStats{
		inNs: uint64(in.Runtime.Nanoseconds()), inRuns: in.RunCount,
		egNs: uint64(eg.Runtime.Nanoseconds()), egRuns: eg.RunCount,
	}, nil
}

// BenchmarkPacketCost measures what our cgroup-skb programs cost per run
// (per packet; a GSO or GRO batch is one run) against an empty program
// (r0 = 1; exit) attached the same way: to the sender's cgroup, ingress and
// egress, under the same traffic (one UID's iperf3 TCP upload, TCP download
// and 1400-byte UDP flood over veth between two namespaces; the receiver is
// in a cgroup of its own, so only the sender's packets run the programs).
//
// The run time comes from kernel.bpf_stats_enabled, which wraps every run in
// two clock reads: the empty program's figure is that overhead and the call,
// and "ours minus empty" is our own work per packet. The modes take turns in
// every round (the order rotates), so the VM's drift hits them all; a
// difference is taken within a round, and the median over rounds reported.
//
// Our modes first move a little traffic and read the counters once, as the
// agent's first tick after a UID's first packets does: that gives the
// sender's UID (and the claimed mode's account) a slot (see bw_slots), so
// that the traffic measured takes the path it takes in steady state.
//
// Modes: empty; ours with no policy for the sender; the same without the
// read (noslot: counted in the hash, the path of a UID the agent has not
// read yet, or of one beyond the slots); ours with a budget on the sender
// (every packet charged to it); ours with 10,000 other UIDs blocked; ours
// with the sender's UID tagged as an owner of attributed
// sockets (as an SSH user's is once a session of theirs forwarded a
// connection, and UID 0's always is): every packet looks its socket's
// attribution up; ours with a speed cap on the sender (capped: every
// packet takes its bytes from the sender's token bucket, at 10 Gbit/s so
// that none is dropped if the path can help it), with 9,999 other UIDs
// capped too (capped10k: 10,000 capped users), and with the sender
// uncapped among 10,000 capped UIDs (other10k: what a cap costs the
// others). A new mode is a row of the table: a function that attaches a
// pair of programs and returns them (attachOurs for ours with other
// policies; a mode whose sockets carry socket storage would load ours with
// that turned on and be one more row). The claimed mode is the sender's
// accepted connection (its own iperf3 server's, see costMode.serves)
// claimed for an account with a budget: every packet finds the account in
// its socket's attribution, and charges the account's budget.
func BenchmarkPacketCost(b *testing.B) {
	e := newCostEnv(b)
	blocked := make(map[uint32]bpf.Policy, blockedUIDs)
	for i := range blockedUIDs {
		blocked[firstUID+uint32(i)] = bpf.Policy{Blocked: true}
	}
	capped := bpf.Policy{Rate: bpf.Rate{Rx: bpf.MaxRate, Tx: bpf.MaxRate}}
	capped10k := make(map[uint32]bpf.Policy, blockedUIDs)
	other10k := make(map[uint32]bpf.Policy, blockedUIDs)
	for i := range blockedUIDs {
		capped10k[firstUID+uint32(i)] = capped
		other10k[firstUID+uint32(i)] = capped
	}
	delete(capped10k, firstUID)
	capped10k[senderUID] = capped
	e.run(b, []costMode{
		{name: "empty", attach: attachEmpty},
		{name: "nopolicy", attach: attachOurs(e.pin, nil)},
		{name: "noslot", attach: attachOurs(e.pin, nil), cold: true},
		{name: "budget", attach: attachOurs(e.pin, map[uint32]bpf.Policy{
			senderUID: {Quota: bpf.Both, Ceiling: 1 << 62}, // never reached
		})},
		{name: "blocked10k", attach: attachOurs(e.pin, blocked)},
		{name: "capped", attach: attachOurs(e.pin, map[uint32]bpf.Policy{senderUID: capped})},
		{name: "capped10k", attach: attachOurs(e.pin, capped10k)},
		{name: "other10k", attach: attachOurs(e.pin, other10k)},
		{name: "tagged", attach: attachOurs(e.pin, nil, tagSender)},
		{name: "claimed", serves: true, attach: attachOurs(e.pin, map[uint32]bpf.Policy{
			bpf.AccountBase: {Quota: bpf.Both, Ceiling: 1 << 62}, // the first account's: never reached
		}, claimAll(e.net.B4, e.ports[0], e.ports[1]))},
	})
}

// BenchmarkPacketCostVariants measures variants of bwacct.c as
// BenchmarkPacketCost measures ours, against the empty program: objects
// built from edited copies of it (clang with bpf/gen.go's flags), named in
// BWCOST_VARIANTS as NAME=FILE.o,NAME=FILE.o... It is how the README's
// "where the time goes" was measured; without the variable it is skipped.
// Each variant's maps are its own and unpinned; if it has bw_slots, the
// sender's UID gets slot 1 (what the agent's first read does); it runs its
// claim variants of the packet programs where it has them.
func BenchmarkPacketCostVariants(b *testing.B) {
	variants := os.Getenv("BWCOST_VARIANTS")
	if variants == "" {
		b.Skip("no BWCOST_VARIANTS=NAME=FILE.o,...")
	}
	e := newCostEnv(b)
	modes := []costMode{{name: "empty", attach: attachEmpty}}
	for _, v := range strings.Split(variants, ",") {
		name, file, ok := strings.Cut(v, "=")
		if !ok {
			b.Fatalf("BWCOST_VARIANTS: %q is not NAME=FILE.o", v)
		}
		modes = append(modes, costMode{name: name, attach: attachObject(file)})
	}
	e.run(b, modes)
}

// costEnv is where the modes run: the sender's and the receiver's cgroups
// and namespaces, iperf3 servers, bpf statistics on.
type costEnv struct {
	cg    string // the sender's: the programs attach here
	srvCg string // the receiver's: nothing attached
	net   *nettest.Pair
	pin   string // our modes' pins
	ports [2]int // the receiver's namespace's ephemeral ports: the claimed mode's clients
}

func newCostEnv(b *testing.B) *costEnv {
	nettest.RequireRoot(b)
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("needs iperf3: run `make deps`")
	}
	root, err := bpf.CgroupV2Root()
	if err != nil {
		b.Fatal(err)
	}
	e := &costEnv{
		cg:    nettest.NewCgroup(b, root),
		srvCg: nettest.NewCgroup(b, root),
		net:   nettest.NewPair(b),
		pin:   filepath.Join("/sys/fs/bpf", nettest.Name("bwcost-")),
	}
	b.Cleanup(func() { bpf.Uninstall(e.pin) })

	stats, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
	if err != nil {
		b.Fatalf("enable bpf stats: %v", err)
	}
	b.Cleanup(func() { stats.Close() })

	nettest.Exec(b, nettest.Spec{NS: e.net.B, Cgroup: e.srvCg, UID: receiverUID}, "iperf3", "-s", "-B", e.net.B4.String(), "-p", "5201", "-A", "1")
	// The claimed mode's server: the sender's, in the sender's cgroup.
	nettest.Exec(b, nettest.Spec{NS: e.net.A, Cgroup: e.cg, UID: senderUID}, "iperf3", "-s", "-B", e.net.A4.String(), "-p", fmt.Sprint(claimPort), "-A", "0")
	time.Sleep(300 * time.Millisecond)
	err = nettest.Do(e.net.B, func() error {
		r, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
		if err == nil {
			_, err = fmt.Sscan(string(r), &e.ports[0], &e.ports[1])
		}
		return err
	})
	if err != nil {
		b.Fatalf("ephemeral ports: %v", err)
	}
	return e
}

// run measures modes (the first is the baseline, "-empty" in the output)
// under every traffic pattern, costRounds rounds, and prints and reports
// the medians.
func (e *costEnv) run(b *testing.B, modes []costMode) {
	traffic := []struct {
		name string
		args []string
	}{
		{"tcp-up", nil},
		{"tcp-down", []string{"-R"}},
		{"udp-1400", []string{"-u", "-b", "0", "-l", "1400"}},
	}
	// The mode attached when a round fails: detached before the pins go.
	var current *attachedProgs
	b.Cleanup(func() {
		if current != nil {
			current.detach()
		}
	})
	// transfer runs traffic with the given iperf3 arguments for mode m.
	transfer := func(m costMode, args []string) {
		if m.serves {
			reversed := slices.DeleteFunc(slices.Clone(args), func(a string) bool { return a == "-R" })
			if !slices.Contains(args, "-R") {
				reversed = append(reversed, "-R")
			}
			iperfAs(b, nettest.Spec{NS: e.net.B, Cgroup: e.srvCg, UID: receiverUID}, e.net.A4.String(), fmt.Sprint(claimPort), "1", reversed)
		} else {
			iperf(b, e.net.A, e.cg, e.net.B4.String(), args)
		}
	}
	res := map[string][]runStats{} // mode/traffic -> one per round
	for range b.N {
		for r := range costRounds {
			for i := range modes {
				m := modes[(i+r)%len(modes)] // each mode takes each place in turn
				current = m.attach(b, e.cg)
				if current.read != nil && !m.cold {
					transfer(m, []string{"-n", "64K"})
					if err := current.read(); err != nil {
						b.Fatalf("%s: %v", m.name, err)
					}
				}
				time.Sleep(200 * time.Millisecond) // let the attach's deferred work settle
				for _, t := range traffic {
					if m.serves && slices.Contains(t.args, "-u") {
						continue
					}
					before, err := current.stats()
					if err != nil {
						b.Fatal(err)
					}
					transfer(m, t.args)
					after, err := current.stats()
					if err != nil {
						b.Fatal(err)
					}
					d := after.sub(before)
					if d.egRuns == 0 {
						b.Fatalf("%s/%s: the egress program never ran", m.name, t.name)
					}
					res[m.name+"/"+t.name] = append(res[m.name+"/"+t.name], d)
				}
				if current.check != nil {
					if err := current.check(); err != nil {
						b.Fatalf("%s: %v", m.name, err)
					}
				}
				a := current
				current = nil
				if err := a.detach(); err != nil {
					b.Fatalf("%s: detach: %v", m.name, err)
				}
			}
		}
	}

	// Printed, not logged: the testing package cuts a benchmark's log.
	// Medians over rounds; "-empty" is the median of the per-round
	// differences.
	fmt.Printf("%-10s %-9s %7s %7s %7s %8s %8s %7s  %s\n", "mode", "traffic", "ns/run", "ingress", "egress", "in-runs", "eg-runs", "-empty", "per-round ns/run")
	base := modes[0].name
	for _, t := range traffic {
		for _, m := range modes {
			if len(res[m.name+"/"+t.name]) == 0 {
				continue // not run: a serving mode's UDP
			}
			var perRun, in, eg, inRuns, egRuns, diff []float64
			for r, s := range res[m.name+"/"+t.name] {
				perRun = append(perRun, s.nsPerRun())
				in = append(in, runStats{inNs: s.inNs, inRuns: s.inRuns}.nsPerRun())
				eg = append(eg, runStats{egNs: s.egNs, egRuns: s.egRuns}.nsPerRun())
				inRuns = append(inRuns, float64(s.inRuns))
				egRuns = append(egRuns, float64(s.egRuns))
				diff = append(diff, s.nsPerRun()-res[base+"/"+t.name][r].nsPerRun())
			}
			fmt.Printf("%-10s %-9s %7.1f %7.1f %7.1f %8.0f %8.0f %7.1f  %.1f\n", m.name, t.name,
				median(perRun), median(in), median(eg), median(inRuns), median(egRuns), median(diff), perRun)
			b.ReportMetric(median(perRun), m.name+"-ns/run-"+t.name)
			if m.name != base {
				b.ReportMetric(median(diff), m.name+"-minus-empty-ns/run-"+t.name)
			}
		}
	}
}

// attachEmpty attaches a program that passes every packet and does nothing
// else, built with the asm package: the floor of what a cgroup-skb program
// costs, clock reads of bpf_stats_enabled included.
func attachEmpty(b *testing.B, cg string) *attachedProgs {
	b.Helper()
	a := &attachedProgs{}
	var links []link.Link
	a.detach = func() error {
		var errs []error
		for _, l := range links {
			errs = append(errs, l.Close())
		}
		errs = append(errs, a.ingress.Close(), a.egress.Close())
		return errors.Join(errs...)
	}
	for _, typ := range []ebpf.AttachType{ebpf.AttachCGroupInetIngress, ebpf.AttachCGroupInetEgress} {
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Name:       "bw_empty",
			Type:       ebpf.CGroupSKB,
			AttachType: typ,
			License:    "GPL",
			Instructions: asm.Instructions{
				asm.Mov.Imm(asm.R0, 1), // pass
				asm.Return(),
			},
		})
		if err != nil {
			b.Fatalf("load empty program: %v", err)
		}
		if typ == ebpf.AttachCGroupInetIngress {
			a.ingress = prog
		} else {
			a.egress = prog
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: typ, Program: prog})
		if err != nil {
			b.Fatalf("attach empty program: %v", err)
		}
		links = append(links, l)
	}
	return a
}

// attachObject returns a mode that loads the packet programs of the object
// file (a variant of bwacct.c) with maps of their own, unpinned, and
// attaches them: the claim variants where the object has them. Its check
// fails if the programs counted a packet in bw_stats (dropped or missed).
func attachObject(file string) func(b *testing.B, cg string) *attachedProgs {
	return func(b *testing.B, cg string) *attachedProgs {
		b.Helper()
		spec, err := ebpf.LoadCollectionSpec(file)
		if err != nil {
			b.Fatal(err)
		}
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinNone
		}
		in, eg := "bw_ingress_attr", "bw_egress_attr"
		if spec.Programs[in] == nil || spec.Programs[eg] == nil {
			in, eg = "bw_ingress", "bw_egress"
		}
		for name := range spec.Programs {
			if name != in && name != eg {
				delete(spec.Programs, name)
			}
		}
		coll, err := ebpf.NewCollection(spec)
		if err != nil {
			b.Fatalf("%s: %v", file, err)
		}
		if m := coll.Maps["bw_slots"]; m != nil {
			if err := m.Put(uint32(senderUID/4), uint64(1)<<(16*(senderUID%4))); err != nil {
				b.Fatal(err)
			}
		}
		a := &attachedProgs{ingress: coll.Programs[in], egress: coll.Programs[eg]}
		var links []link.Link
		a.detach = func() error {
			var errs []error
			for _, l := range links {
				errs = append(errs, l.Close())
			}
			coll.Close()
			return errors.Join(errs...)
		}
		for _, at := range []struct {
			typ  ebpf.AttachType
			prog *ebpf.Program
		}{{ebpf.AttachCGroupInetIngress, a.ingress}, {ebpf.AttachCGroupInetEgress, a.egress}} {
			l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: at.typ, Program: at.prog})
			if err != nil {
				a.detach()
				b.Fatalf("%s: attach: %v", file, err)
			}
			links = append(links, l)
		}
		a.check = func() error {
			stats := coll.Maps["bw_stats"]
			var per []uint64
			for i := uint32(0); stats != nil && stats.Lookup(i, &per) == nil; i++ {
				for _, v := range per {
					if v != 0 {
						return fmt.Errorf("%s: bw_stats[%d] = %v", file, i, per)
					}
				}
			}
			return nil
		}
		return a
	}
}

// tagSender marks the sender's UID as an owner of attributed sockets, the
// way Attribute does for a socket's owner: by attributing a socket of the
// benchmark's own (closed right after; the mark stays).
func tagSender(dp *bpf.Datapath) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	_, err = dp.Attribute(fd, senderUID, bpf.Attribution{UID: senderUID})
	return err
}

// claimAll makes claimPort a claim-only Xray port and claims every
// connection to it from client's ports lo to hi (the receiver's namespace's
// ephemeral ports) for the first account, the sender's UID tagged as Xray's
// is.
func claimAll(client netip.Addr, lo, hi int) func(*bpf.Datapath) error {
	return func(dp *bpf.Datapath) error {
		if !dp.SupportsServerTagging() {
			return errors.New("claims need Linux 6.0")
		}
		acct, err := dp.Account("bench")
		if err != nil {
			return err
		}
		if acct != bpf.AccountBase {
			return fmt.Errorf("the first account is %#x, want %#x: pins of an earlier run?", acct, bpf.AccountBase)
		}
		if err := dp.Tag(senderUID); err != nil {
			return err
		}
		if err := dp.SetXrayPorts(nil, []uint16{claimPort}); err != nil {
			return err
		}
		for port := lo; port <= hi; port++ {
			if err := dp.Claim(netip.AddrPortFrom(client, uint16(port)), claimPort, acct); err != nil {
				return err
			}
		}
		return nil
	}
}

// attachOurs returns a mode that loads our data plane on cg with the given
// policies, then runs setup. Its check fails if a packet was dropped or went
// uncounted, or if an ID with a budget never had it charged.
func attachOurs(pin string, policies map[uint32]bpf.Policy, setup ...func(*bpf.Datapath) error) func(b *testing.B, cg string) *attachedProgs {
	return func(b *testing.B, cg string) *attachedProgs {
		b.Helper()
		dp, err := bpf.Load(bpf.Config{CgroupPath: cg, PinPath: pin})
		if err != nil {
			b.Fatal(err)
		}
		a := &attachedProgs{}
		a.detach = func() error {
			return errors.Join(a.ingress.Close(), a.egress.Close(), dp.Uninstall())
		}
		fail := func(err error) {
			a.detach()
			b.Fatal(err)
		}
		if len(policies) > 0 {
			if _, err := dp.ReconcilePolicies(policies); err != nil {
				fail(err)
			}
		}
		for _, f := range setup {
			if err := f(dp); err != nil {
				fail(err)
			}
		}
		inID, egID, err := dp.ProgramIDs()
		if err != nil {
			fail(err)
		}
		if a.ingress, err = ebpf.NewProgramFromID(inID); err != nil {
			fail(err)
		}
		if a.egress, err = ebpf.NewProgramFromID(egID); err != nil {
			fail(err)
		}
		a.read = func() error { return dp.EachMoved(func(uint32, bpf.Counters) {}) }
		a.check = func() error {
			s, err := dp.Stats()
			if err != nil {
				return err
			}
			s.XrayClaimed = 0 // the claimed mode's connections
			if s.RateDropped > 0 {
				// A flow faster than 10 Gbit/s met the cap: the
				// packets still ran the whole capped path.
				fmt.Printf("(%d packets over the 10 Gbit/s cap dropped)\n", s.RateDropped)
				s.RateDropped = 0
			}
			if s != (bpf.Stats{}) {
				return fmt.Errorf("the programs dropped or missed packets: %+v", s)
			}
			for id, p := range policies {
				if p.Quota == 0 {
					continue
				}
				used, err := dp.QuotaUsed(id)
				if err != nil {
					return err
				}
				if used == 0 {
					return fmt.Errorf("the budget of %d was never charged", id)
				}
			}
			return nil
		}
		return a
	}
}
