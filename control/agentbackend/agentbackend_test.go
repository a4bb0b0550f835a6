package agentbackend_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/myvpn/bwagent/agent"
	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/control/agentbackend"
	"github.com/myvpn/bwagent/quota"
	"google.golang.org/grpc/codes"
)

// Every agent method the adapter wraps must keep its signature.
var _ control.Backend = agentbackend.New((*agent.Agent)(nil))

func TestUser(t *testing.T) {
	t0 := time.Unix(1700000000, 0)
	v := agent.UserView{Name: "john", Protocol: "ssh", UID: 1001, Present: true, Status: quota.Blocked, Used: 5, Limit: 4,
		Upload: 2, Download: 3, Today: 1, Reason: quota.ReasonLimit, BlockTime: t0, LastReset: t0.Add(-time.Hour),
		Override: quota.Override{Active: true, Limit: 4, Until: quota.Instant(t0.Add(time.Hour).UnixNano())}, NextReset: t0.Add(2 * time.Hour)}
	u := agentbackend.User(v)
	if got := fmt.Sprintf("%v %v %v %v %v %v %v %v", u.Name, u.Status, u.Used, u.Limit, u.Reason, u.BlockTime.Equal(t0), u.Override.Until.Equal(t0.Add(time.Hour)), u.Expires.IsZero()); got != "john BLOCKED 5 4 Bandwidth Limit Reached true true true" {
		t.Errorf("User = %s (%+v)", got, u)
	}
}

// stub fails as the agent does; the other methods are not called.
type stub struct{ control.Backend }

func (stub) User(_ context.Context, name string) (control.User, error) {
	return control.User{}, fmt.Errorf("%w %q: not an account in the SSH UID range nor an Xray client", agent.ErrUnknownUser, name)
}

func (stub) RemoveLimit(_ context.Context, name string) error {
	return fmt.Errorf("%w: %s", agent.ErrNoLimit, name)
}

func TestErrorCodes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- control.NewServer(stub{}, control.Options{ErrorCodes: agentbackend.ErrorCodes}).Serve(ctx, path)
	}()
	defer func() { cancel(); <-done }()
	var c *control.Client
	var err error
	for range 200 {
		if c, err = control.Dial(ctx, path); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, err = c.User(ctx, "x")
	if control.Code(err) != codes.NotFound || err.Error() != `unknown user "x": not an account in the SSH UID range nor an Xray client` {
		t.Errorf("unknown user: %v %v", control.Code(err), err)
	}
	err = c.RemoveLimit(ctx, "x")
	if control.Code(err) != codes.FailedPrecondition || err.Error() != "user has no limit: x" {
		t.Errorf("no limit: %v %v", control.Code(err), err)
	}
}
