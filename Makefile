# bwagent: per-UID bandwidth quotas with eBPF and nftables.
#
#   make run        build and run the agent as root with its defaults
#   make install    install the agent as a systemd service (bwagent.service)
#   make test       install the test dependencies, then run every test as root
#   make generate   recompile bpf/bwacct.c and refresh the committed bindings
#   make lint       gofmt, go vet, staticcheck
#   make bench      data plane throughput benchmark (results go in README.md)

GO      ?= go
BIN     := bin
GOFILES := $(shell git ls-files '*.go' 2>/dev/null)
# The version the binaries print (bwagent version, bwctl version) and the
# package carries: scripts/version.sh, from git describe.
VERSION ?= $(shell ./scripts/version.sh)
# Static binaries: neither needs the C library (SQLite is pure Go).
GOBUILD := CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-X main.version=$(VERSION)"

.PHONY: all build generate deps test-deps test lint bench run install clean

all: build

build:
	$(GOBUILD) -o $(BIN)/ ./cmd/...

generate:
	$(GO) generate ./...

deps:
	./scripts/install-deps.sh

test-deps:
	./scripts/install-deps.sh --test

# Tests load BPF programs, create nft tables, namespaces and cgroups: root.
test: test-deps
	$(GO) test -count=1 -timeout 30m ./...

lint:
	@out=$$(gofmt -l $(GOFILES)); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) tool staticcheck ./...

bench: deps
	$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 30m ./bench/

run: deps build
	./$(BIN)/bwagent

install: deps build
	./scripts/install.sh $(BIN)/bwagent

clean:
	rm -rf $(BIN)
