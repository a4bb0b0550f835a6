// Package bpf loads and drives the agent's kernel data plane: two cgroup-skb
// programs that count every socket's bytes per owner UID in both directions,
// drop the packets of blocked UIDs, and enforce per-UID byte budgets in the
// kernel itself, so a user cannot pass a limit between two agent ticks.
// Sockets can count for another UID than their owner's (an SSH session's,
// see Attribute), or for an account, the ID of a user who is no UID (an
// Xray user, see Account and Claim).
//
// The maps and links are pinned under a bpffs directory. A new Load with the
// same pin directory (an agent restart) reuses the maps, so no counter is
// lost, and swaps the program inside the existing links, so there is never a
// second attachment. Close leaves everything in place; Uninstall removes it.
//
// The C source is bwacct.c; `make generate` compiles it with bpf2go.
package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/internal/uidguard"
)

// Errors returned by Load, the policy methods, ParseEpoch, the account
// registry and Claim. Each is wrapped with the detail and, where there is
// one, the command that fixes it.
var (
	ErrNoCgroup2       = errors.New("no cgroup v2 filesystem is mounted")
	ErrNotCgroup2      = errors.New("not a cgroup v2 directory")
	ErrNotBPFFS        = errors.New("pin directory is not on a bpf filesystem")
	ErrPermission      = errors.New("no permission to load BPF programs")
	ErrIncompatiblePin = errors.New("pinned maps have an incompatible layout")
	ErrKernelTooOld    = errors.New("kernel too old")
	ErrProtectedUID    = errors.New("UID is protected and cannot be blocked or limited")
	ErrInUse           = errors.New("pin directory is in use by another agent")
	ErrInvalidEpoch    = errors.New("not a counter epoch (BOOTID/MAPID)")
	ErrAccountName     = errors.New("an account name is 1 to 128 bytes, none of them NUL")
	ErrAccountsFull    = errors.New("the account registry is full (accounts are never reused; " +
		"`bwagent uninstall` starts a new one, with new counters)")
	ErrInvalidClaim = errors.New("a claim needs a client's address and port, and a local port")
)

// Defaults for Config.
const (
	DefaultPinPath = "/sys/fs/bpf/bwagent"
	DefaultMaxUIDs = 65536
)

// Policy flags; they must match the POLICY_* constants in bwacct.c.
const (
	flagBlocked = 1 << 0
	flagQuotaRx = 1 << 1
	flagQuotaTx = 1 << 2
	flagRateRx  = 1 << 3
	flagRateTx  = 1 << 4
)

// Indexes of bw_stats; they must match the STAT_* constants in bwacct.c.
const (
	statCountersFull = iota
	statDropBlocked
	statDropQuota
	statQuotaFull
	statMax
)

// Config says where the data plane attaches and pins.
type Config struct {
	// CgroupPath is the cgroup v2 directory the programs attach to. Empty
	// means the root of the cgroup v2 hierarchy, which sees every socket.
	CgroupPath string
	// PinPath is the bpffs directory for maps and links. Empty means
	// DefaultPinPath.
	PinPath string
	// MaxUIDs sizes the counter, policy and quota maps. Zero means
	// DefaultMaxUIDs.
	MaxUIDs uint32
	// ProtectedUIDs can never be blocked or given a budget, in addition to
	// the UIDs package uidguard always protects (0 and the overflow UID
	// 65534). nft.Config.Protected takes the same list, so both enforcers
	// refuse the same UIDs.
	ProtectedUIDs []uint32
}

// Counters are one UID's (or account's) totals since the maps were created,
// in the user's directions: Rx is the user's download, Tx their upload. For
// the user's own sockets that is what they received and sent; for a server
// socket attributed to the user (Attribution.Server: an SSH session's, a
// claimed Xray connection) it is the other way round. Bytes include IP and
// transport headers; Packets counts a GSO/GRO batch as its segment count
// (bytes a waiting connection moved before its claim come without packets).
type Counters struct {
	RxBytes, RxPackets, TxBytes, TxPackets uint64
}

