//go:build ignore

// SPDX-License-Identifier: GPL-2.0
//
// bwacct: per-UID byte accounting, blocking and in-kernel quota for
// cgroup v2 socket traffic.
//
// Two cgroup-skb programs (ingress and egress) run for every packet of every
// socket in the cgroup they are attached to (the cgroup v2 root sees them all).
// For each packet they
//
//   1. find the socket's owner UID (bpf_get_socket_uid),
//   2. if bw_policy_bits says it may have one, look the UID up in bw_policy:
//      a blocked UID, or a UID whose byte budget is spent, has the packet
//      dropped (never UID 0),
//   3. otherwise add the packet to the UID's per-CPU counters in bw_counters.
//
// Two cgroup sock_addr programs (connect4 and connect6) make a blocked UID's
// new connections fail at once: connect() returns EPERM, where a dropped SYN
// would leave the caller waiting for its own timeout (an SSH tunnel's SOCKS
// client, a curl). They look up the calling task's UID, as the packet
// programs look up the socket's.
//
// Sockets can be attributed to another UID than their owner's: an SSH
// server's session socket, accepted by the root listener, belongs to the user
// who logged in on it. Such a socket carries an entry in bw_sock (socket-local
// storage, freed with the socket) naming the UID it counts for, or saying that
// it is a forwarded connection of a session, whose bytes are counted on the
// session's own socket and must not be counted again. The packet programs look
// bw_sock up only for sockets of UID 0 and of UIDs marked in bw_tagged, so other
// packets pay one array read. A cgroup/sock_create program tags the sockets
// that a registered SSH session process (bw_servers) creates while it runs as
// a user: the forwarded connections of OpenSSH and of Dropbear 2025.89 and
// later. A sockops program makes each connection accepted on an SSH port
// (bw_ssh_ports) pending: held after its first 64 KiB until the agent has
// attributed it, so that a login moves next to nothing before its user's
// limit and block apply.
//
// The Go side (maps.go, attrib.go) owns bw_policy, bw_policy_bits and
// bw_servers; the kernel owns bw_counters, bw_quota_used and bw_stats; both
// write bw_sock and bw_tagged (each entry once). All maps are pinned by name,
// so counters and attributions outlive the agent.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char __license[] SEC("license") = "GPL";

// Must match the constants in bpf/datapath.go.
#define POLICY_BLOCKED  (1u << 0) // drop every packet of the UID
#define POLICY_QUOTA_RX (1u << 1) // received bytes are charged to the quota
#define POLICY_QUOTA_TX (1u << 2) // sent bytes are charged to the quota

#define STAT_COUNTERS_FULL 0 // a UID could not get a counter slot
#define STAT_DROP_BLOCKED  1 // packets dropped because the UID is blocked
#define STAT_DROP_QUOTA    2 // packets dropped because the budget is spent
#define STAT_QUOTA_FULL    3 // a UID could not get a quota slot (dropped)
#define STAT_MAX           4 // bw_stats' size: changing it breaks pins of a running install

#define MAX_UIDS 65536 // default; the loader sets max_entries from its config

// bw_sock flags; they must match bpf/attrib.go.
#define SOCK_FORWARD (1u << 0) // a session's forwarded connection: enforce uid's policy, count nothing
#define SOCK_PENDING (1u << 1) // an SSH connection whose user is not known yet: held, see bw_sockops
#define SOCK_RELEASED (1u << 2) // a pending connection whose hold is over: it flows unattributed

// A pending SSH connection may move PENDING_ALLOWANCE bytes (the key
// exchange and the login take a few KiB); beyond, its packets are dropped
// until the agent attributes it or PENDING_NS pass, after which it flows
// unattributed (an agent that is not running must not stall every login).
#define PENDING_ALLOWANCE (64u << 10)
#define PENDING_NS (5ull * 1000 * 1000 * 1000)

#define SSTAT_HELD         0 // packets of pending SSH connections dropped past the allowance
#define SSTAT_UNATTRIBUTED 1 // packets of SSH connections that passed unattributed after PENDING_NS
#define SSTAT_RELEASED     2 // SSH connections whose hold ended unattributed
#define SSTAT_MAX          3

struct counters {
	__u64 rx_bytes;
	__u64 rx_packets;
	__u64 tx_bytes;
	__u64 tx_packets;
};

struct policy {
	__u32 flags;
	__u32 _pad;
	// Absolute ceiling for bw_quota_used[uid]: a packet that would take the
	// charged total above it is dropped.
	__u64 ceiling;
};

