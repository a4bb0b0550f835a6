package bpf

import (
	"testing"

	"github.com/cilium/ebpf/asm"
)

// The programs every kernel from 5.7 loads use no BPF atomic but the plain
// add (XADD), which every version has: exchanges and fetching atomics
// (Linux 5.12) are in the claim variants alone. Both variants count in the
// same maps, and only the claim variants look claims up.
func TestPlainProgramsNeedNoAtomics(t *testing.T) {
	spec, err := loadBwacct()
	if err != nil {
		t.Fatal(err)
	}
	atomics := func(name string) (ops map[asm.AtomicOp]int, maps map[string]bool) {
		ops, maps = map[asm.AtomicOp]int{}, map[string]bool{}
		p := spec.Programs[name]
		if p == nil {
			t.Fatalf("no program %s", name)
		}
		for _, ins := range p.Instructions {
			if ins.OpCode.Class() == asm.StXClass && ins.OpCode.Mode() == asm.AtomicMode {
				ops[ins.OpCode.AtomicOp()]++
			}
			if ins.IsLoadFromMap() {
				maps[ins.Reference()] = true
			}
		}
		return ops, maps
	}
	for _, name := range []string{bwacctProgBwIngress, bwacctProgBwEgress, bwacctProgBwConnect4, bwacctProgBwConnect6, bwacctProgBwSockCreate, bwacctProgBwSockops} {
		ops, maps := atomics(name)
		for op, n := range ops {
			if op != asm.AddAtomic {
				t.Errorf("%s: %d %v instructions, which need Linux 5.12", name, n, op)
			}
		}
		if maps[bwacctMapBwClaims] {
			t.Errorf("%s looks claims up", name)
		}
	}
	for _, name := range []string{bwacctProgBwIngressAttr, bwacctProgBwEgressAttr} {
		ops, maps := atomics(name)
		if ops[asm.Xchg] == 0 || ops[asm.CmpXchg] == 0 {
			t.Errorf("%s: atomics %v, want exchanges (the fold) and compare-and-exchanges (the claim)", name, ops)
		}
		if !maps[bwacctMapBwClaims] || !maps[bwacctMapBwHashCounts] {
			t.Errorf("%s uses maps %v, want bw_claims and bw_hash_counts", name, maps)
		}
	}
}