// Direction selects which traffic a budget charges.
type Direction uint8

// Directions of traffic, seen from the UID's sockets.
const (
	Rx   Direction = 1 << iota // received (the user's download)
	Tx                         // sent (the user's upload)
	Both = Rx | Tx
)

// Policy is what the kernel enforces for one UID or account.
type Policy struct {
	// Blocked drops every packet the UID sends or receives.
	Blocked bool
	// Quota is the traffic charged to the budget; zero means no budget.
	Quota Direction
	// Ceiling is the budget as an absolute value of QuotaUsed: a packet that
	// would take QuotaUsed above it is dropped. Use Ceiling to derive it
	// from a number of remaining bytes.
	Ceiling uint64
	// QuotaKey, when not zero, is the ID whose charged total (QuotaUsed of
	// QuotaKey) this policy's packets are charged to and compared with
	// Ceiling, instead of the policy's own: an Xray account and an SSH UID
	// of one user share one budget when both policies name the same
	// QuotaKey (one of them, its own ID) and Ceiling. Ignored without a
	// Quota and Rate. Deleting the policy of the ID whose total is shared
	// deletes that total too. It names the speed cap's buckets too:
	// policies with the same QuotaKey (or the ID whose QuotaKey the
	// others name) and Rate share one cap.
	QuotaKey uint32
	// Rate caps the ID's traffic in each of the user's directions; zero:
	// no cap that way.
	Rate Rate
}

// Rate is a pair of speed caps in bytes per second, in the user's
// directions: Rx what they receive (their download), Tx what they send
// (their upload); 0 is no cap. Each is a token bucket in the kernel
// (bw_rates) of Burst(rate) bytes: a packet that does not fit is dropped.
type Rate struct{ Rx, Tx uint64 }

// MaxRate is the largest cap in bytes per second (10 Gbit/s): the kernel's
// bucket arithmetic is exact up to it. Larger caps are taken as MaxRate.
const MaxRate = 1_250_000_000

// MinBurst is the smallest bucket: GSO packets at egress (and GRO ones at
// ingress) reach 64 KiB, and a TCP connection whose window does not fit in
// the bucket stalls for whole seconds (measured: 256 KiB at 10 Mbit/s
// averaged 7.6 Mbit/s; 1 MiB held 10.5 in every second).
const MinBurst = 1 << 20

// Burst returns the bucket size for a cap of rate bytes per second: an
// eighth of a second of it, at least MinBurst.
func Burst(rate uint64) uint64 { return max(MinBurst, min(rate, MaxRate)/8) }

func (p Policy) isZero() bool { return !p.Blocked && p.Quota == 0 && p.Rate == Rate{} }

// rateKey returns the ID whose buckets p's packets use.
func (p Policy) rateKey(id uint32) uint32 {
	if p.QuotaKey != 0 {
		return p.QuotaKey
	}
	return id
}

func (p Policy) encode() bwacctPolicy {
	var v bwacctPolicy
	if p.Blocked {
		v.Flags |= flagBlocked
	}
	if p.Quota&Rx != 0 {
		v.Flags |= flagQuotaRx
	}
	if p.Quota&Tx != 0 {
		v.Flags |= flagQuotaTx
	}
	if p.Rate.Rx != 0 {
		v.Flags |= flagRateRx
	}
	if p.Rate.Tx != 0 {
		v.Flags |= flagRateTx
	}
	if p.Quota != 0 {
		v.Ceiling = p.Ceiling
	}
	if p.Quota != 0 || p.Rate != (Rate{}) {
		v.QuotaKey = p.QuotaKey
	}
	return v
}

func decodePolicy(v bwacctPolicy) Policy {
	p := Policy{Blocked: v.Flags&flagBlocked != 0}
	if v.Flags&flagQuotaRx != 0 {
		p.Quota |= Rx
	}
	if v.Flags&flagQuotaTx != 0 {
		p.Quota |= Tx
	}
	if p.Quota != 0 {
		p.Ceiling = v.Ceiling
	}
	if p.Quota != 0 || v.Flags&(flagRateRx|flagRateTx) != 0 {
		p.QuotaKey = v.QuotaKey
	}
	return p
}

