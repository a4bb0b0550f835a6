// Package sshtest runs real SSH servers, accounts and clients for the
// project's tests, as package xraytest runs a real Xray: an OpenSSH server
// (sshd, with PAM) and a Dropbear server on 127.0.0.1 or another address
// (see [Start]); real Linux accounts that log in to them with a password or
// a key (see [NewAccount]); and OpenSSH's client, under sshpass for
// passwords, that opens a SOCKS tunnel (`ssh -N -D`), runs a command or
// copies a file with scp, from a chosen source address, as root or as
// another UID, in a cgroup of its own (see [Server.Tunnel], [Server.Exec],
// [Server.Fetch]).
// Each server has a TCP sink in its network namespace that a tunnel's
// connections reach (xraytest's sink: see [Session.Transfer] and
// [Session.Stream]). A Dropbear server can log through syslog to a journald
// of the test's own instead of its standard error (see [StartJournal]).
//
// It is the ground the tests of SSH accounting stand on: which sockets an
// SSH login creates, which UID and which cgroup each belongs to, which
// process opens the forwarded connections, and what the servers log about
// it (Dropbear: `Password auth succeeded for 'USER' from IP:PORT` with its
// session process's PID; see [Login]).
//
// # Lifetime
//
// Everything is removed in t.Cleanup, also when t fails: a server or a
// client is killed with every process of its cgroup (session processes,
// sshpass and ssh alike), an account is removed with its home directory
// after every process of its UID is killed. A test binary killed before its
// cleanup (by go test's -timeout, say) leaves its accounts and cgroups
// behind, with the processes in them that did not die with it: the first
// test binary that makes an account or a cgroup here next removes them
// (their comment field and their names hold the PID and start time of
// their creator).
//
// # Requirements
//
// Root, and the programs that scripts/install-deps.sh --test installs:
// openssh-server, openssh-client, dropbear-bin and sshpass. Without a
// program a test is skipped, except in CI (CI=true), where it fails.
// Accounts need /bin/sh in /etc/shells (Dropbear refuses other accounts).
// Ports are free ones, reserved for the test (as xraytest.FreePort
// does); account UIDs are from [FirstUID] to [LastUID].
package sshtest
