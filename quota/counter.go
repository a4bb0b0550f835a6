package quota

// Sample is one reading of a cumulative counter: the kernel's per-UID
// counters or Xray's per-user counters. Epoch names the counter's lifetime
// (for the kernel, the boot and the map; for Xray, the process start): a
// counter never goes down within one epoch.
type Sample struct {
	Epoch    string
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
