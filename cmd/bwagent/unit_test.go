package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// verifyUnit runs systemd-analyze verify on the unit text with its
// ExecStart= pointing at bin (verify wants an executable there) and
// returns what it reported: nothing when the unit is clean. Unknown keys
// and bad values are only warnings to systemd, so any output counts.
func verifyUnit(t *testing.T, unit, bin string) string {
	t.Helper()
	unit = regexp.MustCompile(`(?m)^ExecStart=\S+`).ReplaceAllString(unit, "ExecStart="+bin)
	path := filepath.Join(t.TempDir(), "bwagent.service")
	if err := os.WriteFile(path, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("systemd-analyze", "verify", path).CombinedOutput()
	if err != nil {
		return strings.TrimSpace(string(out)) + " (" + err.Error() + ")"
	}
	return strings.TrimSpace(string(out))
}

// TestUnitVerify: systemd-analyze verify finds nothing to say about the
// unit (and does find a misspelt key and a bad value in it, so its silence
// means something); `make install` installs the same unit with its
// /usr/local paths.
func TestUnitVerify(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Skip("systemd-analyze not installed (make test-deps installs the systemd package)")
	}
	data, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	unit := string(data)
	if !strings.Contains(unit, "\nExecStart=/usr/sbin/bwagent\n") {
		t.Error("ExecStart= is not the package's /usr/sbin/bwagent")
	}
	bin := buildRealAgent(t)
	if out := verifyUnit(t, unit, bin); out != "" {
		t.Errorf("systemd-analyze verify:\n%s", out)
	}
	for _, c := range []struct{ from, to, says string }{
		{"\nProtectSystem=", "\nProtectSytem=", "Unknown key"},
		{"\nWatchdogSec=30s", "\nWatchdogSec=thirty", "Failed to parse"},
	} {
		if out := verifyUnit(t, strings.Replace(unit, c.from, c.to, 1), bin); !strings.Contains(out, c.says) {
			t.Errorf("%q: systemd-analyze verify says %q", c.to, out)
		}
	}

	installed, err := exec.Command("../../scripts/install.sh", "--print-unit").Output()
	if err != nil {
		t.Fatal(err)
	}
	want := strings.NewReplacer("\nExecStart=/usr/sbin/", "\nExecStart=/usr/local/sbin/",
		"\nDocumentation=file:///usr/share/", "\nDocumentation=file:///usr/local/share/").Replace(unit)
	if string(installed) != want || want == unit {
		t.Errorf("make install's unit is not the package's with /usr/local paths:\n%s", installed)
	}
}
