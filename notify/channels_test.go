package notify

import (
	"context"
	"crypto/hmac"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

var t0 = time.Date(2026, 11, 29, 14, 30, 45, 0, time.UTC)

func blockPayload() *Payload {
	return payloadOf("3f2a9c1e5b7d8a60", "vpn-sg-1", store.Event{ID: 42, Time: t0.In(time.FixedZone("WIB", 7*3600)), Protocol: "ssh",
		Name: "john", Action: quota.ActBlock, Reason: quota.ReasonLimit, Used: 10 << 30, Limit: 10 << 30, Status: "BLOCKED"})
}

func TestPayload(t *testing.T) {
	body, err := json.Marshal(blockPayload())
	if err != nil {
		t.Fatal(err)
	}
	want := `{"id":"3f2a9c1e5b7d8a60-42","type":"block","time":"2026-11-29T14:30:45Z","node":"vpn-sg-1",` +
		`"user":{"name":"john","protocol":"ssh","usage":10737418240,"limit":10737418240,"status":"BLOCKED","reason":"Bandwidth Limit Reached"}}`
	if string(body) != want {
		t.Errorf("block payload\n got %s\nwant %s", body, want)
	}
	health := payloadOf("p", "n", store.Event{ID: 7, Time: t0, Name: "xray api", Action: quota.ActFailed, Reason: "connection refused"})
	body, _ = json.Marshal(health)
	if want := `{"id":"p-7","type":"failed","time":"2026-11-29T14:30:45Z","node":"n","component":"xray api","message":"connection refused"}`; string(body) != want {
		t.Errorf("health payload\n got %s\nwant %s", body, want)
	}
	th := payloadOf("p", "n", store.Event{ID: 8, Time: t0, Protocol: "vless", Name: "a@b", Action: quota.ActThreshold, Detail: "80"})
	exp := payloadOf("p", "n", store.Event{ID: 9, Time: t0, Protocol: "vless", Name: "a@b", Action: quota.ActExpiring, Detail: "2026-12-01T17:00:00Z"})
	if th.Threshold != 80 || exp.Expires == nil || !exp.Expires.Equal(time.Date(2026, 12, 1, 17, 0, 0, 0, time.UTC)) {
		t.Errorf("threshold %+v, expiring %+v", th, exp)
	}

	env := blockPayload().Env()
	for _, kv := range []string{"BWAGENT_EVENT_ID=3f2a9c1e5b7d8a60-42", "BWAGENT_EVENT_TYPE=block", "BWAGENT_EVENT_TIME=2026-11-29T14:30:45Z",
		"BWAGENT_NODE=vpn-sg-1", "BWAGENT_USER=john", "BWAGENT_PROTOCOL=ssh", "BWAGENT_USAGE=10737418240", "BWAGENT_LIMIT=10737418240",
		"BWAGENT_STATUS=BLOCKED", "BWAGENT_REASON=Bandwidth Limit Reached"} {
		if !slices.Contains(env, kv) {
			t.Errorf("env lacks %s: %q", kv, env)
		}
	}
	if e := health.Env(); !slices.Contains(e, "BWAGENT_COMPONENT=xray api") || slices.ContainsFunc(e, func(s string) bool { return strings.HasPrefix(s, "BWAGENT_USER=") }) {
		t.Errorf("health env %q", e)
	}
	if e := th.Env(); !slices.Contains(e, "BWAGENT_THRESHOLD=80") {
		t.Errorf("threshold env %q", e)
	}

	if got, want := blockPayload().Text(), "[vpn-sg-1] john (ssh) blocked: Bandwidth Limit Reached\nusage 10.0 GiB of 10.0 GiB, BLOCKED"; got != want {
		t.Errorf("text %q, want %q", got, want)
	}
	if got, want := health.Text(), "[n] xray api failed: connection refused"; got != want {
		t.Errorf("text %q, want %q", got, want)
	}
	dev := payloadOf("p", "n", store.Event{ID: 10, Time: t0, Protocol: "vless", Name: "mary", Action: quota.ActDevice,
		Reason: quota.ReasonDevices + " (192.0.2.7)", Used: 5 << 20, Limit: 10 << 20, Status: "ACTIVE"})
	if got, want := dev.Text(), "[n] mary (vless) device cut: Device Limit Exceeded (192.0.2.7)\nusage 5.0 MiB of 10.0 MiB, ACTIVE"; got != want {
		t.Errorf("text %q, want %q", got, want)
	}
}

// The channels of a configuration: one per webhook and program, one per
// Telegram chat; keys stable and free of secrets; names free of secrets.
func TestChannels(t *testing.T) {
	c := config.Notify{
		Webhooks:  []config.Webhook{{URL: "https://user:pw@hooks.example.com/bw?token=s3cret", Secret: "x", Timeout: time.Second}},
		Execs:     []config.Exec{{Command: []string{"/bin/hook", "-v"}, Timeout: time.Second, Events: []string{"block"}}},
		Telegrams: []config.Telegram{{Token: "1:tok", Chats: []string{"5", "@chan"}, API: config.DefaultTelegramAPI, Timeout: time.Second}},
	}
	chs := Channels(c)
	var names, keys []string
	for _, ch := range chs {
		names, keys = append(names, ch.Name), append(keys, ch.Key)
	}
	if want := []string{"webhook https://hooks.example.com/bw", "exec /bin/hook -v", "telegram chat 5", "telegram chat @chan"}; !slices.Equal(names, want) {
		t.Errorf("names %q, want %q", names, want)
	}
	if len(slices.Compact(slices.Sorted(slices.Values(keys)))) != 4 {
		t.Errorf("keys repeat: %q", keys)
	}
	for _, k := range keys {
		if strings.Contains(k, "s3cret") || strings.Contains(k, "tok") || strings.Contains(k, "pw") {
			t.Errorf("key %q holds a secret", k)
		}
	}
	if again := Channels(c); again[2].Key != chs[2].Key {
		t.Error("keys are not stable")
	}
	c.Webhooks[0].Secret = "changed" // the same receiver
	if Channels(c)[0].Key != chs[0].Key {
		t.Error("a new secret made a new channel")
	}
	if !slices.Equal(chs[1].types(), []string{"block"}) || len(chs[0].types()) != len(config.EventTypes) {
		t.Errorf("types %v %v", chs[1].types(), chs[0].types())
	}
}

// A webhook request: JSON body, signature that verifies with the secret,
// timestamp, event and id headers.
func TestWebhook(t *testing.T) {
	type req struct {
		h    http.Header
		body []byte
	}
	got := make(chan req, 10)
	status := http.StatusNoContent
	var mu sync.Mutex
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- req{r.Header.Clone(), b}
		mu.Lock()
		st := status
		mu.Unlock()
		switch st {
		case http.StatusTooManyRequests:
			w.Header().Set("Retry-After", "120")
		case http.StatusFound:
			w.Header().Set("Location", "https://elsewhere.example/x?secret=1")
		}
		w.WriteHeader(st)
		io.WriteString(w, "quota exceeded\nmore")
	}))
	defer srv.Close()
	secret := "a long random string"
	w := NewWebhook(srv.URL+"/hook?key=k", secret)
	p := blockPayload()
	body, _ := json.Marshal(p)
	before := time.Now().Unix()
	if err := w.Send(context.Background(), p, body); err != nil {
		t.Fatal(err)
	}
	r := <-got
	if string(r.body) != string(body) || r.h.Get("Content-Type") != "application/json" || r.h.Get(HeaderEvent) != "block" ||
		r.h.Get(HeaderID) != "3f2a9c1e5b7d8a60-42" {
		t.Errorf("request %v %s", r.h, r.body)
	}
	// What a receiver does: HMAC-SHA256 of the body it got, compared in
	// constant time.
	if sig := r.h.Get(HeaderSignature); !hmac.Equal([]byte(sig), []byte(Sign([]byte(secret), r.body))) {
		t.Errorf("signature %q does not verify", sig)
	}
	if Sign([]byte("other"), r.body) == r.h.Get(HeaderSignature) {
		t.Error("signature verifies with another secret")
	}
	if ts, err := strconv.ParseInt(r.h.Get(HeaderTimestamp), 10, 64); err != nil || ts < before || ts > time.Now().Unix() {
		t.Errorf("timestamp %q", r.h.Get(HeaderTimestamp))
	}

	unsigned := NewWebhook(srv.URL, "")
	if err := unsigned.Send(context.Background(), p, body); err != nil {
		t.Fatal(err)
	}
	if r := <-got; r.h.Get(HeaderSignature) != "" {
		t.Error("unsigned webhook sent a signature")
	}

	for _, tc := range []struct {
		status int
		want   string
		after  time.Duration
	}{
		{http.StatusInternalServerError, "POST " + srv.URL + "/hook: refused: HTTP 500 Internal Server Error: quota exceeded", 0},
		{http.StatusTooManyRequests, "POST " + srv.URL + "/hook: refused: HTTP 429 Too Many Requests: quota exceeded", 2 * time.Minute},
		{http.StatusFound, "POST " + srv.URL + "/hook: refused: HTTP 302 Found (to https://elsewhere.example/x: redirects are not followed; set the url to where it leads)", 0},
	} {
		mu.Lock()
		status = tc.status
		mu.Unlock()
		err := w.Send(context.Background(), p, body)
		<-got
		var re *RetryError
		if err == nil || err.Error() != tc.want || !errors.Is(err, ErrRefused) || errors.As(err, &re) != (tc.after > 0) || (re != nil && re.After != tc.after) {
			t.Errorf("HTTP %d: %v (retry %+v), want %s", tc.status, err, re, tc.want)
		}
	}

	// Unreachable: the error names the URL without its secrets.
	srv.Close()
	err := NewWebhook("http://user:pw@"+srv.Listener.Addr().String()+"/x?key=k", "").Send(context.Background(), p, body)
	if err == nil || strings.Contains(err.Error(), "pw") || strings.Contains(err.Error(), "key=") || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("unreachable: %v", err)
	}
}

