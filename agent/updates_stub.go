package agent

// never is a channel that is never closed.
var never = make(chan struct{})

// Updates returns the version of the users' snapshot now and a channel that
// is closed when a newer version is published.
//
// Stub until the agent publishes a snapshot at the end of each tick: the
// version is always 0 and the channel is never closed, so a Watch sends its
// first snapshot only. This file goes when the real method comes.
func (a *Agent) Updates() (uint64, <-chan struct{}) { return 0, never }
