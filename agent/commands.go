package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
)

// lookup returns the named user, or ErrUnknownUser.
func (a *Agent) lookup(name string) (*user, error) {
	if err := quota.ValidName(name); err != nil {
		return nil, err
	}
	u := a.users[name]
	if u == nil {
		return nil, fmt.Errorf("%w %q: not an account in the SSH UID range nor an Xray client", ErrUnknownUser, name)
	}
	return u, nil
}

// Check runs a tick now.
func (a *Agent) Check(ctx context.Context) error {
	return a.do(ctx, func(time.Time) error { return nil })
}

// Reset zeroes the user's usage and lifts a block for the limit (a renewal).
// A disabled user stays disabled.
func (a *Agent) Reset(ctx context.Context, name string) error {
	if a.fl != nil {
		return a.fleetReset(ctx, name)
	}
	return a.do(ctx, func(now time.Time) error {
		u, err := a.lookup(name)
		if err != nil {
			return err
		}
		a.reset(u, now)
		return nil
	})
}

// ResetAll resets every user; it returns how many.
func (a *Agent) ResetAll(ctx context.Context) (int, error) {
	if a.fl != nil {
		return a.fleetResetAll(ctx)
	}
	n := 0
	err := a.do(ctx, func(now time.Time) error {
		for _, u := range a.users {
			a.reset(u, now)
			n++
		}
		return nil
	})
	return n, err
}

func (a *Agent) reset(u *user, now time.Time) {
	a.record(u, a.change(u, func(st *quota.State) []quota.Event { return st.Reset(now, "") }))
	a.settle(u, now)
}

// change applies fn to u's state, on a record the loop may write, and
// returns fn's events.
func (a *Agent) change(u *user, fn func(st *quota.State) []quota.Event) []quota.Event {
	w := a.edit(u)
	st := w.state()
	ev := fn(&st)
	w.setState(st)
	return ev
}

// settle applies the rules to u at once after a command, so the command's
// effect (an unblock after a reset, say) is enforced in the same tick.
func (a *Agent) settle(u *user, now time.Time) {
	a.touch(u, now, jsonUrgent)
	if u.r.present() {
		a.evaluateUser(u, now, a.day(now))
	}
}

// Disable blocks the user administratively (reason "Disabled by
// administrator") until Enable; a reset does not lift it.
func (a *Agent) Disable(ctx context.Context, name string) error {
	if a.fl != nil {
		return a.fleetSwitch(ctx, name, true)
	}
	return a.do(ctx, func(now time.Time) error {
		u, err := a.lookup(name)
		if err != nil {
			return err
		}
		a.record(u, a.change(u, func(st *quota.State) []quota.Event { return st.Disable(now) }))
		a.settle(u, now)
		return nil
	})
}

// Enable lifts Disable. A user still over the limit stays blocked for it.
func (a *Agent) Enable(ctx context.Context, name string) error {
	if a.fl != nil {
		return a.fleetSwitch(ctx, name, false)
	}
	return a.do(ctx, func(now time.Time) error {
		u, err := a.lookup(name)
		if err != nil {
			return err
		}
		a.record(u, a.change(u, func(st *quota.State) []quota.Event { return st.Enable(now) }))
		a.settle(u, now)
		return nil
	})
}

// Unblock lets a user blocked for the limit or expiry back in without a
// reset. The rule: the user stays unblocked until their usage is reset, their
// limit is raised above the current one (or removed), or d passes (d = 0: no
// end time); the next ticks do not block them again for the same limit. A
// disabled user must be enabled instead (quota.ErrDisabled).
func (a *Agent) Unblock(ctx context.Context, name string, d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("unblock duration must not be negative, got %v", d)
	}
	if a.fl != nil {
		return a.fleetUnblock(ctx, name, d)
	}
	return a.do(ctx, func(now time.Time) error {
		u, err := a.lookup(name)
		if err != nil {
			return err
		}
		st := u.r.state()
		ev, err := st.Unblock(now, u.r.plan(), d)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		a.edit(u).setState(st)
		a.record(u, ev)
		a.settle(u, now)
		return nil
	})
}

// SetLimit sets the user's limit in bytes (0: unlimited) by rewriting the
// limits file atomically, keeping its comments and other lines.
func (a *Agent) SetLimit(ctx context.Context, name string, limit uint64) error {
	if limit > quota.MaxLimit {
		return fmt.Errorf("%w: %d bytes is more than 1 EiB", quota.ErrBadLimit, limit)
	}
	return a.editLimits(ctx, name, func(l *opsfiles.Limits) error {
		e, _ := l.Lookup(name)
		e.User, e.Limit = name, limit
		return l.Set(e)
	})
}

// RemoveLimit removes the user's line from the limits file: unlimited. A
// device limit, speed caps and a throttle rate on the line stay: the line
// becomes "USER unlimited devices=N speed=RATE".
func (a *Agent) RemoveLimit(ctx context.Context, name string) error {
	return a.editLimits(ctx, name, func(l *opsfiles.Limits) error {
		if e, ok := l.Lookup(name); ok && (e.Devices != quota.DevicesDefault || !e.Speed.IsZero() || !e.Throttle.IsZero()) {
			return l.Set(opsfiles.Entry{User: name, Devices: e.Devices, Speed: e.Speed, Throttle: e.Throttle})
		}
		if !l.Remove(name) {
			return fmt.Errorf("%w: %s", ErrNoLimit, name)
		}
		return nil
	})
}

