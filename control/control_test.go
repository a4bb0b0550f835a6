package control_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/quota"
	"google.golang.org/grpc/codes"
)

func TestMain(m *testing.M) {
	nettest.Register("client", clientHelper)
	nettest.Main(m)
}

var errUnknown = errors.New("unknown user")

// fake is a Backend over a map of users that records the changing calls.
// A change to users is published only by publish.
type fake struct {
	mu         sync.Mutex
	users      map[string]control.User
	calls      []string
	err        error // returned by every call when set
	health     control.Health
	version    uint64
	changed    chan struct{} // closed by publish
	usersCalls int
	afterUsers func() // run once by the next Users, after it read the users
}

func newFake() *fake {
	t0 := time.Unix(1700000000, 0)
	return &fake{
		users: map[string]control.User{
			"john": {Name: "john", Protocol: "ssh", UID: 54321, Present: true, Status: quota.Active, Used: 100, Limit: 1000, Remaining: 900,
				Upload: 40, Download: 60, Today: 10, LastReset: t0, NextReset: t0.Add(24 * time.Hour), Updated: t0.Add(time.Minute),
				Devices: 1, DevicesLimit: 2},
			"mary": {Name: "mary", Protocol: "vless", Present: true, Status: quota.Blocked, Used: 2000, Limit: 1000,
				Reason: quota.ReasonLimit, BlockTime: t0, Override: control.Override{Active: true, Limit: 1000, Until: t0.Add(time.Hour)}, Expires: t0.Add(48 * time.Hour)},
		},
		changed: make(chan struct{}),
		health: control.Health{LastTick: time.Unix(1700000000, 123456789), TickDuration: 3 * time.Millisecond, Ticks: 4242, Users: 2,
			Errors: map[string]string{"xray": "down"}, Components: map[string]string{"kernel": "ok", "xray": "down"},
			Kernel: control.KernelStats{DroppedBlocked: 11, DroppedQuota: 22, CountersFull: 33, QuotaFull: 44},
			Notify: []control.NotifyChannel{
				{Name: "webhook https://hooks.example.com/bw", Backlog: 3, Delivered: 40, Expired: 1, Attempts: 2,
					NextTry: time.Unix(1700000060, 5), LastError: "connection refused", ErrorTime: time.Unix(1700000000, 7)},
				{Name: "telegram chat 5", Delivered: 9},
			}},
	}
}

func (f *fake) call(format string, args ...any) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
	return f.err
}

func (f *fake) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func (f *fake) Users(context.Context) ([]control.User, error) {
	f.mu.Lock()
	f.usersCalls++
	if f.err != nil {
		f.mu.Unlock()
		return nil, f.err
	}
	var out []control.User
	for _, n := range slices.Sorted(maps.Keys(f.users)) {
		out = append(out, f.users[n])
	}
	after := f.afterUsers
	f.afterUsers = nil
	f.mu.Unlock()
	if after != nil {
		after()
	}
	return out, nil
}

func (f *fake) User(_ context.Context, name string) (control.User, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return control.User{}, f.err
	}
	u, ok := f.users[name]
	if !ok {
		return u, fmt.Errorf("%w %q", errUnknown, name)
	}
	return u, nil
}

func (f *fake) History(_ context.Context, name, from, to string) ([]control.Day, error) {
	if err := f.call("History %s %s %s", name, from, to); err != nil {
		return nil, err
	}
	return []control.Day{{Day: "2024-01-01", Up: 1, Down: 2}, {Day: "2024-01-02", Up: 3, Down: 4}}, nil
}

