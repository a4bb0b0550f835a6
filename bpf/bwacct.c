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
//   3. otherwise add the packet to the UID's counters: in
//      bw_slot_counts if the agent gave the UID a slot (bw_slots), in
//      bw_hash_counts otherwise.
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
// Xray users are no UIDs: each has an *account*, an ID from ACCOUNT_BASE on
// (bw_accounts names them), counted and enforced as a UID is. A connection
// accepted on an Xray port (bw_ssh_ports, kinds 2 and 3) waits for its
// *claim* (SOCK_CLAIM): the agent reads Xray's access log and writes to
// bw_claims that the connection from client IP:PORT to local port P is
// account A's; the packet programs look the claim up and, once they find
// it, count and enforce the connection for A from then on, the bytes it
// moved while it waited included.
//
// Server sockets (SOCK_SERVER: an SSH session's, a claimed Xray
// connection) are the server's end of the user's connection: what they send
// is the user's download. Their egress is counted and charged as the user's
// rx, their ingress as tx.
//
// The packet programs come in two variants built from one account(): the
// plain ones (bw_ingress, bw_egress) run on every kernel from 5.7; the
// claim ones (bw_ingress_attr, bw_egress_attr) also turn claims into
// attributions and fold pending bytes with atomic exchanges (Linux 5.12).
// The loader attaches the claim variants where it loads the session
// programs (Linux 6.0), which alone make pending and claim entries.
//
// The Go side (maps.go, attrib.go, accounts.go, slots.go) owns bw_policy,
// bw_policy_bits, bw_servers, bw_ssh_ports, bw_credit, bw_accounts and
// bw_slots; the kernel owns bw_hash_counts, bw_slot_counts, bw_quota_used
// and the stats maps; both write bw_sock, bw_tagged, bw_moved and bw_xmoved
// (a byte each, or an entry once), and bw_claims (the agent adds, the kernel
// deletes what it used). All maps are pinned by name, so counters, accounts
// and attributions outlive the agent.

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
#define POLICY_RATE_RX  (1u << 3) // received bytes are capped: bw_rates[{key, 0}]
#define POLICY_RATE_TX  (1u << 4) // sent bytes are capped: bw_rates[{key, 1}]

#define STAT_COUNTERS_FULL 0 // a UID could not get a counter slot
#define STAT_DROP_BLOCKED  1 // packets dropped because the UID is blocked
#define STAT_DROP_QUOTA    2 // packets dropped because the budget is spent
#define STAT_QUOTA_FULL    3 // a UID could not get a quota slot (dropped)
#define STAT_MAX           4 // bw_stats' size: changing it breaks pins of a running install

#define MAX_UIDS 65536 // default; the loader sets max_entries from its config

#define AF_INET  2
#define AF_INET6 10

// bw_sock flags; they must match bpf/attrib.go.
#define SOCK_FORWARD (1u << 0) // a session's forwarded connection: enforce uid's policy, count nothing
#define SOCK_PENDING (1u << 1) // an SSH connection whose user is not known yet: held, see bw_sockops
#define SOCK_RELEASED (1u << 2) // a pending or claim connection whose wait is over: it flows unattributed
#define SOCK_SERVER (1u << 3) // the server's end of the user's connection: directions swapped
#define SOCK_CLAIM (1u << 4) // an Xray connection waiting for its claim in bw_claims

// bw_ssh_ports' kinds of port; they must match bpf/attrib.go.
#define PORT_SSH 1 // SSH: connections are SOCK_PENDING (any unknown kind too)
#define PORT_XRAY_HOLD 2 // Xray: SOCK_CLAIM|SOCK_PENDING, claim-only from a loopback peer
#define PORT_XRAY_CLAIM 3 // Xray: SOCK_CLAIM, never held

// Accounts (Xray users) are IDs from ACCOUNT_BASE on, MAX_ACCOUNTS of them;
// they must match bpf/accounts.go. systemd documents UIDs from 2^31 on as
// never allocated, so no account is ever a real UID.
#define ACCOUNT_BASE 0xC0000000u
#define MAX_ACCOUNTS (1u << 20)
#define ACCOUNT_NAME_MAX 128

// A pending SSH connection may move PENDING_ALLOWANCE bytes (the key
// exchange and the login take a few KiB); beyond, its packets are dropped
// until the agent attributes it or PENDING_NS pass, after which it flows
// unattributed (an agent that is not running must not stall every login).
#define PENDING_ALLOWANCE (64u << 10)
#define PENDING_NS (5ull * 1000 * 1000 * 1000)

#define RSTAT_DROPPED 0 // packets dropped over a speed cap
#define RSTAT_MAX     1

