// Package nft keeps the agent's own nftables table: a set of blocked Linux
// UIDs and one rule that drops every packet their sockets send.
//
// With the default names, the table reads in nft(8) syntax:
//
//	table inet bwagent {
//		set blocked_uids {
//			type uid
//			elements = { 1001, 1002 }
//		}
//		chain output {
//			type filter hook output priority filter; policy accept;
//			meta skuid @blocked_uids counter packets 0 bytes 0 drop comment "bwagent: drop blocked UIDs"
//		}
//	}
//
// [Firewall.Reconcile] makes the kernel hold exactly a desired list of UIDs,
// rebuilding the table in one transaction when someone changed or removed
// it. The package touches no other table, and never logs: every problem is
// returned as an error.
//
// All operations need CAP_NET_ADMIN in the network namespace's user
// namespace; without it they fail with an error wrapping [ErrPermission].
package nft

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"syscall"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/myvpn/bwagent/internal/uidguard"
)

// Default names of the objects a Firewall keeps.
const (
	DefaultTable = "bwagent"
	DefaultSet   = "blocked_uids"
	DefaultChain = "output"
)

// maxNameLen is the longest table, set or chain name the kernel accepts:
// NFT_NAME_MAXLEN (256) counts the terminating NUL.
const maxNameLen = 255

var (
	// ErrInvalidName means a table, set or chain name in Config cannot be
	// used in the kernel.
	ErrInvalidName = errors.New("invalid name")

	// ErrProtectedUID means a desired UID must never be blocked: one of
	// uidguard.Always (UID 0 and the overflow UID 65534) or of
	// Config.Protected.
	ErrProtectedUID = errors.New("protected UID")

	// ErrPermission means the kernel refused the request: the caller lacks
	// CAP_NET_ADMIN.
	ErrPermission = errors.New("permission denied (run as root or with CAP_NET_ADMIN)")

	// ErrNotInstalled means the table, set, chain or rule a query needs is
	// not in the kernel, for instance before the first Reconcile or after
	// someone flushed the ruleset.
	ErrNotInstalled = errors.New("not installed")

	// ErrClosed means the Firewall was closed.
	ErrClosed = errors.New("firewall closed")
)

// Config names the table a Firewall keeps and where it lives. The zero
// value is usable.
type Config struct {
	// Table is the name of the inet family table; DefaultTable if empty.
	Table string
	// Set is the name of the set of blocked UIDs; DefaultSet if empty.
	Set string
	// Chain is the name of the output chain; DefaultChain if empty.
	Chain string
	// NetNS is a file descriptor of the network namespace to work in, or 0
	// for the caller's. The caller keeps it open until Close.
	NetNS int
	// Protected lists UIDs that may never be blocked, in addition to the
	// UIDs package uidguard always protects (0 and the overflow UID 65534).
	// bpf.Config.ProtectedUIDs takes the same list, so both enforcers
	// refuse the same UIDs.
	Protected []uint32
}

// Result reports what a Reconcile changed.
type Result struct {
	// Recreated is true if the table was missing or differed from what a
	// Firewall builds, and was rebuilt from scratch. A rebuild resets the
	// rule's counter.
	Recreated bool
	// Added and Removed count the UIDs that entered and left the kernel's
	// set, compared with what it held before; a set that was missing or
	// unusable counts as empty.
	Added, Removed int
}

// Firewall keeps one nftables table over a lasting netlink connection. Its
// methods are safe for concurrent use.
type Firewall struct {
	table     *nftables.Table
	set       string
	chain     string
	protected uidguard.Set

	mu     sync.Mutex // serialises the batches of conn and guards what follows
	conn   *nftables.Conn
	sock   *netlink.Conn // conn's socket, for its buffer sizes
	gen    *netlink.Conn // for ruleset generation queries
	closed bool

	// verifiedGen is a ruleset generation at which the table was found
	// intact and holding exactly verifiedSet; 0 when unknown. While the
	// generation stays the same, nobody changed any table, and Reconcile
	// with the same UIDs has nothing to read or do.
	verifiedGen uint32
	verifiedSet []uint32
}

// New validates cfg and opens a netlink connection in cfg.NetNS. It does not
// change the kernel; call Reconcile for that.
func New(cfg Config) (*Firewall, error) {
	f := &Firewall{
		table:     &nftables.Table{Family: nftables.TableFamilyINet, Name: cmp.Or(cfg.Table, DefaultTable)},
		set:       cmp.Or(cfg.Set, DefaultSet),
		chain:     cmp.Or(cfg.Chain, DefaultChain),
		protected: uidguard.New(cfg.Protected),
	}
	for _, n := range []struct{ kind, name string }{
		{"table", f.table.Name},
		{"set", f.set},
		{"chain", f.chain},
	} {
		if err := checkName(n.name); err != nil {
			return nil, fmt.Errorf("nft: %s %q: %w", n.kind, n.name, err)
		}
	}
	opts := []nftables.ConnOption{
		nftables.AsLasting(),
		nftables.WithSockOptions(func(c *netlink.Conn) error {
			f.sock = c
			return nil
		}),
	}
	if cfg.NetNS != 0 {
		opts = append(opts, nftables.WithNetNSFd(cfg.NetNS))
	}
	conn, err := nftables.New(opts...)
	if err != nil {
		return nil, wrap("open netlink socket", err)
	}
	gen, err := dialGeneration(cfg.NetNS)
	if err != nil {
		conn.CloseLasting()
		return nil, wrap("open netlink socket", err)
	}
	f.conn, f.gen = conn, gen
	return f, nil
}

