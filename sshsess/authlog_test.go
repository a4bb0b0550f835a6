package sshsess_test

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/myvpn/bwagent/sshsess"
)

func TestParseLogin(t *testing.T) {
	for _, tc := range []struct {
		line string
		want sshsess.Login
		ok   bool
	}{
		{"Dec  4 21:49:34 vpn dropbear[17106]: Password auth succeeded for 'alice' from 127.0.0.1:58164",
			sshsess.Login{PID: 17106, User: "alice", From: netip.MustParseAddrPort("127.0.0.1:58164")}, true},
		{"[17106] Dec 04 21:49:34 Pubkey auth succeeded for 'bob' with ssh-ed25519 key SHA256:abc from ::1:44738",
			sshsess.Login{PID: 17106, User: "bob", From: netip.MustParseAddrPort("[::1]:44738")}, true},
		{"2026-12-04T21:49:34+00:00 vpn dropbear[9]: Password auth succeeded for 'c.d' from [2001:db8::1]:22",
			sshsess.Login{PID: 9, User: "c.d", From: netip.MustParseAddrPort("[2001:db8::1]:22")}, true},
		{"dropbear[17106]: Bad password attempt for 'alice' from 127.0.0.1:58164", sshsess.Login{}, false},
		{"sshd[5]: Accepted password for alice from 127.0.0.1 port 50848 ssh2", sshsess.Login{}, false},
		{"dropbear[0]: Password auth succeeded for 'alice' from 127.0.0.1:1", sshsess.Login{}, false},
		{"dropbear[7]: Password auth succeeded for '' from 127.0.0.1:1", sshsess.Login{}, false},
		{"dropbear[7]: Password auth succeeded for 'alice' from 127.0.0.1", sshsess.Login{}, false},
		{"dropbear[7]: Password auth succeeded for 'alice' from 127.0.0.1:99999", sshsess.Login{}, false},
		{"dropbear[7]: Password auth succeeded for '" + strings.Repeat("x", 33) + "' from 127.0.0.1:1", sshsess.Login{}, false},
	} {
		got, ok := sshsess.ParseLogin(tc.line)
		if ok != tc.ok || got != tc.want {
			t.Errorf("ParseLogin(%q) = %+v, %v; want %+v, %v", tc.line, got, ok, tc.want, tc.ok)
		}
	}
}

// An AuthLog starts at the file's end, reads what is appended, starts over
// at the top of a rotated or truncated file, skips over-long lines without
// keeping them, and refuses a symbolic link.
func TestAuthLog(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "auth.log")
	login := func(pid int) string {
		return "x dropbear[" + strconv.Itoa(pid) + "]: Password auth succeeded for 'u' from 10.0.0.1:1000\n"
	}
	write := func(flag int, s string) {
		t.Helper()
		f, err := os.OpenFile(path, flag|os.O_WRONLY|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteString(s)
		f.Close()
	}
	read := func(l *sshsess.AuthLog, want ...int) {
		t.Helper()
		got, err := l.Read()
		if err != nil {
			t.Fatal(err)
		}
		var pids []int
		for _, g := range got {
			pids = append(pids, g.PID)
		}
		if !slices.Equal(pids, want) {
			t.Fatalf("read logins of PIDs %v, want %v", pids, want)
		}
	}
	l := sshsess.NewAuthLog(path)
	defer l.Close()
	read(l) // no file yet
	write(os.O_APPEND, login(1))
	read(l) // the agent starts at the end of what is there
	write(os.O_APPEND, login(2)+"partial dropbear[3]: Password auth succ")
	read(l, 2)
	write(os.O_APPEND, "eeded for 'u' from 10.0.0.1:1000\n")
	read(l, 3)
	write(os.O_APPEND, strings.Repeat("z", 10000)+login(4)[1:]+login(5))
	read(l, 5)
	if l.Skipped() != 1 {
		t.Errorf("skipped %d over-long lines, want 1", l.Skipped())
	}
	write(os.O_TRUNC, login(6)) // copytruncate
	read(l, 6)
	os.Rename(path, path+".1") // rotation
	write(os.O_APPEND, login(7))
	read(l, 7)
	os.Remove(path)
	os.Symlink(path+".1", path)
	if _, err := l.Read(); err == nil {
		t.Error("read through a symbolic link")
	}
}
