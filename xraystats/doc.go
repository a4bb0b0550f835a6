// Package xraystats is a small gRPC client for the API of a running Xray-core
// server: it reads per-user traffic counters from Xray's StatsService and adds
// and removes users of inbounds through its HandlerService, so that a quota
// agent can block a user without restarting Xray.
//
// It does not import Xray-core: it speaks Xray's public gRPC API through its
// own minimal copies of Xray's .proto files (see proto/), which keep Xray's
// proto package, message and field names and numbers.
//
// Xray must run with the API enabled on a local address, for example:
//
//	"api": {"tag": "api", "listen": "127.0.0.1:10085",
//	        "services": ["HandlerService", "StatsService"]},
//	"stats": {},
//	"policy": {"levels": {"0": {"statsUserUplink": true,
//	                            "statsUserDownlink": true,
//	                            "statsUserOnline": true}}}
//
// Every call is bounded by a per-call timeout (500 ms unless [WithTimeout]
// says otherwise), so a hung Xray never blocks the caller for longer. Errors
// wrap one of the sentinel errors ([ErrUnavailable], [ErrNotFound],
// [ErrExists], [ErrUnsupported], [ErrInvalid], [ErrBadName], [ErrClosed])
// where one applies, and the gRPC status error that Xray returned; test them
// with [errors.Is]. The package never logs.
//
// Xray's traffic counters are created at a user's first connection after
// Xray starts and count the payload bytes that the user's connections carry
// through Xray (not the protocol's framing or encryption overhead). They are
// kept in memory: when Xray restarts they start again from zero, which a
// caller can detect by [Client.SysStats] reporting a smaller uptime.
package xraystats
