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
	"github.com/myvpn/bwagent/quota"
	"google.golang.org/grpc/codes"
)

// ErrorCodes are the gRPC codes of the agent's sentinel errors, for
// control.Options.ErrorCodes (the quota sentinels are control's defaults).
var ErrorCodes = []control.ErrorCode{
	{Err: agent.ErrUnknownUser, Code: codes.NotFound},
	{Err: agent.ErrNoLimit, Code: codes.FailedPrecondition},
	{Err: agent.ErrStarting, Code: codes.Unavailable},
	{Err: agent.ErrStopped, Code: codes.Unavailable},
}

// Backend is a control.Backend over an agent. The agent's reads and views
// are control's types (package view), so it only forwards.
type Backend struct{ a *agent.Agent }

var _ control.Backend = (*Backend)(nil)

// New returns a's control backend.
func New(a *agent.Agent) *Backend { return &Backend{a} }

func (b *Backend) Users(ctx context.Context) ([]control.User, error) { return b.a.Users(ctx) }
func (b *Backend) User(ctx context.Context, name string) (control.User, error) {
	return b.a.User(ctx, name)
}
func (b *Backend) History(ctx context.Context, name, from, to string) ([]control.Day, error) {
	return b.a.History(ctx, name, from, to)
}
func (b *Backend) Updates() (uint64, <-chan struct{})             { return b.a.Updates() }
func (b *Backend) Health() control.Health                         { return b.a.Health() }
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

func (b *Backend) Devices(ctx context.Context, name string) ([]control.Device, error) {
	return b.a.Devices(ctx, name)
}

func (b *Backend) SetSpeed(ctx context.Context, name string, throttle bool, s quota.Speed) error {
	return b.a.SetSpeed(ctx, name, throttle, s)
}

func (b *Backend) SetDevices(ctx context.Context, name string, d quota.DeviceLimit) error {
	return b.a.SetDevices(ctx, name, d)
}