func (f *fake) Check(context.Context) error { return f.call("Check") }
func (f *fake) Reset(_ context.Context, name string) error {
	return f.call("Reset %s", name)
}
func (f *fake) ResetAll(context.Context) (int, error) { return 2, f.call("ResetAll") }
func (f *fake) Disable(_ context.Context, name string) error {
	return f.call("Disable %s", name)
}
func (f *fake) Enable(_ context.Context, name string) error { return f.call("Enable %s", name) }
func (f *fake) Unblock(_ context.Context, name string, d time.Duration) error {
	return f.call("Unblock %s %v", name, d)
}
func (f *fake) SetLimit(_ context.Context, name string, limit uint64) error {
	return f.call("SetLimit %s %d", name, limit)
}
func (f *fake) RemoveLimit(_ context.Context, name string) error {
	return f.call("RemoveLimit %s", name)
}
func (f *fake) Devices(_ context.Context, name string) ([]control.Device, error) {
	if err := f.call("Devices %s", name); err != nil {
		return nil, err
	}
	return []control.Device{
		{Address: "203.0.113.7", Protocols: []quota.Protocol{quota.SSH, quota.VLESS}, Connections: 3, Since: time.Unix(1700000000, 0), Bytes: 12345},
		{Address: "2001:db8:1:2::/64", Protocols: []quota.Protocol{quota.VLESS}, Connections: 1, Refused: true},
	}, nil
}
func (f *fake) SetDevices(_ context.Context, name string, d quota.DeviceLimit) error {
	return f.call("SetDevices %s %d", name, d)
}
func (f *fake) SetSpeed(_ context.Context, name string, throttle bool, sp quota.Speed) error {
	return f.call("SetSpeed %s %v %d/%d", name, throttle, sp.Down, sp.Up)
}
func (f *fake) Health() control.Health { return f.health }

func (f *fake) Updates() (uint64, <-chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.version, f.changed
}

// publish publishes a new version of the users, after change if not nil.
func (f *fake) publish(change func(users map[string]control.User)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if change != nil {
		change(f.users)
	}
	f.version++
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fake) UsersCalls() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.usersCalls
}

const (
	johnUID  = 54321
	adminUID = 54322
)

func lookupUser(uid uint32) (string, error) {
	switch uid {
	case 0:
		return "root", nil
	case johnUID:
		return "john", nil
	case adminUID:
		return "adm", nil
	}
	return "", fmt.Errorf("no user %d", uid)
}

// serve starts a server over b on a socket in a directory any UID can
// reach, and returns the socket's path.
func serve(t *testing.T, b control.Backend, o control.Options) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "bwcontrol-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "run", "bwagent.sock")
	if o.LookupUser == nil {
		o.LookupUser = lookupUser
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- control.NewServer(b, o).Serve(ctx, path) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if _, err := os.Lstat(path); !os.IsNotExist(err) {
			t.Errorf("socket left behind: %v", err)
		}
	})
	waitSocket(t, path)
	return path
}