// Not preallocated: a per-CPU slot for every possible UID would take
// max_entries x 32 bytes x CPUs (128 MiB on 64 CPUs); entries are made as
// UIDs first send or receive.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, __u32);
	__type(value, struct counters);
	__uint(max_entries, MAX_UIDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct policy);
	__uint(max_entries, MAX_UIDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, MAX_UIDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_quota_used SEC(".maps");

// UIDs below POLICY_BITS_UIDS have a bit in bw_policy_bits, set while they
// may have a bw_policy entry, so that the common packet, of a UID without a
// policy, costs one inlined array read instead of a hash lookup. The agent
// sets a bit before it writes the policy and clears it after deleting it.
// The agent reads the whole bitmap to verify it; memory-mapped, that is a
// 128 KiB copy instead of 16,384 lookups.
#define POLICY_BITS_UIDS (1u << 20)

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, POLICY_BITS_UIDS / 64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_policy_bits SEC(".maps");

// bw_moved has a byte per UID below POLICY_BITS_UIDS (eight to a word),
// set after the UID's counters grew. The agent clears the bytes it finds set
// and then reads those UIDs' counters: a packet counted after the read sets
// its byte again, so the agent reads only the UIDs that moved and misses
// none. A plain byte store; only the first packet after a clear writes.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, POLICY_BITS_UIDS / 8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_moved SEC(".maps");

// sock_owner is a socket's attribution in bw_sock.
struct sock_owner {
	__u32 uid;   // the UID the socket's packets count and are enforced for
	__u32 flags; // SOCK_*
	// While SOCK_PENDING: the bytes moved so far, which the agent credits
	// to the user it attributes the connection to, and the end of the hold.
	__u64 pending_rx;
	__u64 pending_tx;
	__u64 deadline; // bpf_ktime_get_ns
};

// bw_ssh_ports are the TCP ports the SSH servers listen on (host order):
// connections accepted on them are pending until attributed.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16);
	__type(value, __u8);
	__uint(max_entries, 256);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_ssh_ports SEC(".maps");

// bw_sstats are the SSH connections' event counters (bw_stats keeps its size
// for pins of earlier versions).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, SSTAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_sstats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_owner);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_sock SEC(".maps");

// bw_tagged has a byte per UID below POLICY_BITS_UIDS, set once the UID owns
// (or may own) a socket with a bw_sock entry; never cleared. Only those UIDs'
// packets, and UID 0's, look bw_sock up.
// Memory-mapped: the agent sets a byte with a one-byte store, as the kernel
// does, so neither can undo the other's mark in a shared word.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, POLICY_BITS_UIDS / 8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_tagged SEC(".maps");

// bw_credit holds, per UID, bytes that the UID's attributed sockets moved
// before they were attributed, as the agent found them (what a pending
// connection kept in its entry, or a socket's own TCP counters). Only the agent writes it and the programs never read it: the
// agent adds it to the UID's counters when it reads them.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct counters);
	__uint(max_entries, MAX_UIDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_credit SEC(".maps");

// bw_servers holds the thread group IDs of the SSH session processes the
// agent found running as one of its users (by their executable, never by a
// name a user can choose).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_servers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, STAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_stats SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&bw_stats, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline void sstat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&bw_sstats, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

// pending handles a packet of a pending SSH connection: counted in its
// entry within the allowance or after the hold, dropped (0) in between.
static __always_inline int pending(struct sock_owner *o, __u64 len, int egress)
{
	if (o->pending_rx + o->pending_tx + len > PENDING_ALLOWANCE) {
		if (bpf_ktime_get_ns() < o->deadline) {
			sstat_inc(SSTAT_HELD);
			return 0;
		}
		if (!(o->flags & SOCK_RELEASED)) {
			o->flags |= SOCK_RELEASED;
			sstat_inc(SSTAT_RELEASED);
		}
		sstat_inc(SSTAT_UNATTRIBUTED);
	}
	if (egress)
		__sync_fetch_and_add(&o->pending_tx, len);
	else
		__sync_fetch_and_add(&o->pending_rx, len);
	return 1;
}

// byte_of returns uid's byte in a map of a byte per UID (bw_moved, bw_tagged),
// or NULL above POLICY_BITS_UIDS.
static __always_inline volatile __u8 *byte_of(void *map, __u32 uid)
{
	__u32 word = uid / 8;
	__u64 *w;

	if (uid >= POLICY_BITS_UIDS)
		return 0;
	w = bpf_map_lookup_elem(map, &word);
	if (!w)
		return 0;
	return (volatile __u8 *)w + (uid % 8);
}

// charge_quota adds len to the UID's charged total and reports whether the
// packet fits under the ceiling. A packet that does not fit is taken back out,
// so bw_quota_used only ever holds bytes that went through.
//
// The check uses only add-and-read (no fetch atomics, so any 5.7+ kernel
// runs it): a packet passes when the total it observes right after its own add,
// which includes every packet added before it, is within the ceiling. The last
// packet to pass therefore saw every passed byte: the sum of passed packets
// never exceeds the ceiling. Concurrent packets on other CPUs can only make
// each other fail, never overshoot.
static __always_inline int charge_quota(__u32 uid, const struct policy *p, __u64 len)
{
	__u64 *used = bpf_map_lookup_elem(&bw_quota_used, &uid);

	if (!used) {
		__u64 zero = 0;

		bpf_map_update_elem(&bw_quota_used, &uid, &zero, BPF_NOEXIST);
		used = bpf_map_lookup_elem(&bw_quota_used, &uid);
		if (!used) {
			stat_inc(STAT_QUOTA_FULL);
			return 0; // fail closed: a quota we cannot track is spent
		}
	}
	__sync_fetch_and_add(used, len);
	if (*used > p->ceiling) {
		__sync_fetch_and_add(used, -len);
		return 0;
	}
	return 1;
}

static __always_inline void mark_moved(__u32 uid)
{
	volatile __u8 *b = byte_of(&bw_moved, uid);

	if (b && !*b)
		*b = 1;
}

// may_be_tagged reports whether uid's sockets may have a bw_sock entry.
static __always_inline int may_be_tagged(__u32 uid)
{
	volatile __u8 *b;

	if (uid == 0 || uid >= POLICY_BITS_UIDS)
		return 1;
	b = byte_of(&bw_tagged, uid);
	return b && *b;
}

// is_reset reports whether a packet is a TCP reset. Resets pass a block:
// they carry no data, and the reset of a cut connection is how its other end
// learns at once that it is gone. Only packets about to be dropped are
// looked at.
static __always_inline int is_reset(struct __sk_buff *skb)
{
	__u8 b[2];
	__u32 off;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, 0, &b[0], 1) || bpf_skb_load_bytes(skb, 9, &b[1], 1))
			return 0;
		if (b[1] != IPPROTO_TCP)
			return 0;
		off = (b[0] & 0xf) * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 6, &b[1], 1) || b[1] != IPPROTO_TCP)
			return 0;
		off = 40;
	} else {
		return 0;
	}
	if (bpf_skb_load_bytes(skb, off + 13, &b[0], 1))
		return 0;
	return b[0] & 0x04; // RST
}

