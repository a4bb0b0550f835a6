package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/myvpn/bwagent/control/internal/controlpb"
	"github.com/myvpn/bwagent/quota"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// Client is a connection to the agent's control socket. Its methods mirror
// the RPCs; their errors are *Error (see Code) with the server's message.
type Client struct {
	cc *grpc.ClientConn
	c  controlpb.ControlClient

	mu    sync.Mutex
	first net.Conn // Dial's connection until gRPC takes it
}

// Dial connects to the control socket at path. It fails with a message for
// a person when nothing serves there or the socket may not be opened. The
// connection it opens to find out is the one gRPC goes on with: a Client
// holds one connection (the server limits how many a UID may hold).
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	switch {
	case errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED):
		return nil, fmt.Errorf("bwagent is not running (no socket at %s): start it with `systemctl start bwagent`", path)
	case errors.Is(err, os.ErrPermission):
		return nil, fmt.Errorf("cannot open bwagent's socket %s: permission denied", path)
	case err != nil:
		return nil, fmt.Errorf("cannot connect to bwagent at %s: %w", path, err)
	}
	cl := &Client{first: c}
	cc, err := grpc.NewClient("passthrough:///bwagent",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			if c := cl.takeFirst(); c != nil {
				return c, nil
			}
			return d.DialContext(ctx, "unix", path)
		}))
	if err != nil {
		c.Close()
		return nil, err
	}
	cl.cc, cl.c = cc, controlpb.NewControlClient(cc)
	cc.Connect() // now, while Dial's connection is fresh
	return cl, nil
}

func (c *Client) takeFirst() net.Conn {
	c.mu.Lock()
	defer c.mu.Unlock()
	first := c.first
	c.first = nil
	return first
}

// Close closes the connection.
func (c *Client) Close() error {
	if first := c.takeFirst(); first != nil {
		first.Close()
	}
	return c.cc.Close()
}

// callErr converts a gRPC error to *Error.
func callErr(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	return &Error{Code: st.Code(), Msg: st.Message()}
}

// ListUsers returns every user, or those with status st ("" for all; any
// case).
func (c *Client) ListUsers(ctx context.Context, st string) ([]User, error) {
	r, err := c.c.ListUsers(ctx, &controlpb.ListUsersRequest{Status: st})
	if err != nil {
		return nil, callErr(err)
	}
	out := make([]User, len(r.Users))
	for i, u := range r.Users {
		out[i] = userFromPB(u)
	}
	return out, nil
}

// User returns one user; name "" means the caller's own account.
func (c *Client) User(ctx context.Context, name string) (User, error) {
	r, err := c.c.GetUser(ctx, &controlpb.GetUserRequest{Name: name})
	if err != nil {
		return User{}, callErr(err)
	}
	return userFromPB(r), nil
}

// History returns the user's usage per day for days in [from, to]
// (YYYY-MM-DD; "" is unbounded).
func (c *Client) History(ctx context.Context, name, from, to string) ([]Day, error) {
	r, err := c.c.History(ctx, &controlpb.HistoryRequest{Name: name, From: from, To: to})
	if err != nil {
		return nil, callErr(err)
	}
	out := make([]Day, len(r.Days))
	for i, d := range r.Days {
		out[i] = Day{Day: d.Day, Up: d.Up, Down: d.Down}
	}
	return out, nil
}

// SetLimit sets the user's limit in bytes; 0 is unlimited.
func (c *Client) SetLimit(ctx context.Context, name string, bytes uint64) error {
	_, err := c.c.SetLimit(ctx, &controlpb.SetLimitRequest{Name: name, Bytes: bytes})
	return callErr(err)
}

// RemoveLimit removes the user's limit (a device limit on the line stays).
func (c *Client) RemoveLimit(ctx context.Context, name string) error {
	_, err := c.c.RemoveLimit(ctx, &controlpb.NameRequest{Name: name})
	return callErr(err)
}

// Devices returns the user's live devices, oldest first; name "" means
// the caller's own account.
func (c *Client) Devices(ctx context.Context, name string) ([]Device, error) {
	r, err := c.c.ListDevices(ctx, &controlpb.NameRequest{Name: name})
	if err != nil {
		return nil, callErr(err)
	}
	return devicesFromPB(r), nil
}

// SetDevices sets the user's device limit (devices=N);
// quota.DevicesDefault removes it (the configured default applies) and
// quota.DevicesUnlimited exempts the user from any.
func (c *Client) SetDevices(ctx context.Context, name string, d quota.DeviceLimit) error {
	_, err := c.c.SetDevices(ctx, &controlpb.SetDevicesRequest{Name: name, Devices: int32(d)})
	return callErr(err)
}