// SetDevices sets the user's device limit (devices=N on their line of the
// limits file, quota.DevicesUnlimited for none whatever the default) or,
// with quota.DevicesDefault, removes it, so that the configured default
// applies; the rest of the line stays. A line left with nothing to say is
// removed; a user without a line gets "USER unlimited devices=N".
func (a *Agent) SetDevices(ctx context.Context, name string, d quota.DeviceLimit) error {
	if !d.Valid() {
		return fmt.Errorf("%w %d: want 1 to %d devices, or unlimited", quota.ErrBadDevices, d, quota.MaxDevices)
	}
	return a.editOption(ctx, name, d == quota.DevicesDefault, func(e *opsfiles.Entry) { e.Devices = d })
}

// SetSpeed sets the user's speed caps (speed=DOWN/UP on their line of the
// limits file) or, with throttle, their throttle rate (throttle=); the zero
// Speed removes it, so that the configured default applies. The rest of
// the line stays; a line left with nothing to say is removed, and a user
// without a line gets "USER unlimited speed=RATE". The caps apply in the
// tick this command is followed by.
func (a *Agent) SetSpeed(ctx context.Context, name string, throttle bool, s quota.Speed) error {
	if err := s.Check(); err != nil {
		return err
	}
	return a.editOption(ctx, name, s.IsZero(), func(e *opsfiles.Entry) {
		if throttle {
			e.Throttle = s
		} else {
			e.Speed = s
		}
	})
}

// editOption sets one option of the user's line of the limits file (set);
// the rest of the line stays. Unset (the option back to its default), a
// line left with nothing to say is removed; a user without a line gets
// "USER unlimited OPTION".
func (a *Agent) editOption(ctx context.Context, name string, unset bool, set func(*opsfiles.Entry)) error {
	return a.editLimits(ctx, name, func(l *opsfiles.Limits) error {
		e, ok := l.Lookup(name)
		e.User = name
		set(&e)
		if unset && e == (opsfiles.Entry{User: name, Line: e.Line}) {
			if ok {
				l.Remove(name)
			}
			return nil
		}
		return l.Set(e)
	})
}

func (a *Agent) editLimits(ctx context.Context, name string, edit func(*opsfiles.Limits) error) error {
	if a.fl != nil {
		return a.fleetEditPlan(ctx, name, edit)
	}
	return a.do(ctx, func(now time.Time) error {
		u, err := a.lookup(name)
		if err != nil {
			return err
		}
		path := a.cfg.Paths.Limits
		l, _, err := opsfiles.ReadLimits(path)
		if err != nil {
			return err
		}
		if err := edit(l); err != nil {
			return err
		}
		if err := opsfiles.WriteLimits(path, l); err != nil {
			return err
		}
		a.limitsStamp = stamp{}
		if err := a.loadLimits(now); err != nil {
			return err
		}
		a.settle(u, now)
		return nil
	})
}

// Reload applies a new configuration: the tick interval, thresholds,
// metric, time zone, retention, file paths and the SSH and Xray switches
// take effect at once, and the limits, accounts and Xray's config are read
// again. A configuration that changes a setting bound at start (state
// database, socket, pins, cgroup, nftables names...) is refused as a whole
// with ErrNeedRestart naming the keys, so the running configuration stays
// consistent with what the agent uses.
func (a *Agent) Reload(ctx context.Context, cfg config.Config) error {
	return a.do(ctx, func(now time.Time) error {
		old := a.cfg
		if keys := old.NeedsRestart(cfg); len(keys) > 0 {
			return fmt.Errorf("%w: %s; restart the agent to apply them (nothing was applied)", ErrNeedRestart, strings.Join(keys, ", "))
		}
		a.applyConfig(cfg)
		a.files.setDir(cfg.Paths.UsageDir)
		a.commits.setLog(cfg.Paths.BlockLog, a.loc)
		if old.Paths.UsageDir != cfg.Paths.UsageDir {
			a.watch.setDir(cfg.Paths.UsageDir)
		}
		if !slices.Equal(old.Xray.Configs, cfg.Xray.Configs) || old.Xray.ConfigDir != cfg.Xray.ConfigDir || !cfg.Xray.Enabled {
			a.xr.conf = nil // read the new files next tick; the users stay until then
		}
		if old.Paths.MarkerDir != cfg.Paths.MarkerDir {
			a.markersDirty = true
		}
		if old.SSH.Enabled && !cfg.SSH.Enabled {
			// Turned off: nobody is an SSH user any more, so no UID keeps a
			// block or a budget in the kernel or the nft set.
			for _, u := range a.users {
				if u.r.ssh {
					a.leaveSSH(u, now)
				}
			}
			a.kernel.releaseUIDs()
		}
		if old.Xray.Enabled && !cfg.Xray.Enabled {
			for _, u := range a.users {
				if u.r.xray {
					a.leaveXray(u, now)
				}
			}
		}
		for _, u := range a.users {
			if u.r.present() {
				a.markJSON(u, jsonUrgent) // the metric or time zone may have changed the files
			}
		}
		return nil
	})
}
