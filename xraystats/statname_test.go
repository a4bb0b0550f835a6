package xraystats

import (
	"errors"
	"strings"
	"testing"
)

func TestParseStatName(t *testing.T) {
	for _, tc := range []struct {
		name                  string
		kind, subject, metric string
		wantErr               bool
	}{
		{"user>>>alice>>>traffic>>>uplink", "user", "alice", "uplink", false},
		{"user>>>alice>>>traffic>>>downlink", "user", "alice", "downlink", false},
		{"user>>>alice@example.com>>>online", "user", "alice@example.com", "online", false},
		{"inbound>>>vless-in>>>traffic>>>uplink", "inbound", "vless-in", "uplink", false},
		{"outbound>>>direct>>>traffic>>>downlink", "outbound", "direct", "downlink", false},
		// '>' in the subject, at either end or in the middle.
		{"user>>>a>b>>>traffic>>>uplink", "user", "a>b", "uplink", false},
		{"user>>>>alice>>>traffic>>>uplink", "user", ">alice", "uplink", false},
		{"user>>>alice>>>>traffic>>>uplink", "user", "alice>", "uplink", false},
		{"user>>>>>>>traffic>>>uplink", "user", ">", "uplink", false},
		{"user>>>a>>>b>>>traffic>>>downlink", "user", "a>>>b", "downlink", false},
		{"user>>>x>>>traffic>>>uplink>>>traffic>>>uplink", "user", "x>>>traffic>>>uplink", "uplink", false},
		{"user>>>alice>>>online>>>online", "user", "alice>>>online", "online", false},
		{"user>>> >>>traffic>>>uplink", "user", " ", "uplink", false},
		{"user>>>ÄÖ✓>>>traffic>>>uplink", "user", "ÄÖ✓", "uplink", false},

		{"", "", "", "", true},
		{">>>", "", "", "", true},
		{"user", "", "", "", true},
		{"user>>>", "", "", "", true},
		{"user>>>alice", "", "", "", true},
		{"user>>>alice>>>traffic", "", "", "", true},
		{"user>>>alice>>>traffic>>>", "", "", "", true},
		{"user>>>alice>>>traffic>>>sideways", "", "", "", true},
		{"user>>>>>>traffic>>>uplink", "", "", "", true}, // empty email
		{"user>>>traffic>>>uplink", "", "", "", true},    // no email part
		{"user>>>online", "", "", "", true},
		{"users>>>alice>>>traffic>>>uplink", "", "", "", true},
		{"User>>>alice>>>traffic>>>uplink", "", "", "", true},
		{"inbound>>>vless-in>>>online", "", "", "", true},
		{"user>>alice>>>traffic>>>uplink", "", "", "", true},
		{"user>>>alice>>traffic>>>uplink", "", "", "", true},
		{"user>>>alice>>>traffic>>uplink", "", "", "", true},
		{" user>>>alice>>>traffic>>>uplink", "", "", "", true},
		{"user>>>alice>>>traffic>>>uplink ", "", "", "", true},
	} {
		kind, subject, metric, err := ParseStatName(tc.name)
		if tc.wantErr {
			if err == nil || !errors.Is(err, ErrBadName) {
				t.Errorf("ParseStatName(%q) = %q, %q, %q, %v; want ErrBadName", tc.name, kind, subject, metric, err)
			}
			if kind != "" || subject != "" || metric != "" {
				t.Errorf("ParseStatName(%q) failed but returned %q, %q, %q", tc.name, kind, subject, metric)
			}
			continue
		}
		if err != nil || kind != tc.kind || subject != tc.subject || metric != tc.metric {
			t.Errorf("ParseStatName(%q) = %q, %q, %q, %v; want %q, %q, %q", tc.name, kind, subject, metric, err, tc.kind, tc.subject, tc.metric)
		}
	}
}

// statName builds a name the way Xray does.
func statName(kind, subject, metric string) string {
	if metric == MetricOnline {
		return kind + ">>>" + subject + ">>>online"
	}
	return kind + ">>>" + subject + ">>>traffic>>>" + metric
}

// FuzzParseStatName checks, on any input, that ParseStatName does not
// panic, that what it accepts is rebuilt exactly from its parts, and that
// any non-empty email or tag, '>' and all, comes back out of the name that
// Xray would make of it.
func FuzzParseStatName(f *testing.F) {
	for _, s := range []string{
		"user>>>alice>>>traffic>>>uplink",
		"user>>>alice>>>traffic>>>downlink",
		"user>>>alice>>>online",
		"inbound>>>api>>>traffic>>>uplink",
		"outbound>>>direct>>>traffic>>>downlink",
		"user>>>a>>>b>>>traffic>>>uplink",
		"user>>>>>>>traffic>>>uplink",
		"user>>>>>>traffic>>>uplink",
		"user>>>>",
		">>>>>>>>>",
		"user>>>online",
		"",
		"\xff>>>\x00",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		kind, subject, metric, err := ParseStatName(s)
		if err != nil {
			if !errors.Is(err, ErrBadName) {
				t.Fatalf("ParseStatName(%q): %v, not ErrBadName", s, err)
			}
		} else {
			if subject == "" {
				t.Fatalf("ParseStatName(%q): empty subject", s)
			}
			if strings.Contains(kind, ">") {
				t.Fatalf("ParseStatName(%q): kind %q", s, kind)
			}
			if got := statName(kind, subject, metric); got != s {
				t.Fatalf("ParseStatName(%q) = %q, %q, %q, which make %q", s, kind, subject, metric, got)
			}
		}

		// s as an email or tag.
		if s == "" {
			return
		}
		for _, kind := range []string{KindUser, KindInbound, KindOutbound} {
			metrics := []string{MetricUplink, MetricDownlink}
			if kind == KindUser {
				metrics = append(metrics, MetricOnline)
			}
			for _, metric := range metrics {
				name := statName(kind, s, metric)
				k, subj, m, err := ParseStatName(name)
				if err != nil || k != kind || subj != s || m != metric {
					t.Fatalf("ParseStatName(%q) = %q, %q, %q, %v; want %q, %q, %q", name, k, subj, m, err, kind, s, metric)
				}
			}
		}
	})
}
