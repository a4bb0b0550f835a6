package notify

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

// Payload is an event as every channel sends it; as JSON, it is the body of
// a webhook and the standard input of a program.
type Payload struct {
	// ID is the event's id, the same in every attempt and on every
	// channel: deduplicate on it.
	ID string `json:"id"`
	// Type is the event's type (config.EventTypes): block, unblock,
	// disable, enable, reset, threshold, expiring, device, failed,
	// recovered.
	Type string `json:"type"`
	// Time is when the event happened, in UTC.
	Time time.Time `json:"time"`
	// Node is the agent's server (notify.node, or its host name).
	Node string `json:"node"`
	// User is the user the event is about; nil for events of the agent
	// itself (failed, recovered).
	User *User `json:"user,omitempty"`
	// Threshold is the percentage of the limit a threshold event is
	// about.
	Threshold int `json:"threshold,omitempty"`
	// Expires is the expiry an expiring event is about.
	Expires *time.Time `json:"expires,omitempty"`
	// Component and Message are the part of the agent that failed or
	// recovered, and its error (failed) or the error it had (recovered).
	Component string `json:"component,omitempty"`
	Message   string `json:"message,omitempty"`
}

// User is the user of an event, as they were when it happened.
type User struct {
	Name     string `json:"name"`
	Protocol string `json:"protocol"` // ssh, vmess, vless, trojan, shadowsocks
	Usage    uint64 `json:"usage"`    // bytes counted against the limit
	Limit    uint64 `json:"limit"`    // bytes; 0 is unlimited
	Status   string `json:"status"`   // ACTIVE, WARNING, BLOCKED, DISABLED, UNLIMITED
	Reason   string `json:"reason"`   // why the event happened, as the block log says it
}

// payloadOf returns the payload of event e of the database whose event id
// prefix is prefix.
func payloadOf(prefix, node string, e store.Event) *Payload {
	p := &Payload{ID: prefix + "-" + strconv.FormatInt(e.ID, 10), Type: e.Action, Time: e.Time.UTC(), Node: node}
	if e.Protocol == "" {
		p.Component, p.Message = e.Name, e.Reason
		return p
	}
	p.User = &User{Name: e.Name, Protocol: e.Protocol, Usage: e.Used, Limit: e.Limit, Status: e.Status, Reason: e.Reason}
	switch e.Action {
	case quota.ActThreshold:
		p.Threshold, _ = strconv.Atoi(e.Detail)
	case quota.ActExpiring:
		if t, err := time.Parse(time.RFC3339Nano, e.Detail); err == nil {
			t = t.UTC()
			p.Expires = &t
		}
	}
	return p
}

// Env returns p as environment variables (NAME=value), for programs:
// BWAGENT_EVENT_ID, BWAGENT_EVENT_TYPE, BWAGENT_EVENT_TIME (RFC 3339),
// BWAGENT_NODE; for a user's event BWAGENT_USER, BWAGENT_PROTOCOL,
// BWAGENT_USAGE, BWAGENT_LIMIT (bytes; 0 unlimited), BWAGENT_STATUS,
// BWAGENT_REASON, and BWAGENT_THRESHOLD or BWAGENT_EXPIRES for those types;
// for the agent's own BWAGENT_COMPONENT and BWAGENT_MESSAGE. Variables that
// do not apply are not set.
func (p *Payload) Env() []string {
	env := []string{
		"BWAGENT_EVENT_ID=" + p.ID,
		"BWAGENT_EVENT_TYPE=" + p.Type,
		"BWAGENT_EVENT_TIME=" + p.Time.Format(time.RFC3339Nano),
		"BWAGENT_NODE=" + p.Node,
	}
	if u := p.User; u != nil {
		env = append(env,
			"BWAGENT_USER="+u.Name,
			"BWAGENT_PROTOCOL="+u.Protocol,
			"BWAGENT_USAGE="+strconv.FormatUint(u.Usage, 10),
			"BWAGENT_LIMIT="+strconv.FormatUint(u.Limit, 10),
			"BWAGENT_STATUS="+u.Status,
			"BWAGENT_REASON="+u.Reason)
	}
	if p.Threshold != 0 {
		env = append(env, "BWAGENT_THRESHOLD="+strconv.Itoa(p.Threshold))
	}
	if p.Expires != nil {
		env = append(env, "BWAGENT_EXPIRES="+p.Expires.Format(time.RFC3339Nano))
	}
	if p.User == nil {
		env = append(env, "BWAGENT_COMPONENT="+p.Component, "BWAGENT_MESSAGE="+p.Message)
	}
	return env
}

// Text returns p as a short message for people (Telegram):
//
//	[vpn-sg-1] john (ssh) blocked: Bandwidth Limit Reached
//	usage 10.0 GiB of 10.0 GiB, BLOCKED
func (p *Payload) Text() string {
	var b strings.Builder
	b.WriteString("[" + p.Node + "] ")
	u := p.User
	if u == nil {
		fmt.Fprintf(&b, "%s %s: %s", p.Component, p.Type, p.Message)
		return b.String()
	}
	fmt.Fprintf(&b, "%s (%s) ", u.Name, u.Protocol)
	verb := map[string]string{quota.ActBlock: "blocked", quota.ActThrottle: "throttled", quota.ActUnblock: "unblocked", quota.ActDisable: "disabled",
		quota.ActEnable: "enabled", quota.ActDevice: "device cut"}[p.Type]
	if verb == "" {
		verb = p.Type // reset, threshold, expiring
	}
	b.WriteString(verb + ": " + u.Reason)
	limit := "unlimited"
	if u.Limit > 0 {
		limit = "of " + humanSize(u.Limit)
	}
	fmt.Fprintf(&b, "\nusage %s %s, %s", humanSize(u.Usage), limit, u.Status)
	return b.String()
}

// humanSize formats a byte count in binary units, as bwctl does.
func humanSize(n uint64) string {
	const units = "KMGTPE"
	if n < 1024 {
		return strconv.FormatUint(n, 10) + " B"
	}
	v, i := float64(n)/1024, 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	return strconv.FormatFloat(v, 'f', 1, 64) + " " + units[i:i+1] + "iB"
}