// Stats are the data plane's own event counters, in packets, since the
// maps were created. Each is kept per CPU by the kernel; Stats sums them.
type Stats struct {
	// CountersFull counts packets of UIDs that found the counter map full:
	// they passed uncounted. Raise MaxUIDs if it grows.
	CountersFull uint64
	// DroppedBlocked counts packets dropped, either way, because their UID
	// was blocked.
	DroppedBlocked uint64
	// DroppedQuota counts packets dropped because their UID's budget was
	// spent or could not be tracked (QuotaFull).
	DroppedQuota uint64
	// QuotaFull counts packets of budgeted UIDs dropped because the quota
	// map had no room for their UID; they are in DroppedQuota too.
	QuotaFull uint64
	// SSHHeld counts packets of pending SSH connections held (dropped)
	// while the agent had not attributed them yet (Attribution.Pending).
	SSHHeld uint64
	// SSHUnattributed counts packets of SSH connections that passed
	// unattributed, their hold over: no agent ran, or it could not tell
	// whose session it was.
	SSHUnattributed uint64
	// SSHReleased counts those connections: each whose hold ended before
	// it was attributed.
	SSHReleased uint64
	// XrayClaimed counts the connections accepted on an Xray port that
	// found their claim (Claim) and count for its account since.
	XrayClaimed uint64
	// XrayHeld counts packets of connections on a held Xray port dropped
	// while they waited for their claim, past their first 64 KiB.
	XrayHeld uint64
	// XrayUnclaimed counts the connections on an Xray port whose wait
	// ended, after 5 s, without a claim: no agent ran, Xray logged no
	// such connection, or a proxy in front of Xray hid the client's
	// address. They count for their owner, Xray's UID.
	XrayUnclaimed uint64
	// RateDropped counts packets dropped over a speed cap (Policy.Rate).
	RateDropped uint64
}

// Datapath is a loaded, attached data plane.
type Datapath struct {
	cfg       Config
	cgroupID  uint64
	objs      objects
	links     map[ebpf.AttachType]link.Link
	protected uidguard.Set
	lock      *os.File // flock on the pin directory

	// mu serialises policy changes: the policy bits are read-modify-write.
	mu sync.Mutex
	// eachPolicy's buffers, under mu.
	policyKeys []uint32
	policyVals []bwacctPolicy

	// Reused buffers for batched counter reads.
	keys   []uint32
	values []bwacctCounters

	credits map[uint32]Counters // bw_credit, of which the Datapath is the only writer

	epoch  Epoch    // cached by Epoch
	moved  []byte   // takeMarks' copy of a chunk of bw_moved, bw_xmoved or bw_slot_moved
	marked []uint32 // EachMoved's IDs found marked
	taken  []uint64 // EachMoved's bitmap of the slots whose IDs are marked by ID

	slots slotTable // bw_slots, of which the Datapath is the only writer

	// acctMu protects the following: the cache of bw_accounts, of which
	// the Datapath is the only writer.
	acctMu     sync.Mutex
	accountIDs map[string]uint32
	// accountNames are the names by ID, from AccountBase ("" for an ID
	// not given out): a slice, for IDs are given out in order (16 bytes
	// an account; a map took 40 more). An entry of bw_accounts written by
	// hand far past the others makes it that long: 16 MiB at most.
	accountNames []string
	nextAccount  uint32 // the next free ID

	// claimMu protects the following: the keys and values of ClaimAll
	// and Unclaim, and Unclaim's claims due, kept between their calls.
	claimMu   sync.Mutex
	claimKeys []bwacctClaimKey
	claimVals []uint32
	due       map[bwacctClaimKey]uint32

	// portsMu protects the following: what each setter of bw_ssh_ports
	// wants, by kind (see writePorts).
	portsMu sync.Mutex
	ports   [portKinds]map[uint16]bool
}

