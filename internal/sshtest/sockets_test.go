package sshtest

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/myvpn/bwagent/bpf"
	"github.com/myvpn/bwagent/internal/nettest"
)

// TestSockets checks, with each server, the facts that per-user SSH
// accounting is designed on (issue 10), and logs them:
//
//   - the server's end of the SSH connection (the session socket) is
//     root's, and in the cgroup of the listening socket it was accepted
//     from, wherever the processes are;
//   - a tunnel's forwarded connections are opened by the session process
//     (Dropbear: the one its log names), as the user with OpenSSH and with
//     Dropbear from 2025.89, as root with older Dropbear;
//   - a process moved to another cgroup v2 creates its new sockets there,
//     while the sockets it had stay in their cgroup (sk_cgrp_data is set at
//     creation, never moved).
func TestSockets(t *testing.T) {
	need(t, "ss")
	for _, kind := range Kinds {
		t.Run(string(kind), func(t *testing.T) {
			t.Parallel()
			a := NewAccount(t)
			srv := Start(t, kind, Options{})
			root, err := bpf.CgroupV2Root()
			if err != nil {
				t.Fatal(err)
			}
			rel := func(cgroup string) string { return "/" + strings.TrimPrefix(strings.TrimPrefix(cgroup, root), "/") }
			sink := netip.MustParseAddrPort(srv.Sink.Addr)

			tun := srv.Tunnel(t, a, ClientOptions{})
			login := tun.Login(t)
			first := tun.Stream(t, 0, 1<<20)
			if !first.Flowing(5 * time.Second) {
				t.Fatalf("stream not flowing: %v", first.Err())
			}
			session := socketOf(t, srv.Addr, tun.Local)
			fwd := forwarded(t, sink)
			if len(fwd) != 1 {
				t.Fatalf("%d forwarded sockets to the sink, want 1: %+v", len(fwd), fwd)
			}
			opener := fwd[0].holders
			t.Logf("session socket %s<-%s: UID %d, cgroup %s, held by %v", srv.Addr, tun.Local, session.uid, session.cgroup, session.holders)
			t.Logf("forwarded socket %s->%s: UID %d, cgroup %s, held by %v (UIDs %v)", fwd[0].local, sink, fwd[0].uid, fwd[0].cgroup, opener, euids(opener))
			if session.uid != 0 || session.cgroup != rel(srv.Cgroup) {
				t.Errorf("session socket: UID %d, cgroup %s; want 0, %s", session.uid, session.cgroup, rel(srv.Cgroup))
			}
			wantUID := uint32(0)
			if srv.ForwardsAsUser() {
				wantUID = a.UID
			}
			if fwd[0].uid != wantUID || fwd[0].cgroup != rel(srv.Cgroup) || len(opener) != 1 || euids(opener)[0] != wantUID {
				t.Errorf("forwarded socket: UID %d, cgroup %s, held by %v (UIDs %v); want UID %d, cgroup %s, one process of that UID",
					fwd[0].uid, fwd[0].cgroup, opener, euids(opener), wantUID, rel(srv.Cgroup))
			}
			if kind == Dropbear && (len(opener) != 1 || opener[0] != login.PID) {
				t.Errorf("forwarded socket held by %v, Dropbear logged the login as PID %d", opener, login.PID)
			}

			// Moving the session process: its new forwarded socket
			// follows it, its old sockets do not.
			moved := nettest.NewCgroup(t, root)
			move(t, opener[0], moved)
			second := tun.Stream(t, 0, 1<<20)
			if !second.Flowing(5 * time.Second) {
				t.Fatalf("second stream not flowing: %v", second.Err())
			}
			var newer, older socket
			for _, s := range forwarded(t, sink) {
				if s.local == fwd[0].local {
					older = s
				} else {
					newer = s
				}
			}
			session = socketOf(t, srv.Addr, tun.Local)
			t.Logf("after moving PID %d to %s: new forwarded socket in %s, old one in %s, session socket in %s",
				opener[0], rel(moved), newer.cgroup, older.cgroup, session.cgroup)
			if newer.cgroup != rel(moved) || older.cgroup != rel(srv.Cgroup) || session.cgroup != rel(srv.Cgroup) {
				t.Errorf("after the move: new forwarded socket in %q, old one in %q, session socket in %q; want %s, %s, %s",
					newer.cgroup, older.cgroup, session.cgroup, rel(moved), rel(srv.Cgroup), rel(srv.Cgroup))
			}

			// Moving the listener: a new login's session process is
			// born in the new cgroup, its session socket is not.
			listener := nettest.NewCgroup(t, root)
			move(t, srv.PID(), listener)
			tun2 := srv.Tunnel(t, a, ClientOptions{Source: "127.0.0.2"})
			session2 := socketOf(t, srv.Addr, tun2.Local)
			t.Logf("after moving the listener to %s: new session socket in %s, session processes %v in %v",
				rel(listener), session2.cgroup, session2.holders, cgroupsOf(t, rel, session2.holders))
			if session2.cgroup != rel(srv.Cgroup) {
				t.Errorf("new session socket in %s, want the listening socket's %s", session2.cgroup, rel(srv.Cgroup))
			}
			for i, cg := range cgroupsOf(t, rel, session2.holders) {
				if cg != rel(listener) {
					t.Errorf("new session process %d in %s, want %s", session2.holders[i], cg, rel(listener))
				}
			}
		})
	}
}

