package store

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/myvpn/bwagent/quota"
)

// The baselines table keeps sources and epochs as text, in the forms the
// agent has always written, so that databases of earlier versions read the
// same:
//
//	source  uid:1001                  xray:alice@example   fleet:alice
//	epoch   BOOT-ID/COUNTER-MAP-ID    xray@START.ALLOCS    fleet/PERIOD@LEASE+1
//
// Only this file turns them into strings and back.

func encodeSource(s quota.Source) string {
	switch s.Kind {
	case quota.SourceUID:
		return "uid:" + strconv.FormatUint(uint64(s.UID), 10)
	case quota.SourceXray:
		return "xray:" + s.Name
	case quota.SourceOwed:
		return "owed:" + s.Name
	case quota.SourceFleet:
		return "fleet:" + s.Name
	}
	return fmt.Sprintf("kind%d:%d:%s", s.Kind, s.UID, s.Name)
}

func decodeSource(text string) (quota.Source, error) {
	if rest, ok := strings.CutPrefix(text, "uid:"); ok {
		n, err := strconv.ParseUint(rest, 10, 32)
		if err != nil {
			return quota.Source{}, fmt.Errorf("baseline source %q: bad UID", text)
		}
		return quota.UIDSource(uint32(n)), nil
	}
	if rest, ok := strings.CutPrefix(text, "xray:"); ok && rest != "" {
		return quota.XraySource(rest), nil
	}
	if rest, ok := strings.CutPrefix(text, "owed:"); ok && rest != "" {
		return quota.OwedSource(rest), nil
	}
	if rest, ok := strings.CutPrefix(text, "fleet:"); ok && rest != "" {
		return quota.FleetSource(rest), nil
	}
	return quota.Source{}, fmt.Errorf("baseline source %q: unknown kind", text)
}

const xrayOrigin = "xray"

func encodeEpoch(e quota.Epoch) string {
	switch {
	case e.IsZero():
		return ""
	case e.Origin == xrayOrigin:
		return "xray@" + strconv.FormatInt(e.Start, 10) + "." + strconv.FormatUint(e.Gen, 10)
	case e.Start == 0:
		return e.Origin + "/" + strconv.FormatUint(e.Gen, 10)
	}
	return e.Origin + "/" + strconv.FormatUint(e.Gen, 10) + "@" + strconv.FormatInt(e.Start, 10)
}

// decodeEpoch parses an epoch. Text it cannot parse becomes an epoch of its
// own (Origin is the text), which equals no live epoch: the source is then
// counted from zero, as after a restart of its counters.
func decodeEpoch(text string) quota.Epoch {
	if text == "" {
		return quota.Epoch{}
	}
	if rest, ok := strings.CutPrefix(text, "xray@"); ok {
		sec, gen, _ := strings.Cut(rest, ".")
		s, err1 := strconv.ParseInt(sec, 10, 64)
		g, err2 := strconv.ParseUint(gen, 10, 64)
		if err1 == nil && (gen == "" || err2 == nil) {
			return quota.Epoch{Origin: xrayOrigin, Start: s, Gen: g}
		}
		return quota.Epoch{Origin: text}
	}
	origin, rest, ok := strings.Cut(text, "/")
	if !ok {
		return quota.Epoch{Origin: text}
	}
	gen, start, hasStart := strings.Cut(rest, "@")
	g, err := strconv.ParseUint(gen, 10, 64)
	if err != nil {
		return quota.Epoch{Origin: text}
	}
	e := quota.Epoch{Origin: origin, Gen: g}
	if hasStart {
		if e.Start, err = strconv.ParseInt(start, 10, 64); err != nil {
			return quota.Epoch{Origin: text}
		}
	}
	return e
}
