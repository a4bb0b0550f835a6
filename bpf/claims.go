package bpf

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
)

// Kinds of port in bw_ssh_ports; they must match the PORT_* constants in
// bwacct.c.
const (
	portSSH       = 1 // SSH: accepted connections are pending
	portXrayHold  = 2 // Xray: held until claimed
	portXrayClaim = 3 // Xray: claim only, never held
	portKinds     = 4 // the size of Datapath.ports (kind 0 unused)
)

// Claim says that the TCP connection from client to local port localPort,
// accepted on an Xray port (SetXrayPorts), is account's (see Account): the
// packet programs look it up on the connection's next packet, count and
// enforce the connection for account from then on, and fold into account's
// counters what it moved while it waited, as a server socket's (see
// Attribution.Server): what Xray sends the client is the account's Rx.
//
// A claim must come within the connection's 5 s wait (Stats.XrayUnclaimed
// counts those it missed); a claim that no connection takes stays until
// newer ones push it out of the kernel's table (65,536 claims, least
// recently used first). An IPv4 client is stored IPv4-mapped, as a
// dual-stack listener sees it; client must be a valid, specified address
// with a port, and localPort not zero, or the error wraps ErrInvalidClaim.
func (d *Datapath) Claim(client netip.AddrPort, localPort uint16, account uint32) error {
	_, err := d.ClaimAll([]Claim{{Client: client, LocalPort: localPort, Account: account}})
	return err
}

// maxClaimBatch is the most claims whose keys and values ClaimAll keeps
// for its next call, and how many Unclaim reads from the kernel a call.
const maxClaimBatch = 4096

// A Claim is one connection's claim (see [Datapath.Claim]).
type Claim struct {
	Client    netip.AddrPort
	LocalPort uint16
	Account   uint32
}

// ClaimAll writes the claims cs, as Claim does each, in one system call
// for all of them (BPF_MAP_UPDATE_BATCH). It writes them in order and stops
// at the first it cannot write (an invalid one, wrapping ErrInvalidClaim,
// or one the kernel refused), returning how many it wrote and the error:
// the caller can go on after that one.
func (d *Datapath) ClaimAll(cs []Claim) (int, error) {
	d.claimMu.Lock()
	defer d.claimMu.Unlock()
	keys := d.claimKeys[:0]
	var bad error
	for _, c := range cs {
		if !c.Client.IsValid() || c.Client.Addr().IsUnspecified() || c.Client.Port() == 0 || c.LocalPort == 0 {
			bad = fmt.Errorf("%w: %v to port %d", ErrInvalidClaim, c.Client, c.LocalPort)
			break
		}
		keys = append(keys, bwacctClaimKey{Addr: c.Client.Addr().As16(), ClientPort: c.Client.Port(), LocalPort: c.LocalPort})
	}
	if len(keys) == 0 {
		return 0, bad
	}
	vals := d.claimVals[:0]
	for i := range keys {
		vals = append(vals, cs[i].Account)
	}
	// Kept for the next batch, unless a burst made them large.
	if cap(keys) <= maxClaimBatch {
		d.claimKeys, d.claimVals = keys, vals
	}
	// bpftool map update pinned .../bw_claims key ... value ..., for
	// each claim, in one BPF_MAP_UPDATE_BATCH.
	n, err := d.objs.BwClaims.BatchUpdate(keys, vals, nil)
	if err != nil {
		c := cs[min(n, len(cs)-1)]
		return n, fmt.Errorf("claim %v to port %d for %d: %w", c.Client, c.LocalPort, c.Account, err)
	}
	return n, bad
}

// SetSSHPorts makes the ports the SSH servers listen on those whose
// accepted connections start pending (see Attribution.Pending). It owns the
// SSH ports alone and leaves SetXrayPorts' alone; a port that both name is
// an SSH port. It needs the session programs (SupportsServerTagging):
// without them it does nothing.
func (d *Datapath) SetSSHPorts(ports []uint16) error {
	return d.setPorts(ports, nil, nil, true)
}

// SetXrayPorts makes the ports Xray listens on those whose accepted
// connections wait for their claim (Claim). On a hold port a connection
// passes its first 64 KiB, kept to be folded into its account, and is then
// held (its packets dropped) until its claim comes, or for 5 s at most; on
// a claim-only port it is never held, and what it moves before its claim is
// kept likewise. A connection from a loopback address (a local proxy in
// front of Xray, whose log then names another address) is never held. One
// whose wait ends unclaimed counts for its owner, Xray's UID, as before.
// Tag Xray's UID first (UID 0 needs nothing): the packets of an unmarked
// UID never look their socket up. A port in both lists is a hold port. It
// owns the Xray ports alone and leaves SetSSHPorts' alone: a port that both
// name is an SSH port. It needs the session programs (SupportsServerTagging):
// without them it does nothing.
func (d *Datapath) SetXrayPorts(hold, claimOnly []uint16) error {
	return d.setPorts(nil, hold, claimOnly, false)
}