// SetSpeed sets the user's speed caps (speed=) or, with throttle, their
// throttle rate (throttle=); the zero Speed removes it (the configured
// default applies).
func (c *Client) SetSpeed(ctx context.Context, name string, throttle bool, s quota.Speed) error {
	_, err := c.c.SetSpeed(ctx, &controlpb.SetSpeedRequest{Name: name, Throttle: throttle, Down: uint64(s.Down), Up: uint64(s.Up)})
	return callErr(err)
}

// Reset zeroes the user's usage.
func (c *Client) Reset(ctx context.Context, name string) error {
	_, err := c.c.Reset(ctx, &controlpb.NameRequest{Name: name})
	return callErr(err)
}

// ResetAll resets every user and returns how many.
func (c *Client) ResetAll(ctx context.Context) (int, error) {
	r, err := c.c.ResetAll(ctx, &controlpb.Empty{})
	if err != nil {
		return 0, callErr(err)
	}
	return int(r.Count), nil
}

// Disable blocks the user until Enable.
func (c *Client) Disable(ctx context.Context, name string) error {
	_, err := c.c.Disable(ctx, &controlpb.NameRequest{Name: name})
	return callErr(err)
}

// Enable lifts Disable.
func (c *Client) Enable(ctx context.Context, name string) error {
	_, err := c.c.Enable(ctx, &controlpb.NameRequest{Name: name})
	return callErr(err)
}

// Unblock lets a blocked user back in for d (0: until the usage is reset or
// the limit raised). d is rounded down to whole seconds.
func (c *Client) Unblock(ctx context.Context, name string, d time.Duration) error {
	_, err := c.c.Unblock(ctx, &controlpb.UnblockRequest{Name: name, DurationSeconds: int64(d / time.Second)})
	return callErr(err)
}

// Check runs a tick now.
func (c *Client) Check(ctx context.Context) error {
	_, err := c.c.Check(ctx, &controlpb.Empty{})
	return callErr(err)
}

// Status returns the agent's health as of its last tick.
func (c *Client) Status(ctx context.Context) (Health, error) {
	r, err := c.c.Status(ctx, &controlpb.Empty{})
	if err != nil {
		return Health{}, callErr(err)
	}
	h := Health{
		TickDuration: time.Duration(r.TickDurationNanos), Ticks: r.Ticks, Users: int(r.Users),
		Errors: r.Errors, Components: r.Components,
		Kernel: KernelStats{
			DroppedBlocked: r.DroppedBlocked, DroppedQuota: r.DroppedQuota,
			CountersFull: r.CountersFull, QuotaFull: r.QuotaFull,
			SSHSessions: r.SshSessions, SSHHeld: r.SshHeld, SSHUnattributed: r.SshUnattributed,
			SSHNeverAttributed: r.SshNeverAttributed,
			XrayClaimed:        r.XrayClaimed, XrayHeld: r.XrayHeld, XrayUnclaimed: r.XrayUnclaimed,
			DroppedRate: r.DroppedRate,
		},
		Notify: notifyFromPB(r.Notify),
	}
	if r.LastTickUnixNano != 0 {
		h.LastTick = time.Unix(0, r.LastTickUnixNano)
	}
	if h.Errors == nil {
		h.Errors = map[string]string{}
	}
	return h, nil
}

// Watch returns every user's row at once and then whenever one changes.
// The channel is closed when ctx is done or the stream ends; the error of
// the first call is returned directly (a refused caller gets it here).
func (c *Client) Watch(ctx context.Context) (<-chan []UserRow, error) {
	st, err := c.c.Watch(ctx, &controlpb.Empty{})
	if err != nil {
		return nil, callErr(err)
	}
	first, err := st.Recv() // surfaces PermissionDenied at once
	if err != nil {
		return nil, callErr(err)
	}
	ch := make(chan []UserRow, 1)
	ch <- rowsFromPB(first)
	go func() {
		defer close(ch)
		for {
			snap, err := st.Recv()
			if err != nil { // ctx done or the agent stopped
				return
			}
			select {
			case ch <- rowsFromPB(snap):
			case <-ctx.Done():
				return
			}
		}
	}()
	return ch, nil
}

func rowsFromPB(s *controlpb.Snapshot) []UserRow {
	out := make([]UserRow, len(s.Users))
	for i, r := range s.Users {
		out[i] = UserRow{Name: r.Name, Protocol: quota.Protocol(r.Protocol), Status: quota.Status(r.Status),
			Used: r.Used, Limit: r.Limit, Upload: r.Upload, Download: r.Download,
			Speed: quota.Speed{Down: quota.Rate(r.SpeedDown), Up: quota.Rate(r.SpeedUp)}}
	}
	return out
}
