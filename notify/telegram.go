package notify

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Telegram sends each event as a text message to one chat through the Bot
// API's sendMessage.
type Telegram struct {
	endpoint string // API/bot<token>/sendMessage: holds the token
	name     string // without the token
	chat     any    // an int64 chat id, or a "@channel" string
	client   *http.Client
}

var _ Sender = (*Telegram)(nil)

// NewTelegram returns a sender to chat (a chat id, or "@channel") by the
// bot with token, through the Bot API at api (config.DefaultTelegramAPI,
// or a local Bot API server).
func NewTelegram(api, token, chat string) *Telegram {
	t := &Telegram{
		endpoint: strings.TrimRight(api, "/") + "/bot" + token + "/sendMessage",
		name:     "telegram sendMessage to chat " + chat,
		chat:     chat,
		client:   httpClient(),
	}
	if id, err := strconv.ParseInt(chat, 10, 64); err == nil {
		t.chat = id
	}
	return t
}

// telegramAnswer is the Bot API's answer.
type telegramAnswer struct {
	OK          bool   `json:"ok"`
	ErrorCode   int    `json:"error_code"`
	Description string `json:"description"`
	Parameters  struct {
		RetryAfter int `json:"retry_after"`
	} `json:"parameters"`
}

// Send sends p.Text() to the chat.
func (t *Telegram) Send(ctx context.Context, p *Payload, _ []byte) error {
	msg, err := json.Marshal(map[string]any{"chat_id": t.chat, "text": p.Text(), "disable_web_page_preview": true})
	if err != nil {
		return fmt.Errorf("%s: %w", t.name, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, t.endpoint, bytes.NewReader(msg))
	if err != nil {
		return fmt.Errorf("%s: bad api URL", t.name) // the error would show the token
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := t.client.Do(req)
	if err != nil {
		return requestError(t.name, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	var a telegramAnswer
	if err := json.Unmarshal(data, &a); err != nil {
		return fmt.Errorf("%s: %w: HTTP %s, not a Bot API answer: %s", t.name, ErrRefused, resp.Status, firstLine(data))
	}
	if a.OK && resp.StatusCode == http.StatusOK {
		return nil
	}
	err = fmt.Errorf("%s: %w: %d %s", t.name, ErrRefused, a.ErrorCode, firstLine([]byte(a.Description)))
	if s := a.Parameters.RetryAfter; s > 0 {
		return &RetryError{After: time.Duration(min(s, 24*3600)) * time.Second, Err: err}
	}
	if d := retryAfter(resp.Header); d > 0 {
		return &RetryError{After: d, Err: err}
	}
	return err
}
