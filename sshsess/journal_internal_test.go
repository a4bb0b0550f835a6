package sshsess

import (
	"net/netip"
	"testing"
)

func TestParseJournalEntry(t *testing.T) {
	for _, tc := range []struct {
		entry string
		want  Login
		ok    bool
	}{
		{`{"MESSAGE":"Password auth succeeded for 'alice' from 127.0.0.1:5","_PID":"42","_COMM":"dropbear"}`,
			Login{PID: 42, User: "alice", From: netip.MustParseAddrPort("127.0.0.1:5")}, true},
		{`{"MESSAGE":"Pubkey auth succeeded for 'bob' with ssh-ed25519 key SHA256:x from ::1:7","_PID":"9"}`,
			Login{PID: 9, User: "bob", From: netip.MustParseAddrPort("[::1]:7")}, true},
		// A message that is not text (the journal writes bytes as an array).
		{`{"MESSAGE":[80,97,115,115],"_PID":"42"}`, Login{}, false},
		// No trusted PID, or a bad one.
		{`{"MESSAGE":"Password auth succeeded for 'alice' from 127.0.0.1:5"}`, Login{}, false},
		{`{"MESSAGE":"Password auth succeeded for 'alice' from 127.0.0.1:5","_PID":"-1"}`, Login{}, false},
		// A forged line inside a message: the whole message must be a login.
		{`{"MESSAGE":"x\nPassword auth succeeded for 'alice' from 127.0.0.1:5","_PID":"42"}`, Login{}, false},
		{`{"MESSAGE":"Bad password attempt for 'alice' from 127.0.0.1:5","_PID":"42"}`, Login{}, false},
		{`not json`, Login{}, false},
	} {
		got, ok := parseJournalEntry([]byte(tc.entry))
		if ok != tc.ok || got != tc.want {
			t.Errorf("parseJournalEntry(%s) = %+v, %v; want %+v, %v", tc.entry, got, ok, tc.want, tc.ok)
		}
	}
}
