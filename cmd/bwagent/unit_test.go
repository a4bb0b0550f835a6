package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
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
// means something); systemd-analyze security scores it at most 2.1; `make
// install` installs the same unit with its /usr/local paths.
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

	// The exposure score, measured as the README reports it; it must not
	// grow unnoticed.
	score := securityScore(t, unit)
	if score > 2.5 {
		t.Errorf("systemd-analyze security: exposure %.1f, was 2.5 (README)", score)
	}
	if weaker := securityScore(t, strings.Replace(unit, "\nCapabilityBoundingSet=", "\n#", 1)); weaker <= score {
		t.Errorf("exposure %.1f with every capability, %.1f with three", weaker, score)
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

// securityScore returns systemd-analyze security's overall exposure of the
// unit text, from 0 (safe) to 10.
func securityScore(t *testing.T, unit string) float64 {
	t.Helper()
	path := filepath.Join(t.TempDir(), "bwagent.service")
	if err := os.WriteFile(path, []byte(unit), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("systemd-analyze", "security", "--offline=true", path).CombinedOutput()
	m := regexp.MustCompile(`Overall exposure level for bwagent.service: (\d+\.\d)`).FindSubmatch(out)
	if err != nil || m == nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	score, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	return score
}