static __always_inline int may_have_policy(__u32 uid)
{
	__u32 word = uid / 64;
	__u64 *bits;

	if (uid >= POLICY_BITS_UIDS)
		return 1;
	bits = bpf_map_lookup_elem(&bw_policy_bits, &word);
	return !bits || (*bits >> (uid % 64)) & 1;
}

static __always_inline int account(struct __sk_buff *skb, int egress)
{
	__u32 uid = bpf_get_socket_uid(skb);
	__u64 len = skb->len;
	__u64 segs = skb->gso_segs;
	int count = 1;

	if (segs == 0)
		segs = 1;

	if (may_be_tagged(uid)) {
		// bpf_sk_storage_get itself answers NULL for a socket that is not
		// a full one (a request or time-wait socket): no bpf_sk_fullsock
		// call first, which would cost as much again.
		struct bpf_sock *sk = skb->sk;

		if (sk) {
			struct sock_owner *o = bpf_sk_storage_get(&bw_sock, sk, 0, 0);

			if (o) {
				if (o->flags & SOCK_PENDING)
					return pending(o, len, egress);
				uid = o->uid;
				count = !(o->flags & SOCK_FORWARD);
			}
		}
	}

	if (uid != 0 && may_have_policy(uid)) {
		struct policy *p = bpf_map_lookup_elem(&bw_policy, &uid);

		if (p) {
			__u32 qbit = egress ? POLICY_QUOTA_TX : POLICY_QUOTA_RX;

			if (p->flags & POLICY_BLOCKED) {
				if (is_reset(skb))
					return 1;
				stat_inc(STAT_DROP_BLOCKED);
				return 0;
			}
			if (count && (p->flags & qbit) && !charge_quota(uid, p, len)) {
				if (is_reset(skb))
					return 1;
				stat_inc(STAT_DROP_QUOTA);
				return 0;
			}
		}
	}

	if (!count)
		return 1;

	struct counters *c = bpf_map_lookup_elem(&bw_counters, &uid);

	if (!c) {
		struct counters zero = {};

		bpf_map_update_elem(&bw_counters, &uid, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&bw_counters, &uid);
		if (!c) {
			stat_inc(STAT_COUNTERS_FULL);
			return 1;
		}
	}
	// Per-CPU values, but a program in process context can be preempted by
	// another on the same CPU: atomic adds keep every byte.
	if (egress) {
		__sync_fetch_and_add(&c->tx_bytes, len);
		__sync_fetch_and_add(&c->tx_packets, segs);
	} else {
		__sync_fetch_and_add(&c->rx_bytes, len);
		__sync_fetch_and_add(&c->rx_packets, segs);
	}
	mark_moved(uid); // after the add: see bw_moved
	return 1;
}

