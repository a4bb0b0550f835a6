package sshsess

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// sock is a TCP socket of another process, borrowed: fd is this process's
// duplicate of it (pidfd_getfd), which the borrower closes.
type sock struct {
	fd            int
	owner         uint32 // the socket file's owner
	stream        bool   // TCP
	listening     bool
	local, remote netip.AddrPort
	info          unix.TCPInfo
}

// sessionOn reports whether s is a connection accepted on one of ports: a
// session's, not a forwarded one (those are opened, from ephemeral ports).
func (s *sock) sessionOn(ports map[uint16]bool) bool {
	return s.stream && !s.listening && ports[s.local.Port()] && s.remote.IsValid()
}

// closeAll closes the borrowed descriptors.
func closeAll(socks []sock) {
	for _, s := range socks {
		unix.Close(s.fd)
	}
}

// borrowAll returns duplicates of process pid's TCP sockets, which the
// caller closes (closeAll).
func (t *Tracker) borrowAll(pid int) ([]sock, error) {
	dir := filepath.Join(t.cfg.Proc, strconv.Itoa(pid), "fd")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list descriptors: %w", err)
	}
	var fds []int
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil || !strings.HasPrefix(target, "socket:[") {
			continue
		}
		if fd, err := strconv.Atoi(e.Name()); err == nil {
			fds = append(fds, fd)
		}
	}
	if len(fds) == 0 {
		return nil, nil
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open: %w", err)
	}
	defer unix.Close(pidfd)
	var socks []sock
	for _, fd := range fds {
		nfd, err := unix.PidfdGetfd(pidfd, fd, 0)
		if err != nil {
			continue // closed meanwhile
		}
		s, ok := inspect(nfd)
		if !ok {
			unix.Close(nfd)
			continue
		}
		socks = append(socks, s)
	}
	return socks, nil
}

// inspect describes fd if it is a TCP socket over IPv4 or IPv6.
func inspect(fd int) (sock, bool) {
	s := sock{fd: fd}
	dom, err1 := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	proto, err2 := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_PROTOCOL)
	if err1 != nil || err2 != nil || (dom != unix.AF_INET && dom != unix.AF_INET6) || proto != unix.IPPROTO_TCP {
		return s, false
	}
	s.stream = true
	if v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err == nil {
		s.listening = v != 0
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err == nil {
		s.owner = st.Uid
	}
	if sa, err := unix.Getsockname(fd); err == nil {
		s.local = addrPort(sa)
	}
	if !s.listening {
		if sa, err := unix.Getpeername(fd); err == nil {
			s.remote = addrPort(sa)
		}
		if info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			s.info = *info
		}
	}
	return s, true
}

func addrPort(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return netip.AddrPort{}
}
