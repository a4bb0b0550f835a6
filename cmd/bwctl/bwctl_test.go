package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/myvpn/bwagent/agent"
	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/control/agentbackend"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/quota"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata")

func TestMain(m *testing.M) {
	time.Local = time.UTC
	// The test binary is bwctl itself when the cek-bw-limit test runs it.
	if os.Getenv("BWCTL_TEST_AS_BWCTL") != "" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	nettest.Main(m) // the real-agent tests run traffic as other UIDs

}

// fake is a control.Backend over fixed users that records every call.
type fake struct {
	mu      sync.Mutex
	users   []control.User
	calls   []string
	healthy bool // Health reports no errors
}

var t0 = time.Date(2026, 11, 1, 8, 30, 0, 0, time.UTC)

func newFake() *fake {
	return &fake{users: []control.User{
		{Name: "bob", Protocol: quota.Trojan, Present: true, Status: quota.Unlimited, Used: 123 * quota.MiB,
			Upload: 23 * quota.MiB, Download: 100 * quota.MiB, Today: 512, LastReset: t0, Updated: t0.Add(time.Hour)},
		{Name: "john", Protocol: quota.SSH, UID: 1001, Present: true, Status: quota.Warning, Used: 9 * quota.GiB,
			Limit: 10 * quota.GiB, Remaining: quota.GiB, Upload: 2 * quota.GiB, Download: 7 * quota.GiB, Today: 300 * quota.MiB,
			LastReset: t0, NextReset: t0.AddDate(0, 1, 0), Updated: t0.Add(time.Hour), Devices: 2, DevicesLimit: 2,
			Speed: quota.Speed{Down: 20e6, Up: 20e6}},
		{Name: "dave", Protocol: quota.SSH, UID: 1002, Present: true, Status: quota.Throttled, Used: 600 * quota.MiB,
			Limit: 500 * quota.MiB, Upload: 100 * quota.MiB, Download: 500 * quota.MiB, Today: 600 * quota.MiB,
			Reason: quota.ReasonLimit, BlockTime: t0.Add(3 * time.Hour), LastReset: t0, Updated: t0.Add(time.Hour),
			Speed: quota.Speed{Down: 4e6, Up: 1e6}},
		{Name: "mary", Protocol: quota.VLESS, Present: true, Status: quota.Blocked, Used: 5*quota.GiB + 200*quota.MiB,
			Limit: 5 * quota.GiB, Upload: quota.GiB, Download: 4*quota.GiB + 200*quota.MiB, Today: quota.GiB,
			Reason: quota.ReasonLimit, BlockTime: t0.Add(2 * time.Hour), LastReset: t0, NextReset: t0.AddDate(0, 1, 0),
			Expires: t0.AddDate(0, 2, 0), Updated: t0.Add(time.Hour),
			Override: control.Override{Active: true, Limit: 5 * quota.GiB, Until: t0.Add(26 * time.Hour)}},
	}}
}

func (f *fake) call(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
}

func (f *fake) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func (f *fake) find(name string) (control.User, error) {
	for _, u := range f.users {
		if u.Name == name {
			return u, nil
		}
	}
	return control.User{}, fmt.Errorf("%w %q: not an account in the SSH UID range nor an Xray client", agent.ErrUnknownUser, name)
}

func (f *fake) Users(context.Context) ([]control.User, error) {
	f.call("Users")
	return slices.Clone(f.users), nil
}

func (f *fake) User(_ context.Context, name string) (control.User, error) {
	f.call("User %s", name)
	return f.find(name)
}

func (f *fake) History(_ context.Context, name, from, to string) ([]control.Day, error) {
	f.call("History %s %q %q", name, from, to)
	if _, err := f.find(name); err != nil {
		return nil, err
	}
	return []control.Day{
		{Day: "2026-11-01", Up: 100 * quota.MiB, Down: 900 * quota.MiB},
		{Day: "2026-11-02", Up: 2 * quota.GiB, Down: 5 * quota.GiB},
		{Day: "2026-11-03", Up: 0, Down: 700},
	}, nil
}

