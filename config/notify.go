package config

import (
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/myvpn/bwagent/quota"
)

// Notify configures notifications: which events the agent records to
// notify (thresholds, expiry), how long an event is retried, and the
// channels it is sent to. Every channel gets every event of its Events
// (all when empty), at least once.
type Notify struct {
	// Node names this server in notifications; "" (the default) is its
	// host name. At most 64 characters.
	Node string
	// Thresholds are the shares of a limit, in percent, whose crossing is
	// notified once per usage period (a reset starts a new one): whole
	// numbers from 1 to 99, ascending. Default [80, 90]; none: off.
	Thresholds []int
	// ExpiryDays is how many days before a user's expiry date it is
	// notified, once per date; 0 is never. Default 3, at most 3650.
	ExpiryDays uint32
	// MaxAge is how long an event is retried: one older is given up (and
	// counted) instead of sent. From MinMaxAge to MaxMaxAge; default 24h.
	MaxAge time.Duration

	Webhooks  []Webhook  // [[notify.webhook]]
	Execs     []Exec     // [[notify.exec]]
	Telegrams []Telegram // [[notify.telegram]]
}

// Webhook is a URL each event is POSTed to as JSON.
type Webhook struct {
	// URL is an http or https URL; it identifies the channel, so a
	// changed URL is a new channel (sent the events from then on).
	URL string
	// Secret signs each request (HMAC-SHA256 of the body); "" sends
	// them unsigned.
	Secret string
	// Timeout bounds each request, 1s to 5m. Default 10s.
	Timeout time.Duration
	// Events are the event types sent (EventTypes); empty is all.
	Events []string
}

// Exec is a program run once per event, with the event in its environment
// and as JSON on its standard input.
type Exec struct {
	// Command is the program, an absolute path, and its arguments; it
	// identifies the channel.
	Command []string
	// Timeout bounds each run, 1s to 1h: the program and its process
	// group are killed then. Default 30s.
	Timeout time.Duration
	// Events are the event types sent (EventTypes); empty is all.
	Events []string
}

// Telegram is a Telegram bot that sends each event to chats.
type Telegram struct {
	// Token is the bot's token from @BotFather, "123456:ABC...".
	Token string
	// Chats are chat ids (integers) or public channel names ("@name"):
	// each is a channel of its own.
	Chats []string
	// API is the Bot API's base URL. Default DefaultTelegramAPI.
	API string
	// Timeout bounds each request, 1s to 5m. Default 10s.
	Timeout time.Duration
	// Events are the event types sent (EventTypes); empty is all.
	Events []string
}

// DefaultTelegramAPI is Telegram.API's default: Telegram's public Bot API.
const DefaultTelegramAPI = "https://api.telegram.org"

// Bounds of Notify.MaxAge.
const (
	MinMaxAge = time.Minute
	MaxMaxAge = 30 * 24 * time.Hour
)

// EventTypes are the types of the events the agent notifies, as a
// channel's events key names them: a user blocked (or throttled at the
// limit instead), unblocked, disabled,
// enabled or reset; a threshold of usage crossed; an expiry coming; a
// device over a user's device limit cut; a part of the agent failed or
// recovered.
var EventTypes = []string{
	quota.ActBlock, quota.ActThrottle, quota.ActUnblock, quota.ActDisable, quota.ActEnable, quota.ActReset,
	quota.ActThreshold, quota.ActExpiring, quota.ActDevice, quota.ActFailed, quota.ActRecovered,
}

func defaultNotify() Notify {
	return Notify{Thresholds: []int{80, 90}, ExpiryDays: 3, MaxAge: 24 * time.Hour}
}

func defaultWebhook() Webhook   { return Webhook{Timeout: 10 * time.Second} }
func defaultExec() Exec         { return Exec{Timeout: 30 * time.Second} }
func defaultTelegram() Telegram { return Telegram{API: DefaultTelegramAPI, Timeout: 10 * time.Second} }

