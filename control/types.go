package control

import (
	"context"
	"errors"
	"time"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/view"
	"google.golang.org/grpc/codes"
)

// Backend is what the server needs from the agent: its operator commands,
// its views, and word of each new snapshot of its users (Updates, which
// Watch waits on). Package control/agentbackend adapts *agent.Agent to it.
type Backend interface {
	Users(ctx context.Context) ([]User, error)
	User(ctx context.Context, name string) (User, error)
	History(ctx context.Context, name, from, to string) ([]Day, error)
	Check(ctx context.Context) error
	Reset(ctx context.Context, name string) error
	ResetAll(ctx context.Context) (int, error)
	Disable(ctx context.Context, name string) error
	Enable(ctx context.Context, name string) error
	Unblock(ctx context.Context, name string, d time.Duration) error
	SetLimit(ctx context.Context, name string, limit uint64) error
	RemoveLimit(ctx context.Context, name string) error
	Devices(ctx context.Context, name string) ([]Device, error)
	SetDevices(ctx context.Context, name string, d quota.DeviceLimit) error
	SetSpeed(ctx context.Context, name string, throttle bool, s quota.Speed) error
	Health() Health
	// Updates returns the version of the users' snapshot now and a channel
	// that is closed when a newer version is published.
	Updates() (version uint64, changed <-chan struct{})
}

// The types the API carries are the agent's views (package view), so
// nothing converts them field by field.
type (
	User        = view.User
	Override    = view.Override
	Day         = view.Day
	Health      = view.Health
	KernelStats = view.KernelStats
	UserRow     = view.UserRow
	Device      = view.Device
)

// NotifyChannel is one notification channel's state in Health (view).
type NotifyChannel = view.NotifyChannel

// ErrorCode maps a backend error (matched with errors.Is) to a gRPC code.
type ErrorCode struct {
	Err  error
	Code codes.Code
}

// DefaultErrorCodes are the codes of the quota package's sentinels.
var DefaultErrorCodes = []ErrorCode{
	{quota.ErrBadName, codes.InvalidArgument},
	{quota.ErrBadLimit, codes.InvalidArgument},
	{quota.ErrBadDevices, codes.InvalidArgument},
	{quota.ErrNotBlocked, codes.FailedPrecondition},
	{quota.ErrDisabled, codes.FailedPrecondition},
}

// Error is a failed call as Client returns it: the server's message and
// its gRPC code.
type Error struct {
	Code codes.Code
	Msg  string
}

func (e *Error) Error() string { return e.Msg }

// Code returns err's gRPC code: codes.OK for nil, the code of an *Error in
// its chain, and codes.Unknown otherwise.
func Code(err error) codes.Code {
	if err == nil {
		return codes.OK
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return codes.Unknown
}