func (f *fake) named(op, name string) error {
	f.call("%s %s", op, name)
	_, err := f.find(name)
	return err
}

func (f *fake) Check(context.Context) error { f.call("Check"); return nil }
func (f *fake) Reset(_ context.Context, name string) error {
	return f.named("Reset", name)
}
func (f *fake) ResetAll(context.Context) (int, error) { f.call("ResetAll"); return len(f.users), nil }
func (f *fake) Disable(_ context.Context, name string) error {
	return f.named("Disable", name)
}
func (f *fake) Enable(_ context.Context, name string) error { return f.named("Enable", name) }
func (f *fake) Unblock(_ context.Context, name string, d time.Duration) error {
	return f.named("Unblock "+d.String(), name)
}
func (f *fake) SetLimit(_ context.Context, name string, limit uint64) error {
	return f.named(fmt.Sprintf("SetLimit %d", limit), name)
}
func (f *fake) RemoveLimit(_ context.Context, name string) error {
	return f.named("RemoveLimit", name)
}
func (f *fake) Devices(_ context.Context, name string) ([]control.Device, error) {
	if err := f.named("Devices", name); err != nil {
		return nil, err
	}
	if name != "john" {
		return nil, nil
	}
	return []control.Device{
		{Address: "203.0.113.7", Protocols: []quota.Protocol{quota.SSH}, Connections: 2, Since: t0.Add(10 * time.Minute), Bytes: 3 * quota.MiB},
		{Address: "2001:db8:1:2::/64", Protocols: []quota.Protocol{quota.SSH}, Connections: 1, Bytes: 4096},
		{Address: "198.51.100.9", Protocols: []quota.Protocol{quota.SSH}, Connections: 1, Since: t0.Add(time.Hour), Refused: true},
	}, nil
}
func (f *fake) SetDevices(_ context.Context, name string, d quota.DeviceLimit) error {
	return f.named(fmt.Sprintf("SetDevices %d", d), name)
}
func (f *fake) SetSpeed(_ context.Context, name string, throttle bool, sp quota.Speed) error {
	return f.named(fmt.Sprintf("SetSpeed %v %s", throttle, sp), name)
}
func (f *fake) Health() control.Health {
	f.call("Health")
	if f.healthy {
		return control.Health{LastTick: t0, TickDuration: time.Millisecond, Users: 3}
	}
	return control.Health{LastTick: t0.Add(90 * time.Second), TickDuration: 42 * time.Millisecond, Users: 3,
		Errors: map[string]string{"xray": "stats API unreachable"},
		Notify: []control.NotifyChannel{
			{Name: "webhook https://hooks.example.com/bw", Backlog: 3, Delivered: 40, Expired: 1, Attempts: 2,
				NextTry: t0.Add(2 * time.Minute), LastError: "POST https://hooks.example.com/bw: dial tcp 192.0.2.1:443: connect: connection refused",
				ErrorTime: t0.Add(80 * time.Second)},
			{Name: "telegram chat 123456789", Delivered: 12, LastError: "telegram sendMessage to chat 123456789: refused: 429 Too Many Requests: retry after 7",
				ErrorTime: t0.Add(-time.Hour)},
			{Name: "exec /usr/local/bin/on-bw-event"},
		}}
}

// Updates reports a snapshot that never changes: the fake's users are fixed.
func (f *fake) Updates() (uint64, <-chan struct{}) { return 0, nil }

// serve serves a fake backend on a socket in a temporary directory.
func serve(t *testing.T) (*fake, string) {
	t.Helper()
	f := newFake()
	sock := filepath.Join(t.TempDir(), "bw.sock")
	srv := control.NewServer(f, control.Options{
		ErrorCodes: agentbackend.ErrorCodes,
		LookupUser: func(uint32) (string, error) { return "john", nil }, // `usage` is john's own
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, sock) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	for i := 0; ; i++ { // until it listens: the file appears before listen(2)
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if i > 200 {
			t.Fatalf("socket %s did not appear", sock)
		}
		time.Sleep(10 * time.Millisecond)
	}
	return f, sock
}

// runCmd runs bwctl with args against sock.
func runCmd(sock string, args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = run(append([]string{"--socket", sock}, args...), &out, &errb)
	return code, out.String(), errb.String()
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("output differs from %s:\n--- got\n%s--- want\n%s", path, got, want)
	}
}

