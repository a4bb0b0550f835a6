package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// newLogger returns the agent's logger, writing slog's text format to
// stderr. When stderr is the journal it leaves out the time (the journal
// stamps every entry) and starts each line with its syslog priority, "<3>"
// for errors to "<7>" for debug, which journald takes as the entry's
// priority (SyslogLevelPrefix=, on by default): `journalctl -p warning -u
// bwagent` then shows the warnings and errors.
func newLogger(stderr *os.File) *slog.Logger {
	if !isJournal(stderr, os.Getenv("JOURNAL_STREAM")) {
		return slog.New(slog.NewTextHandler(stderr, nil))
	}
	return slog.New(newJournalHandler(stderr))
}

// isJournal reports whether f is the stream systemd names in
// $JOURNAL_STREAM ("DEVICE:INODE" of the journal's socket). Checking the
// descriptor itself matters: a shell started by the service, with its
// output redirected, inherits the variable too.
func isJournal(f *os.File, stream string) bool {
	dev, ino, ok := strings.Cut(stream, ":")
	if !ok {
		return false
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return false
	}
	return strconv.FormatUint(st.Dev, 10) == dev && strconv.FormatUint(st.Ino, 10) == ino
}

// journalHandler is slog's text handler without the time, each line
// prefixed with its syslog priority and written in one write.
type journalHandler struct {
	mu   *sync.Mutex // protects buf, shared by the handlers derived with With*
	buf  *bytes.Buffer
	text slog.Handler // writes into buf
	out  io.Writer
}

func newJournalHandler(out io.Writer) *journalHandler {
	buf := new(bytes.Buffer)
	noTime := func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && a.Key == slog.TimeKey {
			return slog.Attr{}
		}
		return a
	}
	return &journalHandler{mu: new(sync.Mutex), buf: buf, out: out,
		text: slog.NewTextHandler(buf, &slog.HandlerOptions{ReplaceAttr: noTime})}
}

// priority is the syslog priority prefix of level: err, warning, info or
// debug.
func priority(level slog.Level) string {
	switch {
	case level >= slog.LevelError:
		return "<3>"
	case level >= slog.LevelWarn:
		return "<4>"
	case level >= slog.LevelInfo:
		return "<6>"
	}
	return "<7>"
}

func (j *journalHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return j.text.Enabled(ctx, l)
}

func (j *journalHandler) Handle(ctx context.Context, r slog.Record) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.buf.Reset()
	j.buf.WriteString(priority(r.Level))
	if err := j.text.Handle(ctx, r); err != nil {
		return err
	}
	_, err := j.out.Write(j.buf.Bytes())
	return err
}

func (j *journalHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	c := *j
	c.text = j.text.WithAttrs(attrs)
	return &c
}

func (j *journalHandler) WithGroup(name string) slog.Handler {
	c := *j
	c.text = j.text.WithGroup(name)
	return &c
}
