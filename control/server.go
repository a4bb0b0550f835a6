package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/myvpn/bwagent/control/internal/controlpb"
	"github.com/myvpn/bwagent/quota"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Options configure a Server. The zero value is root-only authorisation
// with the system's user database.
type Options struct {
	// AdminGroup is a group whose members may call everything, as root
	// can (config control.admin_group); "" means root only.
	AdminGroup string
	// LookupUser returns the account name of a UID. Default: os/user.
	LookupUser func(uid uint32) (string, error)
	// InGroup reports whether caller c is a member of group. Default:
	// c.GID is the group's, or the group is the primary or a supplementary
	// group of c's account (os/user, that is /etc/group or NSS).
	InGroup func(c Caller, group string) (bool, error)
	// ErrorCodes map backend errors to gRPC codes, tried in order, before
	// DefaultErrorCodes.
	ErrorCodes []ErrorCode
	// WatchSpacing is the least time between two reads of the users by one
	// Watch stream: publications within it are sent as one snapshot.
	// Default DefaultWatchSpacing (200ms).
	WatchSpacing time.Duration
	// Refused, if set, is told of each call refused for lack of permission,
	// and Failed of each call that failed inside the backend (Internal):
	// the library does not log, its caller may.
	Refused func(method string, c Caller)
	Failed  func(method string, c Caller, err error)

	// Connections of non-root UIDs are limited at accept (see the package
	// doc); root's never are. MaxConnsPerUID is how many one UID may hold
	// open (0: DefaultMaxConnsPerUID, 8), MaxConns how many all non-root
	// UIDs together may (0: DefaultMaxConns, 128).
	MaxConnsPerUID int
	MaxConns       int
	// FDReserve is how many of the process's descriptors (RLIMIT_NOFILE's
	// soft limit, read when Serve starts) non-root connections may not
	// take: they are kept for the agent's own files and for root. 0: an
	// eighth of the limit, at least DefaultFDReserve (64).
	FDReserve int
	// HandshakeTimeout is how long a new connection has to send gRPC's
	// preface before it is closed; 0: DefaultHandshakeTimeout (5s).
	HandshakeTimeout time.Duration
	// ConnRefused, if set, is told of each connection closed at accept,
	// with the caller's credentials (no Name; zero if they could not be
	// read) and why: ErrUIDConns, ErrConns, ErrFDReserve, or the error
	// reading SO_PEERCRED. It runs in the accept loop and must be quick; a
	// flood of connections calls it for each one.
	ConnRefused func(c Caller, err error)
}

// Caller is who made a call: the peer credentials and the UID's account
// name ("" when the UID has none).
type Caller struct {
	PID      int32
	UID, GID uint32
	Name     string
	Admin    bool
}

// Server serves the control API over a Backend.
type Server struct {
	controlpb.UnimplementedControlServer
	b    Backend
	o    Options
	stop chan struct{} // closed when Serve stops: ends Watch streams
}

// NewServer returns a server over b.
func NewServer(b Backend, o Options) *Server {
	if o.LookupUser == nil {
		o.LookupUser = lookupUser
	}
	if o.InGroup == nil {
		o.InGroup = inGroup
	}
	if o.WatchSpacing <= 0 {
		o.WatchSpacing = DefaultWatchSpacing
	}
	if o.MaxConnsPerUID <= 0 {
		o.MaxConnsPerUID = DefaultMaxConnsPerUID
	}
	if o.MaxConns <= 0 {
		o.MaxConns = DefaultMaxConns
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = DefaultHandshakeTimeout
	}

	o.ErrorCodes = append(slices.Clip(o.ErrorCodes), DefaultErrorCodes...)
	return &Server{b: b, o: o, stop: make(chan struct{})}
}

func lookupUser(uid uint32) (string, error) {
	u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10))
	if err != nil {
		return "", err
	}
	return u.Username, nil
}

func inGroup(c Caller, group string) (bool, error) {
	g, err := user.LookupGroup(group)
	if err != nil {
		return false, err
	}
	if g.Gid == strconv.FormatUint(uint64(c.GID), 10) {
		return true, nil
	}
	u, err := user.LookupId(strconv.FormatUint(uint64(c.UID), 10))
	if err != nil {
		return false, err
	}
	if u.Gid == g.Gid {
		return true, nil
	}
	gids, err := u.GroupIds()
	if err != nil {
		return false, err
	}
	return slices.Contains(gids, g.Gid), nil
}

