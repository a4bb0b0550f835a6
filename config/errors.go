package config

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// Sentinel errors. Every error of Parse, Load (except reading the file) and
// Validate is an *Error wrapping exactly one of them.
var (
	// ErrSyntax means the file is not valid TOML.
	ErrSyntax = errors.New("syntax error")
	// ErrUnknownKey means the file has a key or table this package does
	// not know, often a typo.
	ErrUnknownKey = errors.New("unknown key")
	// ErrInvalid means a value has the wrong type, is out of range, or
	// contradicts another value.
	ErrInvalid = errors.New("invalid value")
)

// Error is a problem in a configuration, located in its file.
//
// It reads FILE:LINE: KEY: PROBLEM, for instance
//
//	/etc/bwagent/bwagent.toml:3: interval: must be from 1s to 5s, got 10s
//
// Syntax errors and unknown keys read FILE:LINE: PROBLEM, their message
// naming the key itself. Parts that are unknown are left out: Validate
// knows no file or line, and a key defined in a way Parse cannot place has
// no line.
type Error struct {
	File string // the name given to Parse, or the path given to Load
	Line int    // 1-based; 0 if unknown
	Key  string // dotted, e.g. "xray.timeout"; "notify.webhook[2].url" in the 2nd [[notify.webhook]]; "" for syntax errors
	Err  error  // the problem; wraps ErrSyntax, ErrUnknownKey or ErrInvalid

	// alts are other keys the same problem can be reported at, each with
	// the problem phrased for it: Parse reports the first of Key and alts
	// that the file defines.
	alts []alt
	// elem is set when Key is in a table of an array of tables.
	elem *elemRef
}

type alt struct {
	key string
	err error
}

// Error formats e as FILE:LINE: KEY: PROBLEM.
func (e *Error) Error() string {
	var b strings.Builder
	switch {
	case e.File != "" && e.Line > 0:
		fmt.Fprintf(&b, "%s:%d: ", e.File, e.Line)
	case e.File != "":
		b.WriteString(e.File + ": ")
	case e.Line > 0:
		fmt.Fprintf(&b, "line %d: ", e.Line)
	}
	if e.Key != "" && !errors.Is(e.Err, ErrUnknownKey) && !errors.Is(e.Err, ErrSyntax) {
		b.WriteString(e.Key + ": ")
	}
	if e.Err != nil {
		b.WriteString(e.Err.Error())
	} else {
		b.WriteString(ErrInvalid.Error())
	}
	return b.String()
}

// Unwrap returns e.Err.
func (e *Error) Unwrap() error { return e.Err }

// kindError is a message that wraps a sentinel without repeating its text,
// and optionally a cause.
type kindError struct {
	kind  error
	msg   string
	cause error
}

func (e *kindError) Error() string { return e.msg }

func (e *kindError) Unwrap() []error {
	if e.cause == nil {
		return []error{e.kind}
	}
	return []error{e.kind, e.cause}
}

// invalidf returns an error wrapping ErrInvalid, and the error of a %w verb
// if format has one.
func invalidf(format string, a ...any) error {
	err := fmt.Errorf(format, a...)
	return &kindError{kind: ErrInvalid, msg: err.Error(), cause: errors.Unwrap(err)}
}

// syntaxError turns an error of the TOML decoder into an *Error.
func syntaxError(name string, data []byte, err error) error {
	var pe toml.ParseError
	if errors.As(err, &pe) {
		return &Error{File: name, Line: lineOf(data, pe.Position), Err: &kindError{kind: ErrSyntax, msg: "syntax error: " + pe.Message, cause: pe}}
	}
	return &Error{File: name, Err: &kindError{kind: ErrSyntax, msg: "syntax error: " + err.Error(), cause: err}}
}

// parser holds a decoded file while Parse applies it.
type parser struct {
	name string
	data []byte
	md   toml.MetaData
	raw  map[string]any

	arrays map[string]bool // arrays of tables applied (at their first key)
}

// apply sets the value of key k, one of the file's keys in document order,
// and checks it on its own.
func (p *parser) apply(c *Config, k toml.Key) error {
	if done, err := p.applyArray(c, k); done {
		return err
	}
	path := k.String()
	if isTable(path) {
		if v := p.value(k); !isMap(v) {
			return p.errAt(k, invalidf("must be a table ([%s]), got %s", path, describe(v)))
		}
		return nil
	}
	d := keyIndex[path]
	if d == nil {
		msg := "unknown key " + path
		if s := suggest(k); s != "" {
			msg += " (did you mean " + s + "?)"
		}
		return p.errAt(k, &kindError{kind: ErrUnknownKey, msg: msg})
	}
	if err := d.set(c, p.value(k)); err != nil {
		return p.errAt(k, err)
	}
	if d.check != nil {
		if err := d.check(c); err != nil {
			return p.errAt(k, err)
		}
	}
	return nil
}

// value returns the decoded value of k.
func (p *parser) value(k toml.Key) any {
	var v any = p.raw
	for _, part := range k {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		v = m[part]
	}
	return v
}

// errAt returns err at key k of the file.
func (p *parser) errAt(k toml.Key, err error) *Error {
	return &Error{File: p.name, Line: locate(p.data, p.md.Keys(), k), Key: k.String(), Err: err}
}

