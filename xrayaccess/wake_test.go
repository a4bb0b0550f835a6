package xrayaccess

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestWake: the watch wakes a wait when the log is written, created or
// moved away, not when another file of its directory is written, and
// gives up (the caller polls) when the directory is removed; a wait ends
// with its context or Close.
func TestWake(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "access.log")
	w := newWake(path)
	t.Cleanup(w.close)
	if w.file() == nil {
		t.Fatal("no watch of the log's directory")
	}
	// waitFor waits up to limit with do run meanwhile, and returns how
	// long the wait took and what it reported. Before it returns, do has
	// finished and the events it queued after the one that woke the wait
	// (a file's creation, then its write) are drained.
	waitFor := func(limit time.Duration, do func()) (time.Duration, bool) {
		t.Helper()
		done := make(chan struct{})
		go func() {
			defer close(done)
			time.Sleep(50 * time.Millisecond)
			do()
		}()
		start := time.Now()
		watching := w.wait(t.Context(), limit)
		d := time.Since(start)
		<-done
		for w.file() != nil {
			start := time.Now()
			if w.wait(t.Context(), 100*time.Millisecond); time.Since(start) >= 100*time.Millisecond {
				break
			}
		}
		return d, watching
	}
	write := func(name string) func() {
		return func() {
			f, err := os.OpenFile(filepath.Join(dir, name), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
			if err != nil {
				t.Error(err)
				return
			}
			f.WriteString("x\n")
			f.Close()
		}
	}
	const long = 10 * time.Second
	if d, ok := waitFor(long, write("access.log")); !ok || d >= long/2 {
		t.Errorf("created and written: woken after %v (watching %v)", d, ok)
	}
	if d, ok := waitFor(long, write("access.log")); !ok || d >= long/2 {
		t.Errorf("written: woken after %v (watching %v)", d, ok)
	}
	if d, ok := waitFor(300*time.Millisecond, write("error.log")); !ok || d < 300*time.Millisecond {
		t.Errorf("another file written: the wait ended after %v (watching %v)", d, ok)
	}
	if d, ok := waitFor(long, func() { os.Rename(path, path+".1") }); !ok || d >= long/2 {
		t.Errorf("moved away: woken after %v (watching %v)", d, ok)
	}

	ctx, cancel := context.WithCancel(t.Context())
	go func() {
		time.Sleep(50 * time.Millisecond)
		cancel()
	}()
	if start := time.Now(); !w.wait(ctx, long) || time.Since(start) >= long/2 {
		t.Errorf("the context's end did not end the wait")
	}

	if d, ok := waitFor(long, func() { os.RemoveAll(dir) }); ok || d >= long/2 {
		t.Errorf("directory removed: the wait ended after %v, watching %v; want no watch at once", d, ok)
	}
	if w.wait(t.Context(), long) {
		t.Errorf("a wait without a watch reports one")
	}

	w2 := newWake(filepath.Join(t.TempDir(), "access.log"))
	go func() {
		time.Sleep(50 * time.Millisecond)
		w2.close()
	}()
	if start := time.Now(); w2.wait(t.Context(), long) || time.Since(start) >= long/2 {
		t.Errorf("Close did not end the wait")
	}
}