// linkPins names the pinned link of each attach type.
var linkPins = map[ebpf.AttachType]string{
	ebpf.AttachCGroupInetIngress:    "link_ingress",
	ebpf.AttachCGroupInetEgress:     "link_egress",
	ebpf.AttachCGroupInet4Connect:   "link_connect4",
	ebpf.AttachCGroupInet6Connect:   "link_connect6",
	ebpf.AttachCGroupInetSockCreate: "link_sock_create",
	ebpf.AttachCGroupSockOps:        "link_sockops",
}

// objects are the loaded maps and programs. The SSH session programs,
// BwSockCreate and BwSockops, and the claim variants of the packet
// programs, BwIngressAttr and BwEgressAttr, are nil on kernels before
// sockCreateKernel, which refuse the session programs' helpers.
type objects struct {
	programs
	BwSockCreate  *ebpf.Program // loaded on its own: see load
	BwSockops     *ebpf.Program
	BwIngressAttr *ebpf.Program // attached instead of BwIngress when loaded
	BwEgressAttr  *ebpf.Program // attached instead of BwEgress when loaded
}

// packet returns the packet programs to attach: the claim variants where
// they are loaded, the plain ones elsewhere.
func (o *objects) packet() (ingress, egress *ebpf.Program) {
	if o.BwIngressAttr != nil && o.BwEgressAttr != nil {
		return o.BwIngressAttr, o.BwEgressAttr
	}
	return o.BwIngress, o.BwEgress
}

// programs are what load's first LoadAndAssign loads: every map and the
// programs that every supported kernel runs.
type programs struct {
	bwacctMaps
	BwIngress  *ebpf.Program `ebpf:"bw_ingress"`
	BwEgress   *ebpf.Program `ebpf:"bw_egress"`
	BwConnect4 *ebpf.Program `ebpf:"bw_connect4"`
	BwConnect6 *ebpf.Program `ebpf:"bw_connect6"`
}

// pinnedMap is a map and the name it is pinned under.
type pinnedMap struct {
	name string
	m    *ebpf.Map
}

// pinned lists every map by its pin name, in the order they are repaired;
// on an empty objects, the names alone (what Uninstall removes).
func (o *objects) pinned() []pinnedMap {
	return []pinnedMap{
		{bwacctMapBwHashCounts, o.BwHashCounts},
		{bwacctMapBwPolicy, o.BwPolicy},
		{bwacctMapBwPolicyBits, o.BwPolicyBits},
		{bwacctMapBwQuotaUsed, o.BwQuotaUsed},
		{bwacctMapBwStats, o.BwStats},
		{bwacctMapBwMoved, o.BwMoved},
		{bwacctMapBwSock, o.BwSock},
		{bwacctMapBwTagged, o.BwTagged},
		{bwacctMapBwServers, o.BwServers},
		{bwacctMapBwCredit, o.BwCredit},
		{bwacctMapBwSshPorts, o.BwSshPorts},
		{bwacctMapBwSstats, o.BwSstats},
		{bwacctMapBwClaims, o.BwClaims},
		{bwacctMapBwAccounts, o.BwAccounts},
		{bwacctMapBwXmoved, o.BwXmoved},
		{bwacctMapBwXstats, o.BwXstats},
		{bwacctMapBwSlots, o.BwSlots},
		{bwacctMapBwSlotCounts, o.BwSlotCounts},
		{bwacctMapBwSlotMoved, o.BwSlotMoved},
		{bwacctMapBwRates, o.BwRates},
		{bwacctMapBwRstats, o.BwRstats},
	}
}

// Close closes every map and program.
func (o *objects) Close() error {
	var errs []error
	for _, p := range []*ebpf.Program{o.BwIngress, o.BwEgress, o.BwConnect4, o.BwConnect6, o.BwSockCreate, o.BwSockops, o.BwIngressAttr, o.BwEgressAttr} {
		if p != nil {
			errs = append(errs, p.Close())
		}
	}
	errs = append(errs, o.bwacctMaps.Close())
	return errors.Join(errs...)
}

