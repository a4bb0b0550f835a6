package notify

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Headers of a webhook request.
const (
	// HeaderSignature is "sha256=" and the hex HMAC-SHA256 of the body
	// under the webhook's secret; absent without a secret.
	HeaderSignature = "X-Bwagent-Signature"
	// HeaderTimestamp is the Unix time, in seconds, of the attempt.
	HeaderTimestamp = "X-Bwagent-Timestamp"
	// HeaderEvent is the event's type, HeaderID its id (both also in the
	// body).
	HeaderEvent = "X-Bwagent-Event"
	HeaderID    = "X-Bwagent-Id"
)

// Webhook POSTs each event as JSON to a URL. A 2xx answer delivers it.
type Webhook struct {
	url, name string
	secret    []byte
	client    *http.Client
	now       func() time.Time
}

var _ Sender = (*Webhook)(nil)

// NewWebhook returns a webhook to url, signing with secret ("": unsigned).
func NewWebhook(url, secret string) *Webhook {
	w := &Webhook{url: url, name: "POST " + redactURL(url), client: httpClient(), now: time.Now}
	if secret != "" {
		w.secret = []byte(secret)
	}
	return w
}

// Sign returns the signature header's value for body under secret:
// "sha256=" and the hex HMAC-SHA256. A receiver computes the same over the
// body it got and compares in constant time (hmac.Equal).
func Sign(secret, body []byte) string {
	m := hmac.New(sha256.New, secret)
	m.Write(body)
	return "sha256=" + hex.EncodeToString(m.Sum(nil))
}

// Send POSTs body.
func (w *Webhook) Send(ctx context.Context, p *Payload, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.url, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("%s: %w", w.name, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "bwagent")
	req.Header.Set(HeaderEvent, p.Type)
	req.Header.Set(HeaderID, p.ID)
	req.Header.Set(HeaderTimestamp, strconv.FormatInt(w.now().Unix(), 10))
	if w.secret != nil {
		req.Header.Set(HeaderSignature, Sign(w.secret, body))
	}
	resp, err := w.client.Do(req)
	if err != nil {
		return requestError(w.name, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)) // lets the connection be reused
	if resp.StatusCode >= 200 && resp.StatusCode <= 299 {
		return nil
	}
	err = fmt.Errorf("%s: %w: HTTP %s", w.name, ErrRefused, resp.Status)
	if loc := resp.Header.Get("Location"); resp.StatusCode >= 300 && resp.StatusCode <= 399 && loc != "" {
		err = fmt.Errorf("%w (to %s: redirects are not followed; set the url to where it leads)", err, redactURL(loc))
	} else if line := firstLine(msg); line != "" {
		err = fmt.Errorf("%w: %s", err, line)
	}
	if d := retryAfter(resp.Header); d > 0 {
		return &RetryError{After: d, Err: err}
	}
	return err
}

// firstLine returns the first line of b, trimmed, at most 200 bytes.
func firstLine(b []byte) string {
	s, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	s = strings.TrimSpace(s)
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return strings.ToValidUTF8(s, "?")
}
