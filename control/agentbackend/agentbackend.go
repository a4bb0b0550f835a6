// Package agentbackend adapts *agent.Agent to control.Backend. It is apart
// from package control so that bwctl, which uses control.Client, does not
// link the agent. The agent's side of the control socket is:
//
//	srv := control.NewServer(agentbackend.New(a), control.Options{
//		AdminGroup: cfg.Control.AdminGroup,
//		ErrorCodes: agentbackend.ErrorCodes,
//	})
//	go srv.Serve(ctx, cfg.Paths.Socket)
package agentbackend

import (
	"context"
	"time"

	"github.com/myvpn/bwagent/agent"
	"github.com/myvpn/bwagent/control"
	"google.golang.org/grpc/codes"
)

// ErrorCodes are the gRPC codes of the agent's sentinel errors, for
// control.Options.ErrorCodes (the quota sentinels are control's defaults).
var ErrorCodes = []control.ErrorCode{
	{Err: agent.ErrUnknownUser, Code: codes.NotFound},
	{Err: agent.ErrNoLimit, Code: codes.FailedPrecondition},
	{Err: agent.ErrInterval, Code: codes.InvalidArgument},
	{Err: agent.ErrStopped, Code: codes.Unavailable},
}

// Backend is a control.Backend over an agent.
type Backend struct{ a *agent.Agent }

var _ control.Backend = (*Backend)(nil)

// New returns a's control backend.
func New(a *agent.Agent) *Backend { return &Backend{a} }

// User converts the agent's view of a user.
func User(v agent.UserView) control.User {
	return control.User{
		Name: v.Name, Protocol: v.Protocol, UID: v.UID, Present: v.Present, Status: v.Status,
		Used: v.Used, Limit: v.Limit, Remaining: v.Remaining, Upload: v.Upload, Download: v.Download,
		Today: v.Today, Reason: v.Reason, BlockTime: v.BlockTime, LastReset: v.LastReset,
		Override:  control.Override{Active: v.Override.Active, Limit: v.Override.Limit, Until: v.Override.Until.Time()},
		NextReset: v.NextReset, Expires: v.Expires, Updated: v.Updated,
	}
}

func (b *Backend) Users(ctx context.Context) ([]control.User, error) {
	vs, err := b.a.Users(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]control.User, len(vs))
	for i, v := range vs {
		out[i] = User(v)
	}
	return out, nil
}

func (b *Backend) User(ctx context.Context, name string) (control.User, error) {
	v, err := b.a.User(ctx, name)
	if err != nil {
		return control.User{}, err
	}
	return User(v), nil
}

func (b *Backend) History(ctx context.Context, name, from, to string) ([]control.Day, error) {
	ds, err := b.a.History(ctx, name, from, to)
	if err != nil {
		return nil, err
	}
	out := make([]control.Day, len(ds))
	for i, d := range ds {
		out[i] = control.Day{Day: d.Day, Up: d.Up, Down: d.Down}
	}
	return out, nil
}

func (b *Backend) Check(ctx context.Context) error                { return b.a.Check(ctx) }
func (b *Backend) Reset(ctx context.Context, name string) error   { return b.a.Reset(ctx, name) }
func (b *Backend) ResetAll(ctx context.Context) (int, error)      { return b.a.ResetAll(ctx) }
func (b *Backend) Disable(ctx context.Context, name string) error { return b.a.Disable(ctx, name) }
func (b *Backend) Enable(ctx context.Context, name string) error  { return b.a.Enable(ctx, name) }

func (b *Backend) Unblock(ctx context.Context, name string, d time.Duration) error {
	return b.a.Unblock(ctx, name, d)
}

func (b *Backend) SetLimit(ctx context.Context, name string, limit uint64) error {
	return b.a.SetLimit(ctx, name, limit)
}

func (b *Backend) RemoveLimit(ctx context.Context, name string) error {
	return b.a.RemoveLimit(ctx, name)
}

func (b *Backend) Health() control.Health {
	h := b.a.Health()
	return control.Health{LastTick: h.LastTick, TickDuration: h.TickDuration, Users: h.Users, Errors: h.Errors, Components: h.Components}
}

// Updates forwards the agent's: the version of its users' snapshot and a
// channel closed when a newer one is published.
func (b *Backend) Updates() (uint64, <-chan struct{}) { return b.a.Updates() }
