package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/myvpn/bwagent/config"
	"github.com/myvpn/bwagent/internal/nettest"
	"github.com/myvpn/bwagent/quota"
	"github.com/myvpn/bwagent/store"
)

// receiver is a local webhook receiver and Telegram Bot API stand-in, as an
// operator's would be: it verifies each webhook's signature and
// deduplicates on the event id.
type receiver struct {
	secret, token string

	mu       sync.Mutex
	hooks    map[string][]byte   // event id → body, the first received
	dups     int                 // webhooks with an id already received
	mismatch []string            // ids received twice with different bodies
	badSig   []string            // bodies whose signature did not verify
	chats    map[string][]string // chat id → message texts
	badTG    []string            // requests to the wrong path or without a chat
	slowed   bool                // the first enable was answered too late
}

func (r *receiver) hook(w http.ResponseWriter, req *http.Request) {
	body, _ := io.ReadAll(req.Body)
	m := hmac.New(sha256.New, []byte(r.secret))
	m.Write(body)
	want := "sha256=" + hex.EncodeToString(m.Sum(nil))
	var ev struct{ ID, Type string }
	json.Unmarshal(body, &ev)
	r.mu.Lock()
	defer r.mu.Unlock()
	if ev.Type == "enable" && !r.slowed {
		// Taken, but answered after the agent's timeout (2s): the agent
		// sends it again, a duplicate with the same id.
		r.slowed = true
		r.hooks[ev.ID] = body
		r.mu.Unlock()
		time.Sleep(3 * time.Second)
		r.mu.Lock()
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if !hmac.Equal([]byte(req.Header.Get("X-Bwagent-Signature")), []byte(want)) || req.Header.Get("X-Bwagent-Timestamp") == "" {
		r.badSig = append(r.badSig, string(body))
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	if prev, ok := r.hooks[ev.ID]; ok {
		r.dups++
		if string(prev) != string(body) {
			r.mismatch = append(r.mismatch, ev.ID)
		}
	} else {
		r.hooks[ev.ID] = body
	}
	w.WriteHeader(http.StatusNoContent)
}

func (r *receiver) telegram(w http.ResponseWriter, req *http.Request) {
	var m struct {
		ChatID json.Number `json:"chat_id"`
		Text   string      `json:"text"`
	}
	d := json.NewDecoder(req.Body)
	d.UseNumber()
	err := d.Decode(&m)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil || req.URL.Path != "/bot"+r.token+"/sendMessage" || m.ChatID == "" {
		r.badTG = append(r.badTG, req.URL.Path)
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, `{"ok":false,"error_code":404,"description":"Not Found"}`)
		return
	}
	r.chats[string(m.ChatID)] = append(r.chats[string(m.ChatID)], m.Text)
	io.WriteString(w, `{"ok":true,"result":{"message_id":1}}`)
}

// payload returns the webhook body received for id, decoded.
func (r *receiver) payload(id string) map[string]any {
	r.mu.Lock()
	defer r.mu.Unlock()
	var m map[string]any
	json.Unmarshal(r.hooks[id], &m)
	return m
}

// server is an HTTP server on 127.0.0.1 in a network namespace that can be
// taken down and brought up again on the same port.
type server struct {
	t       *testing.T
	ns      netns.NsHandle
	handler http.Handler
	port    int
	srv     *http.Server
}

func (s *server) up() {
	s.t.Helper()
	var ln net.Listener
	// The socket is made in the namespace and stays in it, whichever
	// thread serves it.
	err := nettest.Do(s.ns, func() (err error) {
		ln, err = net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(s.port))
		return err
	})
	if err != nil {
		s.t.Fatal(err)
	}
	s.port = ln.Addr().(*net.TCPAddr).Port
	s.srv = &http.Server{Handler: s.handler}
	go s.srv.Serve(ln)
}

func (s *server) down() { s.srv.Close() }

func serveIn(t *testing.T, ns netns.NsHandle, h http.HandlerFunc) *server {
	s := &server{t: t, ns: ns, handler: h}
	s.up()
	t.Cleanup(func() { s.srv.Close() })
	return s
}

