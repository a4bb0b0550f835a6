package quota

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// DeviceLimit is a user's own device limit, from their line of the limits
// file (devices=N): how many devices (client addresses) may have
// connections open at once. The zero DeviceLimit is none given: the
// configured default applies.
type DeviceLimit int32

// Device limits besides a number of devices.
const (
	// DevicesDefault is no devices= on the user's line: the configured
	// default applies.
	DevicesDefault DeviceLimit = 0
	// DevicesUnlimited is devices=unlimited: no device limit for the user,
	// whatever the default.
	DevicesUnlimited DeviceLimit = -1
)

// MaxDevices is the largest device limit accepted.
const MaxDevices = 1000

// ErrBadDevices is returned by ParseDevices.
var ErrBadDevices = errors.New("invalid device limit")

// ReasonDevices is the reason of a device cut in the block log, followed by
// the device's address in parentheses: "Device Limit Exceeded (192.0.2.7)".
const ReasonDevices = "Device Limit Exceeded"

// ActDevice is the action of a device cut: one of the user's devices over
// their device limit had its connections cut. It goes to the block log and
// to notifications, and changes nothing of the user's status.
const ActDevice = "device"

// ParseDevices parses the value of devices=: a whole number of devices from
// 1 to MaxDevices, or "unlimited" (any case).
func ParseDevices(s string) (DeviceLimit, error) {
	if strings.EqualFold(s, "unlimited") {
		return DevicesUnlimited, nil
	}
	n, err := strconv.ParseInt(s, 10, 32)
	if err != nil || n < 1 || n > MaxDevices || s[0] < '0' || s[0] > '9' {
		return 0, fmt.Errorf("%w %q: want a whole number of devices from 1 to %d, or unlimited", ErrBadDevices, s, MaxDevices)
	}
	return DeviceLimit(n), nil
}

// String formats d as ParseDevices reads it: "2", "unlimited", or "" for
// DevicesDefault.
func (d DeviceLimit) String() string {
	switch {
	case d == DevicesDefault:
		return ""
	case d < 0:
		return "unlimited"
	}
	return strconv.Itoa(int(d))
}

// Valid reports whether d is a value ParseDevices can return or
// DevicesDefault.
func (d DeviceLimit) Valid() bool {
	return d == DevicesDefault || d == DevicesUnlimited || d >= 1 && d <= MaxDevices
}

// Of returns the number of devices the user may have with d as their own
// limit and def as the configured default (0: none); 0 is no limit.
func (d DeviceLimit) Of(def int) int {
	switch {
	case d == DevicesDefault:
		return max(def, 0)
	case d < 0:
		return 0
	}
	return int(d)
}
