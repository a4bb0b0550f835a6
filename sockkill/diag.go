package sockkill

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The sock_diag wire format of TCP sockets (linux/inet_diag.h). The
// github.com/vishvananda/netlink types for it are unexported and its
// SocketDestroy takes neither a cookie nor an IPv6 address, so the two
// structures are encoded here; the netlink transport is that package's.
const (
	sizeofSockID  = 48                    // struct inet_diag_sockid
	sizeofDiagReq = 8 + sizeofSockID      // struct inet_diag_req_v2
	sizeofDiagMsg = 4 + sizeofSockID + 20 // struct inet_diag_msg

	// noCookie in both halves of idiag_cookie: match by address alone.
	noCookie = 0xffffffff

	// inetDiagInfo is INET_DIAG_INFO, the attribute that carries a
	// socket's struct tcp_info; a request asks for it with the bit
	// 1 << (inetDiagInfo - 1) of idiag_ext.
	inetDiagInfo = 2
)

// Where tcp_info's byte counts are: struct tcp_info only grows at its end,
// so an older kernel's shorter one has them at the same place or not at
// all.
var (
	offBytesAcked    = int(unsafe.Offsetof(unix.TCPInfo{}.Bytes_acked))
	offBytesReceived = int(unsafe.Offsetof(unix.TCPInfo{}.Bytes_received))
)

// listStates is the idiag_states mask of List: every TCP state but
// LISTEN (the inbound itself), TIME_WAIT (already closed, no process holds
// it) and CLOSE (not in the kernel's tables).
const listStates = 1<<StateEstablished | 1<<StateSynSent | 1<<StateSynRecv |
	1<<StateFinWait1 | 1<<StateFinWait2 | 1<<StateCloseWait |
	1<<StateLastAck | 1<<StateClosing | 1<<stateNewSynRecv

// sockID is struct inet_diag_sockid. Ports and addresses are in network
// order on the wire, the interface and cookie in host order.
type sockID struct {
	sport, dport uint16
	src, dst     [16]byte
	ifindex      uint32
	cookie       [2]uint32
}

// diagReq is struct inet_diag_req_v2 for IPPROTO_TCP; ext is idiag_ext,
// the attributes asked for (INET_DIAG_INFO when byte counts are wanted).
type diagReq struct {
	family uint8
	ext    uint8
	states uint32
	id     sockID
}

func (r *diagReq) Len() int { return sizeofDiagReq }

func (r *diagReq) Serialize() []byte {
	b := make([]byte, sizeofDiagReq)
	b[0] = r.family
	b[1] = unix.IPPROTO_TCP
	b[2] = r.ext
	// b[3] pad stays 0.
	binary.NativeEndian.PutUint32(b[4:], r.states)
	id := b[8:]
	binary.BigEndian.PutUint16(id[0:], r.id.sport)
	binary.BigEndian.PutUint16(id[2:], r.id.dport)
	copy(id[4:20], r.id.src[:])
	copy(id[20:36], r.id.dst[:])
	binary.NativeEndian.PutUint32(id[36:], r.id.ifindex)
	binary.NativeEndian.PutUint32(id[40:], r.id.cookie[0])
	binary.NativeEndian.PutUint32(id[44:], r.id.cookie[1])
	return b
}

// parseMsg decodes a struct inet_diag_msg and, of the attributes after it,
// the byte counts of INET_DIAG_INFO.
func parseMsg(b []byte) (Conn, error) {
	if len(b) < sizeofDiagMsg {
		return Conn{}, fmt.Errorf("inet_diag_msg of %d bytes, want %d", len(b), sizeofDiagMsg)
	}
	family := b[0]
	id := b[4:]
	var src, dst netip.Addr
	switch family {
	case unix.AF_INET:
		src = netip.AddrFrom4([4]byte(id[4:8]))
		dst = netip.AddrFrom4([4]byte(id[20:24]))
	case unix.AF_INET6:
		src = netip.AddrFrom16([16]byte(id[4:20]))
		dst = netip.AddrFrom16([16]byte(id[20:36]))
	default:
		return Conn{}, fmt.Errorf("inet_diag_msg of family %d", family)
	}
	rest := b[4+sizeofSockID:]
	c := Conn{
		Local:     netip.AddrPortFrom(src, binary.BigEndian.Uint16(id[0:])),
		Remote:    netip.AddrPortFrom(dst, binary.BigEndian.Uint16(id[2:])),
		State:     State(b[1]),
		UID:       binary.NativeEndian.Uint32(rest[12:]),
		Inode:     uint64(binary.NativeEndian.Uint32(rest[16:])),
		Cookie:    uint64(binary.NativeEndian.Uint32(id[40:])) | uint64(binary.NativeEndian.Uint32(id[44:]))<<32,
		Interface: binary.NativeEndian.Uint32(id[36:]),
	}
	// The attributes: struct rtattr {u16 len; u16 type}, then the
	// payload, each padded to 4 bytes.
	for attrs := b[sizeofDiagMsg:]; len(attrs) >= 4; {
		n, typ := int(binary.NativeEndian.Uint16(attrs)), binary.NativeEndian.Uint16(attrs[2:])
		if n < 4 || n > len(attrs) {
			break
		}
		if typ == inetDiagInfo {
			info := attrs[4:n]
			if len(info) >= offBytesReceived+8 {
				c.BytesSent = binary.NativeEndian.Uint64(info[offBytesAcked:])
				c.BytesReceived = binary.NativeEndian.Uint64(info[offBytesReceived:])
			}
		}
		attrs = attrs[min((n+3)&^3, len(attrs)):]
	}
	return c, nil
}

// errInvalidConn: a Conn that names no established socket.
var errInvalidConn = errors.New("not a connected TCP socket")

// request returns the address family and inet_diag_sockid that name c to
// the kernel's exact lookup, with c's cookie if it has one.
func (c Conn) request() (family uint8, id sockID, err error) {
	l, r := c.Local.Addr(), c.Remote.Addr()
	if !l.IsValid() || !r.IsValid() || l.Is4() != r.Is4() {
		return 0, id, errInvalidConn
	}
	// A listener's remote end is *:0. The kernel's lookup falls back to
	// the listeners when no connected socket matches, so a tuple like that
	// (or any tuple, without a cookie) can name the listener: see Destroy.
	if c.Remote.Port() == 0 || c.Local.Port() == 0 || r.IsUnspecified() {
		return 0, id, errInvalidConn
	}
	id.sport, id.dport = c.Local.Port(), c.Remote.Port()
	if l.Is4() {
		family = unix.AF_INET
		a4, b4 := l.As4(), r.As4()
		copy(id.src[:], a4[:])
		copy(id.dst[:], b4[:])
	} else {
		family = unix.AF_INET6
		id.src, id.dst = l.As16(), r.As16()
	}
	id.ifindex = c.Interface
	id.cookie = [2]uint32{noCookie, noCookie}
	if c.Cookie != 0 {
		id.cookie = [2]uint32{uint32(c.Cookie), uint32(c.Cookie >> 32)}
	}
	return family, id, nil
}
