package bpf

// The BPF object and its Go bindings are committed, so a plain `go build`
// needs no clang. `make generate` rebuilds them; CI fails when they are stale.
//
// -mcpu=v3 (bpf2go's default is v1): the claim variants of the packet
// programs exchange pending bytes atomically, which needs the BPF atomics of
// v3 (Linux 5.12). The other programs use v3's 32-bit jumps and ALU (Linux
// 5.1) and no atomic but the plain add of every version (see
// TestPlainProgramsNeedNoAtomics), so they load from Linux 5.7 as before.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -mcpu=v3 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type counters -type policy -type sock_owner -type claim_key -type account_name -type rate_key -type bucket bwacct bwacct.c