#define NSEC_PER_SEC 1000000000ull

#define SSTAT_HELD         0 // packets of pending SSH connections dropped past the allowance
#define SSTAT_UNATTRIBUTED 1 // packets of SSH connections that passed unattributed after PENDING_NS
#define SSTAT_RELEASED     2 // SSH connections whose hold ended unattributed
#define SSTAT_MAX          3

#define XSTAT_CLAIMED   0 // Xray connections that found their claim
#define XSTAT_HELD      1 // packets of Xray connections dropped while they waited for their claim
#define XSTAT_UNCLAIMED 2 // Xray connections whose wait ended without a claim
#define XSTAT_MAX       3

struct counters {
	__u64 rx_bytes;
	__u64 rx_packets;
	__u64 tx_bytes;
	__u64 tx_packets;
};

struct policy {
	__u32 flags;
	// The bw_quota_used entry this policy's packets are charged to, and the
	// key of its bw_rates buckets: 0 for the policy's own ID, else another
	// ID's (an Xray account and an SSH UID of one user share one budget
	// and one speed cap).
	__u32 quota_key;
	// Absolute ceiling for bw_quota_used[quota_key]: a packet that would
	// take the charged total above it is dropped.
	__u64 ceiling;
};

// rate_key names a speed cap's bucket in bw_rates: an ID (a policy's own,
// or its quota_key) and a direction in the user's terms (0: what they
// receive, their download; 1: what they send, their upload).
struct rate_key {
	__u32 id;
	__u32 tx;
};

// bucket is a token bucket: a speed cap of rate bytes per second with room
// for depth. Tokens are kept in nanobytes (bytes x 10^9), so that adding
// elapsed_ns x rate is exact however short the time between two packets
// (whole bytes would lose a fraction at every packet). The agent writes
// rate and depth (and starts tokens and last at zero: a changed cap
// starts with its bucket refilled); the programs alone change tokens and
// last, under the lock.
struct bucket {
	struct bpf_spin_lock lock;
	__u32 _pad;
	__u64 rate;   // bytes per second, at most 1.25 x 10^9 (10gbit)
	__u64 depth;  // nanobytes
	__s64 tokens; // nanobytes
	__u64 last;   // bpf_ktime_get_ns of the last refill
};