// Serve listens on the Unix socket path and serves until ctx is done, then
// removes the socket. It creates the socket's directory (0755) if needed and
// replaces a stale socket file, but fails if another server answers there.
func (s *Server) Serve(ctx context.Context, path string) error {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
		return fmt.Errorf("control socket: RLIMIT_NOFILE: %w", err)
	}
	ul, err := listen(path)
	if err != nil {
		return err
	}
	defer os.Remove(path)
	l := &listener{
		UnixListener: ul,
		limits:       newConnLimits(s.o.MaxConnsPerUID, s.o.MaxConns, fdMax(rl.Cur, s.o.FDReserve)),
		openFDs:      openFDs,
		refused:      s.o.ConnRefused,
	}
	g := grpc.NewServer(s.grpcOptions()...)
	controlpb.RegisterControlServer(g, s)
	done := make(chan error, 1)
	go func() { done <- g.Serve(l) }()
	select {
	case err := <-done:
		return fmt.Errorf("control socket %s: %w", path, err)
	case <-ctx.Done():
	}
	close(s.stop)
	stopped := make(chan struct{})
	go func() { g.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second): // a call stuck in the backend
		g.Stop()
		<-stopped
	}
	<-done
	return nil
}

// fdMax is how many descriptors the process may have open for a non-root
// connection to be accepted: the soft limit minus the reserve.
func fdMax(soft uint64, reserve int) int {
	lim := int(min(soft, 1<<31))
	if reserve <= 0 {
		reserve = max(DefaultFDReserve, lim/8)
	}
	return lim - reserve
}

// grpcOptions bound what one connection can hold: requests are a few
// bytes, so one may not be larger than 64 KiB; a connection has a few
// streams, flow-control windows of gRPC's least (64 KiB) instead of
// windows that grow to megabytes, small buffers, a deadline for its
// handshake and an end when idle; clients may not ping often.
func (s *Server) grpcOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.Creds(peerCreds{}),
		grpc.ChainUnaryInterceptor(s.unaryAuth),
		grpc.ChainStreamInterceptor(s.streamAuth),
		grpc.ConnectionTimeout(s.o.HandshakeTimeout),
		grpc.MaxRecvMsgSize(64 << 10),
		grpc.MaxHeaderListSize(16 << 10),
		grpc.MaxConcurrentStreams(8),
		grpc.InitialWindowSize(64 << 10),
		grpc.InitialConnWindowSize(64 << 10),
		grpc.ReadBufferSize(4 << 10),
		grpc.WriteBufferSize(16 << 10),
		grpc.KeepaliveParams(keepalive.ServerParameters{MaxConnectionIdle: maxIdle}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: time.Minute}),
	}
}

// maxIdle is how long a connection without a call in progress is kept.
const maxIdle = 2 * time.Minute

// listen creates the socket, mode 0666: authorisation is per call.
func listen(path string) (*net.UnixListener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("control socket %s: exists and is not a socket; remove it or set paths.socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("control socket %s: another process is serving it (is bwagent already running?)", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("control socket: removing stale %s: %w", path, err)
		}
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return l, nil
}

// access says who may call a method.
type access int

const (
	adminOnly   access = iota // root or the admin group
	selfOrAdmin               // anyone, for their own account (checked by the method)
)

var methods = map[string]access{
	controlpb.Control_ListUsers_FullMethodName:   adminOnly,
	controlpb.Control_GetUser_FullMethodName:     selfOrAdmin,
	controlpb.Control_History_FullMethodName:     selfOrAdmin,
	controlpb.Control_SetLimit_FullMethodName:    adminOnly,
	controlpb.Control_RemoveLimit_FullMethodName: adminOnly,
	controlpb.Control_SetDevices_FullMethodName:  adminOnly,
	controlpb.Control_SetSpeed_FullMethodName:    adminOnly,
	controlpb.Control_ListDevices_FullMethodName: selfOrAdmin,
	controlpb.Control_Reset_FullMethodName:       adminOnly,
	controlpb.Control_ResetAll_FullMethodName:    adminOnly,
	controlpb.Control_Disable_FullMethodName:     adminOnly,
	controlpb.Control_Enable_FullMethodName:      adminOnly,
	controlpb.Control_Unblock_FullMethodName:     adminOnly,
	controlpb.Control_Check_FullMethodName:       adminOnly,
	controlpb.Control_Status_FullMethodName:      adminOnly,
	controlpb.Control_Watch_FullMethodName:       adminOnly,
}

