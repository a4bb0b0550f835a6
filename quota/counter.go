package quota

// Sample is one reading of a cumulative counter: the kernel's per-UID
// counters or Xray's per-user counters. Epoch names the counter's lifetime
// (for the kernel, the boot and the map; for Xray, the process start): a
// counter never goes down within one epoch.
type Sample struct {
	Epoch    Epoch
	Up, Down uint64
}

// Since returns the usage a counter moved from base to cur. A counter that
// changed epoch or went down restarted from zero in between, so all of cur
// is new: it is counted from zero, never as a negative delta. The first
// reading of a source (zero base epoch) is also counted in full, so the
// bytes a counter gathered while no agent ran are not lost.
func Since(base, cur Sample) Usage {
	if base.Epoch != cur.Epoch || cur.Up < base.Up || cur.Down < base.Down {
		return Usage{Up: cur.Up, Down: cur.Down}
	}
	return Usage{Up: cur.Up - base.Up, Down: cur.Down - base.Down}
}

// SourceKind is what a counter source counts.
type SourceKind uint8

// Kinds of counter sources.
const (
	SourceUID  SourceKind = 1 + iota // one UID's counters in the kernel (SSH users)
	SourceXray                       // one Xray user's counters in Xray, by email
	// SourceOwed is not a counter: for an Xray user whose connections the
	// kernel counts, the bytes the kernel counted and charged that Xray's
	// own counters have not reported yet (XTLS Vision's until the
	// connection closes), per direction: Xray's next counts pay them off
	// before anything more is charged. The agent keeps it as the debt
	// itself, or as a point on the counters of the user's kernel account
	// and Xray's (its epoch says which). See the README's "which source
	// counted what".
	SourceOwed
	// SourceFleet is not a counter either: in fleet mode, the node's own
	// cumulative count of a user in the fleet's usage period (Epoch.Gen the
	// period, Epoch.Start one more than the node's lease, 0 for none):
	// the journal the node reports from. See package fleet.
	SourceFleet
)

// Source names one counter source: the key of its baseline.
type Source struct {
	Kind SourceKind
	UID  uint32 // SourceUID
	Name string // SourceXray: the user's email
}

// UIDSource is the source of uid's kernel counters.
func UIDSource(uid uint32) Source { return Source{Kind: SourceUID, UID: uid} }

// XraySource is the source of an Xray user's counters.
func XraySource(email string) Source { return Source{Kind: SourceXray, Name: email} }

// OwedSource is the key of what an Xray user's kernel count is ahead of
// Xray's.
func OwedSource(email string) Source { return Source{Kind: SourceOwed, Name: email} }

// FleetSource is the key of a user's count in fleet mode.
func FleetSource(name string) Source { return Source{Kind: SourceFleet, Name: name} }

// Epoch names the lifetime of a source's counters: within one epoch they
// only grow; a different epoch means they restarted from zero. The zero
// Epoch is "never read".
type Epoch struct {
	// Origin is what the counters live in: the boot ID for the kernel's
	// counters, "xray" for Xray's.
	Origin string
	// Start is when the counting process started, Unix seconds (Xray).
	Start int64
	// Gen tells apart two lifetimes of the same origin and start: the
	// kernel counter map's ID, or Xray's allocation count when the epoch
	// was first seen.
	Gen uint64
}

// IsZero reports whether e is the zero Epoch.
func (e Epoch) IsZero() bool { return e == Epoch{} }