// bw_rates holds the speed caps: two buckets per capped ID at most. Its
// packets look it up only when their policy's flags say so
// (POLICY_RATE_RX, POLICY_RATE_TX), so the packets of IDs without a cap
// never pay for it.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct rate_key);
	__type(value, struct bucket);
	__uint(max_entries, 2 * MAX_UIDS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_rates SEC(".maps");

// bw_rstats are the speed caps' event counters (RSTAT_*).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, RSTAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_rstats SEC(".maps");

// bw_hash_counts holds the counters of IDs without a slot (see bw_slots),
// and what an ID with one moved before it got it. Not preallocated: a
// per-CPU entry for every possible UID would take max_entries x 32 bytes x
// CPUs (128 MiB on 64 CPUs); entries are made as UIDs first send or receive.
// Agents before slots pinned it as bw_counters, holding every count; the
// loader renames that pin (bpf/slots.go), so that an agent of such a
// version, started after this one, finds no bw_counters and starts new
// counters, a new epoch, instead of reading a part of the counts.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__type(key, __u32);
	__type(value, struct counters);
	__uint(max_entries, MAX_UIDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_hash_counts SEC(".maps");

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

// byte_word serves the maps of a byte per UID and bw_xmoved alike.
_Static_assert(POLICY_BITS_UIDS == MAX_ACCOUNTS, "a byte per UID and per account: one size");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, POLICY_BITS_UIDS / 64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_policy_bits SEC(".maps");

// bw_moved has a byte per UID below POLICY_BITS_UIDS (eight to a word),
// set after the UID's counters grew in bw_hash_counts (in its slot, it is
// the slot's byte in bw_slot_moved). The agent clears the bytes it finds
// set and then reads those UIDs' counters: a packet counted after the read
// sets its byte again, so the agent reads only the UIDs that moved and
// misses none. A plain byte store; only the first packet after a clear
// writes.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, POLICY_BITS_UIDS / 8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_moved SEC(".maps");

// bw_xmoved is bw_moved for accounts: a byte per account index (the account
// ID minus ACCOUNT_BASE).
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, MAX_ACCOUNTS / 8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_xmoved SEC(".maps");

// Slots: the common packet's counters without a hash lookup. The agent gives
// each UID below POLICY_BITS_UIDS and each account whose counters it reads a
// slot, once (a slot is never reused while the maps live), and writes it to
// bw_slots; from then on the programs count the ID's packets in
// bw_slot_counts[slot], an array whose lookup the verifier of recent
// kernels turns into an inlined address computation (seen in the
// translated program on 6.18; older ones call a helper that does the same),
// where a lookup in bw_hash_counts is a call that hashes the key and walks
// a bucket (25-55 ns here, a third of what a packet cost). An ID's counters
// are the sum of both maps: what it moved before its slot stays in
// bw_hash_counts. Slot 0 is none; IDs beyond the slots count in
// bw_hash_counts alone.
//
// bw_slot_counts is one array shared by the CPUs, not a per-CPU one: the
// agent maps it and reads a moved slot's counters with four loads, where a
// per-CPU array takes a syscall per slot (about 2 us here, 5-10 ms of a tick
// in which 5,000 users moved). The adds were atomic already (see
// add_counts). Slot s's received counters are at s, its sent ones at
// MAX_SLOTS + s: a connection's two directions are often counted on two
// CPUs at once (a TCP sender's data on one, the ACKs it gets on another),
// and with both in one cache line a TCP packet cost 7-15 ns more than with
// per-CPU counters (the line moving between the CPUs; BenchmarkPacketCost).
// Its size is the same on any number of CPUs: 2 MiB, where 8,192 per-CPU
// slots took 256 KiB per CPU; Config.MaxUIDs bounds the slots given out.
// Agents before it made a per-CPU bw_slot_counts: the loader keeps that map,
// whose counts no program adds to any more, as bw_slot_counts_percpu
// (bpf/slots.go).
//
// bw_slots has a 16-bit slot per ID, four to a word: UID u at u, account
// ACCOUNT_BASE + i at SLOT_IDS / 2 + i. Only the agent writes it (a word at
// a time, through its memory mapping). The loader sizes bw_slot_moved from
// its config (the slots it gives out); bw_slots, bw_slot_counts and
// bw_hash_counts are reused together or not at all (see bpf/slots.go).
#define SLOT_IDS (2 * POLICY_BITS_UIDS)
#define MAX_SLOTS 65536 // slots are 16 bits

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, SLOT_IDS / 4);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_slots SEC(".maps");

// half_counters are a slot's counters of one direction.
struct half_counters {
	__u64 bytes;
	__u64 packets;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct half_counters);
	__uint(max_entries, 2 * MAX_SLOTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_slot_counts SEC(".maps");

// bw_slot_moved is bw_moved for slots: a byte per slot (eight to a word;
// the loader sizes it with bw_slot_counts), set after a packet was counted
// in the slot. A packet counted in bw_hash_counts marks its ID in bw_moved
// or bw_xmoved instead, so the agent, which clears the marks it finds and
// then reads what they stand for, reads a marked slot's counters alone and
// adds the ID's entry in bw_hash_counts as it last read it: the entry has
// not grown since, or the ID would be marked. A tick reads one map per ID
// that moved, not two.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, MAX_SLOTS / 8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_slot_moved SEC(".maps");

// sock_owner is a socket's attribution in bw_sock.
struct sock_owner {
	__u32 uid;   // the UID or account the socket's packets count and are enforced for
	__u32 flags; // SOCK_*
	// While SOCK_PENDING or SOCK_CLAIM: the bytes moved so far, in the
	// socket's directions, and the end of the wait. The agent credits them
	// to the user it attributes an SSH connection to; the claim variants
	// fold them into the account that claims an Xray connection.
	__u64 pending_rx;
	__u64 pending_tx;
	__u64 deadline; // bpf_ktime_get_ns
};

// bw_ssh_ports are the TCP ports (host order) whose accepted connections
// wait for their user, with their kind (PORT_*): the SSH servers' (pending
// until attributed) and Xray's (waiting for a claim). Only the agent writes
// it. The name is from when it held SSH ports alone: pinned on running
// installs, it keeps it.
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

// bw_xstats are the Xray connections' event counters (XSTAT_*).
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, XSTAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_xstats SEC(".maps");

// claim_key names an accepted TCP connection: its client's address (IPv4
// as IPv4-mapped IPv6, since Xray usually listens dual-stack on [::]) and
// port, and the local port, ports in host order.
struct claim_key {
	__u8 addr[16];
	__u16 client_port;
	__u16 local_port;
};

// bw_claims holds the agent's claims: the connection named by the key
// belongs to the account in the value. The agent adds them as Xray logs its
// connections; the claim variants delete each one they find. Least recently
// used ones go when it is full: a claim that no connection takes is never
// deleted otherwise.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct claim_key);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_claims SEC(".maps");

// account_name is an account's name in bw_accounts: up to 128 bytes, NUL
// padded (a name of 128 bytes has none).
struct account_name {
	char name[ACCOUNT_NAME_MAX];
};

// bw_accounts is the registry of accounts, ID -> name, written only by the
// agent (an entry per account, never deleted nor changed) and never read by
// the programs: it lives exactly as long as the counters, so an agent that
// crashes neither loses nor reassigns an account.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct account_name);
	__uint(max_entries, MAX_ACCOUNTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} bw_accounts SEC(".maps");

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

static __always_inline void xstat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&bw_xstats, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline void rstat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&bw_rstats, &idx);

	if (v)
		__sync_fetch_and_add(v, 1);
}

