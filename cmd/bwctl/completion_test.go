package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestCompletion(t *testing.T) {
	for _, shell := range []string{"bash", "zsh", "fish"} {
		t.Run(shell, func(t *testing.T) {
			code, out, errs := runCmd("/nonexistent.sock", "completion", shell)
			if code != 0 || errs != "" || out == "" {
				t.Fatalf("exit %d, stderr %q, %d bytes", code, errs, len(out))
			}
			golden(t, "completion_"+shell, out)
			for name := range commands {
				if !strings.Contains(out, name) {
					t.Errorf("script lacks command %q", name)
				}
			}
			for _, s := range []string{"socket", "bytes", "json", "status", "all", "for", "from", "to", "protocol",
				"active warning blocked unlimited disabled", "ssh vmess vless trojan shadowsocks", "bwctl list"} {
				if !strings.Contains(out, s) {
					t.Errorf("script lacks %q", s)
				}
			}
			sh, err := exec.LookPath(shell)
			if err != nil {
				t.Skipf("no %s to check the syntax", shell)
			}
			script := filepath.Join(t.TempDir(), "bwctl."+shell)
			if err := writeFile(script, out); err != nil {
				t.Fatal(err)
			}
			check := exec.Command(sh, "-n", script)
			if shell == "fish" {
				check = exec.Command(sh, "--no-execute", script)
			}
			if b, err := check.CombinedOutput(); err != nil {
				t.Errorf("%s -n: %v\n%s", shell, err, b)
			}
		})
	}
}

// TestCompletionCommands: the scripts offer exactly the commands there are
// (monitor may be built in another file, and help is run's own).
func TestCompletionCommands(t *testing.T) {
	for _, c := range completed {
		if _, ok := commands[c.name]; !ok && c.name != "monitor" && c.name != "help" {
			t.Errorf("completion offers %q, which is not a command", c.name)
		}
	}
	for name := range commands {
		found := false
		for _, c := range completed {
			found = found || c.name == name
		}
		if !found {
			t.Errorf("command %q is not in the completion list", name)
		}
	}
}

// TestCompletionBash drives the bash function: commands, flags, statuses
// and user names from `bwctl list`.
func TestCompletionBash(t *testing.T) {
	if _, err := exec.LookPath("bash"); err != nil {
		t.Skip("no bash")
	}
	_, script, _ := runCmd("", "completion", "bash")
	dir := t.TempDir()
	// A stand-in bwctl on PATH that prints a user list.
	fakeBwctl := "#!/bin/sh\nprintf 'USER  PROTOCOL\\nbob   trojan\\njohn  ssh\\nmary  vless\\n'\n"
	if err := writeExec(filepath.Join(dir, "bwctl"), fakeBwctl); err != nil {
		t.Fatal(err)
	}
	if err := writeFile(filepath.Join(dir, "c.bash"), script); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ line, want string }{
		{"bwctl ", commandNames()},
		{"bwctl re", "remove-limit reset"},
		{"bwctl -o ", "table json"},
		{"bwctl list --status b", "blocked"},
		{"bwctl reset --", "--socket --bytes --help --all"},
		{"bwctl reset -", "-o --socket --bytes --help --all"},
		{"bwctl set j", "john"},
		{"bwctl --bytes usage ", "bob john mary"},
		{"bwctl set john ", "unlimited"},
		{"bwctl set john 10G --", "--socket --bytes --help --protocol"},
		{"bwctl set --protocol v", "vmess vless"},
		{"bwctl set --protocol ssh j", "john"},
		{"bwctl completion ", "bash zsh fish"},
	} {
		t.Run(c.line, func(t *testing.T) {
			prog := `source "$DIR/c.bash"
read -ra COMP_WORDS <<< "$LINE"
[[ $LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
_bwctl
echo "${COMPREPLY[*]}"`
			cmd := exec.Command("bash", "-c", prog)
			cmd.Env = []string{"PATH=" + dir + ":/usr/bin:/bin", "DIR=" + dir, "LINE=" + c.line}
			b, err := cmd.CombinedOutput()
			if got := strings.TrimSpace(string(b)); err != nil || got != c.want {
				t.Errorf("%q: %v, got %q, want %q", c.line, err, got, c.want)
			}
		})
	}
}

func TestCompletionBadShell(t *testing.T) {
	for _, args := range [][]string{{"completion", "ksh"}, {"completion"}, {"completion", "bash", "zsh"}} {
		code, out, errs := runCmd("", args...)
		if code != 2 || out != "" || !strings.Contains(errs, "bash, zsh or fish") {
			t.Errorf("%q: exit %d, stdout %q, stderr %q", args, code, out, errs)
		}
	}
}

func writeFile(path, s string) error { return os.WriteFile(path, []byte(s), 0o644) }

func writeExec(path, s string) error { return os.WriteFile(path, []byte(s), 0o755) }
