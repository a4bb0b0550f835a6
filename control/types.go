package control

import (
	"context"
	"errors"
	"time"

	"github.com/myvpn/bwagent/quota"
	"google.golang.org/grpc/codes"
)

// Backend is what the server needs from the agent: its operator commands.
// Package control/agentbackend adapts *agent.Agent to it.
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
	Health() Health
}

// User is one user as the agent sees it (the agent's UserView). Zero times
// mean none.
type User struct {
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
	Override  Override
	NextReset time.Time
	Expires   time.Time
	Updated   time.Time
}

// Override is a manual unblock in force (quota.Override).
type Override struct {
	Active bool
	Limit  uint64    // the limit when the override was granted
	Until  time.Time // zero: no end time
}

// Day is one day's usage of a user.
type Day struct {
	Day      string // YYYY-MM-DD
	Up, Down uint64
}

// Health is the agent's own state as of the last tick.
type Health struct {
	LastTick     time.Time // zero: no tick yet
	TickDuration time.Duration
	Users        int
	Errors       map[string]string // subject → error; empty when healthy
	// Components are the parts of the agent ("kernel", "nftables", "xray",
	// "state database", "usage files") with their state: "ok", a short
	// description, or the error.
	Components map[string]string
}

// UserRow is the part of a user that a live monitor shows (Watch).
type UserRow struct {
	Name     string
	Protocol quota.Protocol
	Status   quota.Status
	Used     uint64
	Limit    uint64
	Upload   uint64
	Download uint64
}

// Row returns u's monitor row.
func (u User) Row() UserRow {
	return UserRow{Name: u.Name, Protocol: u.Protocol, Status: u.Status, Used: u.Used, Limit: u.Limit, Upload: u.Upload, Download: u.Download}
}

// ErrorCode maps a backend error (matched with errors.Is) to a gRPC code.
type ErrorCode struct {
	Err  error
	Code codes.Code
}

// DefaultErrorCodes are the codes of the quota package's sentinels.
var DefaultErrorCodes = []ErrorCode{
	{quota.ErrBadName, codes.InvalidArgument},
	{quota.ErrBadLimit, codes.InvalidArgument},
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
