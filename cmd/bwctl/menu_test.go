package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
)

// runMenu runs `bwctl menu` against sock with input as its standard input.
func runMenu(t *testing.T, sock, input string) (code int, stdout, stderr string) {
	t.Helper()
	old := stdin
	stdin = strings.NewReader(input)
	defer func() { stdin = old }()
	return runCmd(sock, "menu")
}

func TestMenuSetLimit(t *testing.T) {
	f, sock := serve(t)
	code, out, errs := runMenu(t, sock, "3\njohn\n10G\n\n12\n\n0\n")
	if code != 0 || errs != "" {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	want := []string{"SetLimit 10737418240 john", "Users"}
	if got := f.Calls(); !slices.Equal(got, want) {
		t.Errorf("backend calls %q, want %q", got, want)
	}
	for _, s := range []string{"[12] View Blocked Users", "john: limit set to 10.0 GiB", "mary", "BLOCKED"} {
		if !strings.Contains(out, s) {
			t.Errorf("output lacks %q:\n%s", s, out)
		}
	}
	if n := strings.Count(out, "[0]  Exit"); n != 3 {
		t.Errorf("menu shown %d times, want 3", n)
	}
	golden(t, "menu_set", out)
}

// TestMenuText: the menu is the guide's, in its order.
func TestMenuText(t *testing.T) {
	golden(t, "menu_text", menuText)
	guide := []string{
		"Show All Users + Usage + Limits + Status", "Check Single User Usage", "Set User Data Limit",
		"Remove User Limit", "Reset User Usage (Renew) - Also unblocks user", "Reset All Users Usage",
		"Disable User", "Enable User", "Check Bandwidth Service Status", "Real-time Bandwidth Monitor",
		"Unblock User (Manual Unblock)", "View Blocked Users",
	}
	for i, s := range guide {
		n := i + 1
		pad := " "
		if n < 10 {
			pad = "  "
		}
		if line := fmt.Sprintf("[%d]%s%s\n", n, pad, s); !strings.Contains(menuText, line) {
			t.Errorf("menu lacks %q", line)
		}
	}
}

func TestMenuOptions(t *testing.T) {
	for _, c := range []struct {
		name, input string
		calls       []string
		out         string
	}{
		{"list", "1\n\n0\n", []string{"Users"}, "USER  PROTOCOL"},
		{"usage", "2\nmary\n\n0\n", []string{"User mary"}, "mary"},
		{"usage_own", "2\n\n\n0\n", []string{"User john"}, "john"},
		{"bad_limit", "3\njohn\nabc\n-5\n1.5T\n\n0\n", []string{"SetLimit 1649267441664 john"}, `invalid limit "abc"`},
		{"bad_name", "4\n../x\n\nbob\n\n0\n", []string{"RemoveLimit bob"}, `invalid user name "../x"`},
		{"reset", "5\nmary\n\n0\n", []string{"Reset mary"}, "mary: usage reset"},
		{"reset_all", "6\nyes\n\n0\n", []string{"ResetAll"}, "usage reset for 4 users"},
		{"reset_all_no", "6\nno\n\n0\n", nil, "cancelled"},
		{"disable", "7\njohn\n\n0\n", []string{"Disable john"}, "john: disabled"},
		{"enable", "8\njohn\n\n0\n", []string{"Enable john"}, "john: enabled"},
		{"status", "9\n\n0\n", []string{"Health"}, "tick duration"},
		{"unblock", "11\nmary\n\n\n0\n", []string{"Unblock 0s mary"}, "mary: unblocked until"},
		{"unblock_for", "11\nmary\nsoon\n2d\n\n0\n", []string{"Unblock 48h0m0s mary"}, `invalid duration "soon"`},
		{"blocked", "12\n\n0\n", []string{"Users"}, "BLOCKED"},
		{"bad_choice", "13\nx\n0\n", nil, `invalid option "13"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			f, sock := serve(t)
			code, out, errs := runMenu(t, sock, c.input)
			if code != 0 || errs != "" {
				t.Fatalf("exit %d, stderr %q", code, errs)
			}
			if got := f.Calls(); !slices.Equal(got, c.calls) {
				t.Errorf("backend calls %q, want %q", got, c.calls)
			}
			if !strings.Contains(out, c.out) {
				t.Errorf("output lacks %q:\n%s", c.out, out)
			}
		})
	}
}

// TestMenuError: a failed operation is reported and the menu goes on.
func TestMenuError(t *testing.T) {
	f, sock := serve(t)
	code, out, errs := runMenu(t, sock, "7\nnobody\n\n8\njohn\n\n0\n")
	if code != 0 || !strings.Contains(errs, `unknown user "nobody"`) {
		t.Errorf("exit %d, stderr %q", code, errs)
	}
	if want := []string{"Disable nobody", "Enable john"}; !slices.Equal(f.Calls(), want) {
		t.Errorf("backend calls %q, want %q", f.Calls(), want)
	}
	if !strings.Contains(out, "john: enabled") {
		t.Errorf("output:\n%s", out)
	}
}

// TestMenuEOF: the end of the input at any point exits cleanly.
func TestMenuEOF(t *testing.T) {
	_, sock := serve(t)
	full := "3\njohn\n10G\n\n6\nyes\n\n11\nmary\n2d\n\n2\n\n\n0\n"
	for i := range len(full) {
		code, _, errs := runMenu(t, sock, full[:i])
		if code != 0 || errs != "" {
			t.Errorf("input %q: exit %d, stderr %q", full[:i], code, errs)
		}
	}
}

// TestMenuMonitor: option 10 runs the monitor command when there is one.
func TestMenuMonitor(t *testing.T) {
	saved, had := commands["monitor"]
	defer func() {
		if had {
			commands["monitor"] = saved
		} else {
			delete(commands, "monitor")
		}
	}()
	_, sock := serve(t)

	delete(commands, "monitor")
	code, out, _ := runMenu(t, sock, "10\n\n0\n")
	if code != 0 || !strings.Contains(out, "not available") {
		t.Errorf("without monitor: exit %d\n%s", code, out)
	}

	var got string
	commands["monitor"] = command{run: func(_ context.Context, e *env) error {
		b := make([]byte, 2)
		if _, err := io.ReadFull(e.in, b); err != nil {
			return err
		}
		got = string(b)
		_, err := fmt.Fprintln(e.out, "monitoring")
		return err
	}}
	code, out, errs := runMenu(t, sock, "10\nq\n\n0\n")
	if code != 0 || errs != "" || !strings.Contains(out, "monitoring") || got != "q\n" {
		t.Errorf("with monitor: exit %d, stderr %q, read %q\n%s", code, errs, got, out)
	}
}

func TestMenuArgs(t *testing.T) {
	_, sock := serve(t)
	if code, _, errs := runMenu(t, sock, "0\n"); code != 0 || errs != "" {
		t.Errorf("exit %d, stderr %q", code, errs)
	}
	if code, _, _ := runCmd(sock, "menu", "extra"); code != 2 {
		t.Errorf("menu extra: exit %d, want 2", code)
	}
}
