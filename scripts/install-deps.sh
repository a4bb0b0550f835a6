#!/usr/bin/env bash
# Installs what bwagent's build and tests need on a Debian machine, as root,
# and mounts bpffs if nothing did. Safe to run again: it skips what is there.
#
#   install-deps.sh          what building and running the agent needs
#   install-deps.sh --test   and what the tests need (SSH servers and clients,
#                            systemd-analyze, strace, an Xray server,
#                            PostgreSQL for the fleet tests)
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps: run as root (sudo $0)" >&2
	exit 1
fi

packages=(
	clang llvm libbpf-dev   # make generate: compile bpf/bwacct.c
	bpftool                 # inspecting the data plane
	nftables                # the nft CLI, for operators and tests
	iptables                # the old design, for the benchmark
	iperf3                  # throughput benchmark
	iproute2 conntrack
	openssh-server          # SSH users in the agent's tests
	protobuf-compiler       # protoc, for make generate (xraystats)
)
# With --test: the real SSH servers and clients of internal/sshtest, and
# what checks the systemd unit.
if [ "${1:-}" = "--test" ]; then
	packages+=(
		openssh-client  # ssh and scp, the users' client
		dropbear-bin    # a Dropbear server next to OpenSSH's (Debian 12: 2022.83)
		sshpass         # password logins of OpenSSH's client
		systemd         # systemd-analyze (the unit, its system call filter); journald and journalctl (Dropbear logins from the journal)
		strace          # the agent's system calls checked against that filter
		postgresql      # the fleet tests' throwaway clusters (initdb, pg_ctl; Debian 12: 15)
	)
fi
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	echo "install-deps: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# With --test: a real Xray server for xraystats' tests, built from the Go
# module proxy (about a minute the first time), then skipped. Operators
# bring their own Xray.
if [ "${1:-}" = "--test" ]; then
	"$(dirname "$0")/install-xray.sh"
fi

# Pinned maps live on bpffs; systemd mounts it, minimal machines may not.
if ! mountpoint -q /sys/fs/bpf; then
	mount -t bpf bpf /sys/fs/bpf
fi