// Telegram's sendMessage, against a local stand-in of the Bot API: the
// token in the path, the chat id as a number (or "@name"), the text; its
// errors without the token.
func TestTelegram(t *testing.T) {
	type msg struct {
		path string
		body map[string]any
	}
	got := make(chan msg, 10)
	answer := `{"ok":true,"result":{"message_id":1}}`
	code := http.StatusOK
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var m map[string]any
		json.NewDecoder(r.Body).Decode(&m)
		got <- msg{r.URL.Path, m}
		w.WriteHeader(code)
		io.WriteString(w, answer)
	}))
	defer srv.Close()
	p := blockPayload()
	for _, chat := range []string{"-1001234567890", "@vpn_alerts"} {
		if err := NewTelegram(srv.URL+"/", "123:secret-token", chat).Send(context.Background(), p, nil); err != nil {
			t.Fatal(err)
		}
		m := <-got
		var wantChat any = chat
		if chat[0] != '@' {
			wantChat = -1001234567890.0 // a JSON number
		}
		if m.path != "/bot123:secret-token/sendMessage" || m.body["chat_id"] != wantChat || m.body["text"] != p.Text() {
			t.Errorf("request %+v", m)
		}
	}
	answer, code = `{"ok":false,"error_code":429,"description":"Too Many Requests: retry after 7","parameters":{"retry_after":7}}`, 429
	err := NewTelegram(srv.URL, "123:secret-token", "5").Send(context.Background(), p, nil)
	<-got
	var re *RetryError
	if !errors.As(err, &re) || re.After != 7*time.Second || !errors.Is(err, ErrRefused) ||
		err.Error() != "telegram sendMessage to chat 5: refused: 429 Too Many Requests: retry after 7" {
		t.Errorf("429: %v", err)
	}
	answer, code = `{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}`, 400
	err = NewTelegram(srv.URL, "123:secret-token", "5").Send(context.Background(), p, nil)
	<-got
	if err == nil || errors.As(err, &re) || err.Error() != "telegram sendMessage to chat 5: refused: 400 Bad Request: chat not found" {
		t.Errorf("400: %v", err)
	}
	srv.Close()
	err = NewTelegram(srv.URL, "123:secret-token", "5").Send(context.Background(), p, nil)
	if err == nil || strings.Contains(err.Error(), "secret-token") {
		t.Errorf("unreachable: %v", err)
	}
}

