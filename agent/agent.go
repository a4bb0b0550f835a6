// Package agent is bwagent's control loop. Every tick it makes the kernel
// state equal to the desired state and repairs whatever was broken: a
// detached program, a removed pin, a flushed nftables ruleset.
//
// This first version keeps the data plane attached and mirrors the UIDs
// blocked in the BPF policy map into the agent's nftables set; accounting,
// limits and the operators' files build on it.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/nft"
)

// Interval bounds, as in the bash tool's service (1-5 seconds).
const (
	MinInterval     = time.Second
	MaxInterval     = 5 * time.Second
	DefaultInterval = 2 * time.Second
)

// ErrInterval is returned for a tick interval outside 1-5 seconds.
var ErrInterval = errors.New("interval must be from 1s to 5s")

// Dataplane is the part of bpf.Datapath the loop drives.
type Dataplane interface {
	EnsureAttached() error
	Policies() (map[uint32]bpf.Policy, error)
}

// Firewall is the part of nft.Firewall the loop drives.
type Firewall interface {
	Reconcile(desired []uint32) (nft.Result, error)
}

// Agent runs the control loop.
type Agent struct {
	interval time.Duration
	dp       Dataplane
	fw       Firewall
	log      *slog.Logger
	lastErr  string
}

// CheckInterval validates a tick interval, mapping zero to the default.
func CheckInterval(d time.Duration) (time.Duration, error) {
	if d == 0 {
		return DefaultInterval, nil
	}
	if d < MinInterval || d > MaxInterval {
		return 0, fmt.Errorf("%w, got %v", ErrInterval, d)
	}
	return d, nil
}

// New returns an agent over the given kernel boundaries.
func New(interval time.Duration, dp Dataplane, fw Firewall, log *slog.Logger) (*Agent, error) {
	interval, err := CheckInterval(interval)
	if err != nil {
		return nil, err
	}
	return &Agent{interval: interval, dp: dp, fw: fw, log: log}, nil
}

// Run ticks until ctx is done.
func (a *Agent) Run(ctx context.Context) error {
	t := time.NewTicker(a.interval)
	defer t.Stop()
	for {
		a.tick(time.Now())
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// tick runs one step and logs its error once per change, not every tick.
func (a *Agent) tick(now time.Time) {
	err := a.step(now)
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if msg != a.lastErr {
		if err != nil {
			a.log.Error("tick failed", "err", err)
		} else {
			a.log.Info("tick recovered")
		}
		a.lastErr = msg
	}
}

// step makes the kernel match the desired state once.
func (a *Agent) step(time.Time) error {
	var errs []error
	if err := a.dp.EnsureAttached(); err != nil {
		errs = append(errs, fmt.Errorf("attach: %w", err))
	}
	pol, err := a.dp.Policies()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	var blocked []uint32
	for uid, p := range pol {
		if p.Blocked {
			blocked = append(blocked, uid)
		}
	}
	slices.Sort(blocked)
	res, err := a.fw.Reconcile(blocked)
	if err != nil {
		errs = append(errs, fmt.Errorf("nftables: %w", err))
	} else if res.Recreated {
		a.log.Warn("nftables table was missing or altered (or this is the first start); rebuilt", "blocked", len(blocked))
	} else if res.Added+res.Removed > 0 {
		a.log.Info("blocked set updated", "added", res.Added, "removed", res.Removed)
	}
	return errors.Join(errs...)
}
