package xraystats

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/myvpn/bwagent/xraystats/internal/xraypb/statscmdpb"
)

// ScanUserTraffic reads the traffic counter of every user that has counters
// in Xray, without resetting them, and calls fn with each: the user's email,
// whether it is the downlink counter (else the uplink one) and its value.
// Each user has two, in no order (Xray lists its counters in its map's
// order, which changes from call to call).
//
// It is [Client.UserTraffic] without a map, for a caller that reads every
// user's counters often: Xray's answer is decoded as it is received, from
// gRPC's own buffers, and nothing is allocated for each counter. email is
// valid only during the call to fn; fn must not keep it (a map lookup with
// string(email) as the key copies nothing). fn runs on the calling
// goroutine, before ScanUserTraffic returns; when the answer turns out
// malformed, fn may have been called for some counters before the error.
func (c *Client) ScanUserTraffic(ctx context.Context, fn func(email []byte, downlink bool, value int64)) error {
	s := scanPool.Get().(*statsScan)
	defer func() {
		s.fn, s.err = nil, nil
		s.carry = s.carry[:0]
		scanPool.Put(s)
	}()
	s.fn = fn
	return c.call(ctx, "query user traffic", func(ctx context.Context) error {
		// Xray matches the pattern as a substring anywhere in the name:
		// userCounter drops names of other kinds that contain it.
		return c.conn.Invoke(ctx, statscmdpb.StatsService_QueryStats_FullMethodName,
			&statscmdpb.QueryStatsRequest{Pattern: KindUser + sep}, s, grpc.ForceCodecV2(scanCodec{}))
	})
}

// statsScan is the answer of a QueryStats call as ScanUserTraffic reads it:
// the callback, and the bytes of a Stat that straddles two of gRPC's
// buffers.
type statsScan struct {
	fn    func(email []byte, downlink bool, value int64)
	carry []byte
	err   error
}

// scanPool keeps the scans' carry buffers from one call to the next.
var scanPool = sync.Pool{New: func() any { return new(statsScan) }}

// scanCodec is gRPC's proto codec, except that it decodes a *statsScan
// itself, field by field (google.golang.org/protobuf/encoding/protowire),
// rather than into a QueryStatsResponse of one Stat object and one name
// string per counter.
type scanCodec struct{}

// protoCodec is gRPC's own codec for protocol buffers.
var protoCodec = encoding.GetCodecV2("proto")

func (scanCodec) Name() string { return protoCodec.Name() }

func (scanCodec) Marshal(v any) (mem.BufferSlice, error) { return protoCodec.Marshal(v) }

func (scanCodec) Unmarshal(data mem.BufferSlice, v any) error {
	s, ok := v.(*statsScan)
	if !ok {
		return protoCodec.Unmarshal(data, v)
	}
	for _, buf := range data {
		if err := s.feed(buf.ReadOnlyData()); err != nil {
			return err
		}
	}
	if len(s.carry) > 0 {
		return errors.New("QueryStatsResponse: truncated")
	}
	return nil
}

// feed decodes the Stat fields of a QueryStatsResponse in p, the next part
// of it, after what the last part left over.
func (s *statsScan) feed(p []byte) error {
	if len(s.carry) == 0 {
		n, err := s.fields(p)
		if err != nil {
			return err
		}
		s.carry = append(s.carry, p[n:]...)
		return nil
	}
	s.carry = append(s.carry, p...)
	n, err := s.fields(s.carry)
	if err != nil {
		return err
	}
	s.carry = s.carry[:copy(s.carry, s.carry[n:])]
	return nil
}

// fields decodes the whole fields at the start of b and returns how many
// bytes they took: the rest is the start of a field that continues in the
// next part.
func (s *statsScan) fields(b []byte) (int, error) {
	done := 0
	for done < len(b) {
		num, typ, n := protowire.ConsumeTag(b[done:])
		if n < 0 {
			return done, incomplete(n)
		}
		var m int
		if num == 1 && typ == protowire.BytesType {
			var stat []byte
			stat, m = protowire.ConsumeBytes(b[done+n:])
			if m >= 0 {
				if err := s.stat(stat); err != nil {
					return done, err
				}
			}
		} else {
			m = protowire.ConsumeFieldValue(num, typ, b[done+n:])
		}
		if m < 0 {
			return done, incomplete(m)
		}
		done += n + m
	}
	return done, nil
}

// incomplete returns nil for a field cut off at the end of a part (the
// rest is in the next), else the decoding error.
func incomplete(n int) error {
	if err := protowire.ParseError(n); !errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("QueryStatsResponse: %w", err)
	}
	return nil
}

// stat decodes one Stat (name = 1, value = 2) and hands a user's traffic
// counter to the callback.
func (s *statsScan) stat(b []byte) error {
	var name []byte
	var value int64
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fmt.Errorf("QueryStatsResponse: Stat: %w", protowire.ParseError(n))
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType:
			name, n = protowire.ConsumeBytes(b)
		case num == 2 && typ == protowire.VarintType:
			var v uint64
			v, n = protowire.ConsumeVarint(b)
			value = int64(v)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return fmt.Errorf("QueryStatsResponse: Stat: %w", protowire.ParseError(n))
		}
		b = b[n:]
	}
	if email, downlink, ok := userCounter(name); ok {
		s.fn(email, downlink, value)
	}
	return nil
}

// The parts of a user's traffic counter's name around the email.
var (
	userPrefix     = []byte(KindUser + sep)
	uplinkSuffix   = []byte(sep + "traffic" + sep + MetricUplink)
	downlinkSuffix = []byte(sep + "traffic" + sep + MetricDownlink)
)

// userCounter splits the name of a user's traffic counter, as
// ParseStatName does, without allocating; ok is false for any other name.
func userCounter(name []byte) (email []byte, downlink, ok bool) {
	rest, ok := bytes.CutPrefix(name, userPrefix)
	if !ok {
		return nil, false, false
	}
	if email, ok := bytes.CutSuffix(rest, uplinkSuffix); ok && len(email) > 0 {
		return email, false, true
	}
	if email, ok := bytes.CutSuffix(rest, downlinkSuffix); ok && len(email) > 0 {
		return email, true, true
	}
	return nil, false, false
}
