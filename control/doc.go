// Package control is bwagent's control API: a gRPC service on a Unix socket
// (config paths.socket, by default /run/bwagent/bwagent.sock) through which
// bwctl reads usage and changes limits. Server serves it over a Backend (the
// agent); Client is the caller's side, with plain Go types so that the CLI
// never sees protobuf.
//
// # Authorisation
//
// The socket is mode 0666 so that any local user can connect; every call is
// authorised by the caller's peer credentials (SO_PEERCRED), read once per
// connection:
//
//   - root, and members of the configured admin group (config
//     control.admin_group: the caller's process group, or the account's
//     primary or supplementary groups), may call everything;
//   - any other local user may call only GetUser and History, and only for
//     their own account: the name of their UID (GetUser with an empty name
//     means that account). So an SSH user can check their remaining data.
//
// ListUsers, Status and Watch show every user and are admin only. A refused
// call fails with codes.PermissionDenied and a message saying what it needs.
//
// # Errors
//
// The backend's errors keep their text and get a gRPC code by errors.Is
// against Options.ErrorCodes (by default the quota sentinels: a bad name or
// limit is InvalidArgument, "not blocked" and "disabled" FailedPrecondition);
// anything else is Internal. The agent's own sentinels (unknown user:
// NotFound, ...) are added by package control/agentbackend, which also
// adapts *agent.Agent to Backend, so that this package, and so bwctl, does
// not depend on the agent. Client returns *Error, which carries the code.
//
// # Watch
//
// Watch polls Backend.Users every Options.WatchInterval (1s) and sends a
// snapshot when any row changed. The agent may later push after each tick
// instead; the wire protocol would not change.
package control
