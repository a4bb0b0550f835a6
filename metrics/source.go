package metrics

import (
	"context"
	"fmt"
	"io"
	"log"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/view"
)

// discardLog is the HTTP server's error log: the package does not log.
var discardLog = log.New(io.Discard, "", 0)

// The metrics read from the Source at each scrape.
var (
	usersDesc = prometheus.NewDesc("bwagent_users",
		"Present users (an account in the SSH UID range or an Xray client now) by protocol and status.",
		[]string{"protocol", "status"}, nil)
	departedDesc = prometheus.NewDesc("bwagent_departed_users",
		"Users gone from the passwd file and Xray's config, kept with their usage and status within the retention.",
		nil, nil)
	componentDesc = prometheus.NewDesc("bwagent_component_healthy",
		`1 when a part of the agent works at the last tick ("ok") or is turned off by the configuration ("disabled"), 0 when it fails or, for xray, when enabled but no Xray config was found.`,
		[]string{"component"}, nil)
	errorsDesc = prometheus.NewDesc("bwagent_failing_subjects",
		"How many of the agent's subjects (user accounts, limits file, kernel maps, nftables, xray api, state database...) failed at the last tick; bwctl status names them.",
		nil, nil)
	xrayUpDesc = prometheus.NewDesc("bwagent_xray_up",
		"1 when the last tick read Xray's counters through its API, 0 when it could not (unreachable, no API address, no or a broken Xray config); absent with xray.enabled = false.",
		nil, nil)
	ticksDesc = prometheus.NewDesc("bwagent_ticks_total",
		"Ticks the agent's loop has run since the agent started.",
		nil, nil)
	lastTickDesc = prometheus.NewDesc("bwagent_last_tick_timestamp_seconds",
		"When the last tick ran, in seconds since the epoch: a loop that stopped ticking shows here.",
		nil, nil)
	droppedDesc = prometheus.NewDesc("bwagent_kernel_dropped_packets_total",
		"Packets the data plane dropped, by reason: blocked (a blocked UID's), quota (over a UID's budget) or speed (over a user's speed cap). Counted by the kernel since its maps were created.",
		[]string{"reason"}, nil)
	noRoomDesc = prometheus.NewDesc("bwagent_kernel_no_room_packets_total",
		"Packets of UIDs a data plane map had no room for, by map: counters (passed uncounted: raise kernel.max_uids) or quota (a budgeted UID's, dropped). Counted by the kernel since its maps were created.",
		[]string{"map"}, nil)
	sshSessionsDesc = prometheus.NewDesc("bwagent_ssh_sessions",
		"SSH sessions counted for their users as of the last tick.",
		nil, nil)
	sshHeldDesc = prometheus.NewDesc("bwagent_kernel_ssh_held_packets_total",
		"Packets of SSH logins held (dropped) while their user was not known yet. Counted by the kernel since its maps were created.",
		nil, nil)
	sshUnattributedDesc = prometheus.NewDesc("bwagent_kernel_ssh_unattributed_total",
		"SSH connections whose hold ended before they were attributed, and the packets they passed then, by unit: connections or packets. Their bytes count for no user. Counted by the kernel since its maps were created.",
		[]string{"unit"}, nil)

	xrayConnsDesc = prometheus.NewDesc("bwagent_kernel_xray_connections_total",
		"Xray connections the kernel counted for their users, claimed from Xray's access log (state claimed), or never claimed within their hold (state unclaimed: counted by Xray's counters only). Counted by the kernel since its maps were created.",
		[]string{"state"}, nil)
	xrayHeldDesc = prometheus.NewDesc("bwagent_kernel_xray_held_packets_total",
		"Packets of Xray connections held (dropped) while their claim had not come yet. Counted by the kernel since its maps were created.",
		nil, nil)

	userUsedDesc = prometheus.NewDesc("bwagent_user_used_bytes",
		"A user's bytes counted against their limit (the configured metric) since their last reset; only with [metrics] per_user.",
		[]string{"user", "protocol"}, nil)
	userLimitDesc = prometheus.NewDesc("bwagent_user_limit_bytes",
		"A user's limit in bytes; absent for an unlimited user; only with [metrics] per_user.",
		[]string{"user", "protocol"}, nil)
	userStatusDesc = prometheus.NewDesc("bwagent_user_status",
		"Always 1; the status label is the user's status; only with [metrics] per_user.",
		[]string{"user", "protocol", "status"}, nil)
	omittedDesc = prometheus.NewDesc("bwagent_user_metrics_omitted",
		"Present users left out of the per-user series by [metrics] per_user_max; only with [metrics] per_user.",
		nil, nil)
)

// sourceCollector collects the metrics read from a Source.
type sourceCollector struct {
	src  Source
	opts Options
}

// Describe implements prometheus.Collector.
func (c *sourceCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{usersDesc, departedDesc, componentDesc, errorsDesc, xrayUpDesc,
		ticksDesc, lastTickDesc, droppedDesc, noRoomDesc, sshSessionsDesc, sshHeldDesc, sshUnattributedDesc,
		xrayConnsDesc, xrayHeldDesc} {
		ch <- d
	}
	if c.opts.PerUser {
		for _, d := range []*prometheus.Desc{userUsedDesc, userLimitDesc, userStatusDesc, omittedDesc} {
			ch <- d
		}
	}
}

// Collect implements prometheus.Collector.
func (c *sourceCollector) Collect(ch chan<- prometheus.Metric) {
	h := c.src.Health()
	c.collectHealth(ch, h)
	users, err := c.src.Users(context.Background())
	if err != nil {
		ch <- prometheus.NewInvalidMetric(usersDesc, fmt.Errorf("users: %w", err))
		return
	}
	c.collectUsers(ch, users)
}