func TestCommands(t *testing.T) {
	t.Setenv("NO_COLOR", "")
	for _, c := range []struct {
		name  string
		args  []string
		calls []string
	}{
		{"set", []string{"set", "john", "10G"}, []string{"SetLimit 10737418240 john"}},
		{"set_mib", []string{"set", "john", "10240"}, []string{"SetLimit 10737418240 john"}},
		{"set_unlimited", []string{"set", "john", "unlimited"}, []string{"SetLimit 0 john"}},
		{"set_protocol", []string{"set", "john", "10G", "--protocol", "SSH"}, []string{"User john", "SetLimit 10737418240 john"}},
		{"remove_limit", []string{"remove-limit", "john"}, []string{"RemoveLimit john"}},
		{"devices", []string{"devices", "john"}, []string{"User john", "Devices john"}},
		{"devices_own", []string{"devices"}, []string{"User john", "Devices john"}},
		{"devices_none", []string{"devices", "bob"}, []string{"User bob", "Devices bob"}},
		{"devices_set", []string{"devices", "john", "3"}, []string{"SetDevices 3 john"}},
		{"devices_off", []string{"devices", "john", "off"}, []string{"SetDevices 0 john"}},
		{"devices_unlimited", []string{"devices", "john", "unlimited"}, []string{"SetDevices -1 john"}},
		{"speed_set", []string{"speed", "john", "20mbit"}, []string{"SetSpeed false 20mbit john"}},
		{"speed_pair", []string{"speed", "john", "10mbit/2mbit"}, []string{"SetSpeed false 10mbit/2mbit john"}},
		{"speed_off", []string{"speed", "john", "off"}, []string{"SetSpeed false  john"}},
		{"throttle_set", []string{"throttle", "john", "1.5mbit"}, []string{"SetSpeed true 1500kbit john"}},
		{"throttle_off", []string{"throttle", "john", "OFF"}, []string{"SetSpeed true  john"}},
		{"usage_dave", []string{"usage", "dave"}, []string{"User dave"}},
		{"usage", []string{"usage"}, []string{"User john"}},
		{"usage_mary", []string{"usage", "mary"}, []string{"User mary"}},
		{"usage_bob", []string{"usage", "bob"}, []string{"User bob"}},
		{"list", []string{"list"}, []string{"Users"}},
		{"list_status", []string{"list", "--status", "warning"}, []string{"Users"}},
		{"blocked", []string{"blocked"}, []string{"Users"}},
		{"reset", []string{"reset", "mary"}, []string{"Reset mary"}},
		{"reset_all", []string{"reset", "--all"}, []string{"ResetAll"}},
		{"disable", []string{"disable", "john"}, []string{"Disable john"}},
		{"enable", []string{"enable", "john"}, []string{"Enable john"}},
		{"unblock", []string{"unblock", "mary"}, []string{"Unblock 0s mary"}},
		{"unblock_for", []string{"unblock", "mary", "--for", "2d"}, []string{"Unblock 48h0m0s mary"}},
		{"history", []string{"history", "john"}, []string{`History john "" ""`}},
		{"history_range", []string{"history", "--from", "2026-11-01", "john", "--to", "2026-11-03"},
			[]string{`History john "2026-11-01" "2026-11-03"`}},
		{"status", []string{"status"}, []string{"Health"}},
		{"check", []string{"check"}, []string{"Check"}},
		{"version", []string{"version"}, nil},
	} {
		for _, mode := range []string{"table", "json"} {
			t.Run(c.name+"_"+mode, func(t *testing.T) {
				f, sock := serve(t)
				args := c.args
				if mode == "json" {
					args = append([]string{"-o", "json"}, args...)
				}
				code, out, errs := runCmd(sock, args...)
				if code != 0 || errs != "" {
					t.Fatalf("exit %d, stderr %q", code, errs)
				}
				golden(t, c.name+"_"+mode, out)
				if got := f.Calls(); !slices.Equal(got, c.calls) {
					t.Errorf("backend calls %q, want %q", got, c.calls)
				}
			})
		}
	}
}

