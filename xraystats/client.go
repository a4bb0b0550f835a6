package xraystats

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/myvpn/bwagent/xraystats/internal/xraypb/handlercmdpb"
	"github.com/myvpn/bwagent/xraystats/internal/xraypb/protocolpb"
	"github.com/myvpn/bwagent/xraystats/internal/xraypb/statscmdpb"
)

// DefaultTimeout bounds each call of a Client unless [WithTimeout] is given.
const DefaultTimeout = 500 * time.Millisecond

// maxRecvMsgSize bounds one answer from Xray. gRPC's default of 4 MiB would
// cut QueryStats off at some 50,000 users.
const maxRecvMsgSize = 256 << 20

// Client is a connection to the gRPC API of one Xray server. It reconnects by
// itself when Xray restarts. It is safe for concurrent use.
type Client struct {
	conn    *grpc.ClientConn
	stats   statscmdpb.StatsServiceClient
	handler handlercmdpb.HandlerServiceClient
	timeout time.Duration
	closed  atomic.Bool
}

// Option configures [Dial].
type Option func(*options)

type options struct {
	timeout time.Duration
}

// WithTimeout bounds each call of the Client, Dial's own check included, to
// d (default [DefaultTimeout]). A call returns an error wrapping
// [ErrUnavailable] when Xray has not answered in time. d <= 0 keeps the
// default.
func WithTimeout(d time.Duration) Option {
	return func(o *options) {
		if d > 0 {
			o.timeout = d
		}
	}
}

// Dial connects to the gRPC API of the Xray server at addr, a local
// "host:port" such as "127.0.0.1:10085" (or a gRPC target such as
// "unix:///run/xray/api.sock"), without TLS, and checks that it answers by
// reading its system stats, within ctx and the per-call timeout. It fails
// with an error wrapping [ErrUnavailable] when Xray is not reachable, and
// [ErrUnsupported] when its API does not enable the StatsService.
//
// Once dialled, the Client reconnects by itself, retrying at least once a
// second, when Xray restarts; calls made while it is down fail fast with
// [ErrUnavailable].
func Dial(ctx context.Context, addr string, opts ...Option) (*Client, error) {
	o := options{timeout: DefaultTimeout}
	for _, opt := range opts {
		opt(&o)
	}
	if addr == "" {
		return nil, fmt.Errorf("xraystats: dial: %w: empty address", ErrInvalid)
	}
	target := addr
	if !strings.Contains(addr, ":///") && !strings.HasPrefix(addr, "unix:") {
		// A plain host:port: no name resolution through gRPC's DNS resolver.
		target = "passthrough:///" + addr
	}
	conn, err := grpc.NewClient(target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithConnectParams(grpc.ConnectParams{
			// Xray is local: retry soon after it comes back, not after
			// gRPC's default backoff of up to two minutes.
			Backoff: backoff.Config{
				BaseDelay:  100 * time.Millisecond,
				Multiplier: 1.6,
				Jitter:     0.2,
				MaxDelay:   time.Second,
			},
			MinConnectTimeout: max(o.timeout, time.Second),
		}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxRecvMsgSize)),
	)
	if err != nil {
		return nil, fmt.Errorf("xraystats: dial %s: %w: %w", addr, ErrInvalid, err)
	}
	c := &Client{
		conn:    conn,
		stats:   statscmdpb.NewStatsServiceClient(conn),
		handler: handlercmdpb.NewHandlerServiceClient(conn),
		timeout: o.timeout,
	}
	if _, err := c.sysStats(ctx, "dial "+addr); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Close closes the connection. Calls made after it fail with [ErrClosed].
// Closing again does nothing.
func (c *Client) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	return c.conn.Close()
}

// call runs f with the per-call timeout added to ctx and turns its error
// into one of this package's, for operation op.
func (c *Client) call(ctx context.Context, op string, f func(context.Context) error) error {
	if c.closed.Load() {
		return fmt.Errorf("xraystats: %s: %w", op, ErrClosed)
	}
	cctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	if err := f(cctx); err != nil {
		return wrapErr(ctx, op, err)
	}
	return nil
}

// Traffic is the traffic of one user since Xray started, in payload bytes.
type Traffic struct {
	Uplink   int64 // from the client (user) to the destination
	Downlink int64 // from the destination to the client (user)
}