func waitSocket(t *testing.T, path string) {
	t.Helper()
	for range 200 {
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no server at %s", path)
}

func dial(t *testing.T, path string) *control.Client {
	t.Helper()
	c, err := control.Dial(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestRoundTrip(t *testing.T) {
	f := newFake()
	path := serve(t, f, control.Options{})
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o666 {
		t.Errorf("socket mode %v, want 0666", fi.Mode().Perm())
	}
	if fi, err := os.Stat(filepath.Dir(path)); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("socket directory: %v %v", fi.Mode(), err)
	}
	c := dial(t, path)
	ctx := context.Background()

	users, err := c.ListUsers(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	want := []control.User{f.users["john"], f.users["mary"]}
	if len(users) != 2 || !equalUser(users[0], want[0]) || !equalUser(users[1], want[1]) {
		t.Errorf("ListUsers = %+v\nwant %+v", users, want)
	}
	users, err = c.ListUsers(ctx, "blocked")
	if err != nil || len(users) != 1 || users[0].Name != "mary" {
		t.Errorf("ListUsers(blocked) = %+v, %v", users, err)
	}
	if _, err := c.ListUsers(ctx, "sleepy"); control.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), `unknown status "sleepy"`) {
		t.Errorf("ListUsers(sleepy): %v", err)
	}
	u, err := c.User(ctx, "mary")
	if err != nil || !equalUser(u, f.users["mary"]) {
		t.Errorf("User(mary) = %+v, %v", u, err)
	}
	u, err = c.User(ctx, "") // root's own account: not a user
	if control.Code(err) != codes.NotFound && control.Code(err) != codes.Internal {
		t.Logf("User(\"\") as root = %+v, %v", u, err)
	}
	days, err := c.History(ctx, "john", "2024-01-01", "")
	if err != nil || len(days) != 2 || days[1] != (control.Day{Day: "2024-01-02", Up: 3, Down: 4}) {
		t.Errorf("History = %+v, %v", days, err)
	}
	for _, step := range []func() error{
		func() error { return c.SetLimit(ctx, "john", 5<<30) },
		func() error { return c.SetLimit(ctx, "john", 0) },
		func() error { return c.RemoveLimit(ctx, "john") },
		func() error { return c.SetDevices(ctx, "john", 2) },
		func() error { return c.SetDevices(ctx, "john", quota.DevicesUnlimited) },
		func() error { return c.SetDevices(ctx, "john", quota.DevicesDefault) },
		func() error { return c.Reset(ctx, "john") },
		func() error { return c.Disable(ctx, "mary") },
		func() error { return c.Enable(ctx, "mary") },
		func() error { return c.Unblock(ctx, "mary", 90*time.Minute) },
		func() error { return c.Unblock(ctx, "mary", 0) },
		func() error { return c.Check(ctx) },
	} {
		if err := step(); err != nil {
			t.Error(err)
		}
	}
	if n, err := c.ResetAll(ctx); n != 2 || err != nil {
		t.Errorf("ResetAll = %d, %v", n, err)
	}
	if err := c.Unblock(ctx, "mary", -time.Second); control.Code(err) != codes.InvalidArgument {
		t.Errorf("negative Unblock: %v", err)
	}
	for _, d := range []quota.DeviceLimit{-2, quota.MaxDevices + 1} {
		if err := c.SetDevices(ctx, "john", d); control.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "invalid device limit") {
			t.Errorf("SetDevices(%d): %v", d, err)
		}
	}
	ds, err := c.Devices(ctx, "john")
	if err != nil || len(ds) != 2 || ds[0].Address != "203.0.113.7" || !slices.Equal(ds[0].Protocols, []quota.Protocol{quota.SSH, quota.VLESS}) ||
		ds[0].Connections != 3 || !ds[0].Since.Equal(time.Unix(1700000000, 0)) || ds[0].Bytes != 12345 || ds[0].Refused ||
		!ds[1].Since.IsZero() || !ds[1].Refused {
		t.Errorf("Devices = %+v, %v", ds, err)
	}
	h, err := c.Status(ctx)
	if err != nil || !h.LastTick.Equal(f.health.LastTick) || h.TickDuration != f.health.TickDuration || h.Ticks != 4242 || h.Users != 2 ||
		!maps.Equal(h.Errors, f.health.Errors) || !maps.Equal(h.Components, f.health.Components) || h.Kernel != f.health.Kernel ||
		!slices.EqualFunc(h.Notify, f.health.Notify, func(a, b control.NotifyChannel) bool {
			return a.Name == b.Name && a.Backlog == b.Backlog && a.Delivered == b.Delivered && a.Expired == b.Expired &&
				a.Attempts == b.Attempts && a.NextTry.Equal(b.NextTry) && a.LastError == b.LastError && a.ErrorTime.Equal(b.ErrorTime)
		}) || !h.Notify[1].NextTry.IsZero() || !h.Notify[1].ErrorTime.IsZero() {
		t.Errorf("Status = %+v, %v", h, err)
	}
	wantCalls := []string{
		"History john 2024-01-01 ",
		"SetLimit john 5368709120", "SetLimit john 0", "RemoveLimit john",
		"SetDevices john 2", "SetDevices john -1", "SetDevices john 0", "Reset john",
		"Disable mary", "Enable mary", "Unblock mary 1h30m0s", "Unblock mary 0s", "Check", "ResetAll", "Devices john",
	}
	if got := f.Calls(); !slices.Equal(got, wantCalls) {
		t.Errorf("backend calls\n got %q\nwant %q", got, wantCalls)
	}
}

