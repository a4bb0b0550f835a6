package sshsess

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// ProcEvent is a fork, an exec or an exit that the kernel reported.
type ProcEvent struct {
	// Exec is true for an exec (PID runs a new program), Exit for the end
	// of a process; neither for a fork (PID is a new process of Parent's).
	Exec, Exit bool
	// PID and Parent are thread group IDs (process IDs).
	PID, Parent uint32
}

// The process events connector (linux/cn_proc.h, linux/connector.h).
const (
	cnIdxProc         = 1
	cnValProc         = 1
	procCnMcastListen = 1
	procEventFork     = 0x00000001
	procEventExec     = 0x00000002
	procEventExit     = 0x80000000
	sizeofCnMsg       = 20 // idx, val, seq, ack, len, flags
	sizeofEventHeader = 16 // what, cpu, timestamp
)

// ErrProcEvents wraps a failure of the process events subscription.
var ErrProcEvents = errors.New("process events")

// WatchProcesses calls fn with every fork and every exit of a process
// (threads are left out) and every exec on the host, as the kernel's process events connector
// reports them, until ctx ends (nil) or the subscription fails (the kernel
// drops events when the reader falls behind: the caller subscribes again and
// looks for what it missed). It needs root and CONFIG_PROC_EVENTS. fn runs
// on WatchProcesses' goroutine and must be quick.
//
// github.com/vishvananda/netlink's ProcEventMonitor ends at the first message
// that is not the kernel's, which every other subscriber's request on the
// host is; so the socket is its package nl's, and the reading is here.
func WatchProcesses(ctx context.Context, fn func(ProcEvent)) error {
	s, err := nl.Subscribe(unix.NETLINK_CONNECTOR, cnIdxProc)
	if err != nil {
		return fmt.Errorf("%w: subscribe: %w", ErrProcEvents, err)
	}
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	defer s.Close()
	req := nl.NetlinkRequest{}
	req.Pid = uint32(os.Getpid())
	req.Type = unix.NLMSG_DONE
	req.Len = uint32(unix.SizeofNlMsghdr)
	req.AddData(nl.NewCnMsg(cnIdxProc, cnValProc, procCnMcastListen))
	if err := s.Send(&req); err != nil {
		return fmt.Errorf("%w: listen: %w", ErrProcEvents, err)
	}
	for {
		msgs, from, err := s.Receive()
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w: %w", ErrProcEvents, err)
		}
		if from.Pid != 0 {
			continue // another subscriber's request, not the kernel's event
		}
		for _, m := range msgs {
			if ev, ok := parseProcEvent(m.Data); ok {
				fn(ev)
			}
		}
	}
}

// parseProcEvent decodes a connector message holding a fork or an exec.
func parseProcEvent(b []byte) (ProcEvent, bool) {
	if len(b) < sizeofCnMsg+sizeofEventHeader+8 {
		return ProcEvent{}, false
	}
	if binary.NativeEndian.Uint32(b[0:]) != cnIdxProc || binary.NativeEndian.Uint32(b[4:]) != cnValProc {
		return ProcEvent{}, false
	}
	what := binary.NativeEndian.Uint32(b[sizeofCnMsg:])
	d := b[sizeofCnMsg+sizeofEventHeader:]
	switch what {
	case procEventFork: // parent_pid, parent_tgid, child_pid, child_tgid
		if len(d) < 16 {
			return ProcEvent{}, false
		}
		child, childTgid := binary.NativeEndian.Uint32(d[8:]), binary.NativeEndian.Uint32(d[12:])
		if child != childTgid {
			return ProcEvent{}, false // a new thread
		}
		return ProcEvent{PID: childTgid, Parent: binary.NativeEndian.Uint32(d[4:])}, true
	case procEventExec: // process_pid, process_tgid
		return ProcEvent{Exec: true, PID: binary.NativeEndian.Uint32(d[4:])}, true
	case procEventExit: // process_pid, process_tgid, exit_code, exit_signal, ...
		pid, tgid := binary.NativeEndian.Uint32(d[0:]), binary.NativeEndian.Uint32(d[4:])
		if pid != tgid {
			return ProcEvent{}, false // a thread
		}
		return ProcEvent{Exit: true, PID: tgid}, true
	}
	return ProcEvent{}, false
}
