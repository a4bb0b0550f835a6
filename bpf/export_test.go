package bpf

// SetSlotBatchMin makes EachMoved read every slot at once from n moved IDs
// on, whatever their share of the slots, so that a test with few IDs takes
// that way; it returns the function that puts the defaults back.
func SetSlotBatchMin(n int) (restore func()) {
	oldMin, oldShare := slotBatchMin, slotBatchShare
	slotBatchMin, slotBatchShare = n, 1<<20
	return func() { slotBatchMin, slotBatchShare = oldMin, oldShare }
}