// TestSetProtocol: set --protocol changes nothing unless the user connects
// with that protocol; an unknown protocol is wrong usage.
func TestSetProtocol(t *testing.T) {
	for _, c := range []struct {
		args  []string
		code  int
		calls []string
		says  string
	}{
		{[]string{"set", "bob", "500", "--protocol", "trojan"}, 0, []string{"User bob", "SetLimit 524288000 bob"}, ""},
		{[]string{"set", "bob", "500", "--protocol", "vmess"}, 1, []string{"User bob"}, "bob connects with trojan, not vmess; nothing changed"},
		{[]string{"set", "nosuch", "500", "--protocol", "ssh"}, 1, []string{"User nosuch"}, "unknown user"},
		{[]string{"set", "bob", "500", "--protocol", "ftp"}, 2, nil, `unknown protocol "ftp"`},
		{[]string{"set", "bob", "--protocol", "ssh"}, 2, nil, "missing argument"},
	} {
		f, sock := serve(t)
		code, _, errs := runCmd(sock, c.args...)
		if code != c.code || !strings.Contains(errs, c.says) {
			t.Errorf("%q: exit %d, stderr %q; want %d, %q", c.args, code, errs, c.code, c.says)
		}
		if got := f.Calls(); !slices.Equal(got, c.calls) {
			t.Errorf("%q: backend calls %q, want %q", c.args, got, c.calls)
		}
	}
}

// TestSpeedRefused: bwctl speed and throttle refuse every rate that is not
// tc's (a positive number with kbit, mbit or gbit) with a message naming
// the value and the units, and exit status 2, before they connect.
func TestSpeedRefused(t *testing.T) {
	for _, c := range []struct {
		args []string
		says string
	}{
		{[]string{"speed", "john", "20mb"}, `invalid rate "20mb": no unit (want a positive number with kbit, mbit or gbit, as tc writes rates: 512kbit, 20mbit, 1gbit); DOWN/UP for different caps, or off, to leave the user to the configured default`},
		{[]string{"speed", "john", "20M"}, `invalid rate "20M": no unit`},
		{[]string{"speed", "john", "fast"}, `invalid rate "fast"`},
		{[]string{"speed", "john", "0kbit"}, `invalid rate "0kbit": zero`},
		{[]string{"throttle", "john", "-5mbit"}, `invalid rate "-5mbit": not a positive number`},
		{[]string{"throttle", "john", "100000gbit"}, `invalid rate "100000gbit": above 10gbit`},
		{[]string{"speed", "john", "10mbit/2mb"}, `invalid rate "2mb"`},
		{[]string{"speed", "john"}, "missing argument"},
		{[]string{"speed", "../x", "1mbit"}, "invalid user name"},
	} {
		f, sock := serve(t)
		code, _, errs := runCmd(sock, c.args...)
		if code != 2 || !strings.Contains(errs, c.says) || !strings.Contains(errs, "usage: bwctl "+c.args[0]) {
			t.Errorf("%q: exit %d, stderr %q; want 2, %q", c.args, code, errs, c.says)
		}
		if got := f.Calls(); len(got) != 0 {
			t.Errorf("%q: backend calls %q", c.args, got)
		}
	}
}

