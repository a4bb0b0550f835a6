package sshtest

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os/exec"
	"os/user"
	"strconv"
	"testing"

	"github.com/myvpn/bwagent/internal/nettest"
)

// TestParseLogin: the login lines of both servers, as they log them (IPv6
// included: Dropbear writes it without brackets), and lines that are no
// logins.
func TestParseLogin(t *testing.T) {
	for _, tc := range []struct {
		kind Kind
		line string
		want Login // zero: no login
	}{
		{Dropbear, "[17106] Dec 04 21:49:34 Password auth succeeded for 'bwexp1' from 127.0.0.1:58164",
			Login{User: "bwexp1", Method: "password", From: netip.MustParseAddrPort("127.0.0.1:58164"), PID: 17106}},
		{Dropbear, "[24560] Dec 04 21:59:06 Pubkey auth succeeded for 'bwsh-97fff8fd' with ssh-ed25519 key SHA256:qXQ4eseC3AduXwcxMf5mFDSc4Vdsh2puk2I6vt3VLjM from 127.0.0.3:60775",
			Login{User: "bwsh-97fff8fd", Method: "publickey", From: netip.MustParseAddrPort("127.0.0.3:60775"), PID: 24560}},
		{Dropbear, "[23090] Dec 04 21:57:53 Password auth succeeded for 'bwexp3' from ::1:44738",
			Login{User: "bwexp3", Method: "password", From: netip.MustParseAddrPort("[::1]:44738"), PID: 23090}},
		{Dropbear, "[24571] Dec 04 21:59:06 Bad password attempt for 'bwsh-97fff8fd' from 127.0.0.1:34634", Login{}},
		{Dropbear, "[24571] Dec 04 21:59:06 Child connection from 127.0.0.1:34634", Login{}},
		{OpenSSH, "Accepted password for bwsh-7516bd2a from 127.0.0.2 port 60499 ssh2",
			Login{User: "bwsh-7516bd2a", Method: "password", From: netip.MustParseAddrPort("127.0.0.2:60499")}},
		{OpenSSH, "Accepted publickey for bwsh-7516bd2a from ::1 port 38369 ssh2: ED25519 SHA256:AcRhkYnOHmLoQPv22BFHCMFVxaMoMVL71ZOMuV4RDgI",
			Login{User: "bwsh-7516bd2a", Method: "publickey", From: netip.MustParseAddrPort("[::1]:38369")}},
		{OpenSSH, "Failed password for bwsh-7516bd2a from 127.0.0.1 port 37730 ssh2", Login{}},
		{OpenSSH, "[17106] Dec 04 21:49:34 Password auth succeeded for 'bwexp1' from 127.0.0.1:58164", Login{}},
	} {
		got, ok := parseLogin(tc.kind, tc.line)
		got.Line = ""
		if ok != (tc.want != Login{}) || got != tc.want {
			t.Errorf("%s %q: %+v, %v; want %+v", tc.kind, tc.line, got, ok, tc.want)
		}
	}
}

// TestSweep: an account that a killed test binary left behind is removed;
// one whose creator runs is kept.
func TestSweep(t *testing.T) {
	a := NewAccount(t)
	// A process that is gone.
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	name := nettest.Name("bwsh-")
	gecos := fmt.Sprintf("%s pid=%d start=1", gecosTag, dead.Process.Pid)
	for try := 0; ; try++ {
		uid := strconv.Itoa(FirstUID + rand.IntN(LastUID-FirstUID+1))
		out, err := exec.Command("useradd", "-m", "-U", "-u", uid, "-s", "/bin/sh", "-c", gecos, name).CombinedOutput()
		if err == nil {
			break
		}
		if try == 100 {
			t.Fatalf("useradd %s: %v: %s", name, err, out)
		}
	}
	t.Cleanup(func() { exec.Command("userdel", "-f", "-r", name).Run() })
	sweep(t)
	if _, err := user.Lookup(name); err == nil {
		t.Errorf("stale account %s kept", name)
	}
	if _, err := user.Lookup(a.Name); err != nil {
		t.Errorf("live account %s removed: %v", a.Name, err)
	}
}
