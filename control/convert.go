package control

import (
	"time"

	"github.com/myvpn/bwagent/control/internal/controlpb"
	"github.com/myvpn/bwagent/quota"
)

func unixSec(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.Unix()
}

func fromUnix(s int64) time.Time {
	if s == 0 {
		return time.Time{}
	}
	return time.Unix(s, 0)
}

func userToPB(u User) *controlpb.User {
	return &controlpb.User{
		Name: u.Name, Protocol: string(u.Protocol), Uid: u.UID, Present: u.Present,
		Status: string(u.Status), Used: u.Used, Limit: u.Limit, Remaining: u.Remaining,
		Upload: u.Upload, Download: u.Download, Today: u.Today, Reason: u.Reason,
		BlockTime: unixSec(u.BlockTime), LastReset: unixSec(u.LastReset),
		OverrideActive: u.Override.Active, OverrideLimit: u.Override.Limit, OverrideUntil: unixSec(u.Override.Until),
		NextReset: unixSec(u.NextReset), Expires: unixSec(u.Expires), Updated: unixSec(u.Updated),
		Protocols: protocolNames(u.Protocols),
		Devices:   int32(u.Devices), DevicesLimit: int32(u.DevicesLimit),
		SpeedDown: uint64(u.Speed.Down), SpeedUp: uint64(u.Speed.Up),
	}
}

func protocolNames(ps []quota.Protocol) []string {
	var out []string
	for _, p := range ps {
		out = append(out, string(p))
	}
	return out
}

func userFromPB(p *controlpb.User) User {
	return User{
		Name: p.Name, Protocol: quota.Protocol(p.Protocol), UID: p.Uid, Present: p.Present,
		Status: quota.Status(p.Status), Used: p.Used, Limit: p.Limit, Remaining: p.Remaining,
		Upload: p.Upload, Download: p.Download, Today: p.Today, Reason: p.Reason,
		BlockTime: fromUnix(p.BlockTime), LastReset: fromUnix(p.LastReset),
		Override:  Override{Active: p.OverrideActive, Limit: p.OverrideLimit, Until: fromUnix(p.OverrideUntil)},
		NextReset: fromUnix(p.NextReset), Expires: fromUnix(p.Expires), Updated: fromUnix(p.Updated),
		Protocols: protocols(p.Protocols),
		Devices:   int(p.Devices), DevicesLimit: int(p.DevicesLimit),
		Speed: quota.Speed{Down: quota.Rate(p.SpeedDown), Up: quota.Rate(p.SpeedUp)},
	}
}

func devicesToPB(ds []Device) *controlpb.ListDevicesResponse {
	out := &controlpb.ListDevicesResponse{Devices: make([]*controlpb.Device, len(ds))}
	for i, d := range ds {
		out.Devices[i] = &controlpb.Device{Address: d.Address, Protocols: protocolNames(d.Protocols),
			Connections: int32(d.Connections), Since: unixSec(d.Since), Bytes: d.Bytes, Refused: d.Refused}
	}
	return out
}

func devicesFromPB(p *controlpb.ListDevicesResponse) []Device {
	out := make([]Device, len(p.Devices))
	for i, d := range p.Devices {
		out[i] = Device{Address: d.Address, Protocols: protocols(d.Protocols), Connections: int(d.Connections),
			Since: fromUnix(d.Since), Bytes: d.Bytes, Refused: d.Refused}
	}
	return out
}

func protocols(names []string) []quota.Protocol {
	var out []quota.Protocol
	for _, n := range names {
		out = append(out, quota.Protocol(n))
	}
	return out
}

func snapshotToPB(rows []UserRow) *controlpb.Snapshot {
	snap := &controlpb.Snapshot{Users: make([]*controlpb.UserRow, len(rows))}
	for i, r := range rows {
		snap.Users[i] = &controlpb.UserRow{
			Name: r.Name, Protocol: string(r.Protocol), Status: string(r.Status),
			Used: r.Used, Limit: r.Limit, Upload: r.Upload, Download: r.Download,
			SpeedDown: uint64(r.Speed.Down), SpeedUp: uint64(r.Speed.Up),
		}
	}
	return snap
}

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromUnixNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

func notifyToPB(chs []NotifyChannel) []*controlpb.NotifyChannel {
	out := make([]*controlpb.NotifyChannel, len(chs))
	for i, c := range chs {
		out[i] = &controlpb.NotifyChannel{Name: c.Name, Backlog: c.Backlog, Delivered: c.Delivered, Expired: c.Expired,
			Attempts: c.Attempts, NextTryUnixNano: unixNano(c.NextTry), LastError: c.LastError, ErrorUnixNano: unixNano(c.ErrorTime)}
	}
	return out
}

func notifyFromPB(chs []*controlpb.NotifyChannel) []NotifyChannel {
	if len(chs) == 0 {
		return nil
	}
	out := make([]NotifyChannel, len(chs))
	for i, c := range chs {
		out[i] = NotifyChannel{Name: c.Name, Backlog: c.Backlog, Delivered: c.Delivered, Expired: c.Expired,
			Attempts: c.Attempts, NextTry: fromUnixNano(c.NextTryUnixNano), LastError: c.LastError, ErrorTime: fromUnixNano(c.ErrorUnixNano)}
	}
	return out
}