SEC("cgroup_skb/ingress")
int bw_ingress(struct __sk_buff *skb)
{
	return account(skb, 0);
}

SEC("cgroup_skb/egress")
int bw_egress(struct __sk_buff *skb)
{
	return account(skb, 1);
}

// blocked reports whether uid has a blocking policy.
static __always_inline int blocked(__u32 uid)
{
	struct policy *p;

	if (uid == 0 || !may_have_policy(uid))
		return 0;
	p = bpf_map_lookup_elem(&bw_policy, &uid);
	return p && (p->flags & POLICY_BLOCKED);
}

// allow_connect refuses a blocked UID's connect() with EPERM (return 0).
static __always_inline int allow_connect(void)
{
	__u32 uid = (__u32)bpf_get_current_uid_gid();

	return !blocked(uid);
}

SEC("cgroup/connect4")
int bw_connect4(struct bpf_sock_addr *ctx)
{
	return allow_connect();
}

SEC("cgroup/connect6")
int bw_connect6(struct bpf_sock_addr *ctx)
{
	return allow_connect();
}

// bw_sock_create tags the sockets a registered SSH server process creates
// while it runs as a user (uid != 0): they are the session's forwarded
// connections, whose bytes the session's own socket carries and counts. They
// stay enforced: a blocked user's forwarded packets are dropped too. A
// process that runs as root (Dropbear before 2025.89) makes root's sockets,
// which are never counted. Needs Linux 6.0 (current task helpers in
// cgroup/sock programs); the loader leaves it out before.
SEC("cgroup/sock_create")
int bw_sock_create(struct bpf_sock *sk)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 uid;
	struct sock_owner *o;
	volatile __u8 *b;

	if (!bpf_map_lookup_elem(&bw_servers, &tgid))
		return 1;
	uid = (__u32)bpf_get_current_uid_gid();
	if (uid == 0)
		return 1;
	b = byte_of(&bw_tagged, uid);
	if (b && !*b)
		*b = 1; // before the entry: a packet that sees the entry was looked up
	o = bpf_sk_storage_get(&bw_sock, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (o) {
		o->uid = uid;
		o->flags = SOCK_FORWARD;
	}
	return 1;
}

// bw_sockops makes a connection accepted on an SSH server's port pending
// (SOCK_PENDING): its first PENDING_ALLOWANCE bytes pass and are kept in its
// entry; then it is held until the agent has found whose session it is and
// attributed it (moving those bytes to the user), or for PENDING_NS at most.
// So a session's bytes are all counted for its user, and a user's new login
// moves next to nothing before their limit and block apply to it.
SEC("sockops")
int bw_sockops(struct bpf_sock_ops *ops)
{
	struct bpf_sock *sk;
	struct sock_owner *o;
	__u16 port;

	if (ops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	port = (__u16)ops->local_port;
	if (!bpf_map_lookup_elem(&bw_ssh_ports, &port))
		return 1;
	sk = ops->sk;
	if (!sk)
		return 1;
	o = bpf_sk_storage_get(&bw_sock, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (o && !o->flags && !o->uid) {
		o->deadline = bpf_ktime_get_ns() + PENDING_NS;
		o->flags = SOCK_PENDING;
	}
	return 1;
}
