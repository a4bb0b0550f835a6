package bpf_test

import (
	"errors"
	"slices"
	"testing"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/nft"
)

// The data plane and the nftables table, given the same configured list,
// refuse exactly the same UIDs: the fixed ones and the configured ones.
func TestProtectedSameAsNFT(t *testing.T) {
	configured := []uint32{999, 4294967295}
	e := newEnvWith(t, bpf.Config{ProtectedUIDs: configured})
	fw, err := nft.New(nft.Config{Table: nettest.Name("bwtest"), NetNS: int(e.net.A), Protected: configured})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := fw.Remove(); err != nil {
			t.Errorf("remove nft table: %v", err)
		}
		fw.Close()
	})
	want := []uint32{0, 999, 65534, 4294967295}
	for _, uid := range []uint32{0, 1, 999, 1000, 65533, 65534, 65535, 4294967294, 4294967295} {
		bpfErr := e.dp.ApplyPolicies(map[uint32]bpf.Policy{uid: {Blocked: true}})
		_, nftErr := fw.Reconcile([]uint32{uid})
		bpfRefused, nftRefused := errors.Is(bpfErr, bpf.ErrProtectedUID), errors.Is(nftErr, nft.ErrProtectedUID)
		if bpfRefused != nftRefused {
			t.Errorf("UID %d: bpf says %v, nft says %v", uid, bpfErr, nftErr)
		}
		if want := slices.Contains(want, uid); bpfRefused != want || e.dp.Protected(uid) != want {
			t.Errorf("UID %d: refused %v (%v), Protected %v; want %v", uid, bpfRefused, bpfErr, e.dp.Protected(uid), want)
		}
		if !bpfRefused && bpfErr != nil || !nftRefused && nftErr != nil {
			t.Errorf("UID %d: bpf %v, nft %v", uid, bpfErr, nftErr)
		}
		if err := e.dp.ApplyPolicies(map[uint32]bpf.Policy{uid: {}}); err != nil {
			t.Fatal(err)
		}
	}
}
