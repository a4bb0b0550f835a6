package store

import (
	"testing"

	"github.com/myvpn/bwagent/quota"
)

// The text forms are those earlier versions wrote: a database they left
// must read back to the same typed values, and typed values must write the
// same text.
func TestSourceAndEpochText(t *testing.T) {
	for _, c := range []struct {
		src  quota.Source
		text string
	}{
		{quota.UIDSource(1001), "uid:1001"},
		{quota.XraySource("alice@example"), "xray:alice@example"},
		{quota.OwedSource("alice@example"), "owed:alice@example"},
	} {
		if got := encodeSource(c.src); got != c.text {
			t.Errorf("encodeSource(%+v) = %q, want %q", c.src, got, c.text)
		}
		if got, err := decodeSource(c.text); err != nil || got != c.src {
			t.Errorf("decodeSource(%q) = %+v, %v", c.text, got, err)
		}
	}
	for _, bad := range []string{"uid:x", "uid:99999999999", "xray:", "owed:", "foo:1", ""} {
		if _, err := decodeSource(bad); err == nil {
			t.Errorf("decodeSource(%q) succeeded", bad)
		}
	}
	for _, c := range []struct {
		e    quota.Epoch
		text string
	}{
		{quota.Epoch{}, ""},
		{quota.Epoch{Origin: "0b6a3c1e-8a3f-4c56-9d1e-2f1a7b9c0d11", Gen: 42}, "0b6a3c1e-8a3f-4c56-9d1e-2f1a7b9c0d11/42"},
		{quota.Epoch{Origin: "xray", Start: 1764410000, Gen: 123456}, "xray@1764410000.123456"},
	} {
		if got := encodeEpoch(c.e); got != c.text {
			t.Errorf("encodeEpoch(%+v) = %q, want %q", c.e, got, c.text)
		}
		if got := decodeEpoch(c.text); got != c.e {
			t.Errorf("decodeEpoch(%q) = %+v, want %+v", c.text, got, c.e)
		}
	}
	// Text of no known form is an epoch of its own: equal to itself, to no
	// live epoch.
	if e := decodeEpoch("garbage"); e != (quota.Epoch{Origin: "garbage"}) {
		t.Errorf("decodeEpoch(garbage) = %+v", e)
	}
}
