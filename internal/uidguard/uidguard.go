// Package uidguard is the one definition of the UIDs bwagent never blocks
// or limits. Both enforcers use it: the BPF data plane (package bpf) and
// the nftables table (package nft), so they refuse exactly the same UIDs.
//
// Two UIDs are protected whatever the configuration says (Always): UID 0,
// root, whose blocking would cut the machine off its own administration,
// and UID 65534, the kernel's overflow UID, which bpf_get_socket_uid reports
// for packets without a full socket (time-wait, resets) of every user and
// which daemons running as "nobody" own. The configuration adds more
// (config's kernel.protected_uids); each enforcer takes that list in its
// Config and builds its Set with New.
package uidguard

// The UIDs Always protects.
const (
	Root     = 0
	Overflow = 65534
)

// Always returns the UIDs protected in every configuration, in increasing
// order.
func Always() []uint32 { return []uint32{Root, Overflow} }

// Set is a set of protected UIDs: Always and the configured ones. The zero
// Set protects Always alone. A Set is not changed after New, so it may be
// read from any goroutine.
type Set struct {
	configured map[uint32]bool
}

// New returns the Set of Always and configured.
func New(configured []uint32) Set {
	s := Set{configured: make(map[uint32]bool, len(configured))}
	for _, uid := range configured {
		s.configured[uid] = true
	}
	return s
}

// Has reports whether uid is protected.
func (s Set) Has(uid uint32) bool {
	return uid == Root || uid == Overflow || s.configured[uid]
}
