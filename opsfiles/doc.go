// Package opsfiles reads and writes the operators' files of the bash tool it
// replaces (cek-bw-limit), in the formats its guide documents, so that the
// operators' scripts, habits and monitoring keep working:
//
//   - the per-user usage JSON, <usage_dir>/<user>.json (Usage, WriteUsage,
//     WriteUsages, ReadUsage, ImportDir, MoveAside);
//   - the marker files of blocked Xray users, <marker_dir>/<user>
//     (SyncMarkers);
//   - the block log, "timestamp | protocol | username | reason" per line
//     (AppendLog, ReadLog);
//   - the operator-edited limits file, "USER LIMIT" per line (Limits,
//     ReadLimits, WriteLimits).
//
// Every file is replaced atomically (WriteFile, WriteBatch): a reader sees
// the old content or the new one, never a mix, and a failed write leaves the
// old file as it was. The package logs nothing and keeps no state in memory:
// errors are returned, and every path is a parameter, so independent
// instances (tests, an operator's dry run) can work side by side on
// directories of their own. On disk WriteBatch keeps a spare beside each
// file it rewrites: one writer at a time per directory. A user name is checked with
// quota.ValidName before it becomes part of a path; an unsafe name is an
// error and touches nothing on disk.
//
// # Symbolic links
//
// Nothing is read or written through a symbolic link that neither the agent
// nor the operator made:
//
//   - The directories (the usage and marker directories, and the
//     directories of the limits file and block log) are the operator's
//     choice and may be, or lie under, symbolic links: an operator may keep
//     /etc/myvpn/usage elsewhere. Writers and readers go through them.
//   - The agent's own files in them, the usage files and the markers
//     (and the writers' temporary files), are never followed: a writer
//     replaces a link with the file (WriteFile, WriteBatch, SyncMarkers),
//     and a reader refuses it with ErrSymlink (ReadUsage, ImportDir) or
//     takes it for a stale marker (SyncMarkers). A usage file linked to a
//     file elsewhere is thus neither imported nor written through.
//   - The operator's single files, the limits file and the block log, may
//     be symbolic links the operator made: a link owned by root or by the
//     agent's own user is followed, for reading and writing (WriteLimits
//     replaces the file it leads to and keeps the link); a link owned by
//     anyone else, who could otherwise lead the agent to read or write any
//     file on the system, is refused with ErrUntrustedLink.
//
// The readers of the usage files and the limits file also refuse anything
// but a regular file (a FIFO would block them). The block log is opened as
// it is: a root's link to /dev/null keeps no log.
//
// The package is Linux-only: it relies on syncfs(2), renameat2(2) and
// O_DIRECTORY.
package opsfiles