// TestDevicesRefused: bwctl devices refuses a bad number of devices with a
// clear message and exit status 2, before it connects.
func TestDevicesRefused(t *testing.T) {
	for _, c := range []struct {
		args []string
		says string
	}{
		{[]string{"devices", "john", "two"}, `invalid device limit "two": want a whole number of devices from 1 to 1000, or unlimited; or off, to leave the user to the configured default`},
		{[]string{"devices", "john", "-1"}, `invalid device limit "-1"`},
		{[]string{"devices", "john", "0"}, `invalid device limit "0"`},
		{[]string{"devices", "john", "1001"}, `invalid device limit "1001"`},
		{[]string{"devices", "john", "2", "3"}, "too many arguments"},
		{[]string{"devices", "../x", "2"}, "invalid user name"},
	} {
		f, sock := serve(t)
		code, _, errs := runCmd(sock, c.args...)
		if code != 2 || !strings.Contains(errs, c.says) || !strings.Contains(errs, "usage: bwctl devices") {
			t.Errorf("%q: exit %d, stderr %q; want 2, %q", c.args, code, errs, c.says)
		}
		if got := f.Calls(); len(got) != 0 {
			t.Errorf("%q: backend calls %q", c.args, got)
		}
	}
	_, sock := serve(t)
	if code, _, errs := runCmd(sock, "devices", "nosuch"); code != 1 || !strings.Contains(errs, "unknown user") {
		t.Errorf("unknown user: exit %d, %q", code, errs)
	}
}

// TestGlobalFlagsAfter: global flags work after the command and its
// arguments too.
func TestGlobalFlagsAfter(t *testing.T) {
	_, sock := serve(t)
	code, before, _ := runCmd(sock, "-o", "json", "--bytes", "usage", "john")
	code2, after, _ := runCmd(sock, "usage", "john", "--bytes", "-o", "json")
	if code != 0 || code2 != 0 || before != after || !strings.Contains(after, `"used": 9663676416`) {
		t.Errorf("exit %d/%d, before\n%s\nafter\n%s", code, code2, before, after)
	}
}

func TestBytes(t *testing.T) {
	_, sock := serve(t)
	for _, args := range [][]string{{"list"}, {"usage", "john"}, {"history", "john"}} {
		name := "bytes_" + args[0]
		t.Run(name, func(t *testing.T) {
			code, out, errs := runCmd(sock, append(args, "--bytes")...)
			if code != 0 {
				t.Fatalf("exit %d: %s", code, errs)
			}
			if strings.Contains(out, "iB") {
				t.Errorf("--bytes output has units:\n%s", out)
			}
			golden(t, name, out)
		})
	}
	code, out, _ := runCmd(sock, "set", "john", "1.5T", "--bytes")
	if code != 0 || out != "john: limit set to 1649267441664\n" {
		t.Errorf("set --bytes: exit %d, %q", code, out)
	}
}

// TestNoColor: no escape codes when the output is not a terminal, and
// none with NO_COLOR even on a terminal.
func TestNoColor(t *testing.T) {
	_, sock := serve(t)
	code, out, _ := runCmd(sock, "list")
	if code != 0 || strings.Contains(out, "\x1b") {
		t.Errorf("colour in non-terminal output: exit %d\n%q", code, out)
	}
	if colorful(&bytes.Buffer{}) {
		t.Error("a buffer is colourful")
	}
	tty, err := os.OpenFile("/dev/null", os.O_WRONLY, 0) // a character device
	if err != nil {
		t.Fatal(err)
	}
	defer tty.Close()
	t.Setenv("NO_COLOR", "") // restored at the end of the test
	os.Unsetenv("NO_COLOR")
	if !colorful(tty) {
		t.Error("a character device without NO_COLOR is not colourful")
	}
	t.Setenv("NO_COLOR", "1")
	if colorful(tty) {
		t.Error("colour with NO_COLOR set")
	}
}

// TestColorAligned: coloured STATUS cells keep the table aligned.
func TestColorAligned(t *testing.T) {
	var b bytes.Buffer
	e := &env{o: &opts{color: true}, out: &b}
	if err := e.printList(newFake().users); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	if !strings.Contains(out, red+"BLOCKED"+reset) || !strings.Contains(out, yellow+"WARNING"+reset) {
		t.Errorf("no colour:\n%q", out)
	}
	var plainOut bytes.Buffer
	e = &env{o: &opts{}, out: &plainOut}
	if err := e.printList(newFake().users); err != nil {
		t.Fatal(err)
	}
	stripped := out
	for _, esc := range []string{red, yellow, plain, reset} {
		stripped = strings.ReplaceAll(stripped, esc, "")
	}
	if stripped != plainOut.String() {
		t.Errorf("coloured table without its colours:\n%s\nwant\n%s", stripped, plainOut.String())
	}
}

