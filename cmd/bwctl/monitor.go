package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/myvpn/bwagent/control"
	"golang.org/x/sys/unix"
)

// `bwctl monitor`: a full-screen live view of every user, streamed from the
// agent (control.Client.Watch sends a snapshot of every user after each
// change), redrawn every second and after each snapshot.

func init() {
	commands["monitor"] = command{args: "", run: runMonitor}
}

// ANSI sequences of the monitor's screen.
const (
	ansiHome       = "\x1b[H"
	ansiClear      = "\x1b[2J"
	ansiClearLine  = "\x1b[K" // to the end of the line
	ansiClearBelow = "\x1b[J" // from the cursor to the end of the screen
	ansiHideCursor = "\x1b[?25l"
	ansiShowCursor = "\x1b[?25h"
)

// Default screen size when the terminal does not tell.
const (
	defaultWidth  = 80
	defaultHeight = 24
)

// monitorRefresh is how often the screen is redrawn without a new snapshot
// (the clock and the decaying rates).
const monitorRefresh = time.Second

func runMonitor(ctx context.Context, e *env) error {
	if err := e.want(0, 0); err != nil {
		return err
	}
	if e.o.output != "table" {
		return usagef("monitor draws a screen: -o %s is not supported; use `bwctl -o json list`", e.o.output)
	}
	out, ok := e.out.(*os.File)
	in := os.Stdin
	if !ok || !isTerminal(out) || !isTerminal(in) {
		return usagef("monitor needs a terminal; use `bwctl -o json list`")
	}
	// run1's deadline is for one call; the monitor runs until told to quit.
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	c, err := e.client(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	snaps, err := c.Watch(ctx)
	if err != nil {
		return err
	}

	restore, err := rawMode(in)
	if err != nil {
		return fmt.Errorf("cannot put the terminal in raw mode: %w", err)
	}
	defer restore()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGWINCH)
	defer signal.Stop(sigs)
	keys := make(chan struct{}, 1) // q or Ctrl-C
	go readQuit(in, keys)

	io.WriteString(out, ansiHideCursor+ansiClear)
	defer io.WriteString(out, reset+ansiShowCursor+"\r\n")

	var m monitor
	tick := time.NewTicker(monitorRefresh)
	defer tick.Stop()
	draw := func() error {
		w, h := termSize(out)
		var b bytes.Buffer
		b.WriteString(ansiHome)
		m.render(&b, e, time.Now(), w, h)
		b.WriteString(ansiClearBelow)
		_, err := out.Write(b.Bytes())
		return err
	}
	for {
		select {
		case rows, ok := <-snaps:
			if !ok {
				return errors.New("the agent ended the stream (bwagent stopped?)")
			}
			m.update(rows, time.Now())
		case <-tick.C:
		case s := <-sigs:
			if s != syscall.SIGWINCH {
				return nil
			}
		case <-keys:
			return nil
		}
		if err := draw(); err != nil {
			return err
		}
	}
}

// isTerminal reports whether f is a terminal.
func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// rawMode puts the terminal f in raw input mode (no echo, no line editing,
// Ctrl-C a byte rather than a signal) and returns what restores it.
func rawMode(f *os.File) (restore func(), err error) {
	fd := int(f.Fd())
	old, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return nil, err
	}
	raw := *old
	raw.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	raw.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	raw.Cflag &^= unix.CSIZE | unix.PARENB
	raw.Cflag |= unix.CS8
	raw.Cc[unix.VMIN] = 1
	raw.Cc[unix.VTIME] = 0
	// Output processing stays on: the screen is written with \r\n anyway.
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, &raw); err != nil {
		return nil, err
	}
	return func() { unix.IoctlSetTermios(fd, unix.TCSETS, old) }, nil
}

// readQuit reads keys from in and signals quit on q, Q or Ctrl-C (also at
// the end of input).
func readQuit(in io.Reader, quit chan<- struct{}) {
	buf := make([]byte, 64)
	for {
		n, err := in.Read(buf)
		if slices.ContainsFunc(buf[:n], func(b byte) bool { return b == 'q' || b == 'Q' || b == 3 }) || err != nil {
			select {
			case quit <- struct{}{}:
			default:
			}
			return
		}
	}
}

// termSize returns f's terminal width and height, 80x24 when unknown.
func termSize(f *os.File) (w, h int) {
	ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ)
	if err != nil || ws.Col == 0 || ws.Row == 0 {
		return defaultWidth, defaultHeight
	}
	return int(ws.Col), int(ws.Row)
}

// monitor holds the last two snapshots, from which it computes rates.
type monitor struct {
	prev, cur         map[string]control.UserRow
	rows              []control.UserRow // of cur, in the agent's order
	prevTime, curTime time.Time
	snaps             int
}

func (m *monitor) update(rows []control.UserRow, now time.Time) {
	m.prev, m.prevTime = m.cur, m.curTime
	m.cur = make(map[string]control.UserRow, len(rows))
	for _, r := range rows {
		m.cur[r.Name] = r
	}
	m.rows, m.curTime = rows, now
	m.snaps++
}

