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
// # Limits
//
// Any local user can connect, so the server bounds what one can hold. The
// listener reads each connection's SO_PEERCRED right after accept and
// closes at once, before gRPC allocates anything for it, a connection of a
// non-root UID that
//
//   - would take that UID past Options.MaxConnsPerUID open connections
//     (default 8: ErrUIDConns);
//   - would take all non-root UIDs together past Options.MaxConns (default
//     128: ErrConns);
//   - would leave the process fewer free descriptors than the reserve kept
//     for the agent's own files and for root (Options.FDReserve, by default
//     an eighth of RLIMIT_NOFILE's soft limit as of Serve, at least 64:
//     ErrFDReserve).
//
// The caps count the connections this listener admitted and has not
// closed yet. The descriptors are counted only for a connection the caps
// let in: the size of /proc/self/fd (the process's open descriptors, Linux
// 6.2 and later), and at least the accepted descriptor's number plus one
// (the kernel hands out the lowest free one, so all below it are open).
// Root's connections are neither counted nor refused; only the kernel's
// limit stops them. A client whose connection was closed sees a failed
// call (codes.Unavailable); Options.ConnRefused is told why. Accept
// errors (EMFILE when the process is out of descriptors anyway) are
// retried by gRPC with a backoff of up to 1s; Serve does not stop.
//
// A connection has Options.HandshakeTimeout (5s) to send gRPC's preface,
// and is closed after 2 minutes without a call in progress. Its memory is
// bounded by gRPC options: requests of at most 64 KiB (they are a few
// bytes), 16 KiB of headers, 8 concurrent streams, fixed flow-control
// windows of 64 KiB, a 4 KiB read buffer; clients may ping at most once a
// minute.
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
// Watch does not poll. The agent publishes an immutable snapshot of its
// users at the end of each tick that changed something; Backend.Updates
// gives the current version and a channel closed by the next publication.
// A Watch stream takes them before it reads Backend.Users, so no
// publication is missed, sends the first snapshot, then waits on the
// channel and sends again only if a monitor row changed. A burst of
// publications is read once: at most one read per Options.WatchSpacing
// (200ms) per stream.
package control
