// Package view holds the read-only pictures of the agent that its readers
// share: a user (User), a day of a user's history (Day), a user's device
// (Device) and the agent's health (Health). The agent publishes them at the end of each tick; the
// control API sends them over its socket; bwctl prints them. One type each,
// so nothing converts them field by field.
//
// The package has no behaviour beyond small derivations (Row) and imports
// only quota, so that bwctl links it without the agent.
package view

import (
	"time"

	"github.com/myvpn/bwagent/quota"
)

// User is one user as the agent last saw it. Zero times mean none.
type User struct {
	Name     string
	Protocol quota.Protocol // ssh for an SSH account, else the Xray client's protocol
	// Protocols are all the user's sources now: ssh, an Xray protocol, or
	// both for a user who is an SSH account and an Xray client; empty for a
	// user who left.
	Protocols []quota.Protocol
	UID       uint32 // SSH users
	Present   bool   // the account or Xray client exists now
	Status    quota.Status
	Used      uint64 // bytes counted against the limit
	Limit     uint64 // 0: unlimited
	Remaining uint64 // meaningful when Limit > 0
	Upload    uint64
	Download  uint64
	Today     uint64 // today's bytes, counted metric
	Reason    string
	BlockTime time.Time
	LastReset time.Time
	Override  Override
	NextReset time.Time
	Expires   time.Time
	Updated   time.Time
	// Devices is how many devices (client addresses) have an SSH session
	// or an Xray connection of the user open; DevicesLimit is how many
	// may, 0 for no limit (the user's devices=N, else the configured
	// default).
	Devices      int
	DevicesLimit int
	// Speed is the caps in force now, in bits per second each way: the
	// throttle rate while THROTTLED, else the user's speed= (or the
	// configured default); zero: none that way.
	Speed quota.Speed
}

// Device is one of a user's devices as of the agent's last tick: a client
// address with at least one open SSH session or Xray connection of the
// user.
type Device struct {
	// Address is the device's address as the block log shows it: an IPv4
	// address, an IPv6 prefix ("2001:db8:1:2::/64"), or, for a connection
	// through a proxy on the server, the proxy's address and port
	// ("127.0.0.1:40312").
	Address string
	// Protocols are those of its connections (ssh, an Xray protocol).
	Protocols []quota.Protocol
	// Connections is how many connections of the user it has open.
	Connections int
	// Since is when its oldest open connection opened; zero for one open
	// before the agent started, whose start is unknown.
	Since time.Time
	// Bytes is the TCP payload its open connections moved so far, both
	// ways.
	Bytes uint64
	// Refused: the device is over the user's device limit and its
	// connections are being cut (it is listed only when some of them
	// cannot be: see README).
	Refused bool
}

// Override is a manual unblock in force (quota.Override, with a time).
type Override struct {
	Active bool
	Limit  uint64    // the limit when the override was granted
	Until  time.Time // zero: no end time
}

// Day is one day's usage of a user.
type Day struct {
	Day      string // YYYY-MM-DD, local to the agent's time zone
	Up, Down uint64
}

// Health is the agent's own state as of its last tick.
type Health struct {
	LastTick     time.Time // zero: no tick yet
	TickDuration time.Duration
	Ticks        uint64 // ticks run since the agent started
	Users        int
	Errors       map[string]string // subject → error; empty when healthy
	// Components are the parts of the agent ("kernel", "nftables", "xray",
	// "state database", "usage files") with their state: "ok", a short
	// description, or the error.
	Components map[string]string
	// Kernel holds the data plane's own counters (bpf's bw_stats): packets
	// dropped for a block or a spent budget, and packets the maps had no
	// room for.
	Kernel KernelStats
	// Notify holds each notification channel's delivery state, in the
	// order of the configuration; empty when there is none.
	Notify []NotifyChannel
}

// NotifyChannel is one notification channel's delivery state.
type NotifyChannel struct {
	// Name is the channel's kind and receiver, without secrets:
	// "webhook https://hooks.example.com/bw", "exec /usr/local/bin/x",
	// "telegram chat 123456789".
	Name      string
	Backlog   uint64 // events waiting to be sent to it
	Delivered uint64 // events delivered since it was first configured
	Expired   uint64 // events given up: older than notify.max_age
	// Attempts counts the failed attempts at the oldest waiting event; 0
	// when the last attempt succeeded. NextTry is when it tries again
	// (zero: as soon as there is an event).
	Attempts uint64
	NextTry  time.Time
	// LastError is the last failed attempt's error, kept after a
	// success; ErrorTime is when it happened (zero: never).
	LastError string
	ErrorTime time.Time
}

// KernelStats are the data plane's own counters since its maps were
// created.
type KernelStats struct {
	DroppedBlocked uint64 // packets of blocked UIDs
	DroppedQuota   uint64 // packets over a budget
	CountersFull   uint64 // packets of UIDs the counter map had no room for: not counted
	QuotaFull      uint64 // packets of budgeted UIDs the quota map had no room for: dropped
	// SSH sessions: those counted for their users as of the last tick;
	// packets of SSH connections held while their user was not known yet;
	// packets that passed unattributed, their hold over (no agent, or no
	// way to tell whose session it was).
	SSHSessions     uint64
	SSHHeld         uint64
	SSHUnattributed uint64
	// SSHNeverAttributed counts the SSH connections whose hold ended
	// before they were attributed (their packets are SSHUnattributed).
	SSHNeverAttributed uint64
	// Xray's connections: those the kernel counted for their users from
	// the access log's claims; packets held while their claim had not come
	// yet; connections never claimed (counted by Xray's counters only).
	XrayClaimed   uint64
	XrayHeld      uint64
	XrayUnclaimed uint64
	// DroppedRate counts packets dropped over a user's speed cap.
	DroppedRate uint64
}

// UserRow is the part of a user that a live monitor shows (Watch).
type UserRow struct {
	Name     string
	Protocol quota.Protocol
	Status   quota.Status
	Used     uint64
	Limit    uint64
	Upload   uint64
	Download uint64
	Speed    quota.Speed // the caps in force now (User.Speed)
}

// Row returns u's monitor row.
func (u User) Row() UserRow {
	return UserRow{Name: u.Name, Protocol: u.Protocol, Status: u.Status, Used: u.Used, Limit: u.Limit, Upload: u.Upload, Download: u.Download, Speed: u.Speed}
}