// notifiable returns the ids (as receivers see them) and actions of the
// events in the agent's state database that are notified.
func (e *agentEnv) notifiable(t *testing.T) (ids []string, actions map[string]string) {
	t.Helper()
	st, err := store.Open(filepath.Join(e.dir, "state.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	prefix, err := st.EventIDPrefix()
	if err != nil {
		t.Fatal(err)
	}
	es, err := st.Events("", 0)
	if err != nil {
		t.Fatal(err)
	}
	actions = map[string]string{}
	for _, ev := range slices.Backward(es) {
		if slices.Contains(config.EventTypes, ev.Action) {
			id := prefix + "-" + strconv.FormatInt(ev.ID, 10)
			ids = append(ids, id)
			actions[id] = ev.Action + " " + ev.Name
		}
	}
	return ids, actions
}

// TestNotifySurvivesKill: a real agent with a webhook and a Telegram bot
// of two chats, a real user blocked by real traffic. The block reaches the
// webhook, signed, and both chats. Then both receivers go down, events
// happen (a reset and an unblock, a disable and an enable), the agent is
// killed with SIGKILL and restarted (one more event) while they are down.
// Once they are back, every event of the state database reaches the
// webhook and both chats: none lost, and a duplicate only ever with the
// same id and body (the webhook answers one event after the agent's
// timeout, so the agent sends it again).
func TestNotifySurvivesKill(t *testing.T) {
	const john, mary, server = 2751, 2752, 2753
	e := newAgentEnv(t, fmt.Sprintf("john:x:%d:%d::/:/bin/false\nmary:x:%d:%d::/:/bin/false\n", john, john, mary, mary), "john 4\n")
	r := &receiver{secret: "a long random string", token: "123456:test-token", hooks: map[string][]byte{}, chats: map[string][]string{}}
	hook := serveIn(t, e.pair.A, r.hook)
	tg := serveIn(t, e.pair.A, r.telegram)
	conf, _ := os.ReadFile(e.conf)
	conf = fmt.Appendf(conf, `
[notify]
node = "test-node"

[[notify.webhook]]
url = "http://127.0.0.1:%d/hook"
secret = %q
timeout = "2s"

[[notify.telegram]]
token = %q
chats = [111, -222]
api = "http://127.0.0.1:%d"
timeout = "2s"
`, hook.port, r.secret, r.token, tg.port)
	os.WriteFile(e.conf, conf, 0o644)

	srv := nettest.Start(t, nettest.Spec{NS: e.pair.B, Cgroup: e.cg, UID: server}, "tcp-serve", net.JoinHostPort(e.pair.B4.String(), "0"))
	addr := strings.Fields(srv.Expect(t, "ADDR", 5*time.Second))[1]
	a := e.start(t)
	client := nettest.Start(t, nettest.Spec{NS: e.pair.A, Cgroup: e.cg, UID: john}, "tcp-client", addr, "inf", "inf")
	client.Expect(t, "CONNECTED", 5*time.Second)

	// The block, by real traffic.
	var block map[string]any
	waitFor(t, 20*time.Second, "the block's webhook", func() bool {
		r.mu.Lock()
		ids := slices.Collect(func(yield func(string) bool) {
			for id := range r.hooks {
				if !yield(id) {
					return
				}
			}
		})
		r.mu.Unlock()
		for _, id := range ids {
			if p := r.payload(id); p["type"] == "block" {
				block = p
				return true
			}
		}
		return false
	})
	user, _ := block["user"].(map[string]any)
	if block["node"] != "test-node" || !regexp.MustCompile(`^[0-9a-f]{16}-[0-9]+$`).MatchString(fmt.Sprint(block["id"])) ||
		user["name"] != "john" || user["protocol"] != "ssh" || user["limit"] != float64(4<<20) || user["status"] != "BLOCKED" ||
		user["reason"] != quota.ReasonLimit || user["usage"].(float64) < float64(4<<20-64<<10) {
		t.Errorf("block payload %v", block)
	}
	waitFor(t, 10*time.Second, "the block in both chats", func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, chat := range []string{"111", "-222"} {
			if !slices.ContainsFunc(r.chats[chat], func(s string) bool {
				return strings.HasPrefix(s, "[test-node] john (ssh) blocked: Bandwidth Limit Reached\nusage ")
			}) {
				return false
			}
		}
		return true
	})

	// Receivers down; events meanwhile; SIGKILL.
	hook.down()
	tg.down()
	ctx := context.Background()
	c := e.dial(t)
	if err := c.Reset(ctx, "john"); err != nil { // reset, unblock, and soon a new block
		t.Fatal(err)
	}
	if err := c.Disable(ctx, "mary"); err != nil {
		t.Fatal(err)
	}
	if err := c.Enable(ctx, "mary"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "failed attempts in bwctl status", func() bool {
		h, err := c.Status(ctx)
		if err != nil || len(h.Notify) != 3 {
			return false
		}
		for _, ch := range h.Notify {
			if ch.Attempts == 0 || ch.Backlog == 0 || !strings.Contains(ch.LastError, "connection refused") {
				return false
			}
		}
		return true
	})
	if err := a.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	a.Wait(5 * time.Second)

	a = e.start(t)
	c2 := e.dial(t)
	if err := c2.Disable(ctx, "mary"); err != nil {
		t.Fatal(err)
	}
	client.Cmd.Process.Kill() // no more traffic: the set of events stops growing
	client.Wait(5 * time.Second)
	time.Sleep(1500 * time.Millisecond)

	// Receivers back: everything arrives.
	hook.up()
	tg.up()
	want, actions := e.notifiable(t)
	waitFor(t, 90*time.Second, "every event delivered", func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, id := range want {
			if _, ok := r.hooks[id]; !ok {
				return false
			}
		}
		return len(r.chats["111"]) >= len(want) && len(r.chats["-222"]) >= len(want)
	})
	a.Cmd.Process.Signal(syscall.SIGTERM)
	if err := a.Wait(10 * time.Second); err != nil {
		t.Fatalf("agent exit: %v", err)
	}

	final, actions2 := e.notifiable(t)
	for id, act := range actions2 {
		actions[id] = act
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var missing []string
	for _, id := range final {
		if _, ok := r.hooks[id]; !ok {
			missing = append(missing, id+" "+actions[id])
		}
	}
	if len(missing) > 0 {
		t.Errorf("events never delivered to the webhook: %q", missing)
	}
	for id := range r.hooks {
		if !slices.Contains(final, id) {
			t.Errorf("webhook got event %s, which is not in the state database", id)
		}
	}
	if r.dups == 0 {
		t.Error("no duplicate: the enable answered too late was not sent again")
	}
	if len(r.mismatch) > 0 || len(r.badSig) > 0 || len(r.badTG) > 0 {
		t.Errorf("duplicates with other bodies %q, bad signatures %q, bad Telegram requests %q", r.mismatch, r.badSig, r.badTG)
	}
	kinds := map[string]int{}
	for _, id := range final {
		kinds[actions[id]]++
	}
	for _, need := range []string{"block john", "reset john", "unblock john", "disable mary", "enable mary"} {
		if kinds[need] == 0 {
			t.Errorf("no %q event in the state database: %v", need, kinds)
		}
	}
	if kinds["disable mary"] != 2 {
		t.Errorf("events %v: want 2 disables of mary", kinds)
	}
	// Each chat has a message for every event (the Bot API has no ids to
	// deduplicate on: as many or more).
	verbs := map[string]string{"block": "blocked", "unblock": "unblocked", "disable": "disabled", "enable": "enabled", "reset": "reset"}
	for _, chat := range []string{"111", "-222"} {
		for kind, n := range kinds {
			action, name, _ := strings.Cut(kind, " ")
			verb := verbs[action]
			if verb == "" {
				verb = action
			}
			prefix := fmt.Sprintf("[test-node] %s (ssh) %s: ", name, verb)
			got := 0
			for _, m := range r.chats[chat] {
				if strings.HasPrefix(m, prefix) {
					got++
				}
			}
			if got < n {
				t.Errorf("chat %s: %d messages %q..., want at least %d", chat, got, prefix, n)
			}
		}
	}
	t.Logf("%d events, %d webhook duplicates, chats got %d and %d messages", len(final), r.dups, len(r.chats["111"]), len(r.chats["-222"]))
}

// waitFor polls ok every 100 ms until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(timeout); !ok(); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
	}
}

