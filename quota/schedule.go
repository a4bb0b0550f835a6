package quota

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// ErrBadSchedule is returned by ParseSchedule.
var ErrBadSchedule = errors.New("invalid reset schedule")

// Period is how often a scheduled reset repeats.
type Period uint8

// Periods of a reset schedule.
const (
	NoReset Period = iota
	Daily
	Weekly
	Monthly
)

// Schedule is a user's automatic usage reset: every local midnight, every
// week on a weekday, or every month on day N (a month shorter than N resets
// on its last day). The zero Schedule never resets.
type Schedule struct {
	Period Period
	// Day is the weekday (time.Sunday..time.Saturday) for Weekly and the
	// day of the month (1-31) for Monthly.
	Day int
}

var weekdays = map[string]time.Weekday{
	"sun": time.Sunday, "mon": time.Monday, "tue": time.Tuesday, "wed": time.Wednesday,
	"thu": time.Thursday, "fri": time.Friday, "sat": time.Saturday,
}

// ParseSchedule parses "daily", "weekly:mon" (sun..sat, or 0-6 with 0 for
// Sunday), "monthly:N" (N from 1 to 31) and "none" or "".
func ParseSchedule(s string) (Schedule, error) {
	kind, arg, hasArg := strings.Cut(strings.ToLower(strings.TrimSpace(s)), ":")
	bad := func(why string) (Schedule, error) {
		return Schedule{}, fmt.Errorf("%w %q: %s", ErrBadSchedule, s, why)
	}
	switch kind {
	case "", "none":
		if hasArg {
			return bad("none takes no day")
		}
		return Schedule{}, nil
	case "daily":
		if hasArg {
			return bad("daily takes no day")
		}
		return Schedule{Period: Daily}, nil
	case "weekly":
		if d, ok := weekdays[arg]; ok {
			return Schedule{Period: Weekly, Day: int(d)}, nil
		}
		if n, err := strconv.Atoi(arg); err == nil && n >= 0 && n <= 6 {
			return Schedule{Period: Weekly, Day: n}, nil
		}
		return bad("want weekly:sun..sat")
	case "monthly":
		n, err := strconv.Atoi(arg)
		if err != nil || n < 1 || n > 31 {
			return bad("want monthly:1..31")
		}
		return Schedule{Period: Monthly, Day: n}, nil
	}
	return bad("want daily, weekly:DAY or monthly:N")
}

// String returns the form ParseSchedule reads.
func (s Schedule) String() string {
	switch s.Period {
	case Daily:
		return "daily"
	case Weekly:
		return "weekly:" + strings.ToLower(time.Weekday(s.Day).String()[:3])
	case Monthly:
		return "monthly:" + strconv.Itoa(s.Day)
	}
	return "none"
}

// Next returns the first reset instant strictly after t, at local midnight in
// t's location, or the zero time for a schedule that never resets.
func (s Schedule) Next(t time.Time) time.Time {
	y, m, d := t.Date()
	loc := t.Location()
	switch s.Period {
	case Daily:
		return time.Date(y, m, d+1, 0, 0, 0, 0, loc)
	case Weekly:
		ahead := (s.Day - int(t.Weekday()) + 7) % 7
		if ahead == 0 {
			ahead = 7
		}
		return time.Date(y, m, d+ahead, 0, 0, 0, 0, loc)
	case Monthly:
		for i := 0; i < 3; i++ {
			c := time.Date(y, m+time.Month(i), clampDay(y, m+time.Month(i), s.Day), 0, 0, 0, 0, loc)
			if c.After(t) {
				return c
			}
		}
	}
	return time.Time{}
}

// clampDay returns day, or the last day of the month if it has fewer days.
func clampDay(y int, m time.Month, day int) int {
	last := time.Date(y, m+1, 0, 0, 0, 0, 0, time.UTC).Day()
	return min(day, last)
}

// Day returns t's calendar day in its location as YYYY-MM-DD, the key of
// daily usage.
func Day(t time.Time) string { return t.Format(time.DateOnly) }