type callerKey struct{}

// authorize identifies the caller and refuses an admin-only method to a
// non-admin. Unknown methods are refused to everyone but admins (gRPC then
// answers Unimplemented).
func (s *Server) authorize(ctx context.Context, method string) (context.Context, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "no peer credentials")
	}
	cred, ok := p.AuthInfo.(PeerCred)
	if !ok {
		return nil, status.Error(codes.Unauthenticated, "no peer credentials")
	}
	c := Caller{PID: cred.PID, UID: cred.UID, GID: cred.GID}
	if name, err := s.o.LookupUser(c.UID); err == nil {
		c.Name = name
	}
	var groupErr error
	switch {
	case c.UID == 0:
		c.Admin = true
	case s.o.AdminGroup != "":
		c.Admin, groupErr = s.o.InGroup(c, s.o.AdminGroup)
	}
	ctx = context.WithValue(ctx, callerKey{}, c)
	if c.Admin || methods[method] == selfOrAdmin {
		return ctx, nil
	}
	msg := s.needAdmin(methodName(method))
	if groupErr != nil {
		msg += fmt.Sprintf(" (group %s: %v)", s.o.AdminGroup, groupErr)
	}
	if s.o.Refused != nil {
		s.o.Refused(methodName(method), c)
	}
	return nil, status.Error(codes.PermissionDenied, msg)
}

func methodName(full string) string {
	return full[strings.LastIndex(full, "/")+1:]
}

func (s *Server) needAdmin(method string) string {
	what := map[string]string{
		"SetLimit": "changing limits", "RemoveLimit": "changing limits", "SetDevices": "changing limits", "SetSpeed": "changing limits",
		"Reset": "resetting usage", "ResetAll": "resetting usage",
		"Disable": "disabling users", "Enable": "enabling users", "Unblock": "unblocking users",
		"Check": "running a check", "Status": "reading the agent's status",
		"ListUsers": "listing users", "Watch": "watching every user",
	}[method]
	if what == "" {
		what = method
	}
	if s.o.AdminGroup == "" {
		return what + " needs root"
	}
	return what + " needs root or membership of group " + s.o.AdminGroup
}

func (s *Server) unaryAuth(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	ctx, err := s.authorize(ctx, info.FullMethod)
	if err != nil {
		return nil, err
	}
	return h(ctx, req)
}

type authStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (a authStream) Context() context.Context { return a.ctx }

func (s *Server) streamAuth(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	ctx, err := s.authorize(ss.Context(), info.FullMethod)
	if err != nil {
		return err
	}
	return h(srv, authStream{ss, ctx})
}

// own resolves the account a self-or-admin call is about and checks that
// the caller may read it.
func (s *Server) own(ctx context.Context, name string) (string, error) {
	c, _ := ctx.Value(callerKey{}).(Caller)
	if name == "" {
		if c.Name == "" {
			return "", status.Errorf(codes.InvalidArgument, "no user name given and your UID %d has no account name", c.UID)
		}
		name = c.Name
	}
	if c.Admin || name == c.Name {
		return name, nil
	}
	msg := "you may read only your own usage"
	if c.Name != "" {
		msg = fmt.Sprintf("you may read only your own usage (%s)", c.Name)
	}
	return "", status.Errorf(codes.PermissionDenied, "%s; reading other users' %s", msg, s.needAdmin("usage"))
}

// fail turns a backend error into a status error with its mapped code.
func (s *Server) fail(ctx context.Context, method string, err error) error {
	code := codes.Internal
	switch {
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	default:
		for _, ec := range s.o.ErrorCodes {
			if errors.Is(err, ec.Err) {
				code = ec.Code
				break
			}
		}
	}
	if code == codes.Internal {
		if s.o.Failed != nil {
			c, _ := ctx.Value(callerKey{}).(Caller)
			s.o.Failed(method, c, err)
		}
	}
	return status.Error(code, err.Error())
}

