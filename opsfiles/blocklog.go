package opsfiles

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"syscall"
	"time"
)

// LogLine is one event of the block log, one line
// "timestamp | protocol | username | reason" with the timestamp in
// TimeLayout, local time.
type LogLine struct {
	Time     time.Time
	Protocol string
	Username string
	Reason   string
}

// logField makes s safe as a field of a block log line: '|' (the separator)
// becomes '/', and a line break becomes a space, so each event stays one
// line of four fields.
var logField = strings.NewReplacer("|", "/", "\r\n", " ", "\r", " ", "\n", " ")

// format appends l's line to b.
func (l LogLine) format(b []byte, loc *time.Location) []byte {
	b = append(b, logField.Replace(FormatTime(l.Time, loc))...)
	for _, f := range []string{l.Protocol, l.Username, l.Reason} {
		b = append(b, " | "...)
		b = append(b, logField.Replace(f)...)
	}
	return append(b, '\n')
}

// AppendLog appends lines to the block log at path, the time of each in loc
// (a nil loc keeps each time's own location), as
// "2024-12-07 14:30:45 | ssh | john | Bandwidth Limit Reached". All lines go
// in one write(2) on a file opened with O_APPEND, so the lines of concurrent
// appenders never interleave within a line; the file is then fsynced. The
// file (0644) and its directory (0755) are created if missing. If the file
// does not end with a newline (an interrupted writer), one is written first
// so the new lines stay parseable. No lines is a no-op.
//
// A symbolic link at path is followed only if it is owned by root or by
// this process's user (ErrUntrustedLink otherwise, and nothing is written).
func AppendLog(path string, lines []LogLine, loc *time.Location) error {
	if len(lines) == 0 {
		return nil
	}
	path, err := followTrusted(path)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(rawDir(path), 0o755); err != nil {
		return err
	}
	// O_RDWR rather than O_WRONLY, to read the last byte (pread(2) ignores
	// O_APPEND). O_NOFOLLOW: a link that replaced the file since
	// followTrusted looked is not followed.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE|syscall.O_NOFOLLOW, 0o644)
	if err != nil {
		return err
	}
	b := make([]byte, 0, 1+80*len(lines))
	if missingNewline(f) {
		b = append(b, '\n')
	}
	for _, l := range lines {
		b = l.format(b, loc)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// missingNewline reports whether the file f is not empty and does not end
// with a newline.
func missingNewline(f *os.File) bool {
	info, err := f.Stat()
	if err != nil || info.Size() == 0 {
		return false
	}
	var last [1]byte
	n, _ := f.ReadAt(last[:], info.Size()-1)
	return n == 1 && last[0] != '\n'
}

// maxLogLine bounds a block log line ReadLog parses; longer lines are
// counted as malformed.
const maxLogLine = 64 << 10

// ReadLog parses the block log at path, times in loc (UTC if nil). Lines
// that are not "timestamp | protocol | username | reason" with a TimeLayout
// timestamp are skipped and counted in malformed; blank lines are ignored.
// Fields are trimmed of surrounding spaces; CRLF line ends and a leading
// UTF-8 byte order mark are accepted. A missing file is an empty log, not
// an error. A symbolic link at path is followed as AppendLog follows it.
func ReadLog(path string, loc *time.Location) (lines []LogLine, malformed int, err error) {
	if loc == nil {
		loc = time.UTC
	}
	path, err = followTrusted(path)
	if err != nil {
		return nil, 0, err
	}
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, 0, nil
		}
		return nil, 0, err
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, maxLogLine)
	for first := true; ; first = false {
		raw, err := r.ReadSlice('\n')
		if first {
			raw = bytes.TrimPrefix(raw, utf8BOM)
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			malformed++
			for errors.Is(err, bufio.ErrBufferFull) { // skip the rest of the line
				_, err = r.ReadSlice('\n')
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				return lines, malformed, fmt.Errorf("read %s: %w", path, err)
			}
			continue
		}
		if len(raw) > 0 {
			if l, ok := parseLogLine(string(raw), loc); ok {
				lines = append(lines, l)
			} else if strings.TrimSpace(string(raw)) != "" {
				malformed++
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return lines, malformed, fmt.Errorf("read %s: %w", path, err)
		}
	}
	return lines, malformed, nil
}

// parseLogLine parses one block log line.
func parseLogLine(s string, loc *time.Location) (LogLine, bool) {
	s = strings.TrimRight(s, "\r\n")
	f := strings.Split(s, "|")
	if len(f) != 4 {
		return LogLine{}, false
	}
	for i := range f {
		f[i] = strings.TrimSpace(f[i])
	}
	t, err := time.ParseInLocation(TimeLayout, f[0], loc)
	if err != nil {
		return LogLine{}, false
	}
	return LogLine{Time: t, Protocol: f[1], Username: f[2], Reason: f[3]}, true
}