func TestBadUsage(t *testing.T) {
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"set", "john", "abc"}, `invalid limit "abc"`},
		{[]string{"set", "john", "-5"}, `invalid limit "-5": negative`},
		{[]string{"set", "john", "10X"}, `invalid limit "10X"`},
		{[]string{"set", "john", "99999999999999999999"}, "larger than 1 EiB"},
		{[]string{"set", "../x", "10"}, `invalid user name "../x"`},
		{[]string{"set", "john"}, "missing argument"},
		{[]string{"set", "john", "10", "11"}, "too many arguments"},
		{[]string{"set"}, "missing argument"},
		{[]string{"disable"}, "missing argument"},
		{[]string{"enable", "-x"}, "flag provided but not defined: -x"},
		{[]string{"reset"}, "--all for every user"},
		{[]string{"reset", "--all", "john"}, "--all takes no user name"},
		{[]string{"usage", "a b"}, "contains whitespace"},
		{[]string{"list", "--status", "sleepy"}, `unknown status "sleepy"`},
		{[]string{"list", "extra"}, "too many arguments"},
		{[]string{"unblock", "mary", "--for", "soon"}, `invalid duration "soon"`},
		{[]string{"unblock", "mary", "--for", "-1h"}, `invalid duration "-1h"`},
		{[]string{"history", "john", "--from", "yesterday"}, `invalid day "yesterday"`},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{}, "no command given"},
		{[]string{"--colour", "list"}, "flag provided but not defined: -colour"},
		{[]string{"list", "--bogus"}, "flag provided but not defined: -bogus"},
		{[]string{"-o", "yaml", "list"}, `unknown output format "yaml"`},
	} {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			f, sock := serve(t)
			code, out, errs := runCmd(sock, c.args...)
			if code != 2 {
				t.Errorf("exit %d, want 2", code)
			}
			if !strings.Contains(errs, c.msg) || !strings.Contains(errs, "usage") && !strings.Contains(errs, "bwctl help") {
				t.Errorf("stderr %q, want %q and a usage line", errs, c.msg)
			}
			if out != "" {
				t.Errorf("stdout %q", out)
			}
			if calls := f.Calls(); len(calls) != 0 {
				t.Errorf("the backend was called: %q", calls)
			}
		})
	}
}

func TestUnknownUser(t *testing.T) {
	for _, args := range [][]string{{"usage", "nobody"}, {"set", "nobody", "1G"}, {"reset", "nobody"}, {"history", "nobody"}} {
		t.Run(args[0], func(t *testing.T) {
			_, sock := serve(t)
			code, out, errs := runCmd(sock, args...)
			if code != 1 || out != "" {
				t.Errorf("exit %d, stdout %q", code, out)
			}
			if !strings.Contains(errs, `unknown user "nobody"`) || !strings.Contains(errs, "bwctl list") {
				t.Errorf("stderr %q", errs)
			}
		})
	}
}

func TestNotRunning(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	for _, args := range [][]string{{"list"}, {"set", "john", "1G"}, {"-o", "json", "status"}} {
		code, out, errs := runCmd(sock, args...)
		if code != 1 || out != "" || !strings.Contains(errs, "bwagent is not running") ||
			!strings.Contains(errs, "systemctl start bwagent") {
			t.Errorf("%q: exit %d, stdout %q, stderr %q", args, code, out, errs)
		}
	}
}

func TestStatusHealthy(t *testing.T) {
	f, sock := serve(t)
	f.mu.Lock()
	f.healthy = true
	f.mu.Unlock()
	for _, mode := range []string{"table", "json"} {
		code, out, errs := runCmd(sock, "-o", mode, "status")
		if code != 0 {
			t.Fatalf("exit %d: %s", code, errs)
		}
		golden(t, "status_healthy_"+mode, out)
	}
}

func TestHelp(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run([]string{"help"}, &out, &errb); code != 0 || !strings.Contains(out.String(), "remove-limit USER") {
		t.Errorf("help: exit %d, %q", code, out.String())
	}
}

