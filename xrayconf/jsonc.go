package xrayconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"unicode/utf8"
)

// Xray reads its JSON config through a filter that drops comments before
// encoding/json sees it (infra/conf/json/reader.go, read by
// infra/conf/serial/loader.go, as of Xray v26.3.27). The filter is a small
// state machine, outside of strings:
//
//   - "//" and "#" start a comment up to the end of the line; the newline
//     is kept;
//   - "/*" starts a comment up to "*/"; the newlines inside are kept, the
//     rest is dropped, so `1/**/2` reads as `12`;
//   - a backslash and the byte after it are copied as they are;
//   - a '/' that starts no comment is copied together with the byte after
//     it, and the filter stays in its "after a slash" state, so the next
//     '/' or '*' starts a comment; a '/' at the very end is dropped;
//   - double- and single-quoted strings are copied as they are (single
//     quotes are no JSON, so the decoder refuses them later).
//
// Nothing else is relaxed: trailing commas, unquoted keys and the like are
// syntax errors. Xray decodes one JSON value with a json.Decoder and does
// not look past it, so text after the config's closing brace is ignored.
// stripComments implements the same machine, so that this package accepts
// exactly what Xray accepts.

// stripState is the state of the comment filter.
type stripState uint8

const (
	stContent stripState = iota
	stEscape
	stDouble
	stDoubleEscape
	stSingle
	stSingleEscape
	stLineComment
	stSlash
	stBlockComment
	stBlockCommentStar
)

// stripComments returns data without comments, as Xray's reader filters it.
// If pos is not nil, it is set to the offset in data of each byte of the
// result.
func stripComments(data []byte, pos *[]int) []byte {
	out := make([]byte, 0, len(data))
	var at []int
	emit := func(b byte, i int) {
		out = append(out, b)
		if pos != nil {
			at = append(at, i)
		}
	}
	st := stContent
	slash := 0 // offset of the '/' that put the filter in stSlash
	for i, c := range data {
		switch st {
		case stContent:
			switch c {
			case '"':
				st = stDouble
				emit(c, i)
			case '\'':
				st = stSingle
				emit(c, i)
			case '\\':
				st = stEscape
			case '#':
				st = stLineComment
			case '/':
				st = stSlash
				slash = i
			default:
				emit(c, i)
			}
		case stEscape:
			emit('\\', i-1)
			emit(c, i)
			st = stContent
		case stDouble, stSingle:
			quote, esc := byte('"'), stDoubleEscape
			if st == stSingle {
				quote, esc = '\'', stSingleEscape
			}
			switch c {
			case quote:
				st = stContent
				emit(c, i)
			case '\\':
				st = esc
			default:
				emit(c, i)
			}
		case stDoubleEscape:
			emit('\\', i-1)
			emit(c, i)
			st = stDouble
		case stSingleEscape:
			emit('\\', i-1)
			emit(c, i)
			st = stSingle
		case stLineComment:
			if c == '\n' {
				st = stContent
				emit(c, i)
			}
		case stSlash:
			switch c {
			case '/':
				st = stLineComment
			case '*':
				st = stBlockComment
			default:
				// As Xray's reader: both bytes are kept, the state is not
				// reset.
				emit('/', slash)
				emit(c, i)
			}
		case stBlockComment:
			switch c {
			case '*':
				st = stBlockCommentStar
			case '\n':
				emit(c, i)
			}
		case stBlockCommentStar:
			switch c {
			case '/':
				st = stContent
			case '*':
			case '\n':
				emit(c, i)
			default:
				st = stBlockComment
			}
		}
	}
	if pos != nil {
		*pos = at
	}
	return out
}

// decodeJSONC decodes the first JSON value of data, after stripping its
// comments, into v, as Xray decodes a config file. A syntax error wraps
// ErrSyntax, a value of the wrong type ErrInvalid; both name the position in
// data as LINE:COL.
func decodeJSONC(name string, data []byte, v any) error {
	clean := stripComments(data, nil)
	// The usual file is one value and nothing after it: decoded in place.
	// A json.Decoder copies the input into a buffer it grows as it reads
	// (two to three times the file in garbage); it reads the first value
	// alone, as Xray does, and says where an error is, so a file the fast
	// way refuses is decoded again that way, into a fresh value.
	if json.Unmarshal(clean, v) == nil {
		return nil
	}
	if rv := reflect.ValueOf(v); rv.Kind() == reflect.Pointer && !rv.IsNil() {
		rv.Elem().SetZero()
	}
	dec := json.NewDecoder(bytes.NewReader(clean))
	err := dec.Decode(v)
	if err == nil {
		return nil
	}
	var (
		syn *json.SyntaxError
		typ *json.UnmarshalTypeError
	)
	switch {
	case errors.Is(err, io.EOF):
		return fmt.Errorf("%w: %s: no JSON value (the file is empty or all comments)", ErrSyntax, name)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("%w: %s:%s: unexpected end of file", ErrSyntax, name, position(data, len(clean)))
	case errors.As(err, &syn):
		// Offset counts the bytes read, the bad one included.
		return fmt.Errorf("%w: %s:%s: %w", ErrSyntax, name, position(data, int(syn.Offset)-1), err)
	case errors.As(err, &typ):
		field := typ.Field
		if field == "" {
			field = "the config"
		}
		return fmt.Errorf("%w: %s:%s: %s: got a JSON %s, want %s", ErrInvalid, name,
			position(data, int(typ.Offset)-1), field, typ.Value, jsonKind(typ.Type))
	}
	return fmt.Errorf("%w: %s: %w", ErrInvalid, name, err)
}

// position returns "LINE:COL" (both from 1, COL in characters) of the byte
// of data that became clean[off] when its comments were stripped; an
// offset past the end is the end of data.
func position(data []byte, off int) string {
	var at []int
	stripComments(data, &at)
	o := len(data)
	switch {
	case off < 0 && len(at) > 0:
		o = at[0]
	case off >= 0 && off < len(at):
		o = at[off]
	}
	line, col := 1, 1
	for i := 0; i < o && i < len(data); {
		r, n := utf8.DecodeRune(data[i:])
		if r == '\n' {
			line, col = line+1, 1
		} else {
			col++
		}
		i += n
	}
	return fmt.Sprintf("%d:%d", line, col)
}

// jsonKind names the JSON value that decodes into a value of type t.
func jsonKind(t reflect.Type) string {
	if t == nil {
		return "another value"
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uint:
		return fmt.Sprintf("a whole number from 0 to %d", uint64(1)<<(t.Bits())-1)
	case reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64, reflect.Int:
		return "a whole number"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Struct, reflect.Map:
		return "an object"
	}
	return "another value"
}
