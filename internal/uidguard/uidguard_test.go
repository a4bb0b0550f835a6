package uidguard_test

import (
	"slices"
	"testing"

	"github.com/myvpn/bwagent/internal/uidguard"
)

func TestSet(t *testing.T) {
	if got := uidguard.Always(); !slices.Equal(got, []uint32{0, 65534}) {
		t.Fatalf("Always() = %v", got)
	}
	uidguard.Always()[0] = 1000 // a caller's copy
	if !slices.Equal(uidguard.Always(), []uint32{0, 65534}) {
		t.Fatal("Always can be changed through a returned slice")
	}
	for _, c := range []struct {
		name      string
		set       uidguard.Set
		protected []uint32
	}{
		{"zero", uidguard.Set{}, []uint32{0, 65534}},
		{"none configured", uidguard.New(nil), []uint32{0, 65534}},
		{"configured", uidguard.New([]uint32{999, 0, 4294967295}), []uint32{0, 999, 65534, 4294967295}},
	} {
		t.Run(c.name, func(t *testing.T) {
			for _, uid := range []uint32{0, 1, 999, 1000, 65533, 65534, 65535, 4294967294, 4294967295} {
				if got, want := c.set.Has(uid), slices.Contains(c.protected, uid); got != want {
					t.Errorf("Has(%d) = %v, want %v", uid, got, want)
				}
			}
		})
	}
}