// sockCreateKernel is the first Linux release whose cgroup/sock_create
// programs may call bpf_get_current_pid_tgid (6.0): before it, the sockets
// of SSH server processes are not tagged (see Datapath.SupportsServerTagging)
// and no connection waits for its user or its claim. The claim variants of
// the packet programs, which need BPF atomics (5.12), load with them.
var sockCreateKernel = [2]int{6, 0}

// Load loads the programs and maps, reusing pinned maps and links found
// under cfg.PinPath, and makes sure each program is attached exactly once to
// cfg.CgroupPath. The Datapath holds a lock on cfg.PinPath until Close: a
// second Load of the same pins fails with ErrInUse.
//
// Counters is for one goroutine at a time (the agent's loop); the policy
// methods may be called from any goroutine.
func Load(cfg Config) (*Datapath, error) {
	if err := checkKernel(kernelRelease()); err != nil {
		return nil, err
	}
	if cfg.PinPath == "" {
		cfg.PinPath = DefaultPinPath
	}
	if cfg.MaxUIDs == 0 {
		cfg.MaxUIDs = DefaultMaxUIDs
	}
	if cfg.CgroupPath == "" {
		root, err := CgroupV2Root()
		if err != nil {
			return nil, err
		}
		cfg.CgroupPath = root
	}
	if err := checkCgroup2(cfg.CgroupPath); err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Stat(cfg.CgroupPath, &st); err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", cfg.CgroupPath, err)
	}
	if err := os.MkdirAll(cfg.PinPath, 0o700); err != nil {
		return nil, permission(fmt.Errorf("create pin directory: %w", err))
	}
	if err := checkBPFFS(cfg.PinPath); err != nil {
		return nil, err
	}
	lock, err := lockPinDir(cfg.PinPath)
	if err != nil {
		return nil, err
	}
	return load(cfg, st.Ino, lock)
}

// lockPinDir takes an exclusive lock on the pin directory, held until the
// returned file is closed, so two agents never drive the same pins and an
// uninstall never races a running agent.
func lockPinDir(dir string) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, permission(fmt.Errorf("open pin directory: %w", err))
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s (stop it first: systemctl stop bwagent)", ErrInUse, dir)
		}
		return nil, fmt.Errorf("lock pin directory %s: %w", dir, err)
	}
	return f, nil
}

