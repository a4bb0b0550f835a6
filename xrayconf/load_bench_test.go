package xrayconf

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// BenchmarkLoad50k reads a config of one VLESS inbound with 50,000 clients
// (3.5 MB): what bwagent pays at start and at each change of Xray's config,
// and the heap a Config keeps (B-kept/user, the agent holds one).
func BenchmarkLoad50k(b *testing.B) {
	var sb strings.Builder
	sb.WriteString(`{"api": {"tag": "api", "listen": "127.0.0.1:10085", "services": ["StatsService"]}, "stats": {}, "inbounds": [{"tag": "in", "port": 443, "protocol": "vless", "settings": {"decryption": "none", "clients": [`)
	for i := range 50000 {
		if i > 0 {
			sb.WriteString(",\n")
		}
		fmt.Fprintf(&sb, `      {"email": "x%05d", "id": "%08x-7e62-4138-9fd3-098a63964b6b", "level": 0}`, i, i)
	}
	sb.WriteString("]}}]}\n")
	path := filepath.Join(b.TempDir(), "config.json")
	if err := os.WriteFile(path, []byte(sb.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Load([]string{path}, ""); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	c, err := Load([]string{path}, "")
	if err != nil {
		b.Fatal(err)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(c)
	b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/50000, "B-kept/user")
}