// setPorts replaces the SSH ports (ssh) or the Xray ones (the others),
// then writes bw_ssh_ports.
func (d *Datapath) setPorts(ssh, hold, claimOnly []uint16, isSSH bool) error {
	if d.objs.BwSockops == nil {
		return nil
	}
	set := func(ports []uint16) map[uint16]bool {
		m := make(map[uint16]bool, len(ports))
		for _, p := range ports {
			m[p] = true
		}
		return m
	}
	d.portsMu.Lock()
	defer d.portsMu.Unlock()
	if isSSH {
		d.ports[portSSH] = set(ssh)
	} else {
		d.ports[portXrayHold], d.ports[portXrayClaim] = set(hold), set(claimOnly)
	}
	return d.writePorts()
}

// writePorts makes bw_ssh_ports hold what both setters want, an SSH port
// over an Xray one and a hold port over a claim-only one: the only writer of
// bw_ssh_ports. d.portsMu must be held.
func (d *Datapath) writePorts() error {
	want := make(map[uint16]uint8)
	for kind := portKinds - 1; kind >= portSSH; kind-- { // the last kind written wins
		for p := range d.ports[kind] {
			want[p] = uint8(kind)
		}
	}
	have := make(map[uint16]uint8)
	var port uint16
	var kind uint8
	it := d.objs.BwSshPorts.Iterate()
	for it.Next(&port, &kind) {
		have[port] = kind
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read ports: %w", err)
	}
	for p := range have {
		if _, ok := want[p]; !ok {
			if err := d.objs.BwSshPorts.Delete(p); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("remove port %d: %w", p, err)
			}
		}
	}
	for p, k := range want {
		if cur, ok := have[p]; ok && cur == k {
			continue
		}
		if err := d.objs.BwSshPorts.Update(p, k, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("add port %d: %w", p, err)
		}
	}
	return nil
}

// loadPorts reads bw_ssh_ports, which an earlier agent may have written,
// as what each setter wants until it says otherwise. Kinds this version
// does not know are SSH ports, as the kernel takes them.
func (d *Datapath) loadPorts() error {
	d.portsMu.Lock()
	defer d.portsMu.Unlock()
	for kind := range d.ports {
		d.ports[kind] = make(map[uint16]bool)
	}
	var port uint16
	var kind uint8
	it := d.objs.BwSshPorts.Iterate()
	for it.Next(&port, &kind) {
		switch kind {
		case portXrayHold, portXrayClaim:
			d.ports[kind][port] = true
		default:
			d.ports[portSSH][port] = true
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read ports: %w", err)
	}
	return nil
}

// Unclaim removes those of the claims cs that no connection took yet: a
// claim should not outlive the connection it was written for, or a later
// connection from the same address and port would be counted for its
// account. The kernel deletes each claim a connection takes, so it reads
// the claims still there in one pass (BPF_MAP_LOOKUP_BATCH) and deletes
// only those of cs among them that name the same account: the claims
// taken, all but a few, cost no system call each (one each was 1,000
// system calls a tick with a tenth of 10,000 Xray users moving, 2% of the
// agent's CPU), and a claim
// written again since for another account stays. (One written again for
// the same account, from the same address and port, goes with the old.)
// It returns how many it removed, and the errors of those it could not;
// an invalid claim, never written, is none of them.
func (d *Datapath) Unclaim(cs []Claim) (int, error) {
	if len(cs) == 0 {
		return 0, nil
	}
	d.claimMu.Lock()
	defer d.claimMu.Unlock()
	// The claims due by key, in a map kept for the next call unless a
	// burst made it large: its size follows cs, not the kernel's table.
	due := d.due
	if due == nil {
		due = make(map[bwacctClaimKey]uint32, len(cs))
	}
	defer func() {
		if len(due) > maxClaimBatch {
			d.due = nil // a burst's
			return
		}
		clear(due)
		d.due = due
	}()
	for _, c := range cs {
		due[bwacctClaimKey{Addr: c.Client.Addr().As16(), ClientPort: c.Client.Port(), LocalPort: c.LocalPort}] = c.Account
	}
	if cap(d.claimKeys) < maxClaimBatch {
		d.claimKeys, d.claimVals = make([]bwacctClaimKey, maxClaimBatch), make([]uint32, maxClaimBatch)
	}
	keys, vals := d.claimKeys[:maxClaimBatch], d.claimVals[:maxClaimBatch]
	// bpftool map dump pinned .../bw_claims, maxClaimBatch entries a
	// BPF_MAP_LOOKUP_BATCH; the claims found due are deleted after it.
	var gone []bwacctClaimKey
	var cursor ebpf.MapBatchCursor
	for done := false; !done; {
		n, err := d.objs.BwClaims.BatchLookup(&cursor, keys, vals, nil)
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			done = true // the end
		case err != nil:
			return 0, fmt.Errorf("read claims: %w", err)
		}
		for i := range n {
			if acct, ok := due[keys[i]]; ok && acct == vals[i] {
				gone = append(gone, keys[i])
			}
		}
	}
	removed := 0
	var errs []error
	for _, k := range gone {
		// bpftool map delete pinned .../bw_claims key ...
		switch err := d.objs.BwClaims.Delete(k); {
		case err == nil:
			removed++
		case !errors.Is(err, ebpf.ErrKeyNotExist): // taken since
			errs = append(errs, fmt.Errorf("unclaim %v to port %d: %w",
				netip.AddrPortFrom(netip.AddrFrom16(k.Addr).Unmap(), k.ClientPort), k.LocalPort, err))
		}
	}
	return removed, errors.Join(errs...)
}
