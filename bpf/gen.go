package bpf

// The BPF object and its Go bindings are committed, so a plain `go build`
// needs no clang. `make generate` rebuilds them; CI fails when they are stale.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -type counters -type policy -type sock_owner bwacct bwacct.c
