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
	"google.golang.org/grpc/codes"
)

// Every agent method the adapter wraps must keep its signature.
var _ control.Backend = agentbackend.New((*agent.Agent)(nil))

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