// load loads and attaches the data plane for Load, which holds lock; the
// Datapath keeps it, and a failure releases it.
func load(cfg Config, cgroupID uint64, lock *os.File) (*Datapath, error) {
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
	if err := rlimit.RemoveMemlock(); err != nil {
		lock.Close()
		return nil, permission(fmt.Errorf("raise memlock limit: %w", err))
	}

	spec, err := loadBwacct()
	if err != nil {
		lock.Close()
		return nil, err
	}
	for _, name := range []string{bwacctMapBwHashCounts, bwacctMapBwPolicy, bwacctMapBwQuotaUsed, bwacctMapBwCredit} {
		spec.Maps[name].MaxEntries = cfg.MaxUIDs
	}
	spec.Maps[bwacctMapBwRates].MaxEntries = 2 * cfg.MaxUIDs
	spec.Maps[bwacctMapBwSlotMoved].MaxEntries = (slotCount(cfg) + 7) / 8
	if err := migrateCounterPins(cfg.PinPath, spec.Maps[bwacctMapBwSlotCounts], spec.Maps[bwacctMapBwSlotMoved]); err != nil {
		lock.Close()
		return nil, err
	}

	d := &Datapath{
		cfg:       cfg,
		cgroupID:  cgroupID,
		links:     make(map[ebpf.AttachType]link.Link),
		protected: uidguard.New(cfg.ProtectedUIDs),
		lock:      lock,
	}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: cfg.PinPath}}
	err = spec.LoadAndAssign(&d.objs.programs, opts)
	if err == nil && serverTaggingKernel() {
		// A second load of the same spec: its maps are the pins the first
		// made.
		var sc struct {
			SockCreate  *ebpf.Program `ebpf:"bw_sock_create"`
			Sockops     *ebpf.Program `ebpf:"bw_sockops"`
			IngressAttr *ebpf.Program `ebpf:"bw_ingress_attr"`
			EgressAttr  *ebpf.Program `ebpf:"bw_egress_attr"`
		}
		if err = spec.LoadAndAssign(&sc, opts); err == nil {
			d.objs.BwSockCreate, d.objs.BwSockops = sc.SockCreate, sc.Sockops
			d.objs.BwIngressAttr, d.objs.BwEgressAttr = sc.IngressAttr, sc.EgressAttr
		} else {
			d.objs.Close()
		}
	}
	if err != nil {
		lock.Close()
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("%w under %s (an older bwagent, or a different max_uids): %v; "+
				"run `bwagent uninstall` to remove them (kernel counters restart from zero, "+
				"the agent's saved totals are kept), or set max_uids back", ErrIncompatiblePin, cfg.PinPath, err)
		}
		return nil, permission(fmt.Errorf("load BPF objects: %w", err))
	}
	for _, read := range []func() error{d.loadCredits, d.loadAccounts, d.loadPorts, d.loadSlots} {
		if err := read(); err != nil {
			d.Close()
			return nil, err
		}
	}
	// Attaching for the first time, or finding a previous agent's links,
	// is no repair to report.
	if _, err := d.EnsureAttached(); err != nil {
		d.Close()
		return nil, err
	}
	// After the attach: an earlier agent's programs counted in it.
	if err := d.loadFrozen(); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// permission wraps err with ErrPermission when the kernel refused for lack
// of privilege.
func permission(err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("%w: run as root (or with CAP_BPF and CAP_NET_ADMIN; CAP_SYS_ADMIN before Linux 5.8): %v", ErrPermission, err)
	}
	return err
}

// EnsureAttached checks that every program (packets in and out, connect
// for IPv4 and IPv6, the session programs where they are loaded) is attached
// to the configured
// cgroup through links pinned under PinPath, and that every map is pinned
// there, and repairs whatever is not: a link detached by someone else or
// left over for another cgroup, a removed pin of a link or a map, a removed
// pin directory. It returns what it repaired, one readable item each (for
// instance "egress program re-attached" or "pin bw_hash_counts re-created"),
// and nothing when everything was in place. It is cheap enough to call
// every tick.
//
// A pin re-created from the agent's handle keeps the map, so its counters,
// policies and epoch go on; without the repair the next agent would find no
// pin and start new, empty maps.
func (d *Datapath) EnsureAttached() (repaired []string, err error) {
	if _, err := os.Stat(d.cfg.PinPath); errors.Is(err, os.ErrNotExist) {
		if err := d.recreatePinDir(); err != nil {
			return repaired, err
		}
		repaired = append(repaired, "pin directory "+d.cfg.PinPath+" re-created")
	}
	ingress, egress := d.objs.packet()
	for _, a := range []struct {
		name string
		typ  ebpf.AttachType
		prog *ebpf.Program
	}{
		// One link per attach type: a link that holds the other
		// variant (an agent on another kernel before a reboot, or of an
		// earlier version) gets this one's program.
		{"ingress", ebpf.AttachCGroupInetIngress, ingress},
		{"egress", ebpf.AttachCGroupInetEgress, egress},
		// An agent of an earlier version left no connect links: they are
		// made here, at its first start, as a first attachment.
		{"connect4", ebpf.AttachCGroupInet4Connect, d.objs.BwConnect4},
		{"connect6", ebpf.AttachCGroupInet6Connect, d.objs.BwConnect6},
		{"sock_create", ebpf.AttachCGroupInetSockCreate, d.objs.BwSockCreate},
		{"sockops", ebpf.AttachCGroupSockOps, d.objs.BwSockops},
	} {
		if a.prog == nil {
			continue // not on this kernel
		}
		reattached, repinned, err := d.ensureLink(a.typ, a.prog)
		if reattached {
			repaired = append(repaired, a.name+" program re-attached")
		}
		if repinned {
			repaired = append(repaired, "pin "+linkPins[a.typ]+" re-created")
		}
		if err != nil {
			return repaired, err
		}
	}
	pins := d.objs.pinned()
	if d.slots.frozenMap != nil {
		pins = append(pins, pinnedMap{frozenSlotPin, d.slots.frozenMap})
	}
	for _, m := range pins {
		pin := filepath.Join(d.cfg.PinPath, m.name)
		if _, err := os.Stat(pin); !errors.Is(err, os.ErrNotExist) {
			continue
		}
		// The map remembers its old pin path and would skip re-pinning it.
		if err := m.m.Unpin(); err != nil {
			return repaired, fmt.Errorf("unpin map %s: %w", pin, err)
		}
		if err := m.m.Pin(pin); err != nil {
			return repaired, permission(fmt.Errorf("pin map %s: %w", pin, err))
		}
		repaired = append(repaired, "pin "+m.name+" re-created")
	}
	return repaired, nil
}

