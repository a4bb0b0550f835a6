package bpf

import (
	"errors"
	"fmt"
	"slices"

	"github.com/cilium/ebpf"
)

// Errors of the attribution methods.
var (
	// ErrAttributed means that a socket already has an attribution: the
	// first one stays.
	ErrAttributed = errors.New("socket already attributed")
	// ErrNoServerTagging means that the kernel is older than Linux 6.0 and
	// cannot tag the sockets of SSH server processes.
	ErrNoServerTagging = errors.New("tagging an SSH server's sockets needs Linux 6.0 or newer")
)

// They must match the SOCK_* flags in bwacct.c (SOCK_RELEASED, 1 << 2,
// is the kernel's alone).
const (
	sockForward = 1 << 0
	sockPending = 1 << 1
	sockServer  = 1 << 3
	sockClaim   = 1 << 4
)

// An Attribution says whom a socket counts for, when that is not its owner.
// A connection accepted on an SSH port (SetSSHPorts) starts pending, one
// accepted on an Xray port (SetXrayPorts) waits for its claim: see Pending.
type Attribution struct {
	// UID is the user (or account) the socket's packets count and are
	// enforced for.
	UID uint32
	// Forward marks a forwarded connection of an SSH session: enforced for
	// UID (dropped while UID is blocked) but never counted, because the
	// session's own socket carries and counts the same bytes.
	Forward bool
	// Server marks the server's end of the user's connection (an SSH
	// session's socket; a claimed Xray connection is one too): what it
	// sends is the user's download, so its sent bytes count (and are
	// charged) as the user's Rx and its received ones as Tx.
	Server bool
	// Pending marks a connection whose user is not known yet. One
	// accepted on an SSH port passes its first 64 KiB, kept in Moved; then
	// it is held (its packets dropped) until Attribute names its user, or
	// for 5 s at most, after which it flows unattributed
	// (Stats.SSHUnattributed). One accepted on an Xray port waits for its
	// claim (Claim), kept pending by the kernel as long as it waits and
	// after it was released unclaimed (when it counts for its owner).
	Pending bool
	// Moved is what a pending connection moved so far, in bytes with their
	// IP and TCP headers, as the counters have them: in the socket's own
	// directions, or the user's for a Server attribution.
	Moved Counters
}

// SupportsServerTagging reports whether the kernel runs the program that tags
// the sockets SSH server processes create as a user (AddServers). Without
// it, those forwarded connections count for their owner, as any socket does.
func (d *Datapath) SupportsServerTagging() bool { return d.objs.BwSockCreate != nil }

// serverTaggingKernel reports whether the running kernel is sockCreateKernel
// or newer (or of an unknown numbering: the loader then finds out).
func serverTaggingKernel() bool {
	major, minor, ok := parseRelease(kernelRelease())
	return !ok || major > sockCreateKernel[0] || major == sockCreateKernel[0] && minor >= sockCreateKernel[1]
}

// Attribute makes the socket fd (a descriptor of the calling process, such
// as one pidfd_getfd returned) count for a.UID from its next packet on:
// counted as a.UID's (unless a.Forward), dropped while a.UID is blocked,
// charged to its budget. owner is the socket's owner UID (its file's owner):
// unless it is 0, its packets are marked to be looked up. A socket keeps its
// first attribution for its life: a second one fails with ErrAttributed.
//
// A pending connection can be attributed: moved is what it moved while
// pending (the bytes to credit to a.UID, see Credit), taken at the moment
// its entry is replaced, in the user's directions: for a.Server, RxBytes is
// what the socket sent. Packets counted in the few microseconds between the
// two are lost.
func (d *Datapath) Attribute(fd int, owner uint32, a Attribution) (moved Counters, err error) {
	cur, ok, err := d.SocketAttribution(fd)
	if err != nil {
		return Counters{}, err
	}
	if ok && !cur.Pending {
		return Counters{}, fmt.Errorf("attribute socket to UID %d: %w", a.UID, ErrAttributed)
	}
	if err := d.Tag(owner); err != nil {
		return Counters{}, err
	}
	// Pending bytes start at zero: moved is credited by the caller, and the
	// programs fold only what they find in the entry.
	v := bwacctSockOwner{Uid: a.UID}
	if a.Forward {
		v.Flags |= sockForward
	}
	if a.Server {
		v.Flags |= sockServer
	}
	flag := ebpf.UpdateNoExist
	if ok {
		flag = ebpf.UpdateExist
	}
	err = d.objs.BwSock.Update(int32(fd), v, flag)
	if errors.Is(err, ebpf.ErrKeyExist) || errors.Is(err, ebpf.ErrKeyNotExist) {
		// Tagged or closed meanwhile.
		return Counters{}, fmt.Errorf("attribute socket to UID %d: %w", a.UID, ErrAttributed)
	}
	if err != nil {
		return Counters{}, fmt.Errorf("attribute socket to UID %d: %w", a.UID, err)
	}
	moved = cur.Moved // a pending entry's: the socket's directions
	if a.Server {
		moved.RxBytes, moved.TxBytes = moved.TxBytes, moved.RxBytes
	}
	return moved, nil
}

