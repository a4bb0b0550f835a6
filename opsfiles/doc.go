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
// old file as it was. The package logs nothing and keeps no state: errors are
// returned, and every path is a parameter, so independent instances (tests,
// an operator's dry run) can work side by side. A user name is checked with
// quota.ValidName before it becomes part of a path; an unsafe name is an
// error and touches nothing on disk.
//
// The package is Linux-only: it relies on syncfs(2), renameat2(2) and
// O_DIRECTORY.
package opsfiles
