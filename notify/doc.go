// Package notify delivers the agent's events to operators' channels:
// webhooks (a signed JSON POST), programs (the event on standard input and
// in the environment) and Telegram chats (the Bot API's sendMessage).
//
// # Delivery
//
// The events table of the state database is the outbox: the agent commits
// each event in the same transaction as the change that caused it, and a
// [Notifier] delivers them beside the agent's loop, one goroutine per
// channel, so a slow or dead receiver never delays a tick, nor another
// channel. Each channel sends the events of its types in id order and keeps
// its progress in the database (store.Delivery): the id of the last event
// it is done with, its failed attempts, when it tries next, its last error.
// An attempt that fails (an error, a non-2xx answer, a non-zero exit, a
// timeout) is retried after an exponential backoff with jitter (Backoff),
// or the receiver's Retry-After if longer; the channel's later events wait
// behind it, so each receiver sees the events in the order they happened.
// An event older than the maximum age is given up for that channel and
// counted (Expired) instead of sent.
//
// So delivery is at least once: progress is saved at most a second after a
// delivery and at every failure and stop, and a crash in between sends the
// events since the last save again. Every event carries an id that is the
// same in every attempt, on every channel and after any restart (the
// database's event id prefix, "-", the event's row id): receivers
// deduplicate on it.
//
// A channel is known in the database by its Key, derived from what
// identifies its receiver (the URL; the command; the bot API, token and
// chat). A new channel starts after the last event committed when it was
// first opened: it is sent the events from then on, not the history.
//
// # Payload
//
// Every channel sends the same document ([Payload]), as JSON:
//
//	{"id": "3f2a9c1e5b7d8a60-42", "type": "block", "time": "2026-11-29T14:30:45Z",
//	 "node": "vpn-sg-1", "user": {"name": "john", "protocol": "ssh",
//	 "usage": 10737418240, "limit": 10737418240, "status": "BLOCKED",
//	 "reason": "Bandwidth Limit Reached"}}
//
// Events of the agent itself (types failed and recovered) have no user but
// a component and a message; a threshold event has the threshold (percent),
// an expiring event the expiry.
//
// The package does not log: a channel's failures and recoveries go to
// Options.Report, and its state to [Notifier.Status].
package notify
