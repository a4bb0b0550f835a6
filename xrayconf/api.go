package xrayconf

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// api sets c.API and c.APIServices from the "api" object and, in the
// classic form, the inbound tagged api.tag.
func (c *Config) api(m *merged) error {
	a := m.cfg.API
	if a == nil {
		return nil
	}
	if a.Tag == "" {
		return fmt.Errorf("%w: %s: api.tag is empty: Xray refuses it", ErrInvalid, m.apiFile)
	}
	c.APIServices = slices.Clone(a.Services)
	apiProblem := func(format string, args ...any) {
		c.Problems = append(c.Problems, Problem{File: m.apiFile, Pos: -1, Index: -1, Msg: fmt.Sprintf(format, args...)})
	}

	if a.Listen != "" {
		// Xray's gRPC server listens there itself (net.Listen("tcp", ...)).
		host, port, err := net.SplitHostPort(a.Listen)
		n, perr := strconv.ParseUint(port, 10, 16)
		if err != nil || perr != nil {
			apiProblem("api.listen %q is no host:port: Xray's API has no address bwagent can use", a.Listen)
			return nil
		}
		addr, exposed := dialAddr(host, int(n))
		c.API = addr
		if exposed {
			apiProblem("api.listen %q: %s", a.Listen, exposedMsg)
		}
		return nil
	}

	// The classic form: the API is reached through an inbound, usually a
	// dokodemo-door one, whose traffic routing sends to the API.
	i := m.findInbound(a.Tag)
	if i < 0 {
		apiProblem("api.listen is empty and no inbound has the tag %q (api.tag): Xray's API has no address", a.Tag)
		return nil
	}
	in := &m.cfg.Inbounds[i]
	inProblem := func(format string, args ...any) {
		c.Problems = append(c.Problems, Problem{File: in.file, Inbound: in.Tag, Pos: in.pos, Index: -1,
			Msg: fmt.Sprintf(format, args...)})
	}
	listen := ""
	if in.Listen != nil {
		listen = *in.Listen
	}
	port, env, err := firstPort(in.Port)
	switch {
	case err != nil:
		return in.invalid("%v", err)
	case env || strings.HasPrefix(listen, "env:"):
		inProblem("the API inbound's address comes from an environment variable of Xray's: give bwagent the API address")
		return nil
	case strings.HasPrefix(listen, "/"):
		c.API = "unix:" + listen
	case strings.HasPrefix(listen, "@"):
		inProblem("the API inbound listens on an abstract unix socket: give bwagent the API address")
		return nil
	case port == 0:
		inProblem("the API inbound has no port: Xray's API has no address")
		return nil
	default:
		addr, exposed := dialAddr(listen, port)
		c.API = addr
		if exposed {
			inProblem("the API inbound listens on %s: %s", net.JoinHostPort(orAll(listen), strconv.Itoa(port)), exposedMsg)
		}
	}
	if !m.routed(in.Tag, a.Tag) {
		c.Problems = append(c.Problems, Problem{File: m.routingFile, Pos: -1, Index: -1,
			Msg: fmt.Sprintf(`no routing rule sends inbound %q to outbound %q, so Xray's API is unreachable: add {"inboundTag": [%q], "outboundTag": %q} to routing.rules`,
				in.Tag, a.Tag, in.Tag, a.Tag)})
	}
	return nil
}

const exposedMsg = "Xray's API is reachable from beyond this machine; whoever reaches it can add and remove users and read everyone's traffic: listen on 127.0.0.1"

// orAll is listen, or what an empty listen means.
func orAll(listen string) string {
	if listen == "" {
		return "0.0.0.0"
	}
	return listen
}

// dialAddr returns the address to dial for a server listening on host and
// port: the loopback address of the same family if host is an address of
// all interfaces (or empty), host otherwise. exposed is true if host is an
// IP address that is not a loopback one.
func dialAddr(host string, port int) (addr string, exposed bool) {
	host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	dial := host
	if host == "" {
		dial, exposed = "127.0.0.1", true
	} else if ip, err := netip.ParseAddr(host); err == nil {
		exposed = !ip.IsLoopback()
		if ip.IsUnspecified() {
			dial = "127.0.0.1"
			if ip.Is6() && !ip.Is4In6() {
				dial = "::1"
			}
		}
	}
	return net.JoinHostPort(dial, strconv.Itoa(port)), exposed
}

// routed reports whether a routing rule sends the traffic of inbound tag in
// to outbound tag out. Rules that do not decode are skipped: this package
// does not check the routing.
func (m *merged) routed(in, out string) bool {
	if m.cfg.Routing == nil {
		return false
	}
	for _, raw := range m.cfg.Routing.Rules {
		var r struct {
			InboundTag  json.RawMessage `json:"inboundTag"`
			OutboundTag string          `json:"outboundTag"`
		}
		if json.Unmarshal(raw, &r) != nil || r.OutboundTag != out {
			continue
		}
		// Xray's StringList: an array, or a comma-separated string.
		var tags []string
		if json.Unmarshal(r.InboundTag, &tags) != nil {
			var s string
			if json.Unmarshal(r.InboundTag, &s) != nil {
				continue
			}
			tags = strings.Split(s, ",")
		}
		if slices.Contains(tags, in) {
			return true
		}
	}
	return false
}