func TestHumanSize(t *testing.T) {
	for b, want := range map[uint64]string{
		0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB", quota.MiB: "1.0 MiB",
		10 * quota.GiB: "10.0 GiB", 3 * quota.TiB / 2: "1.5 TiB", 2048 * quota.TiB: "2048.0 TiB",
	} {
		if got := humanSize(b); got != want {
			t.Errorf("humanSize(%d) = %q, want %q", b, got, want)
		}
	}
}

// TestCekBwLimit runs scripts/cek-bw-limit, the bash tool's command line,
// with this test binary as bwctl: the guide's invocations reach the agent
// as the right calls, and wrong usage is refused.
func TestCekBwLimit(t *testing.T) {
	f, sock := serve(t)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// bwctl reads its socket from the config; --socket via a wrapper.
	wrapper := filepath.Join(t.TempDir(), "bwctl")
	script := "#!/bin/sh\nBWCTL_TEST_AS_BWCTL=1 exec " + exe + " --socket " + sock + " \"$@\"\n"
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	cek := func(args ...string) (int, string) {
		cmd := exec.Command("../../scripts/cek-bw-limit", args...)
		cmd.Env = append(os.Environ(), "BWCTL="+wrapper)
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return code, string(out)
	}
	for _, c := range []struct {
		args []string
		code int
		call string
	}{
		{[]string{"set", "john", "10240"}, 0, "SetLimit 10737418240 john"},
		{[]string{"usage", "john"}, 0, ""},
		{[]string{"list"}, 0, ""},
		{[]string{"reset", "john"}, 0, "Reset john"},
		{[]string{"enable", "mary"}, 0, "Enable mary"},
		{[]string{"check"}, 0, "Check"},
		{[]string{"set", "john"}, 2, ""},
		{[]string{"frobnicate"}, 2, ""},
		{[]string{"set", "john", "abc"}, 2, ""},
		// The old tool's variants: add USER MB [PROTOCOL], checked
		// against the user's protocol, in any case.
		{[]string{"add", "john", "2048"}, 0, "SetLimit 2147483648 john"},
		{[]string{"add", "john", "4096", "ssh"}, 0, "SetLimit 4294967296 john"},
		{[]string{"add", "bob", "4096", "TROJAN"}, 0, "SetLimit 4294967296 bob"},
		{[]string{"add", "bob", "4096", "vmess"}, 1, "User bob"},
		{[]string{"add", "john", "4096", "ftp"}, 2, ""},
		{[]string{"add", "john"}, 2, ""},
		{[]string{"add", "john", "1", "ssh", "extra"}, 2, ""},
		{[]string{"menu", "extra"}, 2, ""},
	} {
		before := len(f.Calls())
		code, out := cek(c.args...)
		if code != c.code {
			t.Errorf("cek-bw-limit %v: exit %d, want %d\n%s", c.args, code, c.code, out)
		}
		calls := f.Calls()[before:]
		if c.call != "" && !slices.Contains(calls, c.call) {
			t.Errorf("cek-bw-limit %v: calls %q, want %q", c.args, calls, c.call)
		}
		if c.code == 2 && len(calls) > 0 {
			t.Errorf("cek-bw-limit %v: wrong usage reached the agent: %q", c.args, calls)
		}
		if c.code != 0 && slices.ContainsFunc(calls, func(s string) bool { return strings.HasPrefix(s, "SetLimit") }) {
			t.Errorf("cek-bw-limit %v failed but set a limit: %q", c.args, calls)
		}
	}

	// menu: the numbered menu, driven from standard input: option 3 sets a
	// limit, 0 exits.
	before := len(f.Calls())
	cmd := exec.Command("../../scripts/cek-bw-limit", "menu")
	cmd.Env = append(os.Environ(), "BWCTL="+wrapper)
	cmd.Stdin = strings.NewReader("3\nmary\n700\n\n0\n")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "===== Bandwidth Menu =====") {
		t.Errorf("cek-bw-limit menu: %v\n%s", err, out)
	}
	if calls := f.Calls()[before:]; !slices.Equal(calls, []string{"SetLimit 734003200 mary"}) {
		t.Errorf("cek-bw-limit menu, option 3: calls %q", calls)
	}
}
