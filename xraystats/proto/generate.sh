#!/bin/sh
# Regenerates the Go code in xraystats/internal/xraypb from xraystats/proto.
# 'go generate ./xraystats/' runs it (see xraystats/gen.go). It needs protoc
# (Debian: protobuf-compiler); the two protoc plugins are the go.mod tools,
# built by 'go tool -n' at the versions that go.mod pins, so the output only
# depends on go.mod and protoc's version, not on what is on $PATH.
set -eu

cd "$(dirname "$0")/../.." # the module root: .proto paths are relative to it

if ! command -v protoc >/dev/null 2>&1; then
	echo "xraystats/proto/generate.sh: protoc not found; install it (Debian: apt-get install protobuf-compiler)" >&2
	exit 1
fi
gen_go=$(go tool -n protoc-gen-go)
gen_grpc=$(go tool -n protoc-gen-go-grpc)

rm -f xraystats/internal/xraypb/*/*.pb.go
protoc -I . \
	--plugin=protoc-gen-go="$gen_go" \
	--plugin=protoc-gen-go-grpc="$gen_grpc" \
	--go_out=. --go_opt=module=github.com/myvpn/bwagent \
	--go-grpc_out=. --go-grpc_opt=module=github.com/myvpn/bwagent \
	xraystats/proto/*.proto
