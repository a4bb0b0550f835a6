package store

import (
	"bytes"
	"fmt"
	"github.com/myvpn/bwagent/quota"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// benchUsers returns n users with realistic names and values.
func benchUsers(n int) ([]User, []Baseline) {
	now := time.Now()
	us := make([]User, n)
	bs := make([]Baseline, n)
	for i := range us {
		u := &us[i]
		u.Name = fmt.Sprintf("user%06d@example.com", (i*7919)%n) // not in key order
		u.Protocol = "vless"
		u.Day = "2026-03-14"
		u.Up, u.Down = uint64(i)*1000, uint64(i)*9000
		u.DayUp, u.DayDown = uint64(i), uint64(i)*9
		u.Schedule = "monthly 1"
		u.NextReset = now.Add(24 * time.Hour)
		u.UpdatedAt = now
		if i%10 == 0 {
			u.Protocol, u.UID = "ssh", uint32(1000+i)
			u.Blocked, u.BlockReason, u.BlockTime = true, "quota exceeded", now
		}
		bs[i] = Baseline{Source: quota.XraySource(u.Name), Epoch: quota.Epoch{Origin: "xray", Start: 1757000000, Gen: 42}, Rx: u.Down, Tx: u.Up}
	}
	return us, bs
}

// BenchmarkCommit commits ticks in which 10% of the users, chosen at random,
// had traffic: that many User rows and as many Baselines per commit.
func BenchmarkCommit(b *testing.B) {
	for _, n := range []int{1_000, 10_000, 100_000} {
		b.Run("users="+strconv.Itoa(n), func(b *testing.B) {
			s, err := Open(filepath.Join(b.TempDir(), "state.db"))
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			us, bs := benchUsers(n)
			if err := s.Commit(&Batch{Users: us, Baselines: bs}); err != nil {
				b.Fatal(err)
			}
			r := rand.New(rand.NewPCG(1, 2))
			const ticks = 8
			var batches [ticks]Batch
			for t := range batches {
				for _, i := range r.Perm(n)[:n/10] {
					batches[t].Users = append(batches[t].Users, us[i])
					batches[t].Baselines = append(batches[t].Baselines, bs[i])
				}
			}
			w0 := writeBytes(b)
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				bt := &batches[i%ticks]
				now := time.Now()
				for j := range bt.Users {
					bt.Users[j].Up += 1500
					bt.Users[j].UpdatedAt = now
					bt.Baselines[j].Tx += 1500
				}
				if err := s.Commit(bt); err != nil {
					b.Fatal(err)
				}
				if i == 0 {
					b.ReportMetric(float64(len(bt.Users)+len(bt.Baselines)), "rows/op")
				}
			}
			b.StopTimer()
			if w0 >= 0 {
				b.ReportMetric(float64(writeBytes(b)-w0)/float64(b.N)/(1<<20), "MiBwritten/op")
			}
		})
	}
}

// memChildEnv names the database whose users the child process of
// BenchmarkOpenUsersMemory loads, and how: "users:PATH" or "each:PATH".
const memChildEnv = "BWAGENT_STORE_MEM_CHILD"

// memChild opens the database named by memChildEnv, reads every user, with
// Users or EachUser, and prints the number of users, the process's resident
// memory, current and peak, in KiB, and the Go heap in use, with the users
// Users returned still referenced.
func memChild(arg string) {
	how, path, _ := strings.Cut(arg, ":")
	s, err := Open(path)
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	var us []User
	n := 0
	if how == "users" {
		us, err = s.Users()
		n = len(us)
	} else {
		err = s.EachUser(func(User) error { n++; return nil })
	}
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	kib := func(field string) string {
		for _, line := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(line, field+":"); ok {
				return strings.TrimSuffix(strings.TrimSpace(v), " kB")
			}
		}
		return "-1"
	}
	fmt.Println(n, kib("VmRSS"), kib("VmHWM"), ms.HeapAlloc>>10)
	runtime.KeepAlive(us)
	s.Close()
}

// BenchmarkOpenUsersMemory measures the resident memory of a process that
// opens a database of 100,000 users and reads them all, as the agent does at
// start: with Users, which returns them all at once, and with EachUser,
// which does not. Each load runs in a child process, so that nothing else in
// the test binary counts.
func BenchmarkOpenUsersMemory(b *testing.B) {
	const n = 100_000
	path := filepath.Join(b.TempDir(), "state.db")
	s, err := Open(path)
	if err != nil {
		b.Fatal(err)
	}
	us, bs := benchUsers(n)
	if err := s.Commit(&Batch{Users: us, Baselines: bs}); err != nil {
		b.Fatal(err)
	}
	if err := s.Close(); err != nil {
		b.Fatal(err)
	}
	for _, how := range []string{"users", "each"} {
		b.Run(how, func(b *testing.B) {
			var rss, peak, heap float64
			for b.Loop() {
				cmd := exec.Command(os.Args[0], "-test.run=^$")
				cmd.Env = append(os.Environ(), memChildEnv+"="+how+":"+path)
				out, err := cmd.CombinedOutput()
				if err != nil {
					b.Fatalf("%v: %s", err, out)
				}
				var got int
				if _, err := fmt.Sscan(string(out), &got, &rss, &peak, &heap); err != nil || got != n {
					b.Fatalf("child: %q", out)
				}
			}
			b.ReportMetric(rss/1024, "MiB-RSS")
			b.ReportMetric(peak/1024, "MiB-peak-RSS")
			b.ReportMetric(heap/1024, "MiB-Go-heap")
		})
	}
}

// writeBytes returns the bytes this process has caused to be written to
// storage (/proc/self/io write_bytes), or -1 if unknown.
func writeBytes(b *testing.B) int64 {
	data, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return -1
	}
	for _, line := range bytes.Split(data, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("write_bytes: ")); ok {
			n, err := strconv.ParseInt(string(v), 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			return n
		}
	}
	return -1
}
