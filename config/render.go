package config

import (
	"strings"
)

// header starts String's output.
const header = `# bwagent configuration: /etc/bwagent/bwagent.toml, or the file given with
# bwagent --config FILE.
#
# Every key is optional: a key left out keeps its default, and without the
# file the agent runs with every default. config/example.toml in bwagent's
# source is this file with every key at its default.
`

// String renders c as a commented TOML file with every key, which Parse
// reads back to an equal Config (see Equal) if c is valid. The defaults
// render as config/example.toml.
func (c Config) String() string {
	var b strings.Builder
	b.WriteString(header)
	table := ""
	for _, d := range keyDefs {
		t, key := splitLast(d.path)
		if t != table {
			table = t
			b.WriteString("\n")
			for _, td := range tableDefs {
				if td.name == t {
					comment(&b, td.doc)
				}
			}
			b.WriteString("[" + t + "]\n")
		} else if d.doc != "" {
			b.WriteString("\n")
		}
		comment(&b, d.doc)
		b.WriteString(key + " = " + d.value(&c) + "\n")
	}
	renderArrays(&b, &c)
	return b.String()
}

// comment writes doc as TOML comment lines.
func comment(b *strings.Builder, doc string) {
	if doc == "" {
		return
	}
	for line := range strings.SplitSeq(doc, "\n") {
		b.WriteString(strings.TrimRight("# "+line, " ") + "\n")
	}
}
