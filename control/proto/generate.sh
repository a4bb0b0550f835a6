#!/bin/sh
# Regenerates the Go code in control/internal/controlpb from
# control/proto/control.proto. 'go generate ./control/' runs it (see
# control/gen.go). Like xraystats/proto/generate.sh, it needs protoc and uses
# the protoc plugins pinned as go.mod tools.
set -eu

cd "$(dirname "$0")/../.." # the module root: .proto paths are relative to it

if ! command -v protoc >/dev/null 2>&1; then
	echo "control/proto/generate.sh: protoc not found; install it (Debian: apt-get install protobuf-compiler)" >&2
	exit 1
fi
gen_go=$(go tool -n protoc-gen-go)
gen_grpc=$(go tool -n protoc-gen-go-grpc)

rm -f control/internal/controlpb/*.pb.go
protoc -I . \
	--plugin=protoc-gen-go="$gen_go" \
	--plugin=protoc-gen-go-grpc="$gen_grpc" \
	--go_out=. --go_opt=module=github.com/myvpn/bwagent \
	--go-grpc_out=. --go-grpc_opt=module=github.com/myvpn/bwagent \
	control/proto/control.proto
