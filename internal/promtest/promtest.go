// Package promtest reads a Prometheus scrape for tests: the text format is
// parsed with the Prometheus client library's own parser (expfmt) and
// linted with its linter (promlint, the checks of `promtool check
// metrics`), and single samples are looked up by name and labels.
package promtest

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Scrape is one parsed scrape.
type Scrape struct {
	Text     []byte                       // the body as served
	Families map[string]*dto.MetricFamily // by name
}

// Parse parses a scrape in the text format.
func Parse(text []byte) (*Scrape, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(text))
	if err != nil {
		return nil, fmt.Errorf("parse scrape: %w", err)
	}
	return &Scrape{Text: text, Families: fams}, nil
}

// Read reads an HTTP response to a scrape: it must be 200 in the text
// format. It closes the body.
func Read(resp *http.Response) (*Scrape, error) {
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("read scrape: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape: %s: %s", resp.Status, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		return nil, fmt.Errorf("scrape: content type %q, want the text format", ct)
	}
	return Parse(body)
}

// Lint returns the problems promlint finds, one string each.
func (s *Scrape) Lint() ([]string, error) {
	problems, err := promlint.New(bytes.NewReader(s.Text)).Lint()
	if err != nil {
		return nil, fmt.Errorf("lint: %w", err)
	}
	var out []string
	for _, p := range problems {
		out = append(out, p.Metric+": "+p.Text)
	}
	return out, nil
}

// Metric returns the sample of family name whose labels are exactly
// labels (name, value, name, value...), or nil.
func (s *Scrape) Metric(name string, labels ...string) *dto.Metric {
	f := s.Families[name]
	if f == nil {
		return nil
	}
	want := make(map[string]string, len(labels)/2)
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	for _, m := range f.GetMetric() {
		if len(m.GetLabel()) != len(want) {
			continue
		}
		if !slices.ContainsFunc(m.GetLabel(), func(l *dto.LabelPair) bool { return want[l.GetName()] != l.GetValue() }) {
			return m
		}
	}
	return nil
}

// Value returns the value of a counter, gauge or untyped sample (see
// Metric), and false if there is none.
func (s *Scrape) Value(name string, labels ...string) (float64, bool) {
	m := s.Metric(name, labels...)
	switch {
	case m == nil:
		return 0, false
	case m.Counter != nil:
		return m.Counter.GetValue(), true
	case m.Gauge != nil:
		return m.Gauge.GetValue(), true
	case m.Untyped != nil:
		return m.Untyped.GetValue(), true
	}
	return 0, false
}

// Type returns the type of family name ("" when absent).
func (s *Scrape) Type(name string) string {
	f := s.Families[name]
	if f == nil {
		return ""
	}
	return strings.ToLower(f.GetType().String())
}

// Histogram returns a histogram's sample count and sum, and false if there
// is none (see Metric).
func (s *Scrape) Histogram(name string, labels ...string) (count uint64, sum float64, ok bool) {
	m := s.Metric(name, labels...)
	if m == nil || m.Histogram == nil {
		return 0, 0, false
	}
	return m.Histogram.GetSampleCount(), m.Histogram.GetSampleSum(), true
}

// Series returns how many samples family name has.
func (s *Scrape) Series(name string) int {
	return len(s.Families[name].GetMetric())
}
