package agent

import (
	"time"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/view"
)

// Observer is told what the agent does, for metrics, notifications and the
// service manager. Tick, Charged and Event are called on the loop, Committed
// on the committer: each must be quick and must never block or call back
// into the agent's commands.
type Observer interface {
	// Tick is called after each tick with the health it published.
	Tick(h view.Health)
	// Charged is called with each usage delta folded into a user.
	Charged(p quota.Protocol, d quota.Usage)
	// Event is called with each event recorded for a user (a block, an
	// unblock, a reset...), as it is queued for the state database.
	Event(p quota.Protocol, action, reason string)
	// Committed is called after each commit of the state database, with
	// how long it took and its error.
	Committed(d time.Duration, err error)
}

// observers calls every Observer in turn.
type observers []Observer

func (o observers) Tick(h view.Health) {
	for _, x := range o {
		x.Tick(h)
	}
}

func (o observers) Charged(p quota.Protocol, d quota.Usage) {
	for _, x := range o {
		x.Charged(p, d)
	}
}

func (o observers) Event(p quota.Protocol, action, reason string) {
	for _, x := range o {
		x.Event(p, action, reason)
	}
}

func (o observers) Committed(d time.Duration, err error) {
	for _, x := range o {
		x.Committed(d, err)
	}
}