// rates returns a user's upload and download rates in bytes per second:
// the growth of the counters between the last two snapshots over the time
// from the earlier one to now. The agent sends a snapshot whenever a
// counter changes, so no new snapshot means no traffic since the last one
// and the rates decay towards zero until one comes.
func (m *monitor) rates(r control.UserRow, now time.Time) (up, down float64) {
	p, ok := m.prev[r.Name]
	if !ok {
		return 0, 0
	}
	dt := now.Sub(m.prevTime)
	if d := m.curTime.Sub(m.prevTime); d > dt {
		dt = d
	}
	if dt <= 0 {
		return 0, 0
	}
	s := dt.Seconds()
	if r.Upload > p.Upload {
		up = float64(r.Upload-p.Upload) / s
	}
	if r.Download > p.Download {
		down = float64(r.Download-p.Download) / s
	}
	return up, down
}

// monitor's column widths; USER and USAGE take what is left.
const (
	colStatus = 9  // "unlimited"
	colRate   = 12 // "1023.9 KiB/s"
	colSpeed  = 13 // "10mbit/2mbit", "-"
)

type monRow struct {
	r        control.UserRow
	up, down float64
}

// render writes one screen of at most w columns and h lines; lines are
// separated by \r\n and each clears the rest of its line.
func (m *monitor) render(b *bytes.Buffer, e *env, now time.Time, w, h int) {
	rows := make([]monRow, len(m.rows))
	var upAll, downAll float64
	for i, r := range m.rows {
		up, down := m.rates(r, now)
		rows[i] = monRow{r, up, down}
		upAll += up
		downAll += down
	}
	slices.SortStableFunc(rows, func(x, y monRow) int {
		ta, tb := x.up+x.down, y.up+y.down
		switch {
		case ta > tb:
			return -1
		case ta < tb:
			return 1
		}
		return strings.Compare(x.r.Name, y.r.Name)
	})

	var lines []string
	line := func(cells ...cell) { lines = append(lines, fit(cells, w, e.o.color)) }
	line(cell{text: fmt.Sprintf("bwctl monitor  %s  %d users  up %s  down %s  (q quits)",
		now.Local().Format("15:04:05"), len(rows), e.rate(upAll), e.rate(downAll))})

	userW := min(max(w-(colStatus+2*colRate+colSpeed+5)-18, 4), 20)
	usageW := max(w-(userW+colStatus+2*colRate+colSpeed+5), 0)
	line(cell{text: pad("USER", userW) + " "}, cell{text: pad("STATUS", colStatus) + " "},
		cell{text: padLeft("UP/s", colRate) + " "}, cell{text: padLeft("DOWN/s", colRate) + " "},
		cell{text: pad("SPEED", colSpeed) + " "}, cell{text: "USAGE"})

	room := max(h-len(lines), 0)
	shown := len(rows)
	if shown > room {
		shown = max(room-1, 0) // the last line says how many more
	}
	for _, r := range rows[:shown] {
		line(cell{text: pad(clip(r.r.Name, userW), userW) + " "},
			cell{text: pad(string(r.r.Status), colStatus), status: string(r.r.Status)}, cell{text: " "},
			cell{text: padLeft(e.rate(r.up), colRate) + " "}, cell{text: padLeft(e.rate(r.down), colRate) + " "},
			cell{text: pad(clip(speedOf(r.r.Speed), colSpeed), colSpeed) + " "}, cell{text: usageBar(r.r, usageW)})
	}
	if shown < len(rows) && room > 0 {
		line(cell{text: fmt.Sprintf("+%d more", len(rows)-shown)})
	}
	if len(lines) > h {
		lines = lines[:h]
	}
	for i, l := range lines {
		if i > 0 {
			b.WriteString("\r\n")
		}
		b.WriteString(l)
		b.WriteString(ansiClearLine)
	}
}

// rate formats bytes per second.
func (e *env) rate(r float64) string {
	return e.size(uint64(r)) + "/s"
}

// usageBar returns "[#####-----] 52%" in at most w columns, or "unlimited".
func usageBar(r control.UserRow, w int) string {
	if r.Limit == 0 {
		return "unlimited"
	}
	pct := r.Used * 100 / r.Limit
	p := fmt.Sprintf("%3d%%", pct)
	if pct > 999 {
		p = ">999%"
	}
	n := w - len(p) - 3 // brackets and a space
	if n < 4 {
		return p
	}
	fill := n
	if r.Used < r.Limit {
		fill = int(float64(r.Used) / float64(r.Limit) * float64(n))
	}
	return "[" + strings.Repeat("#", fill) + strings.Repeat("-", n-fill) + "] " + p
}

// cell is part of a line; a status cell is coloured as the STATUS column
// of `bwctl list`.
type cell struct {
	text   string
	status string
}

// fit joins cells, cut at w columns (cells are ASCII but for user names,
// counted in runes), colouring status cells when color is on.
func fit(cells []cell, w int, color bool) string {
	var b strings.Builder
	col := 0
	for _, c := range cells {
		if col >= w {
			break
		}
		t := clip(c.text, w-col)
		col += len([]rune(t))
		if color && c.status != "" && t != "" {
			colored := (&env{o: &opts{color: true}}).status(c.status)
			prefix, _, _ := strings.Cut(colored, c.status)
			t = prefix + t + reset
		}
		b.WriteString(t)
	}
	return b.String()
}

// clip cuts s to at most n runes, marking a cut with ~ when there is room.
func clip(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	if n <= 1 {
		return string(r[:max(n, 0)])
	}
	return string(r[:n-1]) + "~"
}

func pad(s string, n int) string {
	if k := len([]rune(s)); k < n {
		return s + strings.Repeat(" ", n-k)
	}
	return s
}

func padLeft(s string, n int) string {
	if k := len([]rune(s)); k < n {
		return strings.Repeat(" ", n-k) + s
	}
	return s
}
