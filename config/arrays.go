package config

import (
	"bytes"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/BurntSushi/toml"
)

// arrayDef is an array of tables of the file, such as [[notify.webhook]]:
// any number of tables (none by default), each with the keys keys gives.
// In errors a table's key reads PATH[N].KEY, N counting the tables of PATH
// in the file from 1: notify.webhook[2].url.
type arrayDef struct {
	path string // dotted: "notify.webhook"
	// doc is the comment above the tables in String's output: what a
	// table is, and its keys.
	doc string
	// len returns how many tables c has; add appends one with every key
	// at its default.
	len func(c *Config) int
	add func(c *Config)
	// keys returns the keys of the i-th table, each bound to it; a key's
	// path is its name within the table ("url").
	keys func(i int) []*keyDef
	// check checks the i-th table as a whole once its keys are set: keys
	// that must be set, tables that repeat an earlier one. It returns the
	// key the problem is at ("" for the table). Nil if anything goes.
	check func(c *Config, i int) (key string, err error)
	// sample appends a table with example values, shown commented out in
	// String's output when there is none.
	sample func(c *Config)
}

// elemPath is the key of the i-th (from 0) table of a, or of its key.
func (a *arrayDef) elemPath(i int, key string) string {
	p := fmt.Sprintf("%s[%d]", a.path, i+1)
	if key != "" {
		p += "." + key
	}
	return p
}

// arrayOf returns the array a key of the file is, or is in, or nil.
func arrayOf(path string) *arrayDef {
	for _, a := range arrayDefs {
		if path == a.path || strings.HasPrefix(path, a.path+".") {
			return a
		}
	}
	return nil
}

// elemRef locates an error in one table of an array.
type elemRef struct {
	array *arrayDef
	index int    // from 0
	key   string // "" for the table itself
}

// applyArray applies key k of the file if it is an array of tables or in
// one: the whole array, at its first key, each table's keys in the order
// of its definition. It reports whether k was one.
func (p *parser) applyArray(c *Config, k toml.Key) (bool, error) {
	a := arrayOf(k.String())
	if a == nil {
		return false, nil
	}
	if p.arrays == nil {
		p.arrays = make(map[string]bool)
	}
	if p.arrays[a.path] {
		return true, nil
	}
	p.arrays[a.path] = true
	ak := toml.Key(strings.Split(a.path, "."))
	v := p.value(ak)
	tables, ok := asTables(v)
	if !ok {
		return true, p.errAt(ak, invalidf("must be an array of tables ([[%s]]), got %s", a.path, describe(v)))
	}
	for i, t := range tables {
		a.add(c)
		defs := a.keys(i)
		for _, name := range slices.Sorted(maps.Keys(t)) {
			if slices.ContainsFunc(defs, func(d *keyDef) bool { return d.path == name }) {
				continue
			}
			msg := "unknown key " + a.elemPath(i, name)
			if s := suggestIn(name, defs); s != "" {
				msg += " (did you mean " + a.elemPath(i, s) + "?)"
			}
			return true, p.errElem(elemRef{a, i, name}, &kindError{kind: ErrUnknownKey, msg: msg})
		}
		for _, d := range defs {
			v, ok := t[d.path]
			if !ok {
				continue
			}
			if err := d.set(c, v); err != nil {
				return true, p.errElem(elemRef{a, i, d.path}, err)
			}
			if d.check != nil {
				if err := d.check(c); err != nil {
					return true, p.errElem(elemRef{a, i, d.path}, err)
				}
			}
		}
		if a.check != nil {
			if key, err := a.check(c, i); err != nil {
				return true, p.errElem(elemRef{a, i, key}, err)
			}
		}
	}
	return true, nil
}

// asTables returns v as an array of tables: [[x]] tables or an inline
// array of inline tables.
func asTables(v any) ([]map[string]any, bool) {
	switch v := v.(type) {
	case []map[string]any:
		return v, true
	case []any:
		ts := make([]map[string]any, len(v))
		for i, e := range v {
			t, ok := e.(map[string]any)
			if !ok {
				return nil, false
			}
			ts[i] = t
		}
		return ts, true
	}
	return nil, false
}

