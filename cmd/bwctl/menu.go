package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/myvpn/bwagent/quota"
)

func init() {
	commands["menu"] = command{run: cmdMenu}
}

// menuText is the bash tool's main bandwidth menu, in its order.
const menuText = `
===== Bandwidth Menu =====
[1]  Show All Users + Usage + Limits + Status
[2]  Check Single User Usage
[3]  Set User Data Limit
[4]  Remove User Limit
[5]  Reset User Usage (Renew) - Also unblocks user
[6]  Reset All Users Usage
[7]  Disable User
[8]  Enable User
[9]  Check Bandwidth Service Status
[10] Real-time Bandwidth Monitor
[11] Unblock User (Manual Unblock)
[12] View Blocked Users
[0]  Exit
`

// menu is an interactive session: its input and the context its commands
// run under.
type menu struct {
	e   *env
	in  *bufio.Reader
	ctx context.Context
}

// cmdMenu shows the menu until Exit or the end of the input. Each option
// runs the command of the same job with the arguments it asks for.
func cmdMenu(ctx context.Context, e *env) error {
	if err := e.want(0, 0); err != nil {
		return err
	}
	in := e.in
	if in == nil {
		in = strings.NewReader("")
	}
	// The session lasts as long as the operator likes: each command gets
	// its own timeout instead of the menu's.
	m := &menu{e: e, in: bufio.NewReader(in), ctx: context.WithoutCancel(ctx)}
	err := m.loop()
	if errors.Is(err, io.EOF) {
		fmt.Fprintln(e.out)
		return nil
	}
	return err
}

func (m *menu) loop() error {
	for {
		fmt.Fprint(m.e.out, menuText)
		choice, err := m.ask("Select an option [0-12]: ")
		if err != nil {
			return err
		}
		if choice == "0" {
			return nil
		}
		known, err := m.option(choice)
		if err != nil {
			return err
		}
		if !known {
			fmt.Fprintf(m.e.out, "invalid option %q: enter a number from 0 to 12\n", choice)
			continue
		}
		if _, err := m.ask("\nPress Enter to return to the menu..."); err != nil {
			return err
		}
	}
}

// option runs one menu option, reporting whether choice is one. The error
// is the input's (io.EOF at its end).
func (m *menu) option(choice string) (known bool, err error) {
	switch choice {
	case "1":
		m.exec("list")
	case "2":
		var name string
		if name, err = m.askName("User name (empty for your own): ", true); err == nil {
			if name == "" {
				m.exec("usage")
			} else {
				m.exec("usage", name)
			}
		}
	case "3":
		var name, limit string
		if name, err = m.askName("User name: ", false); err == nil {
			if limit, err = m.askLimit(); err == nil {
				m.exec("set", name, limit)
			}
		}
	case "4":
		err = m.withName("remove-limit")
	case "5":
		err = m.withName("reset")
	case "6":
		var ok string
		if ok, err = m.ask("Reset the usage of EVERY user? Type yes to confirm: "); err == nil {
			if ok == "yes" {
				m.exec("reset", "--all")
			} else {
				fmt.Fprintln(m.e.out, "cancelled: nothing reset")
			}
		}
	case "7":
		err = m.withName("disable")
	case "8":
		err = m.withName("enable")
	case "9":
		m.exec("status")
	case "10":
		if _, ok := commands["monitor"]; ok {
			m.exec("monitor")
		} else {
			fmt.Fprintln(m.e.out, "the real-time monitor is not available in this bwctl")
		}
	case "11":
		var name, d string
		if name, err = m.askName("User name: ", false); err == nil {
			if d, err = m.askDuration(); err == nil {
				if d == "" {
					m.exec("unblock", name)
				} else {
					m.exec("unblock", name, "--for", d)
				}
			}
		}
	case "12":
		m.exec("blocked")
	default:
		return false, nil
	}
	return true, err
}

// withName asks for a user name and runs the command on it.
func (m *menu) withName(cmd string) error {
	name, err := m.askName("User name: ", false)
	if err == nil {
		m.exec(cmd, name)
	}
	return err
}

// exec runs the command name with args as `bwctl name args...` would, and
// prints its result or error.
func (m *menu) exec(name string, args ...string) {
	cmd := commands[name]
	o := *m.e.o
	e := &env{o: &o, out: m.e.out, errOut: m.e.errOut, in: m.in, client: m.e.client}
	err := prepare(name, cmd, args, e)
	if err == nil {
		ctx, cancel := m.ctx, context.CancelFunc(func() {})
		if name != "monitor" { // runs until the operator quits it
			ctx, cancel = context.WithTimeout(m.ctx, time.Minute)
		}
		err = cmd.run(ctx, e)
		cancel()
	}
	if err != nil {
		fmt.Fprintf(m.e.errOut, "bwctl %s: %v\n", name, explain(err))
	}
}

// ask prints prompt and reads a line, without its surrounding spaces. At the
// end of the input it returns io.EOF.
func (m *menu) ask(prompt string) (string, error) {
	fmt.Fprint(m.e.out, prompt)
	line, err := m.in.ReadString('\n')
	if err != nil && (!errors.Is(err, io.EOF) || line == "") {
		return "", err
	}
	return strings.TrimSpace(line), nil
}

// askName asks until it gets a valid user name (or, when optional, none).
func (m *menu) askName(prompt string, optional bool) (string, error) {
	for {
		name, err := m.ask(prompt)
		if err != nil || name == "" && optional {
			return name, err
		}
		if err := quota.ValidName(name); err != nil {
			fmt.Fprintf(m.e.out, "%v: give the user's account name or Xray email\n", err)
			continue
		}
		return name, nil
	}
}

// askLimit asks until it gets a valid limit.
func (m *menu) askLimit() (string, error) {
	for {
		limit, err := m.ask("Limit (MiB such as 10240, or 500M, 10G, 1.5T, unlimited): ")
		if err != nil {
			return "", err
		}
		if _, err := quota.ParseLimit(limit); err != nil {
			fmt.Fprintf(m.e.out, "%v\n", err)
			continue
		}
		return limit, nil
	}
}

// askDuration asks until it gets a valid unblock duration or none.
func (m *menu) askDuration() (string, error) {
	for {
		d, err := m.ask("Unblock for (1h, 2d; empty until the next reset): ")
		if err != nil {
			return "", err
		}
		if _, err := parseDuration(d); err != nil {
			fmt.Fprintf(m.e.out, "%v\n", err)
			continue
		}
		return d, nil
	}
}