// equalUser compares users whose times went through Unix seconds.
func equalUser(a, b control.User) bool {
	norm := func(u control.User) control.User {
		for _, t := range []*time.Time{&u.BlockTime, &u.LastReset, &u.Override.Until, &u.NextReset, &u.Expires, &u.Updated} {
			if !t.IsZero() {
				*t = time.Unix(t.Unix(), 0)
			}
		}
		return u
	}
	a, b = norm(a), norm(b)
	return a.Name == b.Name && a.Protocol == b.Protocol && a.UID == b.UID && a.Present == b.Present && a.Status == b.Status &&
		a.Used == b.Used && a.Limit == b.Limit && a.Remaining == b.Remaining && a.Upload == b.Upload && a.Download == b.Download &&
		a.Today == b.Today && a.Reason == b.Reason && a.BlockTime.Equal(b.BlockTime) && a.LastReset.Equal(b.LastReset) &&
		a.Override.Active == b.Override.Active && a.Override.Limit == b.Override.Limit && a.Override.Until.Equal(b.Override.Until) &&
		a.NextReset.Equal(b.NextReset) && a.Expires.Equal(b.Expires) && a.Updated.Equal(b.Updated) &&
		a.BlockTime.IsZero() == b.BlockTime.IsZero() && a.Expires.IsZero() == b.Expires.IsZero() &&
		a.Devices == b.Devices && a.DevicesLimit == b.DevicesLimit
}

func TestErrors(t *testing.T) {
	f := newFake()
	path := serve(t, f, control.Options{ErrorCodes: []control.ErrorCode{{Err: errUnknown, Code: codes.NotFound}}})
	c := dial(t, path)
	ctx := context.Background()
	if _, err := c.User(ctx, "nobody"); control.Code(err) != codes.NotFound || err.Error() != `unknown user "nobody"` {
		t.Errorf("unknown user: %v (%v)", err, control.Code(err))
	}
	for _, tc := range []struct {
		err  error
		code codes.Code
	}{
		{fmt.Errorf("%w: \"a b\"", quota.ErrBadName), codes.InvalidArgument},
		{fmt.Errorf("%w: too big", quota.ErrBadLimit), codes.InvalidArgument},
		{fmt.Errorf("john: %w", quota.ErrNotBlocked), codes.FailedPrecondition},
		{fmt.Errorf("mary: %w", quota.ErrDisabled), codes.FailedPrecondition},
		{fmt.Errorf("%w %q", errUnknown, "x"), codes.NotFound},
		{errors.New("disk on fire"), codes.Internal},
	} {
		f.mu.Lock()
		f.err = tc.err
		f.mu.Unlock()
		err := c.SetLimit(ctx, "john", 1)
		var ce *control.Error
		if !errors.As(err, &ce) || ce.Code != tc.code || ce.Msg != tc.err.Error() {
			t.Errorf("backend error %q: got %v (%v), want code %v", tc.err, err, control.Code(err), tc.code)
		}
	}
}

func TestDialNoAgent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bwagent.sock")
	_, err := control.Dial(context.Background(), path)
	want := "bwagent is not running (no socket at " + path + "): start it with `systemctl start bwagent`"
	if err == nil || err.Error() != want {
		t.Errorf("Dial without a socket: %v", err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close() // a stale socket: connection refused
	if _, err := control.Dial(context.Background(), path); err == nil || err.Error() != want {
		t.Errorf("Dial to a stale socket: %v", err)
	}
}

func TestStaleAndLiveSocket(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "bwagent.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	f := newFake()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- control.NewServer(f, control.Options{}).Serve(ctx, path) }()
	waitSocket(t, path)
	if _, err := dial(t, path).ListUsers(ctx, ""); err != nil {
		t.Errorf("after replacing a stale socket: %v", err)
	}

	err = control.NewServer(f, control.Options{}).Serve(context.Background(), path)
	if err == nil || !strings.Contains(err.Error(), "another process is serving it") {
		t.Errorf("second Serve on a live socket: %v", err)
	}
	if _, err := dial(t, path).ListUsers(ctx, ""); err != nil {
		t.Errorf("the first server after the second failed: %v", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Error(err)
	}
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("socket not removed: %v", err)
	}

	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	err = control.NewServer(f, control.Options{}).Serve(context.Background(), path)
	if err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Serve over a regular file: %v", err)
	}
}

// watch starts a Watch and returns a function that waits up to d for its
// next snapshot (nil if none came).
func watch(t *testing.T, path string) func(d time.Duration) []control.UserRow {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := dial(t, path).Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		for range ch {
		}
	})
	return func(d time.Duration) []control.UserRow {
		t.Helper()
		select {
		case rows, ok := <-ch:
			if !ok {
				t.Fatal("watch ended")
			}
			return rows
		case <-time.After(d):
			return nil
		}
	}
}

