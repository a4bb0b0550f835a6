package quota

import (
	"errors"
	"testing"
)

func TestParseDevices(t *testing.T) {
	for in, want := range map[string]DeviceLimit{"1": 1, "2": 2, "1000": MaxDevices, "unlimited": DevicesUnlimited, "Unlimited": DevicesUnlimited} {
		got, err := ParseDevices(in)
		if err != nil || got != want {
			t.Errorf("ParseDevices(%q) = %v, %v; want %v", in, got, err, want)
		}
		if back, err := ParseDevices(got.String()); err != nil || back != got {
			t.Errorf("ParseDevices(%q.String() = %q) = %v, %v", in, got.String(), back, err)
		}
	}
	for _, in := range []string{"", "0", "-1", "two", "1001", "1.5", " 2", "2 ", "+2", "0x2", "99999999999"} {
		if got, err := ParseDevices(in); !errors.Is(err, ErrBadDevices) {
			t.Errorf("ParseDevices(%q) = %v, %v; want ErrBadDevices", in, got, err)
		}
	}
}

func TestDeviceLimitOf(t *testing.T) {
	for _, c := range []struct {
		d    DeviceLimit
		def  int
		want int
	}{
		{DevicesDefault, 0, 0}, {DevicesDefault, 3, 3}, {DevicesUnlimited, 3, 0}, {2, 3, 2}, {5, 0, 5},
	} {
		if got := c.d.Of(c.def); got != c.want {
			t.Errorf("%v.Of(%d) = %d, want %d", c.d, c.def, got, c.want)
		}
	}
	for d, ok := range map[DeviceLimit]bool{0: true, -1: true, 1: true, MaxDevices: true, MaxDevices + 1: false, -2: false} {
		if d.Valid() != ok {
			t.Errorf("%d.Valid() = %v", d, !ok)
		}
	}
}
