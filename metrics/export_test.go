package metrics

import "github.com/prometheus/client_golang/prometheus"

// Register registers m's collectors with src in reg, for a pedantic
// registry in the tests.
func (m *Metrics) Register(reg prometheus.Registerer, src Source) error { return m.register(reg, src) }