// normal returns n with empty lists as nil, for Equal; the tables are
// copies.
func (n Notify) normal() Notify {
	nilIfEmpty(&n.Thresholds)
	n.Webhooks = slices.Clone(n.Webhooks)
	for i := range n.Webhooks {
		nilIfEmpty(&n.Webhooks[i].Events)
	}
	n.Execs = slices.Clone(n.Execs)
	for i := range n.Execs {
		nilIfEmpty(&n.Execs[i].Command)
		nilIfEmpty(&n.Execs[i].Events)
	}
	n.Telegrams = slices.Clone(n.Telegrams)
	for i := range n.Telegrams {
		nilIfEmpty(&n.Telegrams[i].Chats)
		nilIfEmpty(&n.Telegrams[i].Events)
	}
	nilIfEmpty(&n.Webhooks)
	nilIfEmpty(&n.Execs)
	nilIfEmpty(&n.Telegrams)
	return n
}

var notifyTableDefs = []tableDef{
	{"notify", `Notifications: events are kept in the state database in the same
transaction as the change that caused them, and delivered to each channel
below at least once and in order, retried with backoff (across restarts)
until they are older than max_age. Each carries an id to deduplicate on.`},
}

var notifyKeyDefs = []*keyDef{
	stringKey("notify.node", `This server's name in notifications; "" is its host name.`,
		func(c *Config) *string { return &c.Notify.Node }, func(s string) error {
			if len(s) > 64 || !utf8.ValidString(s) || strings.ContainsFunc(s, unicode.IsControl) {
				return invalidf("must be at most 64 characters, none a control character, got %q", s)
			}
			return nil
		}),
	{
		path: "notify.thresholds",
		doc: `Usage crossing each of these shares of a user's limit (percent, 1 to 99,
ascending) is notified once per usage period: a reset starts a new one.
[] is none.`,
		value: func(c *Config) string {
			s := make([]string, len(c.Notify.Thresholds))
			for i, t := range c.Notify.Thresholds {
				s[i] = strconv.Itoa(t)
			}
			return "[" + strings.Join(s, ", ") + "]"
		},
		set: func(c *Config, v any) error {
			a, ok := v.([]any)
			if !ok {
				return invalidf("must be an array of percentages, got %s", describe(v))
			}
			var ts []int // nil if empty
			for _, e := range a {
				n, ok := e.(int64)
				if !ok {
					return invalidf("must be an array of whole percentages, got %s in it", describe(e))
				}
				if n < 1 || n > 99 {
					return invalidf("must be percentages from 1 to 99, got %d", n)
				}
				ts = append(ts, int(n))
			}
			c.Notify.Thresholds = ts
			return nil
		},
		check: func(c *Config) error {
			for i, t := range c.Notify.Thresholds {
				if t < 1 || t > 99 {
					return invalidf("must be percentages from 1 to 99, got %d", t)
				}
				if i > 0 && t <= c.Notify.Thresholds[i-1] {
					return invalidf("must be in ascending order without repeats, got %d after %d", t, c.Notify.Thresholds[i-1])
				}
			}
			return nil
		},
	},
	uint32Key("notify.expiry_days", "A user's expiry date (expires= in the limits file) is notified this many\ndays before it, once per date; 0 is never. At most 3650.",
		func(c *Config) *uint32 { return &c.Notify.ExpiryDays }, func(n int64) error {
			if n < 0 || n > 3650 {
				return invalidf("must be from 0 to 3650, got %d", n)
			}
			return nil
		}),
	durationKey("notify.max_age", `An event not delivered to a channel within this time is given up for it
(and counted in bwctl status), from 1m to 30d.`,
		func(c *Config) *time.Duration { return &c.Notify.MaxAge }, durationRange(MinMaxAge, MaxMaxAge)),
}

