package xraystats

import (
	"fmt"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
)

// TestScanSplit: a QueryStatsResponse decodes the same however gRPC cuts it
// into buffers, unknown fields (of the response and of a Stat) are
// skipped, and a cut-off or malformed answer is an error.
func TestScanSplit(t *testing.T) {
	stat := func(name string, value uint64, extra bool) []byte {
		var b []byte
		if extra {
			b = protowire.AppendTag(b, 9, protowire.Fixed64Type)
			b = protowire.AppendFixed64(b, 42)
		}
		b = protowire.AppendTag(b, 1, protowire.BytesType)
		b = protowire.AppendString(b, name)
		if value != 0 { // proto3 leaves a zero out
			b = protowire.AppendTag(b, 2, protowire.VarintType)
			b = protowire.AppendVarint(b, value)
		}
		return b
	}
	var msg []byte
	add := func(s []byte) {
		msg = protowire.AppendTag(msg, 1, protowire.BytesType)
		msg = protowire.AppendBytes(msg, s)
	}
	add(stat("user>>>alice>>>traffic>>>uplink", 300, false))
	add(stat("user>>>alice>>>traffic>>>downlink", 1<<40, true))
	msg = protowire.AppendTag(msg, 7, protowire.BytesType) // an unknown field
	msg = protowire.AppendString(msg, "ignored")
	add(stat("inbound>>>api>>>traffic>>>uplink", 5, false))
	add(stat("user>>>bob>>>traffic>>>uplink", 0, false))
	add(stat("user>>>bob>>>traffic>>>downlink", 1, false))
	want := "alice up 300;alice down 1099511627776;bob up 0;bob down 1;"

	run := func(parts ...[]byte) (string, error) {
		var got string
		s := &statsScan{fn: func(email []byte, downlink bool, value int64) {
			dir := "up"
			if downlink {
				dir = "down"
			}
			got += fmt.Sprintf("%s %s %d;", email, dir, value)
		}}
		for _, p := range parts {
			if err := s.feed(p); err != nil {
				return got, err
			}
		}
		if len(s.carry) > 0 {
			return got, fmt.Errorf("truncated: %d bytes left", len(s.carry))
		}
		return got, nil
	}
	for i := 0; i <= len(msg); i++ {
		for j := i; j <= len(msg); j += 7 {
			got, err := run(msg[:i], msg[i:j], msg[j:])
			if err != nil || got != want {
				t.Fatalf("cut at %d and %d: %q, %v; want %q", i, j, got, err, want)
			}
		}
	}
	if _, err := run(msg[:len(msg)-1]); err == nil {
		t.Error("a cut-off answer: no error")
	}
	bad := protowire.AppendTag(nil, 1, protowire.BytesType)
	bad = protowire.AppendBytes(bad, []byte{0xff}) // a Stat that is no message
	if _, err := run(bad); err == nil {
		t.Error("a malformed Stat: no error")
	}
}
