package agent

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/opsfiles"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

// UserView is a read-only snapshot of one user, for the CLI and the control
// API.
type UserView struct {
	Name      string
	Protocol  quota.Protocol
	UID       uint32 // SSH users
	Present   bool   // the account or Xray client exists now
	Status    quota.Status
	Used      uint64 // bytes counted against the limit
	Limit     uint64 // 0: unlimited
	Remaining uint64 // meaningful when Limit > 0
	Upload    uint64
	Download  uint64
	Today     uint64 // today's bytes, counted metric
	Reason    string
	BlockTime time.Time
	LastReset time.Time
	Override  quota.Override // Until is an Instant: use Until.Time()
	NextReset time.Time
	Expires   time.Time
	Updated   time.Time
}

func (a *Agent) view(u *user) UserView {
	p := u.plan
	v := UserView{
		Name: u.name, Protocol: u.proto, UID: u.uid, Present: u.present,
		Status: u.st.Status(p, a.rules), Used: u.st.Used(a.rules), Limit: p.Limit,
		Upload: u.st.Total.Up, Download: u.st.Total.Down,
		Reason: u.st.Reason, BlockTime: u.st.BlockTime.Time(), LastReset: u.st.LastReset.Time(),
		Override: u.st.Override, NextReset: u.st.NextReset.Time(), Expires: p.Expires.Time(), Updated: u.updated.Time(),
	}
	if u.st.Day == quota.Day(a.now().In(a.loc)) {
		v.Today = a.rules.Metric.Of(u.st.Today)
	}
	v.Remaining, _ = u.st.Remaining(p, a.rules)
	return v
}

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

// Users returns every known user, sorted by name.
func (a *Agent) Users(ctx context.Context) ([]UserView, error) {
	var out []UserView
	err := a.do(ctx, func(time.Time) error {
		for _, name := range slices.Sorted(maps.Keys(a.users)) {
			out = append(out, a.view(a.users[name]))
		}
		return nil
	})
	return out, err
}

// User returns one user.
func (a *Agent) User(ctx context.Context, name string) (UserView, error) {
	var out UserView
	err := a.do(ctx, func(time.Time) error {
		u, err := a.lookup(name)
		if err != nil {
			return err
		}
		out = a.view(u)
		return nil
	})
	return out, err
}

// History returns the user's per-day usage from the state database, today
// included, for days in [from, to] ("" is unbounded).
func (a *Agent) History(ctx context.Context, name, from, to string) ([]store.DayUsage, error) {
	var out []store.DayUsage
	err := a.do(ctx, func(time.Time) error {
		u, err := a.lookup(name)
		if err != nil {
			return err
		}
		out, err = a.st.History(name, from, to)
		if err != nil {
			return err
		}
		for _, h := range a.history { // finished days not yet committed
			if h.Name == name && (from == "" || h.Day >= from) && (to == "" || h.Day <= to) {
				out = append(out, h)
			}
		}
		if u.st.Day != "" && (from == "" || u.st.Day >= from) && (to == "" || u.st.Day <= to) {
			out = append(out, store.DayUsage{Name: name, Day: u.st.Day, Up: u.st.Today.Up, Down: u.st.Today.Down})
		}
		slices.SortFunc(out, func(x, y store.DayUsage) int {
			if x.Day < y.Day {
				return -1
			}
			if x.Day > y.Day {
				return 1
			}
			return 0
		})
		return nil
	})
	return out, err
}

// Check runs a tick now.
func (a *Agent) Check(ctx context.Context) error {
	return a.do(ctx, func(time.Time) error { return nil })
}

// Reset zeroes the user's usage and lifts a block for the limit (a renewal).
// A disabled user stays disabled.
func (a *Agent) Reset(ctx context.Context, name string) error {
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
	a.record(u, u.st.Reset(now, ""))
	a.settle(u, now)
}