var arrayDefs = []*arrayDef{
	{
		path: "notify.webhook",
		doc: `Webhooks, any number: each event is POSTed to url as JSON. With a secret,
the header X-Bwagent-Signature is "sha256=" and the hex HMAC-SHA256 of the
body under it, and X-Bwagent-Timestamp the Unix time of the request. A
2xx answer delivers it; anything else is retried. timeout bounds a
request (1s to 5m); events lists the types sent (block, unblock, disable,
enable, reset, threshold, expiring, device, failed, recovered; [] is all).
The url identifies the channel: a new url starts from the events after it.`,
		len: func(c *Config) int { return len(c.Notify.Webhooks) },
		add: func(c *Config) { c.Notify.Webhooks = append(c.Notify.Webhooks, defaultWebhook()) },
		keys: func(i int) []*keyDef {
			w := func(c *Config) *Webhook { return &c.Notify.Webhooks[i] }
			return []*keyDef{
				stringKey("url", "", func(c *Config) *string { return &w(c).URL }, checkURL),
				stringKey("secret", "", func(c *Config) *string { return &w(c).Secret }, func(string) error { return nil }),
				durationKey("timeout", "", func(c *Config) *time.Duration { return &w(c).Timeout }, durationRange(time.Second, 5*time.Minute)),
				eventsKey(func(c *Config) *[]string { return &w(c).Events }),
			}
		},
		check: func(c *Config, i int) (string, error) {
			ws := c.Notify.Webhooks
			if ws[i].URL == "" {
				return "url", invalidf(`must be set, such as "https://hooks.example.com/bwagent"`)
			}
			for j := range i {
				if ws[j].URL == ws[i].URL {
					return "url", invalidf("must differ from notify.webhook[%d].url, got the same %q", j+1, ws[i].URL)
				}
			}
			return "", nil
		},
		sample: func(c *Config) {
			w := defaultWebhook()
			w.URL, w.Secret, w.Events = "https://hooks.example.com/bwagent", "a long random string", []string{"block", "unblock"}
			c.Notify.Webhooks = append(c.Notify.Webhooks, w)
		},
	},
	{
		path: "notify.exec",
		doc: `Programs, any number: command (an absolute path and its arguments) runs
once per event, with the event as JSON on its standard input and in
BWAGENT_* environment variables. Exit status 0 delivers it; anything else
is retried. At timeout (1s to 1h) it and its process group are killed.
events as for webhooks. The command identifies the channel.`,
		len: func(c *Config) int { return len(c.Notify.Execs) },
		add: func(c *Config) { c.Notify.Execs = append(c.Notify.Execs, defaultExec()) },
		keys: func(i int) []*keyDef {
			x := func(c *Config) *Exec { return &c.Notify.Execs[i] }
			return []*keyDef{
				stringsKey("command", "", func(c *Config) *[]string { return &x(c).Command }, func(s string) error {
					if strings.IndexByte(s, 0) >= 0 || !utf8.ValidString(s) {
						return invalidf("must be valid UTF-8 without NUL bytes, got %q", s)
					}
					return nil
				}),
				durationKey("timeout", "", func(c *Config) *time.Duration { return &x(c).Timeout }, durationRange(time.Second, time.Hour)),
				eventsKey(func(c *Config) *[]string { return &x(c).Events }),
			}
		},
		check: func(c *Config, i int) (string, error) {
			xs := c.Notify.Execs
			cmd := xs[i].Command
			if len(cmd) == 0 {
				return "command", invalidf(`must be set: the program and its arguments, such as ["/usr/local/bin/on-bw-event"]`)
			}
			if checkPath(true)(cmd[0]) != nil {
				return "command", invalidf("must start with the program's absolute, clean path, got %q", cmd[0])
			}
			for j := range i {
				if slices.Equal(xs[j].Command, cmd) {
					return "command", invalidf("must differ from notify.exec[%d].command, got the same %q", j+1, cmd)
				}
			}
			return "", nil
		},
		sample: func(c *Config) {
			x := defaultExec()
			x.Command = []string{"/usr/local/bin/on-bw-event", "--from", "bwagent"}
			c.Notify.Execs = append(c.Notify.Execs, x)
		},
	},
	{
		path: "notify.telegram",
		doc: `Telegram bots, any number: each event is sent with sendMessage to every
chat in chats (chat ids, or "@channel" names), each chat a channel of its
own. token is the bot's token; api the Bot API's base URL (a local Bot API
server or a proxy); timeout bounds a request (1s to 5m); events as for
webhooks.`,
		len: func(c *Config) int { return len(c.Notify.Telegrams) },
		add: func(c *Config) { c.Notify.Telegrams = append(c.Notify.Telegrams, defaultTelegram()) },
		keys: func(i int) []*keyDef {
			g := func(c *Config) *Telegram { return &c.Notify.Telegrams[i] }
			return []*keyDef{
				stringKey("token", "", func(c *Config) *string { return &g(c).Token }, func(s string) error {
					if s != "" && !telegramToken.MatchString(s) {
						// The token is a secret: not repeated in the error.
						return invalidf(`must be a bot token such as "123456:ABC-DEF_ghi" (digits, ':', then letters, digits, '_' or '-'), got %d other characters`, len(s))
					}
					return nil
				}),
				chatsKey(func(c *Config) *[]string { return &g(c).Chats }),
				stringKey("api", "", func(c *Config) *string { return &g(c).API }, checkURL),
				durationKey("timeout", "", func(c *Config) *time.Duration { return &g(c).Timeout }, durationRange(time.Second, 5*time.Minute)),
				eventsKey(func(c *Config) *[]string { return &g(c).Events }),
			}
		},
		check: func(c *Config, i int) (string, error) {
			gs := c.Notify.Telegrams
			g := gs[i]
			switch {
			case g.Token == "":
				return "token", invalidf(`must be set: the bot's token from @BotFather, such as "123456:ABC-DEF_ghi"`)
			case len(g.Chats) == 0:
				return "chats", invalidf("must name at least one chat: a chat id such as 123456789, or \"@channel\"")
			case g.API == "":
				return "api", invalidf("must be set, such as %q", DefaultTelegramAPI)
			}
			for k, chat := range g.Chats {
				if slices.Contains(g.Chats[:k], chat) {
					return "chats", invalidf("must not repeat a chat, got %s twice", chat)
				}
				for j := range i {
					if gs[j].API == g.API && gs[j].Token == g.Token && slices.Contains(gs[j].Chats, chat) {
						return "chats", invalidf("must not repeat a chat of notify.telegram[%d] with the same bot, got %s", j+1, chat)
					}
				}
			}
			return "", nil
		},
		sample: func(c *Config) {
			g := defaultTelegram()
			g.Token, g.Chats = "123456:ABC-DEF_ghi", []string{"123456789", "@vpn_alerts"}
			c.Notify.Telegrams = append(c.Notify.Telegrams, g)
		},
	},
}

