package sockkill

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

func TestStateString(t *testing.T) {
	for s, want := range map[State]string{
		StateEstablished: "ESTABLISHED",
		StateCloseWait:   "CLOSE_WAIT",
		StateClosing:     "CLOSING",
		0:                "State(0)",
		200:              "State(200)",
	} {
		if got := s.String(); got != want {
			t.Errorf("State(%d).String() = %q, want %q", uint8(s), got, want)
		}
	}
}

// TestWire encodes a Conn as a request and decodes the same bytes laid out
// as the kernel's answer.
func TestWire(t *testing.T) {
	for _, c := range []Conn{
		{
			Local:     netip.MustParseAddrPort("198.18.0.1:443"),
			Remote:    netip.MustParseAddrPort("198.18.0.2:50000"),
			Cookie:    0x1122334455667788,
			Interface: 7,
		},
		{
			Local:  netip.MustParseAddrPort("[fd00:b0::1]:443"),
			Remote: netip.MustParseAddrPort("[fd00:b0::2]:50000"),
			Cookie: 1,
		},
		{
			Local:  netip.MustParseAddrPort("[::ffff:198.18.0.1]:443"),
			Remote: netip.MustParseAddrPort("[::ffff:198.18.0.2]:50000"),
			Cookie: 2,
		},
	} {
		family, id, err := c.request()
		if err != nil {
			t.Fatalf("%v: %v", c, err)
		}
		wantFamily := uint8(unix.AF_INET6)
		if c.Local.Addr().Is4() {
			wantFamily = unix.AF_INET
		}
		if family != wantFamily {
			t.Errorf("%v: family %d, want %d", c, family, wantFamily)
		}
		req := (&diagReq{family: family, states: 1 << StateEstablished, id: id}).Serialize()
		if len(req) != sizeofDiagReq || req[0] != family || req[1] != unix.IPPROTO_TCP {
			t.Fatalf("%v: request % x", c, req)
		}
		if binary.NativeEndian.Uint32(req[4:]) != 1<<StateEstablished {
			t.Errorf("%v: states % x", c, req[4:8])
		}
		if req[8] != 443>>8 || req[9] != 443&0xff {
			t.Errorf("%v: source port not in network order: % x", c, req[8:10])
		}
		// inet_diag_msg: family, state, timer, retrans, the same sockid,
		// expires, rqueue, wqueue, uid, inode.
		msg := make([]byte, sizeofDiagMsg+8) // and an attribute, ignored
		msg[0], msg[1] = family, uint8(StateEstablished)
		copy(msg[4:], req[8:])
		binary.NativeEndian.PutUint32(msg[64:], 1000)
		binary.NativeEndian.PutUint32(msg[68:], 12345)
		got, err := parseMsg(msg)
		if err != nil {
			t.Fatal(err)
		}
		want := c
		want.State, want.UID, want.Inode = StateEstablished, 1000, 12345
		if got != want {
			t.Errorf("decoded %+v, want %+v", got, want)
		}
	}
	if _, err := parseMsg(make([]byte, sizeofDiagMsg-1)); err == nil {
		t.Error("parseMsg of a short message: no error")
	}
	msg := make([]byte, sizeofDiagMsg)
	msg[0] = unix.AF_UNIX
	if _, err := parseMsg(msg); err == nil {
		t.Error("parseMsg of AF_UNIX: no error")
	}
}

func TestNoCookie(t *testing.T) {
	c := Conn{
		Local:  netip.MustParseAddrPort("198.18.0.1:443"),
		Remote: netip.MustParseAddrPort("198.18.0.2:50000"),
	}
	_, id, err := c.request()
	if err != nil {
		t.Fatal(err)
	}
	if id.cookie != [2]uint32{noCookie, noCookie} {
		t.Errorf("cookie %x, want INET_DIAG_NOCOOKIE", id.cookie)
	}
}

func TestInvalidConn(t *testing.T) {
	l := netip.MustParseAddrPort("198.18.0.1:443")
	for _, c := range []Conn{
		{},
		{Local: l},
		{Local: l, Remote: netip.MustParseAddrPort("0.0.0.0:0")},
		{Local: l, Remote: netip.MustParseAddrPort("198.18.0.2:0")},
		{Local: l, Remote: netip.MustParseAddrPort("0.0.0.0:5000")},
		{Local: netip.MustParseAddrPort("198.18.0.1:0"), Remote: netip.MustParseAddrPort("198.18.0.2:5000")},
		{Local: l, Remote: netip.MustParseAddrPort("[fd00::2]:5000")},
	} {
		if _, _, err := c.request(); !errors.Is(err, errInvalidConn) {
			t.Errorf("%v: %v, want errInvalidConn", c, err)
		}
	}
}

// TestErrors checks how the kernel's answers map to the sentinels,
// including those this kernel cannot be made to give.
func TestErrors(t *testing.T) {
	var c Conn
	for _, tc := range []struct {
		errno error
		want  error
	}{
		{unix.ENOENT, errGone},
		{unix.ESTALE, errGone},
		{unix.EOPNOTSUPP, ErrNotSupported},
		{unix.EPERM, ErrPermission},
		{unix.EACCES, ErrPermission},
		{unix.EINVAL, unix.EINVAL},
	} {
		err := destroyErr(c, tc.errno)
		if !errors.Is(err, tc.want) {
			t.Errorf("destroy answered %v: %v, want %v", tc.errno, err, tc.want)
		}
		if tc.want != errGone && !errors.Is(err, tc.errno) {
			t.Errorf("destroy answered %v: %v does not wrap it", tc.errno, err)
		}
	}
	if err := destroyErr(c, nil); err != nil {
		t.Errorf("destroy answered nil: %v", err)
	}
	if err := wrap("open", unix.EPROTONOSUPPORT); !errors.Is(err, ErrNotSupported) {
		t.Errorf("EPROTONOSUPPORT: %v, want ErrNotSupported", err)
	}
}