// UserTraffic returns the traffic of every user that has counters in Xray,
// by email, without resetting the counters. A user has counters from its
// first connection after Xray started; users without any are not in the
// map. A caller that reads every user's counters often should rather use
// [Client.ScanUserTraffic], which builds no map.
func (c *Client) UserTraffic(ctx context.Context) (map[string]Traffic, error) {
	m := make(map[string]Traffic)
	err := c.ScanUserTraffic(ctx, func(email []byte, downlink bool, value int64) {
		t := m[string(email)]
		if downlink {
			t.Downlink = value
		} else {
			t.Uplink = value
		}
		m[string(email)] = t
	})
	if err != nil {
		return nil, err
	}
	return m, nil
}

// UserTrafficOf returns the traffic of the user with this email, without
// resetting its counters. Only this exact email counts: "alice" never
// matches "alice2". It fails with an error wrapping [ErrNotFound] when Xray
// has no counter for the email: no connection of that user since Xray
// started, no such user, or user stats are off in Xray's policy for the
// user's level.
func (c *Client) UserTrafficOf(ctx context.Context, email string) (Traffic, error) {
	op := fmt.Sprintf("query traffic of %q", email)
	if email == "" {
		return Traffic{}, fmt.Errorf("xraystats: %s: %w: empty email", op, ErrInvalid)
	}
	var resp *statscmdpb.QueryStatsResponse
	err := c.call(ctx, op, func(ctx context.Context) (err error) {
		// A substring pattern that ends where the email ends; the exact
		// names are compared below.
		pattern := KindUser + sep + email + sep + "traffic" + sep
		resp, err = c.stats.QueryStats(ctx, &statscmdpb.QueryStatsRequest{Pattern: pattern})
		return err
	})
	if err != nil {
		return Traffic{}, err
	}
	up, down := userStatName(email, MetricUplink), userStatName(email, MetricDownlink)
	var t Traffic
	found := false
	for _, s := range resp.GetStat() {
		switch s.GetName() {
		case up:
			t.Uplink, found = s.GetValue(), true
		case down:
			t.Downlink, found = s.GetValue(), true
		}
	}
	if !found {
		return Traffic{}, fmt.Errorf("xraystats: %s: %w: no counter", op, ErrNotFound)
	}
	return t, nil
}

// SysStats are Xray's runtime statistics.
type SysStats struct {
	// Uptime is the time since Xray's stats service started, in whole
	// seconds. It going down between two reads means that Xray restarted,
	// and its counters with it.
	Uptime       time.Duration
	NumGoroutine uint32
	NumGC        uint32
	Alloc        uint64 // bytes of allocated heap objects
	TotalAlloc   uint64 // cumulative bytes allocated
	Sys          uint64 // bytes obtained from the OS
	Mallocs      uint64
	Frees        uint64
	LiveObjects  uint64
	PauseTotal   time.Duration // cumulative GC pause
}

// SysStats returns Xray's runtime statistics, among them its uptime.
func (c *Client) SysStats(ctx context.Context) (SysStats, error) {
	return c.sysStats(ctx, "sys stats")
}

func (c *Client) sysStats(ctx context.Context, op string) (SysStats, error) {
	var r *statscmdpb.SysStatsResponse
	err := c.call(ctx, op, func(ctx context.Context) (err error) {
		r, err = c.stats.GetSysStats(ctx, &statscmdpb.SysStatsRequest{})
		return err
	})
	if err != nil {
		return SysStats{}, err
	}
	return SysStats{
		Uptime:       time.Duration(r.GetUptime()) * time.Second,
		NumGoroutine: r.GetNumGoroutine(),
		NumGC:        r.GetNumGC(),
		Alloc:        r.GetAlloc(),
		TotalAlloc:   r.GetTotalAlloc(),
		Sys:          r.GetSys(),
		Mallocs:      r.GetMallocs(),
		Frees:        r.GetFrees(),
		LiveObjects:  r.GetLiveObjects(),
		PauseTotal:   time.Duration(r.GetPauseTotalNs()),
	}, nil
}

// OnlineIPs returns the source IPs that the user with this email has open
// connections from, each with the Unix time (seconds) of the latest
// connection from it. The IPs are in the form of [netip.Addr.String]
// ("192.0.2.1", "2001:db8::1"), not Xray's ("[2001:db8::1]"). Xray leaves
// 127.0.0.1 and ::1 out. It needs "statsUserOnline" in Xray's policy for the
// user's level, and fails with an error wrapping [ErrNotFound] when Xray has
// no online map for the user (no connection since Xray started, or
// statsUserOnline off), and with [ErrUnsupported] when this Xray version
// lacks the call.
func (c *Client) OnlineIPs(ctx context.Context, email string) (map[string]int64, error) {
	op := fmt.Sprintf("online IPs of %q", email)
	if email == "" {
		return nil, fmt.Errorf("xraystats: %s: %w: empty email", op, ErrInvalid)
	}
	var resp *statscmdpb.GetStatsOnlineIpListResponse
	err := c.call(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.stats.GetStatsOnlineIpList(ctx, &statscmdpb.GetStatsRequest{Name: userStatName(email, MetricOnline)})
		return err
	})
	if err != nil {
		return nil, err
	}
	return plainIPs(resp.GetIps()), nil
}