// TestNotifyExecHook: a real agent runs a program per event with the event
// in its environment and on its standard input; a program that hangs is
// killed with its process group at its timeout, and the agent's loop ticks
// and answers commands all the while. A reload that drops the hanging
// program keeps the other's progress.
func TestNotifyExecHook(t *testing.T) {
	e := newAgentEnv(t, "john:x:2761:2761::/:/bin/false\n", "john 100\n")
	out := filepath.Join(e.dir, "hooks")
	os.Mkdir(out, 0o700)
	record := filepath.Join(e.dir, "record.sh")
	os.WriteFile(record, []byte(`#!/bin/sh
cat > "$1/$BWAGENT_EVENT_ID.json"
env | grep '^BWAGENT_' | sort > "$1/$BWAGENT_EVENT_ID.env"
`), 0o755)
	hang := filepath.Join(e.dir, "hang.sh")
	os.WriteFile(hang, []byte(`#!/bin/sh
sleep 600 &
echo $! > "$1/child"
echo $$ > "$1/pid"
sleep 600
`), 0o755)
	conf, _ := os.ReadFile(e.conf)
	base := string(conf) + "\n[notify]\nnode = \"test-node\"\n\n" +
		fmt.Sprintf("[[notify.exec]]\ncommand = [%q, %q]\ntimeout = \"10s\"\n", record, out)
	os.WriteFile(e.conf, []byte(base+fmt.Sprintf("\n[[notify.exec]]\ncommand = [%q, %q]\ntimeout = \"4s\"\nevents = [\"disable\"]\n", hang, out)), 0o644)
	a := e.start(t)
	ctx := context.Background()
	c := e.dial(t)
	if err := c.Disable(ctx, "john"); err != nil {
		t.Fatal(err)
	}

	// The recording program got the disable.
	var envFile string
	waitFor(t, 10*time.Second, "the recording program", func() bool {
		m, _ := filepath.Glob(filepath.Join(out, "*.env"))
		if len(m) == 1 {
			envFile = m[0]
		}
		return len(m) == 1
	})
	id := strings.TrimSuffix(filepath.Base(envFile), ".env")
	time.Sleep(100 * time.Millisecond) // the program finishes writing
	env, _ := os.ReadFile(envFile)
	for _, kv := range []string{"BWAGENT_EVENT_ID=" + id, "BWAGENT_EVENT_TYPE=disable", "BWAGENT_NODE=test-node", "BWAGENT_USER=john",
		"BWAGENT_PROTOCOL=ssh", "BWAGENT_LIMIT=104857600", "BWAGENT_STATUS=DISABLED", "BWAGENT_REASON=Disabled by administrator", "BWAGENT_USAGE=0"} {
		if !slices.Contains(strings.Split(string(env), "\n"), kv) {
			t.Errorf("environment lacks %s:\n%s", kv, env)
		}
	}
	var in map[string]any
	data, _ := os.ReadFile(filepath.Join(out, id+".json"))
	if err := json.Unmarshal(data, &in); err != nil || in["id"] != id || in["type"] != "disable" || in["node"] != "test-node" {
		t.Errorf("standard input %s: %v", data, err)
	}

	// The hanging program: the loop goes on meanwhile.
	var pid int
	waitFor(t, 10*time.Second, "the hanging program", func() bool {
		if _, err := os.Stat(filepath.Join(out, "child")); err != nil {
			return false
		}
		b, _ := os.ReadFile(filepath.Join(out, "pid"))
		pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		return pid > 0
	})
	h1, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := c.Enable(ctx, "john"); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("a command took %s while a program hung", d)
	}
	time.Sleep(2500 * time.Millisecond)
	h2, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if syscall.Kill(pid, 0) != nil {
		t.Fatal("the hanging program ended before its timeout: nothing shown")
	}
	if h2.Ticks < h1.Ticks+2 {
		t.Errorf("ticks went from %d to %d in 2.5 s while a program hung", h1.Ticks, h2.Ticks)
	}
	waitFor(t, 10*time.Second, "the timeout", func() bool {
		h, err := c.Status(ctx)
		return err == nil && len(h.Notify) == 2 && h.Notify[1].Attempts > 0 &&
			strings.HasPrefix(h.Notify[1].LastError, "timed out after 4s: exec "+hang+": killed with its process group")
	})
	for _, f := range []string{"pid", "child"} {
		b, _ := os.ReadFile(filepath.Join(out, f))
		p, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		waitFor(t, 5*time.Second, f+" killed", func() bool {
			stat, err := os.ReadFile("/proc/" + strconv.Itoa(p) + "/stat")
			return err != nil || strings.Contains(string(stat), ") Z ")
		})
	}
	h, _ := c.Status(ctx)
	if h.Notify[0].Name != "exec "+record+" "+out || h.Notify[0].Delivered < 2 || h.Notify[0].Attempts != 0 || h.Notify[1].Delivered != 0 {
		t.Errorf("channels %+v", h.Notify)
	}

	// Reloaded without the hanging program.
	os.WriteFile(e.conf, []byte(base), 0o644)
	a.Cmd.Process.Signal(syscall.SIGHUP)
	a.Expect(t, `level=INFO msg="configuration reloaded"`, 10*time.Second)
	if err := c.Disable(ctx, "john"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the program after the reload", func() bool {
		h, err := c.Status(ctx)
		return err == nil && len(h.Notify) == 1 && h.Notify[0].Delivered == 3
	})
	a.Cmd.Process.Signal(syscall.SIGTERM)
	if err := a.Wait(10 * time.Second); err != nil {
		t.Errorf("exit: %v", err)
	}
}