func checkName(name string) error {
	switch {
	case name == "":
		// Unreachable through Config, which fills in defaults; kept so that
		// the check stands on its own.
		return fmt.Errorf("%w: empty", ErrInvalidName)
	case len(name) > maxNameLen:
		return fmt.Errorf("%w: %d bytes, at most %d allowed", ErrInvalidName, len(name), maxNameLen)
	case slices.Contains([]byte(name), 0):
		return fmt.Errorf("%w: contains a NUL byte", ErrInvalidName)
	}
	return nil
}

// Blocked returns the UIDs in the kernel's set now, sorted. It returns an
// error wrapping ErrNotInstalled if the table or set does not exist.
func (f *Firewall) Blocked() ([]uint32, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, fmt.Errorf("nft: %w", ErrClosed)
	}
	set, err := f.conn.GetSetByName(f.table, f.set)
	if isNotExist(err) {
		return nil, fmt.Errorf("nft: set %s in table inet %s: %w", f.set, f.table.Name, ErrNotInstalled)
	}
	if err != nil {
		return nil, wrap("get set "+f.set, err)
	}
	if !setOK(set) {
		return nil, fmt.Errorf("nft: set %s in table inet %s is not a set of UIDs", f.set, f.table.Name)
	}
	return f.elements(set)
}

// DropCounter returns the packets and bytes the drop rule has dropped since
// it was last created. It returns an error wrapping ErrNotInstalled if the
// chain or the rule does not exist.
func (f *Firewall) DropCounter() (packets, bytes uint64, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return 0, 0, fmt.Errorf("nft: %w", ErrClosed)
	}
	chain, err := f.getChain()
	if err != nil {
		return 0, 0, err
	}
	if chain == nil {
		return 0, 0, fmt.Errorf("nft: chain %s in table inet %s: %w", f.chain, f.table.Name, ErrNotInstalled)
	}
	rules, err := f.conn.GetRules(f.table, chain)
	if err != nil {
		return 0, 0, wrap("list chain "+f.chain, err)
	}
	for _, r := range rules {
		if c := f.dropCounter(r); c != nil {
			return c.Packets, c.Bytes, nil
		}
	}
	return 0, 0, fmt.Errorf("nft: drop rule in chain %s of table inet %s: %w", f.chain, f.table.Name, ErrNotInstalled)
}

// Remove deletes the table with its set, chain and rule, so that no UID is
// blocked any more. A missing table is no error.
func (f *Firewall) Remove() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return fmt.Errorf("nft: %w", ErrClosed)
	}
	const op = "delete table"
	if err := f.reserve(2, 0); err != nil {
		return wrap(op, err)
	}
	// Adding the table first makes the deletion succeed if it is absent.
	//
	//	nft add table inet bwagent; delete table inet bwagent
	f.conn.AddTable(f.table)
	f.conn.DelTable(f.table)
	if err := f.conn.Flush(); err != nil {
		return wrap(op, err)
	}
	return nil
}

// Close closes the netlink connection. It leaves the table in the kernel.
func (f *Firewall) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed = true
	err := errors.Join(f.conn.CloseLasting(), f.gen.Close())
	if err != nil {
		return wrap("close netlink socket", err)
	}
	return nil
}

// Bytes of a batch, for sizing the socket buffers: each set element takes
// 16 bytes (its nested attribute header, the key's nested header, the value
// header and the 4-byte UID), and no other message is longer than 1 KiB,
// even with names of 255 bytes.
const (
	elemBytes = 16
	msgBytes  = 1024
)

// reserve makes the socket's buffers large enough for a batch of msgs
// messages holding elems set elements in all. Call it before buffering the
// batch.
func (f *Firewall) reserve(msgs, elems int) error {
	// The kernel takes a batch in a single sendmsg no larger than the send
	// buffer, and queues one acknowledgement per message in the receive
	// buffer before userspace reads any.
	return f.growBuffers(elems*elemBytes+(msgs+2)*msgBytes, msgs*msgBytes)
}

// growBuffers raises the socket's send and receive buffers to at least snd
// and rcv bytes. It never shrinks them.
func (f *Firewall) growBuffers(snd, rcv int) error {
	if f.sock == nil {
		return nil
	}
	rc, err := f.sock.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		serr = growBuffer(int(fd), unix.SO_SNDBUF, unix.SO_SNDBUFFORCE, snd)
		if serr == nil {
			serr = growBuffer(int(fd), unix.SO_RCVBUF, unix.SO_RCVBUFFORCE, rcv)
		}
	})
	return errors.Join(err, serr)
}

// growBuffer raises the socket buffer opt of fd to hold n bytes, with force
// the option that may pass the system-wide limit.
func growBuffer(fd, opt, force, n int) error {
	// A sendmsg must leave 32 bytes of the send buffer free.
	n += 32
	cur, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, opt)
	if err != nil {
		return os.NewSyscallError("getsockopt", err)
	}
	if cur >= n {
		return nil
	}
	// The kernel doubles the size it is given, for its bookkeeping, and
	// reports the doubled size. The force variant passes
	// net.core.[wr]mem_max; it needs CAP_NET_ADMIN, as the batch does.
	half := (n + 1) / 2
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, force, half) == nil {
		return nil
	}
	return os.NewSyscallError("setsockopt", unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt, half))
}

// wrap adds op to err, and ErrPermission if the kernel refused.
func wrap(op string, err error) error {
	if errors.Is(err, os.ErrPermission) {
		return fmt.Errorf("nft: %s: %w: %w", op, ErrPermission, err)
	}
	return fmt.Errorf("nft: %s: %w", op, err)
}

// isNotExist reports whether err is the kernel's answer for a missing
// object.
func isNotExist(err error) bool {
	return errors.Is(err, syscall.ENOENT)
}
