package bench

import (
	"context"
	"net/http/httptest"
	"strconv"
	"testing"

	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/internal/promtest"
	"github.com/myvpn/bwagent/metrics"
)

// BenchmarkScrape: one scrape of /metrics of a real agent (as in
// BenchmarkTick: real data plane, nft table and state database) with N SSH
// users, without and with per-user series (capped at the default 1,000
// users). A scrape renders every user from the agent's last snapshot.
func BenchmarkScrape(b *testing.B) {
	nettest.RequireRoot(b)
	for _, users := range []int{10_000, 100_000} {
		env := newTickEnv(b, users)
		env.traffic(b, 0)
		env.tick(b, context.Background(), "first")
		for _, perUser := range []bool{false, true} {
			b.Run("users="+strconv.Itoa(users)+"/per_user="+strconv.FormatBool(perUser), func(b *testing.B) {
				h := metrics.New(metrics.Options{PerUser: perUser}).Handler(env.a)
				req := httptest.NewRequest("GET", "/metrics", nil)
				var w *httptest.ResponseRecorder
				b.ReportAllocs()
				for b.Loop() {
					w = httptest.NewRecorder()
					h.ServeHTTP(w, req)
					if w.Code != 200 {
						b.Fatalf("scrape: %d %s", w.Code, w.Body)
					}
				}
				b.ReportMetric(float64(w.Body.Len()), "bytes/scrape")
				s, err := promtest.Parse(w.Body.Bytes())
				if err != nil {
					b.Fatal(err)
				}
				total := 0.0
				for _, st := range []string{"ACTIVE", "BLOCKED"} {
					v, _ := s.Value("bwagent_users", "protocol", "ssh", "status", st)
					total += v
				}
				if int(total) != users {
					b.Fatalf("%v active and blocked users, want %d", total, users)
				}
				if n := s.Series("bwagent_user_status"); perUser && n != metrics.DefaultPerUserMax {
					b.Fatalf("%d users with per-user series, want %d", n, metrics.DefaultPerUserMax)
				}
			})
		}
	}
}
