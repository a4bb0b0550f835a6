package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/myvpn/bwagent/control"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/view"
)

// TestUsageFleet: in fleet mode, usage shows each node's share and lease,
// in the table and in JSON; a database that did not answer is said.
func TestUsageFleet(t *testing.T) {
	u := control.User{Name: "john", Protocol: quota.SSH, Present: true, Status: quota.Active, Used: 3 * quota.MiB,
		Limit: 10 * quota.MiB, Remaining: 7 * quota.MiB, Download: 3 * quota.MiB,
		Fleet: []view.NodeShare{{Node: "a", Download: 2 * quota.MiB, Used: 2 * quota.MiB, Lease: 8 * quota.MiB},
			{Node: "b", Download: quota.MiB, Used: quota.MiB}}}
	var out bytes.Buffer
	e := &env{o: &opts{}, out: &out}
	if err := e.printUser(u); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"node a:", "2.0 MiB (upload 0 B, download 2.0 MiB, lease 8.0 MiB)", "node b:", "lease -)"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("usage without %q:\n%s", want, out.String())
		}
	}
	data, _ := json.Marshal(userJSON(u))
	if !strings.Contains(string(data), `"fleet":[{"node":"a","used":2097152,"upload":0,"download":2097152,"lease":8388608},{"node":"b"`) {
		t.Errorf("JSON: %s", data)
	}
	u.Fleet, u.FleetNote = nil, "the fleet database did not answer: timeout"
	out.Reset()
	e.printUser(u)
	if !strings.Contains(out.String(), "nodes:") || !strings.Contains(out.String(), "did not answer") {
		t.Errorf("usage with the database down:\n%s", out.String())
	}
	data, _ = json.Marshal(userJSON(control.User{Name: "x"}))
	if strings.Contains(string(data), "fleet") {
		t.Errorf("JSON of a single server's user: %s", data)
	}
}