// within_rate takes len bytes from the bucket of key in the user's
// direction tx and reports whether they were there (a token bucket: a
// packet passes when the bucket holds all of it). A bucket the agent has
// not written yet caps nothing. The refill is clamped to a second, which
// keeps elapsed x rate within 64 bits, and never goes back in time: a
// packet on another CPU may have refilled it with a later clock.
static __always_inline int within_rate(__u32 key, int tx, __u64 len)
{
	struct rate_key k = {.id = key, .tx = tx ? 1 : 0};
	struct bucket *b = bpf_map_lookup_elem(&bw_rates, &k);
	__u64 now, elapsed;
	__s64 tokens, need = len * NSEC_PER_SEC;
	int ok;

	if (!b)
		return 1;
	now = bpf_ktime_get_ns();
	bpf_spin_lock(&b->lock);
	elapsed = 0;
	if (now > b->last) {
		elapsed = now - b->last;
		b->last = now;
	}
	if (elapsed > NSEC_PER_SEC)
		elapsed = NSEC_PER_SEC;
	tokens = b->tokens + (__s64)(elapsed * b->rate);
	if (tokens > (__s64)b->depth)
		tokens = b->depth;
	ok = tokens >= need;
	if (ok)
		tokens -= need;
	b->tokens = tokens;
	bpf_spin_unlock(&b->lock);
	return ok;
}

// pending handles a packet of a connection that waits for its user: a
// pending SSH connection, or an Xray one waiting for its claim (flags, as
// the caller read them). The packet is counted in the entry; a SOCK_PENDING
// connection's packets past the allowance are dropped (0) until the
// deadline. Past it an SSH connection is released here and flows
// unattributed; an Xray one is released by claim (claim variants).
static __always_inline int pending(struct sock_owner *o, __u32 flags, __u64 len, int egress)
{
	if ((flags & SOCK_PENDING) && o->pending_rx + o->pending_tx + len > PENDING_ALLOWANCE) {
		if (bpf_ktime_get_ns() < o->deadline) {
			if (flags & SOCK_CLAIM)
				xstat_inc(XSTAT_HELD);
			else
				sstat_inc(SSTAT_HELD);
			return 0;
		}
		if (!(flags & SOCK_CLAIM)) {
			if (!(flags & SOCK_RELEASED)) {
				o->flags |= SOCK_RELEASED;
				sstat_inc(SSTAT_RELEASED);
			}
			sstat_inc(SSTAT_UNATTRIBUTED);
		}
	}
	if (egress)
		__sync_fetch_and_add(&o->pending_tx, len);
	else
		__sync_fetch_and_add(&o->pending_rx, len);
	return 1;
}

// claim looks the claim of a waiting Xray connection up (claim variants
// only: it needs BPF atomics, Linux 5.12). Found: the connection is the
// account's server socket from now on (SOCK_SERVER) and the claim is
// deleted. Past the deadline unclaimed: SOCK_RELEASED, and it counts for
// its owner. It returns the flags the caller goes on with. Each change of
// flags is a compare-and-exchange from what the caller read, so that one
// packet alone, on one CPU, claims or releases the connection.
static __always_inline __u32 claim(struct sock_owner *o, struct bpf_sock *sk, __u32 flags)
{
	struct claim_key k __attribute__((aligned(8))) = {};
	__u32 *a = (__u32 *)k.addr;
	// Read before the branches: clang would otherwise join the two
	// branches' last loads into one load from a chosen offset, which the
	// verifier refuses (no pointer arithmetic on a socket).
	__u32 ip4 = sk->dst_ip4;
	__u32 *acct;

	if (sk->family == AF_INET6) {
		a[0] = sk->dst_ip6[0];
		a[1] = sk->dst_ip6[1];
		a[2] = sk->dst_ip6[2];
		a[3] = sk->dst_ip6[3];
	} else if (sk->family == AF_INET) {
		a[2] = bpf_htonl(0xffff);
		a[3] = ip4;
	} else {
		return flags;
	}
	k.client_port = bpf_ntohs(sk->dst_port);
	k.local_port = sk->src_port;
	acct = bpf_map_lookup_elem(&bw_claims, &k);
	if (acct) {
		// The account before the flag: a packet that sees SOCK_SERVER
		// reads the account's ID. A connection released meanwhile
		// ignores uid.
		o->uid = *acct;
		if (__sync_val_compare_and_swap(&o->flags, flags, SOCK_SERVER) == flags) {
			bpf_map_delete_elem(&bw_claims, &k);
			xstat_inc(XSTAT_CLAIMED);
		}
		return o->flags;
	}
	if (bpf_ktime_get_ns() >= o->deadline) {
		if (__sync_val_compare_and_swap(&o->flags, flags, flags | SOCK_RELEASED) == flags)
			xstat_inc(XSTAT_UNCLAIMED);
		return o->flags;
	}
	return flags;
}

