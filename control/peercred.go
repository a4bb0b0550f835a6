package control

import (
	"context"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
)

// PeerCred is the credentials of the process at the other end of a Unix
// socket connection (SO_PEERCRED), as of connect. It is the AuthInfo of
// every call on that connection.
type PeerCred struct {
	credentials.CommonAuthInfo
	PID      int32
	UID, GID uint32
}

// AuthType implements credentials.AuthInfo.
func (PeerCred) AuthType() string { return "peercred" }

// peerCreds is a server-side TransportCredentials that hands gRPC the
// SO_PEERCRED of each connection, read by the listener at accept. It does
// not encrypt: the socket is local.
type peerCreds struct{}

func (peerCreds) ClientHandshake(_ context.Context, _ string, c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return c, nil, fmt.Errorf("peercred credentials are for the server side only")
}

// ServerHandshake hands gRPC the credentials the listener read at accept.
func (peerCreds) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	lc, ok := c.(*conn)
	if !ok {
		return nil, nil, fmt.Errorf("control: connection is %T, not one of the control listener", c)
	}
	return c, lc.cred, nil
}

// peerCred reads the credentials of c's peer, and returns c's descriptor
// number.
func peerCred(c *net.UnixConn) (PeerCred, int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return PeerCred{}, 0, err
	}
	var uc *unix.Ucred
	var fd int
	var serr error
	if err := rc.Control(func(sfd uintptr) {
		fd = int(sfd)
		uc, serr = unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return PeerCred{}, 0, err
	}
	if serr != nil {
		return PeerCred{}, 0, fmt.Errorf("control: SO_PEERCRED: %w", serr)
	}
	return PeerCred{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity},
		PID:            uc.Pid, UID: uc.Uid, GID: uc.Gid,
	}, fd, nil
}

func (peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}

func (p peerCreds) Clone() credentials.TransportCredentials { return p }

func (peerCreds) OverrideServerName(string) error { return nil }
