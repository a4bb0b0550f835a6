# bwagent: per-UID bandwidth quotas with eBPF and nftables.
#
#   make run        build and run the agent as root with its defaults
#   make install    install the agent as a systemd service (bwagent.service)
#   make deb        build the Debian package bwagent_VERSION_ARCH.deb
#   make test       install the test dependencies, then run every test as root
#   make generate   recompile bpf/bwacct.c and refresh the committed bindings
#   make lint       gofmt, go vet, staticcheck
#   make bench      data plane throughput and per-packet cost (results go in README.md)

GO      ?= go
BIN     ?= bin
GOFILES := $(shell git ls-files '*.go' 2>/dev/null)
# The version the binaries print (bwagent version, bwctl version) and the
# package carries: scripts/version.sh, from git describe.
VERSION ?= $(shell ./scripts/version.sh)
# Static binaries: neither needs the C library (SQLite is pure Go).
GOLDFLAGS := -X main.version=$(VERSION)
GOBUILD    = CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(GOLDFLAGS)"

.PHONY: all build deb generate deps test-deps test lint bench run install clean

all: build

build:
	$(GOBUILD) -o $(BIN)/ ./cmd/...

# The Debian package (scripts/deb/nfpm.yaml): both binaries, the unit, the
# example configuration, cek-bw-limit, the shell completions bwctl prints,
# the README. nfpm is a Go tool of this module (go.mod's tool block): it
# builds the package and is linked into neither binary.
DEB_ARCH ?= $(shell $(GO) env GOARCH)
DEB_OUT  ?= .
deb: GOLDFLAGS += -s -w # no symbol table nor DWARF: a third of the size; stack traces stay
deb: build
	rm -rf $(BIN)/deb
	mkdir -p $(BIN)/deb
	cp $(BIN)/bwagent $(BIN)/bwctl $(BIN)/deb/
	for sh in bash zsh fish; do $(BIN)/bwctl completion $$sh >$(BIN)/deb/bwctl.$$sh || exit 1; done
	DEB_STAGE=$(BIN)/deb VERSION=$(VERSION) GOARCH=$(DEB_ARCH) $(GO) tool nfpm package \
		--config scripts/deb/nfpm.yaml --packager deb --target $(DEB_OUT)/bwagent_$(VERSION)_$(DEB_ARCH).deb

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