// recreatePinDir creates the pin directory again after someone removed it,
// and moves the lock to the new directory, so that a second agent is
// still refused.
func (d *Datapath) recreatePinDir() error {
	if err := os.MkdirAll(d.cfg.PinPath, 0o700); err != nil {
		return permission(fmt.Errorf("re-create pin directory: %w", err))
	}
	lock, err := lockPinDir(d.cfg.PinPath)
	if err != nil {
		return err
	}
	if d.lock != nil {
		d.lock.Close()
	}
	d.lock = lock
	return nil
}

// ensureLink makes sure prog is attached to the cgroup through a link
// pinned under PinPath. It reports whether it re-attached a link that was
// no longer attached here and whether it re-created a removed pin; the
// first attachment and a previous agent's link taken over are neither.
func (d *Datapath) ensureLink(typ ebpf.AttachType, prog *ebpf.Program) (reattached, repinned bool, err error) {
	pin := filepath.Join(d.cfg.PinPath, linkPins[typ])
	_, statErr := os.Stat(pin)
	pinGone := errors.Is(statErr, os.ErrNotExist)
	l := d.links[typ]
	ours := l != nil
	if l == nil {
		pinned, err := link.LoadPinnedLink(pin, nil)
		switch {
		case err == nil:
			// A previous agent's link: put this version's program in it.
			if err := pinned.Update(prog); err != nil {
				pinned.Close()
				return false, false, fmt.Errorf("update pinned link %s: %w", pin, err)
			}
			l = pinned
		case errors.Is(err, os.ErrNotExist):
		default:
			return false, false, permission(fmt.Errorf("load pinned link %s: %w", pin, err))
		}
	}
	if l != nil && !d.attachedHere(l) {
		// Detached behind our back, or attached to another cgroup.
		l.Unpin()
		l.Close()
		l = nil
		reattached = true
	}
	if l == nil {
		var err error
		l, err = link.AttachCgroup(link.CgroupOptions{Path: d.cfg.CgroupPath, Attach: typ, Program: prog})
		if err != nil {
			delete(d.links, typ)
			return false, false, permission(fmt.Errorf("attach %v to %s: %w", typ, d.cfg.CgroupPath, err))
		}
	}
	d.links[typ] = l
	if _, err := os.Stat(pin); errors.Is(err, os.ErrNotExist) {
		// The link remembers its old pin path and would skip re-pinning it.
		l.Unpin()
		if err := l.Pin(pin); err != nil {
			return reattached, false, fmt.Errorf("pin link %s: %w", pin, err)
		}
		repinned = ours && pinGone
	}
	return reattached, repinned, nil
}

// attachedHere reports whether l is a live cgroup link on our cgroup.
func (d *Datapath) attachedHere(l link.Link) bool {
	info, err := l.Info()
	if err != nil {
		return false
	}
	cg := info.Cgroup()
	return cg != nil && cg.CgroupId == d.cgroupID
}