// A program gets the event on standard input and in its environment; exit
// status 0 delivers, another fails with its last line of output.
func TestExec(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "hook.sh")
	os.WriteFile(script, []byte(`#!/bin/sh
cat > "$1/stdin"
env | grep '^BWAGENT_' | sort > "$1/env"
pwd > "$1/pwd"
if [ "$BWAGENT_USER" = fail ]; then echo "first"; echo "no such user" >&2; exit 3; fi
`), 0o755)
	t.Setenv("BWAGENT_STALE", "from the agent's own environment")
	x := NewExec([]string{script, dir})
	p := blockPayload()
	body, _ := json.Marshal(p)
	if err := x.Send(context.Background(), p, body); err != nil {
		t.Fatal(err)
	}
	stdin, _ := os.ReadFile(filepath.Join(dir, "stdin"))
	if string(stdin) != string(body)+"\n" {
		t.Errorf("stdin %q", stdin)
	}
	env, _ := os.ReadFile(filepath.Join(dir, "env"))
	want := p.Env()
	slices.Sort(want)
	if got := strings.Split(strings.TrimSpace(string(env)), "\n"); !slices.Equal(got, want) {
		t.Errorf("environment\n got %q\nwant %q", got, want)
	}
	if wd, _ := os.ReadFile(filepath.Join(dir, "pwd")); string(wd) != "/\n" {
		t.Errorf("working directory %q", wd)
	}
	p.User.Name = "fail"
	err := x.Send(context.Background(), p, body)
	if err == nil || !errors.Is(err, ErrRefused) || err.Error() != "exec "+script+": refused: exit status 3: no such user" {
		t.Errorf("failing program: %v", err)
	}
	if err := NewExec([]string{filepath.Join(dir, "missing")}).Send(context.Background(), p, body); err == nil {
		t.Error("a missing program delivered")
	}
}

