package xraystats

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Sentinel errors. The errors of this package wrap one of them where one
// applies, together with the underlying gRPC status error; use [errors.Is].
var (
	// ErrUnavailable: Xray could not be reached, or did not answer within
	// the per-call timeout (it is stopped, restarting or hung).
	ErrUnavailable = errors.New("xray unavailable")
	// ErrNotFound: the user, the inbound or the counter does not exist.
	ErrNotFound = errors.New("not found")
	// ErrExists: the inbound already has a user with this email.
	ErrExists = errors.New("already exists")
	// ErrUnsupported: this Xray does not implement the call (an older
	// version), or its API does not enable the service that serves it.
	ErrUnsupported = errors.New("not supported by this xray")
	// ErrInvalid: an argument was rejected, by this package (an empty email
	// or tag, a nil account, an unknown cipher) or by Xray (e.g. a malformed
	// UUID).
	ErrInvalid = errors.New("invalid argument")
	// ErrBadName: a stat name that is not one of the shapes that Xray
	// produces; see [ParseStatName].
	ErrBadName = errors.New("bad stat name")
	// ErrClosed: the Client was closed.
	ErrClosed = errors.New("client closed")
)

// wrapErr turns err, returned by a gRPC call made under ctx (the caller's
// context, before the per-call timeout was added to it), into an error of
// this package for operation op.
func wrapErr(ctx context.Context, op string, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		// The caller gave up: report that, not what it caused.
		return fmt.Errorf("xraystats: %s: %w", op, cerr)
	}
	if sentinel := classify(err); sentinel != nil {
		return fmt.Errorf("xraystats: %s: %w: %w", op, sentinel, err)
	}
	return fmt.Errorf("xraystats: %s: %w", op, err)
}

// classify maps a gRPC error from Xray to a sentinel error, or nil.
//
// Xray's HandlerService returns its own errors, which gRPC sends with code
// Unknown and the error text, e.g. "app/proxyman/command: User bob not
// found." (RemoveUser of a missing user: the text is the same for the VLESS,
// VMess, Trojan, Shadowsocks and Shadowsocks 2022 inbounds), "... User bob
// already exists." (AddUser of an existing one) and "... failed to get
// handler: tag > app/proxyman/inbound: handler not found: tag" (a missing
// inbound). Its StatsService uses proper codes (NotFound).
func classify(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return nil
	}
	switch st.Code() {
	case codes.Unavailable, codes.DeadlineExceeded:
		return ErrUnavailable
	case codes.Unimplemented:
		return ErrUnsupported
	case codes.NotFound:
		return ErrNotFound
	case codes.AlreadyExists:
		return ErrExists
	case codes.InvalidArgument:
		return ErrInvalid
	case codes.Canceled:
		// The connection was closed under the call: Close ran.
		return ErrClosed
	case codes.Unknown:
		msg := strings.ToLower(st.Message())
		switch {
		case strings.Contains(msg, "already exists"):
			return ErrExists
		case strings.Contains(msg, "not found"):
			return ErrNotFound
		case strings.Contains(msg, "failed to parse"),
			strings.Contains(msg, "must not be empty"),
			strings.Contains(msg, "failed to get cipher"):
			return ErrInvalid
		}
	}
	return nil
}
