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
// The Go side (maps.go) owns bw_policy and bw_policy_bits; the kernel owns bw_counters,
// bw_quota_used and bw_stats. All maps are pinned by name, so counters outlive
// the agent.

#include <linux/bpf.h>
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
	__u32 word = uid / 8;
	__u64 *w;
	volatile __u8 *b;

	if (uid >= POLICY_BITS_UIDS)
		return;
	w = bpf_map_lookup_elem(&bw_moved, &word);
	if (!w)
		return;
	b = (volatile __u8 *)w + (uid % 8);
	if (!*b)
		*b = 1;
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

	if (segs == 0)
		segs = 1;

	if (uid != 0 && may_have_policy(uid)) {
		struct policy *p = bpf_map_lookup_elem(&bw_policy, &uid);

		if (p) {
			__u32 qbit = egress ? POLICY_QUOTA_TX : POLICY_QUOTA_RX;

			if (p->flags & POLICY_BLOCKED) {
				stat_inc(STAT_DROP_BLOCKED);
				return 0;
			}
			if ((p->flags & qbit) && !charge_quota(uid, p, len)) {
				stat_inc(STAT_DROP_QUOTA);
				return 0;
			}
		}
	}

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