// suggestIn returns the key of defs an unknown key name was probably meant
// to be, or "".
func suggestIn(name string, defs []*keyDef) string {
	best, bestDist := "", max(1, len(name)/3)+1
	for _, d := range defs {
		if strings.EqualFold(d.path, name) {
			return d.path
		}
		if n := distance(strings.ToLower(name), d.path); n < bestDist {
			best, bestDist = d.path, n
		}
	}
	return best
}

// errElem returns err at the key (or the start) of a table of an array.
func (p *parser) errElem(ref elemRef, err error) *Error {
	return &Error{File: p.name, Line: locateElem(p.data, ref), Key: ref.array.elemPath(ref.index, ref.key), Err: err, elem: &ref}
}

// locateElem returns the line where the key ref names starts in data, or
// the line of its table when the table does not set it; 0 if not found.
//
// The decoder keeps one position per dotted key, the last table's, so a
// table's own keys cannot be told apart that way. Instead locateElem
// decodes ever longer prefixes of data, a line at a time: the key starts on
// the line after the last prefix that decodes without it (the lines
// between are a multi-line value, which does not decode cut short). It
// runs only for errors; a configuration file is short.
func locateElem(data []byte, ref elemRef) int {
	path := strings.Split(ref.array.path, ".")
	has := func(prefix []byte, key string) (ok, valid bool) {
		var raw map[string]any
		if _, err := toml.Decode(string(prefix), &raw); err != nil {
			return false, false
		}
		var v any = raw
		for _, part := range path {
			m, isMap := v.(map[string]any)
			if !isMap {
				return false, true
			}
			v = m[part]
		}
		ts, _ := asTables(v)
		if len(ts) <= ref.index {
			return false, true
		}
		if key == "" {
			return true, true
		}
		_, ok = ts[ref.index][key]
		return ok, true
	}
	find := func(key string) int {
		lastGood := 0
		end := 0
		for n := 1; end < len(data); n++ {
			next := bytes.IndexByte(data[end:], '\n')
			if next < 0 {
				end = len(data)
			} else {
				end += next + 1
			}
			ok, valid := has(data[:end], key)
			switch {
			case ok:
				return lastGood + 1
			case valid:
				lastGood = n
			}
		}
		return 0
	}
	if ref.key != "" {
		if line := find(ref.key); line > 0 {
			return line
		}
	}
	return find("")
}

// checkArrays checks every table of every array in c, for Validate.
func (c Config) checkArrays() error {
	for _, a := range arrayDefs {
		for i := range a.len(&c) {
			for _, d := range a.keys(i) {
				if d.check == nil {
					continue
				}
				if err := d.check(&c); err != nil {
					return &Error{Key: a.elemPath(i, d.path), Err: err, elem: &elemRef{a, i, d.path}}
				}
			}
			if a.check != nil {
				if key, err := a.check(&c, i); err != nil {
					return &Error{Key: a.elemPath(i, key), Err: err, elem: &elemRef{a, i, key}}
				}
			}
		}
	}
	return nil
}

// renderArrays writes every array of c for String: each table with all its
// keys, or a commented-out sample table when there is none.
func renderArrays(b *strings.Builder, c *Config) {
	for _, a := range arrayDefs {
		b.WriteString("\n")
		comment(b, a.doc)
		n := a.len(c)
		if n == 0 {
			var s Config
			a.sample(&s)
			var t strings.Builder
			writeTable(&t, a, &s, 0)
			comment(b, strings.TrimSuffix(t.String(), "\n"))
			continue
		}
		for i := range n {
			if i > 0 {
				b.WriteString("\n")
			}
			writeTable(b, a, c, i)
		}
	}
}

func writeTable(b *strings.Builder, a *arrayDef, c *Config, i int) {
	b.WriteString("[[" + a.path + "]]\n")
	for _, d := range a.keys(i) {
		b.WriteString(d.path + " = " + d.value(c) + "\n")
	}
}
