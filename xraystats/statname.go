package xraystats

import (
	"fmt"
	"strings"
)

// Kinds of Xray stat names, the first part of a name.
const (
	KindUser     = "user"
	KindInbound  = "inbound"
	KindOutbound = "outbound"
)

// Metrics of Xray stat names, the last part of a name.
const (
	MetricUplink   = "uplink"   // bytes from the client (user) side
	MetricDownlink = "downlink" // bytes to the client (user) side
	MetricOnline   = "online"   // a user's online IP map, not a counter
)

// sep separates the parts of Xray's stat names.
const sep = ">>>"

// Name suffixes, each with the metric it names; the subject comes before.
var statSuffixes = [...]struct{ suffix, metric string }{
	{sep + "traffic" + sep + MetricUplink, MetricUplink},
	{sep + "traffic" + sep + MetricDownlink, MetricDownlink},
	{sep + MetricOnline, MetricOnline},
}

// ParseStatName splits one of the stat names that Xray makes into its kind,
// subject and metric:
//
//	user>>>EMAIL>>>traffic>>>uplink     -> "user", EMAIL, "uplink"
//	user>>>EMAIL>>>traffic>>>downlink   -> "user", EMAIL, "downlink"
//	user>>>EMAIL>>>online               -> "user", EMAIL, "online"
//	inbound>>>TAG>>>traffic>>>uplink    -> "inbound", TAG, "uplink" (and downlink)
//	outbound>>>TAG>>>traffic>>>uplink   -> "outbound", TAG, "uplink" (and downlink)
//
// Xray builds names by plain concatenation and does not forbid '>' in emails
// or tags, so the subject is everything between the fixed prefix and the
// fixed suffix: it may itself contain '>' or even ">>>". Any other shape,
// an unknown kind or an empty subject is an error wrapping [ErrBadName].
func ParseStatName(name string) (kind, subject, metric string, err error) {
	kind, rest, ok := strings.Cut(name, sep)
	if !ok {
		return "", "", "", badName(name, "no "+sep)
	}
	switch kind {
	case KindUser, KindInbound, KindOutbound:
	default:
		return "", "", "", badName(name, "unknown kind")
	}
	for _, s := range statSuffixes {
		subject, ok := strings.CutSuffix(rest, s.suffix)
		if !ok {
			continue
		}
		if s.metric == MetricOnline && kind != KindUser {
			return "", "", "", badName(name, "only users have an online map")
		}
		if subject == "" {
			return "", "", "", badName(name, "empty "+kind)
		}
		return kind, subject, s.metric, nil
	}
	return "", "", "", badName(name, "unknown metric")
}

func badName(name, why string) error {
	return fmt.Errorf("xraystats: stat name %q: %w: %s", name, ErrBadName, why)
}

// userStatName is the name of a user's counter or online map, as Xray
// builds it.
func userStatName(email, metric string) string {
	if metric == MetricOnline {
		return KindUser + sep + email + sep + MetricOnline
	}
	return KindUser + sep + email + sep + "traffic" + sep + metric
}
