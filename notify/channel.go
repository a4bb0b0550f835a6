package notify

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"github.com/myvpn/bwagent/config"
)

// Errors of the channels.
var (
	// ErrTimeout means an attempt outlived its channel's timeout: the
	// request was abandoned, or the program killed with its process group.
	ErrTimeout = errors.New("timed out")
	// ErrRefused means the receiver answered, and refused the event: a
	// non-2xx HTTP status, a Telegram error, a non-zero exit status.
	ErrRefused = errors.New("refused")
)

// Sender sends one event to one receiver. body is p as JSON. Send must
// return soon after ctx is done; it is never called concurrently for the
// same channel.
type Sender interface {
	Send(ctx context.Context, p *Payload, body []byte) error
}

// RetryError is a failed attempt whose receiver said when to try again (an
// HTTP Retry-After, Telegram's retry_after): the channel waits at least
// After.
type RetryError struct {
	After time.Duration
	Err   error
}

// Error returns e.Err's message.
func (e *RetryError) Error() string { return e.Err.Error() }

// Unwrap returns e.Err.
func (e *RetryError) Unwrap() error { return e.Err }

// Channel is one receiver and how to send it events.
type Channel struct {
	// Key identifies the channel in the state database across restarts:
	// its kind and a hash of what identifies its receiver.
	Key string
	// Name is shown in bwctl status and reports: its kind and receiver,
	// without secrets.
	Name string
	// Types are the event types it is sent; empty is all of
	// config.EventTypes.
	Types []string
	// Timeout bounds each attempt.
	Timeout time.Duration
	Sender  Sender
}

// Channels returns the channels of a configuration, in its order: each
// webhook, each program, and each chat of each Telegram bot.
func Channels(c config.Notify) []Channel {
	var chs []Channel
	for _, w := range c.Webhooks {
		chs = append(chs, Channel{Key: key("webhook", w.URL), Name: "webhook " + redactURL(w.URL), Types: w.Events,
			Timeout: w.Timeout, Sender: NewWebhook(w.URL, w.Secret)})
	}
	for _, x := range c.Execs {
		chs = append(chs, Channel{Key: key("exec", x.Command...), Name: "exec " + strings.Join(x.Command, " "), Types: x.Events,
			Timeout: x.Timeout, Sender: NewExec(x.Command)})
	}
	for _, g := range c.Telegrams {
		for _, chat := range g.Chats {
			name := "telegram chat " + chat
			if g.API != config.DefaultTelegramAPI {
				name += " via " + redactURL(g.API)
			}
			chs = append(chs, Channel{Key: key("telegram", g.API, g.Token, chat), Name: name, Types: g.Events,
				Timeout: g.Timeout, Sender: NewTelegram(g.API, g.Token, chat)})
		}
	}
	return chs
}

// key returns a channel's key: its kind, ':', and the start of the SHA-256
// of what identifies it (which may hold secrets: a token, a URL's query).
func key(kind string, identity ...string) string {
	h := sha256.New()
	for _, s := range identity {
		h.Write([]byte(s))
		h.Write([]byte{0})
	}
	return kind + ":" + hex.EncodeToString(h.Sum(nil)[:12])
}

// types returns the event types a channel is sent.
func (c *Channel) types() []string {
	if len(c.Types) == 0 {
		return slices.Clone(config.EventTypes)
	}
	return c.Types
}

// redactURL returns u without its user information, query and fragment,
// which may hold secrets.
func redactURL(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		return "(unparsable URL)"
	}
	p.User, p.RawQuery, p.ForceQuery, p.Fragment = nil, "", false, ""
	return p.String()
}

// httpClient returns a client for one channel: the default transport's
// settings (proxies from the environment), no redirects followed (a POST
// redirected would be re-sent as a GET, or not at all).
func httpClient() *http.Client {
	return &http.Client{
		Transport:     http.DefaultTransport.(*http.Transport).Clone(),
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// requestError describes a failed HTTP request to target (a name without
// secrets), keeping only the cause of a *url.Error, whose message would
// repeat the URL.
func requestError(target string, err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return fmt.Errorf("%s: %w", target, err)
}

// retryAfter parses an HTTP Retry-After of whole seconds; 0 if none.
func retryAfter(h http.Header) time.Duration {
	var s int
	if _, err := fmt.Sscanf(h.Get("Retry-After"), "%d", &s); err != nil || s <= 0 {
		return 0
	}
	return time.Duration(min(s, 24*3600)) * time.Second
}