// Credit adds bytes to uid's counters that its attributed sockets moved
// before they were attributed (their TCP counters at that moment). Credits
// are kept in a pinned map, so they outlive the agent like the counters;
// Counters, CountersOf, EachCounter and EachMoved include them. Like the
// counter reads, it is for one goroutine at a time.
func (d *Datapath) Credit(uid uint32, c Counters) error {
	if c == (Counters{}) {
		return nil
	}
	cur := d.credits[uid]
	cur.RxBytes += c.RxBytes
	cur.RxPackets += c.RxPackets
	cur.TxBytes += c.TxBytes
	cur.TxPackets += c.TxPackets
	v := bwacctCounters{RxBytes: cur.RxBytes, RxPackets: cur.RxPackets, TxBytes: cur.TxBytes, TxPackets: cur.TxPackets}
	if err := d.objs.BwCredit.Update(uid, v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("credit UID %d: %w", uid, err)
	}
	d.credits[uid] = cur
	d.markMoved(uid) // the next EachMoved reads the UID
	return nil
}

// loadCredits reads bw_credit, which an earlier agent may have written.
func (d *Datapath) loadCredits() error {
	d.credits = make(map[uint32]Counters)
	var uid uint32
	var v bwacctCounters
	it := d.objs.BwCredit.Iterate()
	for it.Next(&uid, &v) {
		var c Counters
		c.add(v)
		d.credits[uid] = c
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read credits: %w", err)
	}
	return nil
}

// SocketAttribution returns the attribution of the socket fd, a descriptor of
// the calling process; ok is false for a socket that has none.
func (d *Datapath) SocketAttribution(fd int) (a Attribution, ok bool, err error) {
	var v bwacctSockOwner
	err = d.objs.BwSock.Lookup(int32(fd), &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Attribution{}, false, nil
	}
	if err != nil {
		return Attribution{}, false, fmt.Errorf("read socket attribution: %w", err)
	}
	a = Attribution{
		UID:     v.Uid,
		Forward: v.Flags&sockForward != 0,
		Server:  v.Flags&sockServer != 0,
		Pending: v.Flags&(sockPending|sockClaim) != 0,
		Moved:   Counters{RxBytes: v.PendingRx, TxBytes: v.PendingTx},
	}
	if a.Server {
		a.Moved.RxBytes, a.Moved.TxBytes = a.Moved.TxBytes, a.Moved.RxBytes
	}
	return a, true, nil
}

// Untag removes the socket fd's attribution: it counts for its owner again.
// A socket without one is no error.
func (d *Datapath) Untag(fd int) error {
	err := d.objs.BwSock.Delete(int32(fd))
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("untag socket: %w", err)
	}
	return nil
}

// Tag marks uid as an owner of attributed sockets (bw_tagged): from then on
// (for good: a mark is never cleared) the packets of uid's sockets look their
// socket's attribution up, which costs them a few tens of ns. Attribute
// marks the owner of the socket it attributes; mark the UID Xray runs as
// before its connections wait for their claims (SetXrayPorts): unmarked,
// they count for it as any socket does. UID 0 and UIDs from 2^20 on are
// always looked up and need no mark (a no-op).
func (d *Datapath) Tag(uid uint32) error {
	if uid == 0 || uid >= policyBitsUIDs {
		return nil
	}
	mem, err := d.objs.BwTagged.Memory()
	if err != nil {
		return fmt.Errorf("map tagged marks: %w", err)
	}
	if _, err := mem.WriteAt([]byte{1}, int64(uid)); err != nil {
		return fmt.Errorf("mark UID %d tagged: %w", uid, err)
	}
	return nil
}

// AddServers registers processes (thread group IDs) as SSH server
// processes: every socket one of them creates while it runs as a user is
// that user's forwarded connection (see Attribution.Forward). Register only
// processes whose executable is a server's: a process's name is the user's
// to choose. It fails with ErrNoServerTagging on kernels before 6.0.
func (d *Datapath) AddServers(pids ...uint32) error {
	if d.objs.BwSockCreate == nil {
		return ErrNoServerTagging
	}
	for _, pid := range pids {
		if err := d.objs.BwServers.Update(pid, uint32(0), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("register server process %d: %w", pid, err)
		}
	}
	return nil
}

// RemoveServers forgets server processes, once they exited or run another
// program. A process not registered is no error.
func (d *Datapath) RemoveServers(pids ...uint32) error {
	for _, pid := range pids {
		err := d.objs.BwServers.Delete(pid)
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("forget server process %d: %w", pid, err)
		}
	}
	return nil
}

// Servers returns the registered server processes, sorted.
func (d *Datapath) Servers() ([]uint32, error) {
	var pids []uint32
	var pid, v uint32
	it := d.objs.BwServers.Iterate()
	for it.Next(&pid, &v) {
		pids = append(pids, pid)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read server processes: %w", err)
	}
	slices.Sort(pids)
	return pids, nil
}