// Close releases the agent's handles. Pins and attachments stay, so the
// kernel keeps counting and enforcing while no agent runs.
func (d *Datapath) Close() error {
	err := d.release()
	if d.lock != nil {
		d.lock.Close()
		d.lock = nil
	}
	return err
}

func (d *Datapath) release() error {
	var errs []error
	for typ, l := range d.links {
		errs = append(errs, l.Close())
		delete(d.links, typ)
	}
	errs = append(errs, d.slots.unmap(), d.objs.Close())
	return errors.Join(errs...)
}

// Uninstall detaches the programs and removes every pin. The kernel's
// counters are gone afterwards.
func (d *Datapath) Uninstall() error {
	for _, l := range d.links {
		l.Unpin()
	}
	err := errors.Join(d.release(), removePins(d.cfg.PinPath))
	if d.lock != nil {
		d.lock.Close()
		d.lock = nil
	}
	return err
}

// Uninstall removes a data plane pinned under pinPath without loading it,
// which also works when the pins have an incompatible layout. Removing the
// last reference to the links detaches the programs. It fails with ErrInUse
// while an agent has the pins loaded.
func Uninstall(pinPath string) error {
	if pinPath == "" {
		pinPath = DefaultPinPath
	}
	lock, err := lockPinDir(pinPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer lock.Close()
	return removePins(pinPath)
}

// removePins removes the pins Load makes under pinPath, and the directory.
func removePins(pinPath string) error {
	entries, err := os.ReadDir(pinPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return permission(fmt.Errorf("uninstall: %w", err))
	}
	known := []string{legacyCounterPin, frozenSlotPin, newSlotPin}
	for _, m := range (&objects{}).pinned() {
		known = append(known, m.name)
	}
	for _, name := range linkPins {
		known = append(known, name)
	}
	var errs []error
	for _, e := range entries {
		if !slices.Contains(known, e.Name()) {
			errs = append(errs, fmt.Errorf("uninstall: leaving unknown pin %s", filepath.Join(pinPath, e.Name())))
			continue
		}
		if err := os.Remove(filepath.Join(pinPath, e.Name())); err != nil {
			errs = append(errs, fmt.Errorf("uninstall: %w", err))
		}
	}
	if len(errs) == 0 {
		if err := os.Remove(pinPath); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("uninstall: %w", err))
		}
	}
	return errors.Join(errs...)
}

// CgroupPath returns the cgroup the programs are attached to.
func (d *Datapath) CgroupPath() string { return d.cfg.CgroupPath }

// PinPath returns the bpffs directory of the pins.
func (d *Datapath) PinPath() string { return d.cfg.PinPath }

// AttachedPrograms returns the IDs of the programs attached to the
// configured cgroup for typ (AttachCGroupInetIngress, AttachCGroupInetEgress,
// AttachCGroupInet4Connect or AttachCGroupInet6Connect), ours and anyone
// else's.
func (d *Datapath) AttachedPrograms(typ ebpf.AttachType) ([]ebpf.ProgramID, error) {
	f, err := os.Open(d.cfg.CgroupPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: typ})
	if err != nil {
		return nil, fmt.Errorf("query %v programs: %w", typ, err)
	}
	ids := make([]ebpf.ProgramID, 0, len(res.Programs))
	for _, p := range res.Programs {
		ids = append(ids, p.ID)
	}
	return ids, nil
}

// ProgramIDs returns the IDs of this data plane's attached ingress and
// egress programs (the claim variants where they are loaded).
func (d *Datapath) ProgramIDs() (ingress, egress ebpf.ProgramID, err error) {
	in, eg := d.objs.packet()
	ii, err := in.Info()
	if err != nil {
		return 0, 0, err
	}
	ei, err := eg.Info()
	if err != nil {
		return 0, 0, err
	}
	ingress, _ = ii.ID()
	egress, _ = ei.ID()
	return ingress, egress, nil
}
