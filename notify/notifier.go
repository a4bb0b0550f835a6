package notify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/myvpn/bwagent/store"
	"github.com/myvpn/bwagent/view"
)

// Options are what New needs.
type Options struct {
	// Store is the state database: the outbox and each channel's
	// progress. It must stay open until Run has returned.
	Store *store.Store
	// Channels are the receivers (Channels builds them from the
	// configuration); their keys must differ.
	Channels []Channel
	// Node names the agent's server in every payload.
	Node string
	// MaxAge is how long an event is tried: an older one is given up
	// for a channel and counted. Zero is 24 hours.
	MaxAge time.Duration
	// Report, if set, is called from a channel's goroutine when the
	// channel starts failing or fails with another error (err, and when
	// it tries next), and when it works again after failing (err nil).
	// It must not block.
	Report func(channel string, err error, next time.Time)

	// Now is the clock; nil is time.Now.
	Now func() time.Time
	// Poll is how often an idle channel looks for new events, and a
	// waiting one refreshes its backlog. Zero is 1 second.
	Poll time.Duration
	// Backoff is the wait after the n-th failed attempt at an event;
	// nil is Backoff.
	Backoff func(n int) time.Duration
}

// Notifier delivers the events of a state database to channels. Create it
// with New, run it with Run; Status may be called from any goroutine.
type Notifier struct {
	o      Options
	prefix string
	chans  []*channel
}

// channel is one channel's delivery state. Its goroutine owns d; mu
// protects status, which Status reads.
type channel struct {
	Channel
	types []string
	d     store.Delivery

	mu     sync.Mutex
	status view.NotifyChannel

	lastSave time.Time
	saved    store.Delivery
	reported string // the error last reported; "" healthy
}

// batchSize is how many events a channel reads from the outbox at a time.
const batchSize = 100

// saveEvery is how often a channel delivering a run of events saves its
// progress: a crash sends at most this much again.
const saveEvery = time.Second

// New returns a notifier of the events of o.Store to o.Channels, opening
// each channel's row in the database (a new channel starts after the last
// event committed so far).
func New(o Options) (*Notifier, error) {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Poll <= 0 {
		o.Poll = time.Second
	}
	if o.Backoff == nil {
		o.Backoff = Backoff
	}
	if o.MaxAge <= 0 {
		o.MaxAge = 24 * time.Hour
	}
	prefix, err := o.Store.EventIDPrefix()
	if err != nil {
		return nil, err
	}
	n := &Notifier{o: o, prefix: prefix}
	seen := make(map[string]bool)
	for _, c := range o.Channels {
		if seen[c.Key] {
			return nil, fmt.Errorf("notify: two channels have the key %s (%s)", c.Key, c.Name)
		}
		seen[c.Key] = true
		d, err := o.Store.OpenDelivery(c.Key)
		if err != nil {
			return nil, fmt.Errorf("notify: %s: %w", c.Name, err)
		}
		ch := &channel{Channel: c, types: c.types(), d: d, saved: d, lastSave: o.Now()}
		if d.Attempts > 0 {
			ch.reported = d.LastError
		}
		ch.status = ch.view()
		if backlog, err := o.Store.CountEvents(d.Cursor, ch.types); err == nil {
			ch.status.Backlog = uint64(backlog)
		}
		n.chans = append(n.chans, ch)
	}
	return n, nil
}

// Backoff returns the wait after the n-th failed attempt at an event: 1s,
// doubling each attempt up to 5 minutes, each drawn at random from its
// upper half (jitter, so that channels failing together do not retry
// together).
func Backoff(n int) time.Duration {
	d := 5 * time.Minute
	if n >= 1 && n <= 9 {
		d = min(d, time.Second<<(n-1))
	}
	return d/2 + rand.N(d/2+1)
}

// Run delivers events until ctx is done, then saves each channel's
// progress and returns. Events still waiting are delivered by the next
// Run, in this process or the next.
func (n *Notifier) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for _, c := range n.chans {
		wg.Go(func() { n.deliver(ctx, c) })
	}
	wg.Wait()
}

// Status returns each channel's state, in the order of Options.Channels.
func (n *Notifier) Status() []view.NotifyChannel {
	out := make([]view.NotifyChannel, len(n.chans))
	for i, c := range n.chans {
		c.mu.Lock()
		out[i] = c.status
		c.mu.Unlock()
	}
	return out
}

// view returns the channel's state as Status shows it, but the backlog.
func (c *channel) view() view.NotifyChannel {
	return view.NotifyChannel{Name: c.Name, Delivered: c.d.Delivered, Expired: c.d.Expired, Attempts: uint64(c.d.Attempts),
		NextTry: c.d.NextTry, LastError: c.d.LastError, ErrorTime: c.d.ErrorTime}
}