// telegramToken is the form of a bot token: the bot's id, ':' and a secret.
var telegramToken = regexp.MustCompile(`^[0-9]+:[A-Za-z0-9_-]+$`)

// telegramChannel is a public channel's name.
var telegramChannel = regexp.MustCompile(`^@[A-Za-z][A-Za-z0-9_]{3,31}$`)

// checkURL accepts an http or https URL with a host, and "" (which the
// table's check refuses where a URL is required).
func checkURL(s string) error {
	if s == "" {
		return nil
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || strings.ContainsFunc(s, unicode.IsSpace) {
		return invalidf(`must be an http or https URL such as "https://hooks.example.com/bwagent", got %q`, s)
	}
	return nil
}

// eventsKey defines a channel's list of event types.
func eventsKey(field func(*Config) *[]string) *keyDef {
	return stringsKey("events", "", field, func(s string) error {
		if !slices.Contains(EventTypes, s) {
			return invalidf("must be event types (%s), got %q", strings.Join(EventTypes, ", "), s)
		}
		return nil
	})
}

// chatsKey defines a Telegram bot's chats: integers (chat ids) or strings
// (a chat id, or "@channel"), kept as strings.
func chatsKey(field func(*Config) *[]string) *keyDef {
	return &keyDef{
		path: "chats",
		value: func(c *Config) string {
			s := make([]string, len(*field(c)))
			for i, chat := range *field(c) {
				if _, err := strconv.ParseInt(chat, 10, 64); err == nil {
					s[i] = chat
				} else {
					s[i] = quote(chat)
				}
			}
			return "[" + strings.Join(s, ", ") + "]"
		},
		set: func(c *Config, v any) error {
			a, ok := v.([]any)
			if !ok {
				return invalidf("must be an array of chat ids or \"@channel\" names, got %s", describe(v))
			}
			var chats []string // nil if empty
			for _, e := range a {
				switch e := e.(type) {
				case int64:
					chats = append(chats, strconv.FormatInt(e, 10))
				case string:
					chats = append(chats, e)
				default:
					return invalidf("must be an array of chat ids or \"@channel\" names, got %s in it", describe(e))
				}
			}
			*field(c) = chats
			return nil
		},
		check: func(c *Config) error {
			for _, chat := range *field(c) {
				if _, err := strconv.ParseInt(chat, 10, 64); err != nil && !telegramChannel.MatchString(chat) {
					return invalidf("must be chat ids (integers) or public channel names such as \"@vpn_alerts\", got %q", chat)
				}
			}
			return nil
		},
	}
}