// Maps of a byte per ID (bw_moved, bw_tagged, bw_xmoved; each
// POLICY_BITS_UIDS = MAX_ACCOUNTS bytes) are arrays of words, eight bytes
// to a word, byte i of a word in bits 8i to 8i+7 (bpfel). They are read and
// written without pointer arithmetic: an offset computed at run time and
// added to a map value pointer makes the verifier, without CAP_PERFMON,
// refuse any instruction that sees it unknown on one path and known on
// another (the byte of UID 0), or pointers into different maps.

// byte_word returns the word of map that holds byte idx, NULL past the end.
static __always_inline __u64 *byte_word(void *map, __u32 idx)
{
	__u32 word = idx / 8;

	if (idx >= POLICY_BITS_UIDS)
		return 0;
	return bpf_map_lookup_elem(map, &word);
}

// byte_in returns byte idx of its word w.
static __always_inline __u8 byte_in(__u64 *w, __u32 idx)
{
	return *(volatile __u64 *)w >> (idx % 8 * 8);
}

// set_byte sets byte idx of its word w to 1, with a one-byte store at a
// constant offset: it never undoes another writer's byte in the word (the
// agent clears and sets bytes through its memory mapping, one at a time).
static __always_inline void set_byte(__u64 *w, __u32 idx)
{
	volatile __u8 *b = (volatile __u8 *)w;

	switch (idx % 8) {
	case 0: b[0] = 1; break;
	case 1: b[1] = 1; break;
	case 2: b[2] = 1; break;
	case 3: b[3] = 1; break;
	case 4: b[4] = 1; break;
	case 5: b[5] = 1; break;
	case 6: b[6] = 1; break;
	default: b[7] = 1;
	}
}

// mark_byte sets byte idx of map unless it is set already.
static __always_inline void mark_byte(void *map, __u32 idx)
{
	__u64 *w = byte_word(map, idx);

	if (w && !byte_in(w, idx))
		set_byte(w, idx);
}

// used_of returns key's charged total in bw_quota_used, made at zero if
// need be; NULL if the map has no room (counted in STAT_QUOTA_FULL).
static __always_inline __u64 *used_of(__u32 key)
{
	__u64 *used = bpf_map_lookup_elem(&bw_quota_used, &key);

	if (!used) {
		__u64 zero = 0;

		bpf_map_update_elem(&bw_quota_used, &key, &zero, BPF_NOEXIST);
		used = bpf_map_lookup_elem(&bw_quota_used, &key);
		if (!used)
			stat_inc(STAT_QUOTA_FULL);
	}
	return used;
}

// charge_quota adds len to key's charged total and reports whether the
// packet fits under the ceiling. A packet that does not fit is taken back out,
// so bw_quota_used only ever holds bytes that went through.
//
// The check uses only add-and-read (no fetch atomics, so any 5.7+ kernel
// runs it): a packet passes when the total it observes right after its own add,
// which includes every packet added before it, is within the ceiling. The last
// packet to pass therefore saw every passed byte: the sum of passed packets
// never exceeds the ceiling. Concurrent packets on other CPUs can only make
// each other fail, never overshoot.
static __always_inline int charge_quota(__u32 key, const struct policy *p, __u64 len)
{
	__u64 *used = used_of(key);

	if (!used)
		return 0; // fail closed: a quota we cannot track is spent
	__sync_fetch_and_add(used, len);
	if (*used > p->ceiling) {
		__sync_fetch_and_add(used, -len);
		return 0;
	}
	return 1;
}