// publish makes the channel's state visible to Status; backlog < 0 keeps
// the last one.
func (c *channel) publish(backlog int) {
	v := c.view()
	c.mu.Lock()
	defer c.mu.Unlock()
	if backlog < 0 {
		v.Backlog = c.status.Backlog
	} else {
		v.Backlog = uint64(backlog)
	}
	c.status = v
}

// deliver is one channel's goroutine.
func (n *Notifier) deliver(ctx context.Context, c *channel) {
	defer n.save(c, true)
	for ctx.Err() == nil {
		if wait := c.d.NextTry.Sub(n.o.Now()); wait > 0 {
			n.refresh(c)
			sleep(ctx, min(wait, n.o.Poll))
			continue
		}
		es, next, err := n.o.Store.PendingEvents(c.d.Cursor, c.types, batchSize)
		if err != nil {
			n.storeError(c, err)
			sleep(ctx, n.o.Poll)
			continue
		}
		done := true
		for _, e := range es {
			if ctx.Err() != nil {
				done = false
				break
			}
			if !n.attempt(ctx, c, e) {
				done = false
				break
			}
			n.save(c, false)
		}
		if done {
			c.d.Cursor = max(c.d.Cursor, next)
		}
		n.save(c, true)
		if done && len(es) < batchSize {
			c.publish(0)
			sleep(ctx, n.o.Poll)
		} else {
			n.refresh(c)
		}
	}
}

// attempt sends e to c, or gives it up when too old, and reports whether
// the channel may go on to the next event.
func (n *Notifier) attempt(ctx context.Context, c *channel, e store.Event) bool {
	now := n.o.Now()
	if now.Sub(e.Time) > n.o.MaxAge {
		c.d.Cursor = e.ID
		c.d.Expired++
		c.d.Attempts, c.d.NextTry = 0, time.Time{}
		return true
	}
	p := payloadOf(n.prefix, n.o.Node, e)
	body, err := json.Marshal(p)
	if err == nil {
		err = n.send(ctx, c, p, body)
	}
	if ctx.Err() != nil {
		return false // stopping: not the receiver's failure
	}
	if err != nil {
		c.d.Attempts++
		now = n.o.Now()
		wait := n.o.Backoff(c.d.Attempts)
		var re *RetryError
		if errors.As(err, &re) {
			wait = max(wait, re.After)
		}
		c.d.NextTry, c.d.LastError, c.d.ErrorTime = now.Add(wait), err.Error(), now
		if c.reported != c.d.LastError && n.o.Report != nil {
			n.o.Report(c.Name, err, c.d.NextTry)
		}
		c.reported = c.d.LastError
		return false
	}
	c.d.Cursor = e.ID
	c.d.Delivered++
	c.d.Attempts, c.d.NextTry = 0, time.Time{}
	if c.reported != "" && n.o.Report != nil {
		n.o.Report(c.Name, nil, time.Time{})
	}
	c.reported = ""
	return true
}

// send runs one attempt within the channel's timeout.
func (n *Notifier) send(ctx context.Context, c *channel, p *Payload, body []byte) error {
	sctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()
	err := c.Sender.Send(sctx, p, body)
	if err != nil && errors.Is(sctx.Err(), context.DeadlineExceeded) && ctx.Err() == nil {
		return fmt.Errorf("%w after %s: %w", ErrTimeout, c.Timeout, err)
	}
	return err
}

// save writes the channel's progress if it changed and, unless force, the
// last save is older than saveEvery, and publishes it.
func (n *Notifier) save(c *channel, force bool) {
	if c.d == c.saved || (!force && n.o.Now().Sub(c.lastSave) < saveEvery) {
		return
	}
	if err := n.o.Store.SaveDelivery(c.d); err != nil {
		n.storeError(c, err)
		return
	}
	c.saved, c.lastSave = c.d, n.o.Now()
	c.publish(-1)
}

// refresh publishes the channel's state with its backlog counted again.
func (n *Notifier) refresh(c *channel) {
	backlog, err := n.o.Store.CountEvents(c.d.Cursor, c.types)
	if err != nil {
		n.storeError(c, err)
		return
	}
	c.publish(backlog)
}

// storeError shows an error of the state database as the channel's last
// error; it is no failed attempt.
func (n *Notifier) storeError(c *channel, err error) {
	c.publish(-1)
	c.mu.Lock()
	c.status.LastError, c.status.ErrorTime = err.Error(), n.o.Now()
	c.mu.Unlock()
}

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