// OnlineUsers returns the source IPs of every user that Xray lists as
// online, by email: a user with at least one connection open from an
// address other than 127.0.0.1 and ::1 (a user removed from their inbounds
// stays online while their open connections last). Each user's IPs are as
// [Client.OnlineIPs] gives them (the same form, with the Unix time of the
// latest connection from each); a user whose connections all closed in
// between is left out. Emails are Xray's, exactly: "alice" is never
// "alice2". It never returns a partial answer: when any request fails, the
// call fails and the map is nil.
//
// It asks StatsService.GetAllOnlineUsers for the online users, then
// GetStatsOnlineIpList once for each of them (never for users who are not
// online), a few at a time, all within one per-call timeout. An Xray
// without GetAllOnlineUsers (added to Xray-core in September 2025) makes it
// fail with an error wrapping [ErrUnsupported] and the gRPC status
// Unimplemented: ask [Client.OnlineIPs] user by user there.
//
// Users of a level whose policy lacks "statsUserOnline" are never online;
// with it off for every level the map is empty. An online map name that is
// not a user's (user>>>EMAIL>>>online) fails the call with [ErrBadName].
func (c *Client) OnlineUsers(ctx context.Context) (map[string]map[string]int64, error) {
	var users map[string]map[string]int64
	err := c.call(ctx, "online users", func(ctx context.Context) error {
		resp, err := c.stats.GetAllOnlineUsers(ctx, &statscmdpb.GetAllOnlineUsersRequest{})
		if err != nil {
			return err
		}
		names := resp.GetUsers()
		emails := make([]string, len(names))
		for i, name := range names {
			kind, email, metric, err := ParseStatName(name)
			if err != nil || kind != KindUser || metric != MetricOnline {
				return fmt.Errorf("%w: %q is not a user's online map", ErrBadName, name)
			}
			emails[i] = email
		}
		ips, err := c.onlineIPLists(ctx, names, emails)
		if err != nil {
			return err
		}
		users = make(map[string]map[string]int64, len(names))
		for i, email := range emails {
			if len(ips[i]) > 0 {
				users[email] = plainIPs(ips[i])
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return users, nil
}

// onlineIPListsInFlight is how many GetStatsOnlineIpList requests of one
// OnlineUsers call may be in flight at once.
const onlineIPListsInFlight = 8

// onlineIPLists asks Xray for the online map of each of names (whose users'
// emails are emails), up to [onlineIPListsInFlight] at a time, and returns
// their IP maps in the same order. It fails with the first error, and
// cancels the requests still running; ctx ending before every request was
// made is an error too.
func (c *Client) onlineIPLists(ctx context.Context, names, emails []string) ([]map[string]int64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ips := make([]map[string]int64, len(names))
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	fail := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		if firstErr == nil {
			firstErr = err
			cancel()
		}
	}
	slots := make(chan struct{}, onlineIPListsInFlight)
	for i, name := range names {
		slots <- struct{}{} // freed by a request, which ends by ctx's deadline
		if err := ctx.Err(); err != nil {
			// Failed or timed out before this request was made (a
			// deadline as a status error, as a request would have failed).
			fail(status.FromContextError(err).Err())
			break
		}
		wg.Go(func() {
			defer func() { <-slots }()
			r, err := c.stats.GetStatsOnlineIpList(ctx, &statscmdpb.GetStatsRequest{Name: name})
			if err != nil {
				fail(fmt.Errorf("online IPs of %q: %w", emails[i], err))
				return
			}
			ips[i] = r.GetIps()
		})
	}
	wg.Wait()
	if firstErr != nil {
		return nil, firstErr
	}
	return ips, nil
}

// plainIPs returns the online map ips, as Xray sends it, with its IPs in the
// form of [netip.Addr.String]. Xray writes an IPv6 address in brackets
// ("[2001:db8::1]", common/net/address.go), which [netip.ParseAddr] refuses;
// IPv4 addresses, IPv4-mapped ones included, come as "192.0.2.1". A key that
// is no IP address stays as it is. It never returns nil.
func plainIPs(ips map[string]int64) map[string]int64 {
	out := make(map[string]int64, len(ips))
	for ip, seen := range ips {
		s := strings.TrimSuffix(strings.TrimPrefix(ip, "["), "]")
		if addr, err := netip.ParseAddr(s); err == nil {
			ip = addr.Unmap().String()
		}
		// Two spellings of one address (not seen from Xray): the latest.
		out[ip] = max(out[ip], seen)
	}
	return out
}

// AddUser adds a user with this email and account to the inbound with this
// tag, at user level 0 (the level whose policy must enable the user stats).
// The account must be of the inbound's protocol. It fails with an error
// wrapping [ErrExists] when the inbound already has a user with this email
// (compared as the inbound's protocol does, case-insensitively for most),
// [ErrNotFound] when there is no such inbound and [ErrInvalid] when Xray
// rejects the account.
//
// Xray's own check for duplicates is missing for classic Shadowsocks
// inbounds, so AddUser asks for the email first; two AddUser calls racing
// for the same new email may then both succeed on such an inbound.
func (c *Client) AddUser(ctx context.Context, inboundTag, email string, acct Account) error {
	op := fmt.Sprintf("add user %q to inbound %q", email, inboundTag)
	if inboundTag == "" || email == "" {
		return fmt.Errorf("xraystats: %s: %w: empty tag or email", op, ErrInvalid)
	}
	am, err := accountMessage(acct)
	if err != nil {
		return fmt.Errorf("xraystats: %s: %w", op, err)
	}
	account, err := typed(am)
	if err != nil {
		return fmt.Errorf("xraystats: %s: %w: %w", op, ErrInvalid, err)
	}
	operation, err := typed(&handlercmdpb.AddUserOperation{
		User: &protocolpb.User{Level: 0, Email: email, Account: account},
	})
	if err != nil {
		return fmt.Errorf("xraystats: %s: %w: %w", op, ErrInvalid, err)
	}
	// One per-call timeout for both requests.
	return c.call(ctx, op, func(ctx context.Context) error {
		resp, err := c.handler.GetInboundUsers(ctx, &handlercmdpb.GetInboundUserRequest{Tag: inboundTag, Email: email})
		if err != nil {
			return err
		}
		if len(emails(resp)) > 0 {
			return ErrExists
		}
		_, err = c.handler.AlterInbound(ctx, &handlercmdpb.AlterInboundRequest{Tag: inboundTag, Operation: operation})
		return err
	})
}

// RemoveUser removes the user with this email from the inbound with this
// tag. New connections of the user are refused from then on; connections
// that are already open are not closed by Xray. It fails with an error
// wrapping [ErrNotFound] when the inbound has no such user, or there is no
// such inbound.
func (c *Client) RemoveUser(ctx context.Context, inboundTag, email string) error {
	op := fmt.Sprintf("remove user %q from inbound %q", email, inboundTag)
	if inboundTag == "" || email == "" {
		return fmt.Errorf("xraystats: %s: %w: empty tag or email", op, ErrInvalid)
	}
	operation, err := typed(&handlercmdpb.RemoveUserOperation{Email: email})
	if err != nil {
		return fmt.Errorf("xraystats: %s: %w: %w", op, ErrInvalid, err)
	}
	return c.call(ctx, op, func(ctx context.Context) error {
		_, err := c.handler.AlterInbound(ctx, &handlercmdpb.AlterInboundRequest{Tag: inboundTag, Operation: operation})
		return err
	})
}

// InboundUsers returns the emails of the users of the inbound with this tag,
// sorted; users without an email are left out. It fails with an error
// wrapping [ErrNotFound] when there is no such inbound.
func (c *Client) InboundUsers(ctx context.Context, inboundTag string) ([]string, error) {
	op := fmt.Sprintf("users of inbound %q", inboundTag)
	if inboundTag == "" {
		return nil, fmt.Errorf("xraystats: %s: %w: empty tag", op, ErrInvalid)
	}
	var resp *handlercmdpb.GetInboundUserResponse
	err := c.call(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.handler.GetInboundUsers(ctx, &handlercmdpb.GetInboundUserRequest{Tag: inboundTag})
		return err
	})
	if err != nil {
		return nil, err
	}
	users := emails(resp)
	slices.Sort(users)
	return users, nil
}

// emails returns the emails of the users in resp.
func emails(resp *handlercmdpb.GetInboundUserResponse) []string {
	var out []string
	for _, u := range resp.GetUsers() {
		// Asked for a missing email, Xray answers with one empty user.
		if e := u.GetEmail(); e != "" {
			out = append(out, e)
		}
	}
	return out
}