// socket is a TCP socket as ss and sock_diag report it.
type socket struct {
	local, remote netip.AddrPort
	uid           uint32
	cgroup        string // relative to the cgroup v2 mount, as ss prints it
	holders       []int
}

// sockets lists the established TCP sockets of the test's network
// namespace with `ss -tnHe`, with the processes that hold them.
func sockets(t *testing.T) []socket {
	t.Helper()
	out, err := exec.Command("ss", "-tnHe", "state", "established").Output()
	if err != nil {
		t.Fatalf("ss: %v", err)
	}
	var socks []socket
	for _, line := range strings.Split(string(out), "\n") {
		// Recv-Q Send-Q Local Peer [uid:N] ino:N sk:N cgroup:PATH ...
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		s := socket{}
		if s.local, err = netip.ParseAddrPort(f[2]); err != nil {
			continue
		}
		if s.remote, err = netip.ParseAddrPort(f[3]); err != nil {
			continue
		}
		for _, field := range f[4:] {
			key, value, _ := strings.Cut(field, ":")
			switch key {
			case "uid": // absent for root
				n, _ := strconv.ParseUint(value, 10, 32)
				s.uid = uint32(n)
			case "cgroup":
				s.cgroup = value
			case "ino":
				ino, _ := strconv.ParseUint(value, 10, 64)
				s.holders = holders(ino)
			}
		}
		socks = append(socks, s)
	}
	return socks
}

// socketOf returns the socket from local to remote; t fails if there is
// none.
func socketOf(t *testing.T, local, remote netip.AddrPort) socket {
	t.Helper()
	for _, s := range sockets(t) {
		if s.local == local && s.remote == remote {
			return s
		}
	}
	t.Fatalf("no socket %s->%s", local, remote)
	return socket{}
}

// forwarded returns the sockets connected to the sink: the forwarded
// connections of the tunnels.
func forwarded(t *testing.T, sink netip.AddrPort) []socket {
	t.Helper()
	var fwd []socket
	for _, s := range sockets(t) {
		if s.remote == sink {
			fwd = append(fwd, s)
		}
	}
	return fwd
}

// move moves process pid to cgroup.
func move(t *testing.T, pid int, cgroup string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(cgroup, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		t.Fatalf("move %d to %s: %v", pid, cgroup, err)
	}
}

// euids returns the effective UIDs of processes.
func euids(pids []int) []uint32 {
	var uids []uint32
	for _, pid := range pids {
		u, _ := uidsOf(pid)
		uids = append(uids, u[1])
	}
	return uids
}

// cgroupsOf returns the cgroup v2 paths of processes, as rel makes them.
func cgroupsOf(t *testing.T, rel func(string) string, pids []int) []string {
	t.Helper()
	var cgs []string
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		if err != nil {
			t.Fatal(err)
		}
		cg := "?"
		for _, line := range strings.Split(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "0::"); ok {
				cg = rel(rest)
			}
		}
		cgs = append(cgs, cg)
	}
	return cgs
}