func (c *sourceCollector) collectHealth(ch chan<- prometheus.Metric, h view.Health) {
	ch <- prometheus.MustNewConstMetric(ticksDesc, prometheus.CounterValue, float64(h.Ticks))
	if !h.LastTick.IsZero() {
		ch <- prometheus.MustNewConstMetric(lastTickDesc, prometheus.GaugeValue, float64(h.LastTick.UnixNano())/1e9)
	}
	ch <- prometheus.MustNewConstMetric(errorsDesc, prometheus.GaugeValue, float64(len(h.Errors)))
	for name, state := range h.Components {
		ch <- prometheus.MustNewConstMetric(componentDesc, prometheus.GaugeValue, bool01(healthy(state)), name)
	}
	if up, ok := xrayUp(h); ok {
		ch <- prometheus.MustNewConstMetric(xrayUpDesc, prometheus.GaugeValue, bool01(up))
	}
	k := h.Kernel
	ch <- prometheus.MustNewConstMetric(droppedDesc, prometheus.CounterValue, float64(k.DroppedBlocked), "blocked")
	ch <- prometheus.MustNewConstMetric(droppedDesc, prometheus.CounterValue, float64(k.DroppedQuota), "quota")
	ch <- prometheus.MustNewConstMetric(droppedDesc, prometheus.CounterValue, float64(k.DroppedRate), "speed")
	ch <- prometheus.MustNewConstMetric(noRoomDesc, prometheus.CounterValue, float64(k.CountersFull), "counters")
	ch <- prometheus.MustNewConstMetric(noRoomDesc, prometheus.CounterValue, float64(k.QuotaFull), "quota")
	ch <- prometheus.MustNewConstMetric(sshSessionsDesc, prometheus.GaugeValue, float64(k.SSHSessions))
	ch <- prometheus.MustNewConstMetric(sshHeldDesc, prometheus.CounterValue, float64(k.SSHHeld))
	ch <- prometheus.MustNewConstMetric(sshUnattributedDesc, prometheus.CounterValue, float64(k.SSHNeverAttributed), "connections")
	ch <- prometheus.MustNewConstMetric(sshUnattributedDesc, prometheus.CounterValue, float64(k.SSHUnattributed), "packets")
	ch <- prometheus.MustNewConstMetric(xrayConnsDesc, prometheus.CounterValue, float64(k.XrayClaimed), "claimed")
	ch <- prometheus.MustNewConstMetric(xrayConnsDesc, prometheus.CounterValue, float64(k.XrayUnclaimed), "unclaimed")
	ch <- prometheus.MustNewConstMetric(xrayHeldDesc, prometheus.CounterValue, float64(k.XrayHeld))
}

// userKey is a label pair of bwagent_users.
type userKey struct {
	proto  quota.Protocol
	status quota.Status
}

func (c *sourceCollector) collectUsers(ch chan<- prometheus.Metric, users []view.User) {
	counts := make(map[userKey]int, len(protocols)*len(statuses))
	for _, p := range protocols {
		for _, s := range statuses {
			counts[userKey{p, s}] = 0
		}
	}
	departed, listed, omitted := 0, 0, 0
	for i := range users {
		u := &users[i]
		if !u.Present {
			departed++
			continue
		}
		counts[userKey{u.Protocol, u.Status}]++
		if !c.opts.PerUser {
			continue
		}
		if listed >= c.opts.PerUserMax {
			omitted++
			continue
		}
		listed++
		name, proto := u.Name, string(u.Protocol)
		ch <- prometheus.MustNewConstMetric(userUsedDesc, prometheus.GaugeValue, float64(u.Used), name, proto)
		if u.Limit > 0 {
			ch <- prometheus.MustNewConstMetric(userLimitDesc, prometheus.GaugeValue, float64(u.Limit), name, proto)
		}
		ch <- prometheus.MustNewConstMetric(userStatusDesc, prometheus.GaugeValue, 1, name, proto, string(u.Status))
	}
	for k, n := range counts {
		ch <- prometheus.MustNewConstMetric(usersDesc, prometheus.GaugeValue, float64(n), string(k.proto), string(k.status))
	}
	ch <- prometheus.MustNewConstMetric(departedDesc, prometheus.GaugeValue, float64(departed))
	if c.opts.PerUser {
		ch <- prometheus.MustNewConstMetric(omittedDesc, prometheus.GaugeValue, float64(omitted))
	}
}

// healthy reports whether a component's state (view.Health.Components) is
// "ok..." or "disabled...": anything else is an error, or Xray enabled
// without a config.
func healthy(state string) bool {
	return strings.HasPrefix(state, "ok") || strings.HasPrefix(state, "disabled")
}

// xrayUp reports whether the last tick reached Xray's API, and false for
// ok when Xray is turned off (or the source has no xray component). The
// API was reached when the xray component is ok, or when only changing
// users failed (which runs after the counters were read); with no config,
// a broken one, or a failed API call, it was not (or may not have been)
// reached.
func xrayUp(h view.Health) (up, ok bool) {
	state, ok := h.Components["xray"]
	switch {
	case !ok || strings.HasPrefix(state, "disabled"):
		return false, false
	case strings.HasPrefix(state, "ok"):
		return true, true
	}
	failed := func(subject string) bool { return h.Errors[subject] != "" }
	return failed("xray users") && !failed("xray api") && !failed("xray config"), true
}

func bool01(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