func (s *Server) ListUsers(ctx context.Context, r *controlpb.ListUsersRequest) (*controlpb.ListUsersResponse, error) {
	var want string
	if r.Status != "" {
		st, err := quota.ParseStatus(r.Status)
		if err != nil {
			return nil, status.Error(codes.InvalidArgument, err.Error())
		}
		want = string(st)
	}
	users, err := s.b.Users(ctx)
	if err != nil {
		return nil, s.fail(ctx, "ListUsers", err)
	}
	out := &controlpb.ListUsersResponse{}
	for _, u := range users {
		if want == "" || string(u.Status) == want {
			out.Users = append(out.Users, userToPB(u))
		}
	}
	return out, nil
}

func (s *Server) GetUser(ctx context.Context, r *controlpb.GetUserRequest) (*controlpb.User, error) {
	name, err := s.own(ctx, r.Name)
	if err != nil {
		return nil, err
	}
	u, err := s.b.User(ctx, name)
	if err != nil {
		return nil, s.fail(ctx, "GetUser", err)
	}
	return userToPB(u), nil
}

func (s *Server) History(ctx context.Context, r *controlpb.HistoryRequest) (*controlpb.HistoryResponse, error) {
	name, err := s.own(ctx, r.Name)
	if err != nil {
		return nil, err
	}
	days, err := s.b.History(ctx, name, r.From, r.To)
	if err != nil {
		return nil, s.fail(ctx, "History", err)
	}
	out := &controlpb.HistoryResponse{}
	for _, d := range days {
		out.Days = append(out.Days, &controlpb.Day{Day: d.Day, Up: d.Up, Down: d.Down})
	}
	return out, nil
}

func (s *Server) ListDevices(ctx context.Context, r *controlpb.NameRequest) (*controlpb.ListDevicesResponse, error) {
	name, err := s.own(ctx, r.Name)
	if err != nil {
		return nil, err
	}
	ds, err := s.b.Devices(ctx, name)
	if err != nil {
		return nil, s.fail(ctx, "ListDevices", err)
	}
	return devicesToPB(ds), nil
}

func (s *Server) SetDevices(ctx context.Context, r *controlpb.SetDevicesRequest) (*controlpb.Empty, error) {
	d := quota.DeviceLimit(r.Devices)
	if !d.Valid() {
		return nil, status.Errorf(codes.InvalidArgument, "%v %d: want 1 to %d devices, 0 (off) or -1 (unlimited)", quota.ErrBadDevices, r.Devices, quota.MaxDevices)
	}
	return s.empty(ctx, "SetDevices", s.b.SetDevices(ctx, r.Name, d))
}

func (s *Server) SetSpeed(ctx context.Context, r *controlpb.SetSpeedRequest) (*controlpb.Empty, error) {
	sp := quota.Speed{Down: quota.Rate(r.Down), Up: quota.Rate(r.Up)}
	if err := sp.Check(); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return s.empty(ctx, "SetSpeed", s.b.SetSpeed(ctx, r.Name, r.Throttle, sp))
}

func (s *Server) SetLimit(ctx context.Context, r *controlpb.SetLimitRequest) (*controlpb.Empty, error) {
	return s.empty(ctx, "SetLimit", s.b.SetLimit(ctx, r.Name, r.Bytes))
}

func (s *Server) RemoveLimit(ctx context.Context, r *controlpb.NameRequest) (*controlpb.Empty, error) {
	return s.empty(ctx, "RemoveLimit", s.b.RemoveLimit(ctx, r.Name))
}

func (s *Server) Reset(ctx context.Context, r *controlpb.NameRequest) (*controlpb.Empty, error) {
	return s.empty(ctx, "Reset", s.b.Reset(ctx, r.Name))
}

func (s *Server) ResetAll(ctx context.Context, _ *controlpb.Empty) (*controlpb.ResetAllResponse, error) {
	n, err := s.b.ResetAll(ctx)
	if err != nil {
		return nil, s.fail(ctx, "ResetAll", err)
	}
	return &controlpb.ResetAllResponse{Count: int64(n)}, nil
}

func (s *Server) Disable(ctx context.Context, r *controlpb.NameRequest) (*controlpb.Empty, error) {
	return s.empty(ctx, "Disable", s.b.Disable(ctx, r.Name))
}

