package bpf

import (
	"errors"
	"strings"
	"testing"
)

func TestCgroup2FromMountinfo(t *testing.T) {
	const hybrid = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
`
	const unified = `25 1 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
`
	const escaped = `25 1 0:23 / /mnt/my\040cgroups rw - cgroup2 none rw
`
	const none = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
`
	for _, tc := range []struct {
		name, in, want string
		err            error
	}{
		{"hybrid", hybrid, "/sys/fs/cgroup/unified", nil},
		{"unified with optional fields", unified, "/sys/fs/cgroup", nil},
		{"escaped space", escaped, "/mnt/my cgroups", nil},
		{"no cgroup2", none, "", ErrNoCgroup2},
		{"empty", "", "", ErrNoCgroup2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := cgroup2FromMountinfo(strings.NewReader(tc.in))
			if !errors.Is(err, tc.err) {
				t.Fatalf("error %v, want %v", err, tc.err)
			}
			if got != tc.want {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
			if err != nil && !strings.Contains(err.Error(), "mount -t cgroup2") {
				t.Errorf("error %q does not say how to fix it", err)
			}
		})
	}
}

func TestCheckKernel(t *testing.T) {
	for _, tc := range []struct {
		release string
		tooOld  bool
	}{
		{"4.19.0-26-amd64", true},
		{"5.4.0-150-generic", true},
		{"5.6.19", true},
		{"5.7.0", false},
		{"5.7-rc1", false},
		{"5.10.0-28-amd64", false},
		{"6.18.44-fc-v782", false},
		{"10.0", false},
		{"weird", false},
	} {
		err := checkKernel(tc.release)
		if got := errors.Is(err, ErrKernelTooOld); got != tc.tooOld {
			t.Errorf("checkKernel(%q) = %v, want too old = %v", tc.release, err, tc.tooOld)
		}
		if err != nil && !strings.Contains(err.Error(), tc.release) {
			t.Errorf("error %q does not name the running kernel", err)
		}
	}
}

func TestPolicyEncoding(t *testing.T) {
	for _, p := range []Policy{
		{},
		{Blocked: true},
		{Quota: Rx, Ceiling: 10},
		{Quota: Tx, Ceiling: 1 << 40},
		{Blocked: true, Quota: Both, Ceiling: 7},
	} {
		if got := decodePolicy(p.encode()); got != p {
			t.Errorf("round trip of %+v gave %+v", p, got)
		}
	}
	// A ceiling without a quota direction means nothing and is dropped.
	if got := decodePolicy(Policy{Blocked: true, Ceiling: 5}.encode()); got != (Policy{Blocked: true}) {
		t.Errorf("ceiling without quota survived: %+v", got)
	}
}