// A program that outlives its timeout is killed with its process group (a
// child it started too), and Send returns at once.
func TestExecTimeout(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "hang.sh")
	os.WriteFile(script, []byte(`#!/bin/sh
sleep 600 &
echo $! > "$1/child"
echo $$ > "$1/pid"
sleep 600
`), 0o755)
	st := openStore(t)
	o := fastOptions(st, Channel{Key: "exec:hang", Name: "exec hang", Timeout: 300 * time.Millisecond, Sender: NewExec([]string{script, dir})})
	o.Backoff = func(int) time.Duration { return time.Hour }
	n, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	add(t, st, time.Now(), quota.ActBlock)
	begin := time.Now()
	start(t, n)
	eventually(t, "the timeout", func() bool { return n.Status()[0].Attempts == 1 })
	if d := time.Since(begin); d > 3*time.Second {
		t.Errorf("attempt took %s with a 300ms timeout", d)
	}
	s := n.Status()[0]
	if !strings.HasPrefix(s.LastError, "timed out after 300ms: exec "+script+": killed with its process group") {
		t.Errorf("status %+v", s)
	}
	for _, f := range []string{"pid", "child"} {
		data, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		pid, _ := strconv.Atoi(strings.TrimSpace(string(data)))
		eventually(t, f+" gone", func() bool {
			// Gone, or a zombie waiting for its parent (init).
			stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
			return err != nil || strings.Contains(string(stat), ") Z ")
		})
		if err := syscall.Kill(pid, 0); err == nil {
			if stat, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); !strings.Contains(string(stat), ") Z ") {
				t.Errorf("%s %d still runs", f, pid)
			}
		}
	}
}