// place locates an error of Validate in the file: at its key if the file
// defines it, else at the first alternative key the file defines.
func (p *parser) place(err error) error {
	var e *Error
	if !errors.As(err, &e) {
		return err
	}
	if e.elem != nil {
		return p.errElem(*e.elem, e.Err)
	}
	for _, a := range append([]alt{{e.Key, e.Err}}, e.alts...) {
		k := toml.Key(strings.Split(a.key, "."))
		if p.md.IsDefined(k...) {
			return p.errAt(k, a.err)
		}
	}
	return &Error{File: p.name, Key: e.Key, Err: e.Err}
}

// errHere marks the key locate looks for.
var errHere = errors.New("config: locate this key")

// here fails to decode, so the decoder reports the line of its key.
type here struct{}

func (*here) UnmarshalTOML(any) error { return errHere }

// sink decodes anything and keeps nothing.
type sink struct{}

func (*sink) UnmarshalTOML(any) error { return nil }

// locate returns the line of key target in data, whose keys are keys, or 0.
//
// The TOML decoder keeps the position of every key but does not export it;
// it does report the position of a key whose value fails to decode. So
// locate decodes data again into a struct built for the occasion, with a
// field that fails for target and fields that accept anything for its
// siblings (the decoder matches field names without regard to case, and an
// exact match must win). A key whose name cannot be a struct tag (it
// contains a comma, or is empty) is not found. It runs only for errors:
// reflect keeps every struct type it builds.
func locate(data []byte, keys []toml.Key, target toml.Key) (line int) {
	defer func() {
		if recover() != nil {
			line = 0
		}
	}()
	if len(target) == 0 {
		return 0
	}
	v := reflect.New(locateType(keys, target, 0))
	_, err := toml.NewDecoder(bytes.NewReader(data)).Decode(v.Interface())
	var pe toml.ParseError
	if errors.As(err, &pe) && pe.Message == errHere.Error() && pe.LastKey == target.String() {
		return lineOf(data, pe.Position)
	}
	return 0
}

// lineOf returns the line where the item at pos starts. Position.Line is the
// line where it ends, which differs for multi-line strings.
func lineOf(data []byte, pos toml.Position) int {
	if pos.Start > 0 && pos.Start <= len(data) {
		return 1 + bytes.Count(data[:pos.Start], []byte("\n"))
	}
	return pos.Line
}

// locateType returns the struct type for target's table at depth.
func locateType(keys []toml.Key, target toml.Key, depth int) reflect.Type {
	var fields []reflect.StructField
	seen := make(map[string]bool)
	for _, k := range keys {
		if len(k) <= depth || seen[k[depth]] || !slices.Equal(k[:depth], target[:depth]) {
			continue
		}
		name := k[depth]
		seen[name] = true
		t := reflect.TypeFor[sink]()
		switch {
		case name != target[depth]:
		case depth == len(target)-1:
			t = reflect.TypeFor[here]()
		default:
			t = locateType(keys, target, depth+1)
		}
		fields = append(fields, reflect.StructField{
			Name: "F" + strconv.Itoa(len(fields)),
			Type: t,
			Tag:  reflect.StructTag("toml:" + strconv.Quote(name)),
		})
	}
	return reflect.StructOf(fields)
}

// suggest returns the known key an unknown key k was probably meant to be,
// or "".
func suggest(k toml.Key) string {
	path := k.String()
	for _, known := range knownPaths {
		if strings.EqualFold(known, path) {
			return known
		}
	}
	parent, last := strings.Join(k[:len(k)-1], "."), k[len(k)-1]
	best, bestDist := "", max(1, len(last)/3)+1
	for _, known := range knownPaths {
		kp, kl := splitLast(known)
		if kp != parent {
			continue
		}
		if d := distance(strings.ToLower(last), kl); d < bestDist {
			best, bestDist = known, d
		}
	}
	if best != "" {
		return best
	}
	// A key in the wrong table.
	for _, known := range knownPaths {
		if _, kl := splitLast(known); strings.EqualFold(kl, last) && !isTable(known) {
			return known
		}
	}
	// A typo across the dots, such as ssh.uid.min.
	for _, known := range knownPaths {
		if d := distance(strings.ToLower(path), known); d < bestDist {
			best, bestDist = known, d
		}
	}
	return best
}

// splitLast splits a dotted key into its table and its last part.
func splitLast(path string) (parent, last string) {
	if i := strings.LastIndexByte(path, '.'); i >= 0 {
		return path[:i], path[i+1:]
	}
	return "", path
}

// distance is the optimal string alignment distance between a and b: the
// edits (insert, delete, replace, swap two adjacent characters) from one
// to the other.
func distance(a, b string) int {
	s, t := []rune(a), []rune(b)
	if len(s) > 64 || len(t) > 64 {
		return max(len(s), len(t))
	}
	d := make([][]int, len(s)+1)
	for i := range d {
		d[i] = make([]int, len(t)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(s); i++ {
		for j := 1; j <= len(t); j++ {
			cost := 1
			if s[i-1] == t[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && s[i-1] == t[j-2] && s[i-2] == t[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(s)][len(t)]
}

func isMap(v any) bool {
	_, ok := v.(map[string]any)
	return ok
}

// describe names a decoded TOML value's type and shows the value, for
// messages.
func describe(v any) string {
	switch v := v.(type) {
	case string:
		return fmt.Sprintf("string %q", v)
	case int64:
		return fmt.Sprintf("integer %d", v)
	case float64:
		return "float " + strconv.FormatFloat(v, 'g', -1, 64)
	case bool:
		return fmt.Sprintf("boolean %t", v)
	case []any:
		return "array"
	case map[string]any:
		return "table"
	case []map[string]any:
		return "array of tables"
	case nil:
		return "nothing"
	}
	return fmt.Sprintf("date-time %v", v)
}