func (s *Server) Enable(ctx context.Context, r *controlpb.NameRequest) (*controlpb.Empty, error) {
	return s.empty(ctx, "Enable", s.b.Enable(ctx, r.Name))
}

func (s *Server) Unblock(ctx context.Context, r *controlpb.UnblockRequest) (*controlpb.Empty, error) {
	if r.DurationSeconds < 0 || r.DurationSeconds > int64(time.Duration(1<<63-1)/time.Second) {
		return nil, status.Errorf(codes.InvalidArgument, "unblock duration out of range: %d seconds", r.DurationSeconds)
	}
	return s.empty(ctx, "Unblock", s.b.Unblock(ctx, r.Name, time.Duration(r.DurationSeconds)*time.Second))
}

func (s *Server) Check(ctx context.Context, _ *controlpb.Empty) (*controlpb.Empty, error) {
	return s.empty(ctx, "Check", s.b.Check(ctx))
}

func (s *Server) Status(context.Context, *controlpb.Empty) (*controlpb.StatusResponse, error) {
	h := s.b.Health()
	out := &controlpb.StatusResponse{
		TickDurationNanos: int64(h.TickDuration), Ticks: h.Ticks, Users: int64(h.Users),
		Errors: h.Errors, Components: h.Components,
		DroppedBlocked: h.Kernel.DroppedBlocked, DroppedQuota: h.Kernel.DroppedQuota,
		CountersFull: h.Kernel.CountersFull, QuotaFull: h.Kernel.QuotaFull,
		SshSessions: h.Kernel.SSHSessions, SshHeld: h.Kernel.SSHHeld, SshUnattributed: h.Kernel.SSHUnattributed,
		SshNeverAttributed: h.Kernel.SSHNeverAttributed,
		XrayClaimed:        h.Kernel.XrayClaimed, XrayHeld: h.Kernel.XrayHeld, XrayUnclaimed: h.Kernel.XrayUnclaimed,
		DroppedRate: h.Kernel.DroppedRate,
		Notify:      notifyToPB(h.Notify),
	}
	if !h.LastTick.IsZero() {
		out.LastTickUnixNano = h.LastTick.UnixNano()
	}
	return out, nil
}

// DefaultWatchSpacing is Options.WatchSpacing's default.
const DefaultWatchSpacing = 200 * time.Millisecond

// Watch sends every user's row at once, then after each publication of the
// backend that changed a row, until the client goes away or the server
// stops. It does not poll: between publications it only waits.
func (s *Server) Watch(_ *controlpb.Empty, st grpc.ServerStreamingServer[controlpb.Snapshot]) error {
	ctx := st.Context()
	var last []UserRow
	var seen uint64 // the version last read
	for first := true; ; first = false {
		// Updates before Users: whatever is published after this read
		// closes changed, so no publication is missed.
		version, changed := s.b.Updates()
		turn := time.Now()
		if first || version != seen {
			users, err := s.b.Users(ctx)
			if err != nil {
				return s.fail(ctx, "Watch", err)
			}
			seen = version
			rows := make([]UserRow, len(users))
			for i, u := range users {
				rows[i] = u.Row()
			}
			if first || !slices.Equal(rows, last) {
				if err := st.Send(snapshotToPB(rows)); err != nil {
					return err
				}
				last = rows
			}
		}
		if err := wait(ctx, s.stop, changed); err != nil {
			return err
		}
		// A burst of publications is read once: a turn of this loop
		// starts at most every WatchSpacing.
		if d := s.o.WatchSpacing - time.Since(turn); d > 0 {
			t := time.NewTimer(d)
			err := wait(ctx, s.stop, t.C)
			t.Stop()
			if err != nil {
				return err
			}
		}
	}
}

// wait waits for ch, and fails when the stream's ctx is done or the server
// stops (stop is closed) first.
func wait[T any](ctx context.Context, stop <-chan struct{}, ch <-chan T) error {
	select {
	case <-ctx.Done():
		return status.FromContextError(ctx.Err()).Err()
	case <-stop:
		return status.Error(codes.Unavailable, "bwagent is stopping")
	case <-ch:
		return nil
	}
}

func (s *Server) empty(ctx context.Context, method string, err error) (*controlpb.Empty, error) {
	if err != nil {
		return nil, s.fail(ctx, method, err)
	}
	return &controlpb.Empty{}, nil
}