// settle applies the rules to u at once after a command, so the command's
// effect (an unblock after a reset, say) is enforced in the same tick.
func (a *Agent) settle(u *user, now time.Time) {
	a.touch(u, now, jsonUrgent)
	if u.present {
		a.evaluateUser(u, now, a.day(now))
	}
}

// Disable blocks the user administratively (reason "Disabled by
// administrator") until Enable; a reset does not lift it.
func (a *Agent) Disable(ctx context.Context, name string) error {
	return a.do(ctx, func(now time.Time) error {
		u, err := a.lookup(name)
		if err != nil {
			return err
		}
		a.record(u, u.st.Disable(now))
		a.settle(u, now)
		return nil
	})
}

// Enable lifts Disable. A user still over the limit stays blocked for it.
func (a *Agent) Enable(ctx context.Context, name string) error {
	return a.do(ctx, func(now time.Time) error {
		u, err := a.lookup(name)
		if err != nil {
			return err
		}
		a.record(u, u.st.Enable(now))
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
	return a.do(ctx, func(now time.Time) error {
		u, err := a.lookup(name)
		if err != nil {
			return err
		}
		ev, err := u.st.Unblock(now, u.plan, d)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
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

// RemoveLimit removes the user's line from the limits file: unlimited.
func (a *Agent) RemoveLimit(ctx context.Context, name string) error {
	return a.editLimits(ctx, name, func(l *opsfiles.Limits) error {
		if !l.Remove(name) {
			return fmt.Errorf("%w: %s", ErrNoLimit, name)
		}
		return nil
	})
}

func (a *Agent) editLimits(ctx context.Context, name string, edit func(*opsfiles.Limits) error) error {
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
		if err := a.loadLimits(); err != nil {
			return err
		}
		a.settle(u, now)
		return nil
	})
}

// Reload applies a new configuration: the tick interval, thresholds, metric,
// time zone and file paths take effect at once, and the limits and accounts
// are read again. Settings bound at start (state database, pins, cgroup,
// nftables names, socket) need a restart; Reload returns their names.
func (a *Agent) Reload(ctx context.Context, cfg config.Config) (restart []string, err error) {
	iv, err := CheckInterval(cfg.Interval)
	if err != nil {
		return nil, err
	}
	err = a.do(ctx, func(now time.Time) error {
		old := a.cfg
		if err := a.applyConfig(cfg); err != nil {
			return err
		}
		for name, changed := range map[string]bool{
			"paths.state_db": old.Paths.StateDB != cfg.Paths.StateDB,
			"paths.socket":   old.Paths.Socket != cfg.Paths.Socket,
			"kernel":         !slices.Equal(old.Kernel.ProtectedUIDs, cfg.Kernel.ProtectedUIDs) || old.Kernel.PinPath != cfg.Kernel.PinPath || old.Kernel.Cgroup != cfg.Kernel.Cgroup || old.Kernel.MaxUIDs != cfg.Kernel.MaxUIDs,
			"nft":            old.NFT != cfg.NFT,
		} {
			if changed {
				restart = append(restart, name)
			}
		}
		slices.Sort(restart)
		a.mu.Lock()
		a.interval = iv
		a.mu.Unlock()
		a.files.setDir(cfg.Paths.UsageDir)
		if !slices.Equal(old.Xray.Configs, cfg.Xray.Configs) || old.Xray.ConfigDir != cfg.Xray.ConfigDir {
			a.xr.conf = nil // read the new files next tick; the users stay until then
		}
		a.commits.setLog(cfg.Paths.BlockLog, a.loc)
		if old.Paths.UsageDir != cfg.Paths.UsageDir {
			a.watch.close()
			a.watch = newDirWatch(cfg.Paths.UsageDir)
		}
		for _, u := range a.users {
			a.markJSON(u, jsonUrgent) // the metric or time zone may have changed the files
		}
		return nil
	})
	return restart, err
}