func setUsed(used, down uint64) func(map[string]control.User) {
	return func(users map[string]control.User) {
		u := users["john"]
		u.Used, u.Download = used, down
		users["john"] = u
	}
}

func TestWatch(t *testing.T) {
	f := newFake()
	next := watch(t, serve(t, f, control.Options{}))
	rows := next(5 * time.Second)
	if len(rows) != 2 || rows[0] != f.users["john"].Row() || rows[1] != f.users["mary"].Row() {
		t.Fatalf("first snapshot %+v", rows)
	}

	// Nothing published: no snapshot, and the users are not read again,
	// even when they changed (Watch does not poll).
	f.mu.Lock()
	setUsed(120, 80)(f.users)
	f.mu.Unlock()
	if rows := next(500 * time.Millisecond); rows != nil {
		t.Errorf("snapshot without a publication: %+v", rows)
	}
	if n := f.UsersCalls(); n != 1 {
		t.Errorf("Users called %d times without a publication, want once", n)
	}

	// A publication: the new rows come promptly.
	f.publish(setUsed(150, 110))
	rows = next(2 * time.Second)
	if rows == nil || rows[0].Used != 150 || rows[0].Download != 110 {
		t.Fatalf("snapshot after a publication %+v", rows)
	}

	// A publication that changes no row sends nothing.
	f.publish(func(users map[string]control.User) {
		u := users["john"]
		u.Today++ // not in a monitor row
		users["john"] = u
	})
	for i := 0; f.UsersCalls() < 3; i++ {
		if i == 500 {
			t.Fatalf("Users called %d times after two publications, want 3", f.UsersCalls())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if rows := next(300 * time.Millisecond); rows != nil {
		t.Errorf("snapshot of unchanged rows: %+v", rows)
	}
}

// A publication while Watch reads the users is not missed: Watch took the
// version before it read them.
func TestWatchPublishedDuringRead(t *testing.T) {
	f := newFake()
	f.afterUsers = func() { f.publish(setUsed(300, 260)) }
	next := watch(t, serve(t, f, control.Options{}))
	if rows := next(5 * time.Second); rows == nil || rows[0].Used != 100 {
		t.Fatalf("first snapshot %+v, want the users as read (used 100)", rows)
	}
	if rows := next(5 * time.Second); rows == nil || rows[0].Used != 300 {
		t.Fatalf("after a publication during the first read: %+v, want used 300", rows)
	}
}

// A burst of publications within WatchSpacing is read once and sent as
// one snapshot of the last.
func TestWatchCoalesces(t *testing.T) {
	f := newFake()
	next := watch(t, serve(t, f, control.Options{WatchSpacing: time.Second}))
	if rows := next(5 * time.Second); rows == nil {
		t.Fatal("no first snapshot")
	}
	// 5 publications over about 160ms, well within the spacing: each
	// would be a snapshot of its own if every one were read.
	for i := range uint64(5) {
		if i > 0 {
			time.Sleep(40 * time.Millisecond)
		}
		f.publish(setUsed(200+i, 100+i))
	}
	rows := next(5 * time.Second)
	if rows == nil || rows[0].Used != 204 {
		t.Fatalf("after a burst of 5 publications: %+v, want the last (used 204)", rows)
	}
	if n := f.UsersCalls(); n != 2 {
		t.Errorf("Users called %d times for the first snapshot and one burst, want 2", n)
	}
}

// clientHelper runs calls against the socket in args[0] and prints
// "R call code" for each; calls are name[:arg].
func clientHelper(args []string) error {
	ctx := context.Background()
	c, err := control.Dial(ctx, args[0])
	if err != nil {
		return err
	}
	defer c.Close()
	for _, call := range args[1:] {
		op, arg, _ := strings.Cut(call, ":")
		switch op {
		case "get":
			u, e := c.User(ctx, arg)
			if e == nil && u.Name == "" {
				e = errors.New("empty user")
			}
			err = e
		case "history":
			_, err = c.History(ctx, arg, "", "")
		case "setlimit":
			err = c.SetLimit(ctx, arg, 1<<30)
		case "devices":
			_, err = c.Devices(ctx, arg)
		case "setdevices":
			err = c.SetDevices(ctx, arg, 2)
		case "reset":
			err = c.Reset(ctx, arg)
		case "list":
			_, err = c.ListUsers(ctx, "")
		case "status":
			_, err = c.Status(ctx)
		case "watch":
			wctx, cancel := context.WithCancel(ctx)
			_, err = c.Watch(wctx)
			cancel()
		default:
			return fmt.Errorf("unknown call %q", call)
		}
		fmt.Printf("R %s %v %s\n", call, control.Code(err), errMsg(err))
	}
	fmt.Println("DONE")
	return nil
}

func errMsg(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// runAs runs the helper's calls as uid and returns "call code" → message.
func runAs(t *testing.T, uid uint32, path string, calls ...string) map[string]string {
	t.Helper()
	p := nettest.Start(t, nettest.Spec{UID: uid}, "client", append([]string{path}, calls...)...)
	got := map[string]string{}
	for {
		line := p.Expect(t, "", 20*time.Second)
		if line == "DONE" {
			break
		}
		if strings.HasPrefix(line, "ERR ") {
			t.Fatalf("helper as UID %d: %s", uid, line)
		}
		f := strings.SplitN(strings.TrimPrefix(line, "R "), " ", 3)
		if len(f) < 2 {
			t.Fatalf("helper line %q", line)
		}
		got[f[0]] = f[1]
		if len(f) == 3 {
			got[f[0]] += " " + f[2]
		}
	}
	if err := p.Wait(10 * time.Second); err != nil {
		t.Fatalf("helper as UID %d: %v", uid, err)
	}
	return got
}

func TestPermissions(t *testing.T) {
	f := newFake()
	path := serve(t, f, control.Options{
		AdminGroup: "bwadmin",
		InGroup: func(c control.Caller, group string) (bool, error) {
			return group == "bwadmin" && c.UID == adminUID, nil
		},
	})
	calls := []string{"get:", "get:john", "history:john", "get:mary", "history:mary", "devices:john", "devices:mary", "setlimit:john", "setdevices:john", "reset:john", "list", "status", "watch"}
	john := runAs(t, johnUID, path, calls...)
	for call, want := range map[string]string{
		"get:":            "OK",
		"get:john":        "OK",
		"history:john":    "OK",
		"get:mary":        "PermissionDenied you may read only your own usage (john); reading other users' usage needs root or membership of group bwadmin",
		"history:mary":    "PermissionDenied you may read only your own usage (john)",
		"setlimit:john":   "PermissionDenied changing limits needs root or membership of group bwadmin",
		"devices:john":    "OK",
		"devices:mary":    "PermissionDenied you may read only your own usage (john)",
		"setdevices:john": "PermissionDenied changing limits needs root or membership of group bwadmin",
		"reset:john":      "PermissionDenied resetting usage needs root or membership of group bwadmin",
		"list":            "PermissionDenied listing users needs root or membership of group bwadmin",
		"status":          "PermissionDenied reading the agent's status needs root",
		"watch":           "PermissionDenied watching every user needs root",
	} {
		if got := john[call]; !strings.HasPrefix(got, want) {
			t.Errorf("john %s: %q, want %q", call, got, want)
		}
	}
	if c := f.Calls(); !slices.Equal(c, []string{"History john  ", "Devices john"}) {
		t.Errorf("backend calls by john: %q", c)
	}

	adm := runAs(t, adminUID, path, calls...)
	for _, call := range calls[1:] {
		if got := adm[call]; got != "OK " && got != "OK" {
			t.Errorf("admin %s: %q", call, got)
		}
	}
	// the admin's own account is not a user of the agent
	if got := adm["get:"]; !strings.HasPrefix(got, "Internal") && !strings.HasPrefix(got, "NotFound") {
		t.Errorf("admin get own: %q", got)
	}
	if !slices.Contains(f.Calls(), "SetLimit john 1073741824") {
		t.Errorf("admin's SetLimit did not reach the backend: %q", f.Calls())
	}

	// a UID without an account name may not read anything
	nobody := runAs(t, 54399, path, "get:", "get:john")
	if !strings.HasPrefix(nobody["get:"], "InvalidArgument no user name given and your UID 54399 has no account name") ||
		!strings.HasPrefix(nobody["get:john"], "PermissionDenied you may read only your own usage;") {
		t.Errorf("UID without a name: %q", nobody)
	}
}