// mark_moved marks a UID below POLICY_BITS_UIDS in bw_moved, an account in
// bw_xmoved.
static __always_inline void mark_moved(__u32 uid)
{
	if (uid - ACCOUNT_BASE < MAX_ACCOUNTS)
		mark_byte(&bw_xmoved, uid - ACCOUNT_BASE);
	else
		mark_byte(&bw_moved, uid);
}

// may_be_tagged reports whether uid's sockets may have a bw_sock entry.
static __always_inline int may_be_tagged(__u32 uid)
{
	__u64 *w;

	if (uid == 0 || uid >= POLICY_BITS_UIDS)
		return 1;
	w = byte_word(&bw_tagged, uid);
	return w && byte_in(w, uid);
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

// slot_of returns the slot of a UID or an account in bw_slots, 0 if it has
// none.
static __always_inline __u32 slot_of(__u32 uid)
{
	__u32 idx, word;
	__u64 *w;

	if (uid < POLICY_BITS_UIDS)
		idx = uid;
	else if (uid - ACCOUNT_BASE < MAX_ACCOUNTS)
		idx = SLOT_IDS / 2 + (uid - ACCOUNT_BASE);
	else
		return 0;
	word = idx / 4;
	w = bpf_map_lookup_elem(&bw_slots, &word);
	if (!w)
		return 0;
	return *w >> (idx % 4 * 16) & 0xffff;
}

// hash_counters returns uid's entry in bw_hash_counts for this CPU, made at
// zero if need be; NULL if the map has no room (counted in
// STAT_COUNTERS_FULL).
static __always_inline struct counters *hash_counters(__u32 uid)
{
	struct counters *c = bpf_map_lookup_elem(&bw_hash_counts, &uid);

	if (!c) {
		struct counters zero = {};

		bpf_map_update_elem(&bw_hash_counts, &uid, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&bw_hash_counts, &uid);
		if (!c)
			stat_inc(STAT_COUNTERS_FULL);
	}
	return c;
}

// add_counts adds bytes and packets to uid's counters of one direction,
// sent (tx) or received: its slot's in bw_slot_counts if it has one, else
// its entry in bw_hash_counts. Then it marks what it changed, after the add
// (see bw_moved and bw_slot_moved): the slot in bw_slot_moved, else the ID
// in bw_moved or bw_xmoved.
//
// Atomic adds: a slot's counters are every CPU's. A per-CPU entry in
// bw_hash_counts needs them too: a plain add (load, add, store) can lose
// another program's add on the same CPU. Cgroup programs run with migration
// disabled only (bpf_prog_run_array_cg: migrate_disable and rcu_read_lock),
// neither preemption nor softirqs: an egress run in process context (a
// send, through ip_finish_output) can be interrupted by a softirq that runs
// these programs on the same CPU for the same UID (an ingress packet; TCP
// sending more data on an ACK, egress from softirq), and with preempt=full
// (PREEMPT_DYNAMIC kernels) by another task's send. A server socket counts
// its egress as rx, so even ingress and egress share a field. Both atomics
// together cost a few ns (measured: within the noise).
static __always_inline void add_counts(__u32 uid, int tx, __u64 bytes, __u64 packets)
{
	__u32 slot = slot_of(uid);
	struct counters *c;

	if (slot) {
		__u32 key = tx ? MAX_SLOTS + slot : slot;
		struct half_counters *h = bpf_map_lookup_elem(&bw_slot_counts, &key);

		if (h) {
			__sync_fetch_and_add(&h->bytes, bytes);
			__sync_fetch_and_add(&h->packets, packets);
			mark_byte(&bw_slot_moved, slot);
			return;
		}
	}
	c = hash_counters(uid);
	if (!c)
		return;
	// The two empty asm statements keep the branches apart: clang would
	// otherwise add tx * 16 to c, arithmetic on a map value pointer with an
	// offset that differs between paths, which the verifier refuses
	// without CAP_PERFMON (the agent has CAP_BPF and CAP_NET_ADMIN only).
	if (tx) {
		__sync_fetch_and_add(&c->tx_bytes, bytes);
		__sync_fetch_and_add(&c->tx_packets, packets);
		asm volatile("/* tx */");
	} else {
		__sync_fetch_and_add(&c->rx_bytes, bytes);
		__sync_fetch_and_add(&c->rx_packets, packets);
		asm volatile("/* rx */");
	}
	mark_moved(uid);
}

// account_policed counts and enforces a packet of uid (len bytes, segs
// segments) that may be attributed to another ID or have a policy. egress
// is the packet's direction at the socket; attr is constant: 1 in the claim
// variants, which look claims up and fold pending bytes with BPF atomics
// (Linux 5.12), 0 in the plain ones, which every kernel from 5.7 loads and
// which leave both out.
static __always_inline int account_policed(struct __sk_buff *skb, __u32 uid, __u64 len, __u64 segs,
					   int egress, const int attr)
{
	__u64 fold_rx = 0, fold_tx = 0; // pending bytes to fold, in the user's directions
	int count = 1;
	int tx = egress; // the user's direction: swapped on a server socket

	if (may_be_tagged(uid)) {
		// bpf_sk_storage_get itself answers NULL for a socket that is not
		// a full one (a request or time-wait socket): no bpf_sk_fullsock
		// call first, which would cost as much again.
		struct bpf_sock *sk = skb->sk;

		if (sk) {
			struct sock_owner *o = bpf_sk_storage_get(&bw_sock, sk, 0, 0);

			if (o) {
				__u32 flags = o->flags;
				// A connection claimed by this packet (or one on
				// another CPU meanwhile): see the fold below.
				int claimed = 0;

				if (attr && (flags & (SOCK_CLAIM | SOCK_RELEASED)) == SOCK_CLAIM) {
					flags = claim(o, sk, flags);
					claimed = (flags & SOCK_SERVER) != 0;
				}
				if (flags & SOCK_CLAIM) {
					// Waiting, or released: then it counts for its
					// owner (uid stays), what it moved while it
					// waited included.
					if (!(flags & SOCK_RELEASED))
						return pending(o, flags, len, egress);
				} else if (flags & SOCK_PENDING) {
					return pending(o, flags, len, egress);
				} else {
					uid = o->uid;
					count = !(flags & SOCK_FORWARD);
					if (flags & SOCK_SERVER)
						tx = !egress;
				}
				// Bytes a connection moved while it waited: they
				// passed, so they are counted and charged for its
				// owner whatever this packet's fate, at its release
				// (for Xray's UID) or at its claim (for the account,
				// so the account's budget holds to the packet: a held
				// connection moves PENDING_ALLOWANCE at most before
				// it). Xray's own counters count them too; the agent
				// takes what the kernel counted as owed by Xray's
				// report, which pays it off (a report that came first
				// is kept as credit that this fold pays off). Taken
				// with exchanges, so that bytes a packet on another
				// CPU adds meanwhile are folded once, by whoever finds
				// them next. (Attribute's entries start at zero: it
				// credits what it moved itself.)
				if (attr && count && ((flags & SOCK_RELEASED) || claimed) && (o->pending_rx | o->pending_tx)) {
					__u64 rx = __sync_lock_test_and_set(&o->pending_rx, 0);
					__u64 sent = __sync_lock_test_and_set(&o->pending_tx, 0);

					fold_rx = tx == egress ? rx : sent;
					fold_tx = tx == egress ? sent : rx;
				}
			}
		}
	}

	if (attr && fold_rx)
		add_counts(uid, 0, fold_rx, 0);
	if (attr && fold_tx)
		add_counts(uid, 1, fold_tx, 0);

	if (uid != 0 && may_have_policy(uid)) {
		struct policy *p = bpf_map_lookup_elem(&bw_policy, &uid);

		if (p) {
			__u32 qbit = tx ? POLICY_QUOTA_TX : POLICY_QUOTA_RX;
			__u32 key = p->quota_key ? p->quota_key : uid;

			if (attr && (fold_rx | fold_tx)) {
				__u64 charge = 0;
				__u64 *used;

				if (p->flags & POLICY_QUOTA_RX)
					charge += fold_rx;
				if (p->flags & POLICY_QUOTA_TX)
					charge += fold_tx;
				if (charge && (used = used_of(key)))
					__sync_fetch_and_add(used, charge);
			}
			if (p->flags & POLICY_BLOCKED) {
				if (is_reset(skb))
					return 1;
				stat_inc(STAT_DROP_BLOCKED);
				return 0;
			}
			// A speed cap, before the budget: a packet over the cap
			// is dropped uncharged. Only counted packets are capped
			// (not a session's forwarded ones), so no byte is capped
			// twice. At egress the drop says "congestion" (2: TCP
			// backs off, cwnd reduced, instead of waiting for a
			// retransmission timer); at ingress it is a loss.
			if (count && (p->flags & (tx ? POLICY_RATE_TX : POLICY_RATE_RX)) && !within_rate(key, tx, len)) {
				rstat_inc(RSTAT_DROPPED);
				return egress ? 2 : 0;
			}
			if (count && (p->flags & qbit) && !charge_quota(key, p, len)) {
				if (is_reset(skb))
					return 1;
				stat_inc(STAT_DROP_QUOTA);
				return 0;
			}
		}
	}

	if (!count)
		return 1;

	add_counts(uid, tx, len, segs);
	return 1;
}

// account counts and enforces one packet (see account_policed for egress
// and attr). The common one first: a packet of a UID that is neither
// tagged nor may have a policy (two inlined array reads say so) goes
// straight to its counters.
static __always_inline int account(struct __sk_buff *skb, int egress, const int attr)
{
	__u32 uid = bpf_get_socket_uid(skb);
	__u64 len = skb->len;
	__u64 segs = skb->gso_segs;

	if (segs == 0)
		segs = 1;
	if (!may_be_tagged(uid) && !may_have_policy(uid)) {
		add_counts(uid, egress, len, segs);
		return 1;
	}
	return account_policed(skb, uid, len, segs, egress, attr);
}

SEC("cgroup_skb/ingress")
int bw_ingress(struct __sk_buff *skb)
{
	return account(skb, 0, 0);
}

SEC("cgroup_skb/egress")
int bw_egress(struct __sk_buff *skb)
{
	return account(skb, 1, 0);
}

// The claim variants: attached instead of the plain ones where the session
// programs run (see account).
SEC("cgroup_skb/ingress")
int bw_ingress_attr(struct __sk_buff *skb)
{
	return account(skb, 0, 1);
}

SEC("cgroup_skb/egress")
int bw_egress_attr(struct __sk_buff *skb)
{
	return account(skb, 1, 1);
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

	if (!bpf_map_lookup_elem(&bw_servers, &tgid))
		return 1;
	uid = (__u32)bpf_get_current_uid_gid();
	if (uid == 0)
		return 1;
	mark_byte(&bw_tagged, uid); // before the entry: a packet that sees the entry was looked up
	o = bpf_sk_storage_get(&bw_sock, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (o) {
		o->uid = uid;
		o->flags = SOCK_FORWARD;
	}
	return 1;
}

// loopback_peer reports whether a connection's peer is a loopback address
// (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104): a local proxy's.
static __always_inline int loopback_peer(struct bpf_sock_ops *ops)
{
	if (ops->family == AF_INET)
		return (bpf_ntohl(ops->remote_ip4) >> 24) == 127;
	if (ops->family != AF_INET6 || ops->remote_ip6[0] || ops->remote_ip6[1])
		return 0;
	if (ops->remote_ip6[2] == bpf_htonl(0xffff))
		return (bpf_ntohl(ops->remote_ip6[3]) >> 24) == 127;
	return !ops->remote_ip6[2] && ops->remote_ip6[3] == bpf_htonl(1);
}

// bw_sockops makes each connection accepted on a port of bw_ssh_ports wait
// for its user, by the port's kind:
//
//   - an SSH server's port: pending (SOCK_PENDING). Its first
//     PENDING_ALLOWANCE bytes pass and are kept in its entry; then it is held
//     until the agent has found whose session it is and attributed it
//     (moving those bytes to the user), or for PENDING_NS at most. So a
//     session's bytes are all counted for its user, and a user's new login
//     moves next to nothing before their limit and block apply to it.
//   - an Xray port, held: the same (SOCK_CLAIM|SOCK_PENDING), until the
//     packet programs find its claim. From a loopback peer it is claim-only:
//     a local proxy in front of Xray (nginx, stunnel) makes the address Xray
//     logs differ from the socket's peer, so its claim never comes.
//   - an Xray port, claim-only (SOCK_CLAIM): never held; its bytes are kept
//     in the entry until the claim is found or PENDING_NS pass.
SEC("sockops")
int bw_sockops(struct bpf_sock_ops *ops)
{
	struct bpf_sock *sk;
	struct sock_owner *o;
	__u8 *kind;
	__u32 flags;
	__u16 port;

	if (ops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	port = (__u16)ops->local_port;
	kind = bpf_map_lookup_elem(&bw_ssh_ports, &port);
	if (!kind)
		return 1;
	switch (*kind) {
	case PORT_XRAY_HOLD:
		flags = loopback_peer(ops) ? SOCK_CLAIM : SOCK_CLAIM | SOCK_PENDING;
		break;
	case PORT_XRAY_CLAIM:
		flags = SOCK_CLAIM;
		break;
	default:
		flags = SOCK_PENDING;
	}
	sk = ops->sk;
	if (!sk)
		return 1;
	o = bpf_sk_storage_get(&bw_sock, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (o && !o->flags && !o->uid) {
		o->deadline = bpf_ktime_get_ns() + PENDING_NS;
		o->flags = flags;
	}
	return 1;
}
