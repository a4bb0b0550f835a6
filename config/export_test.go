package config

// SetDefaultPath makes Load read p instead of DefaultPath until restore is
// called.
func SetDefaultPath(p string) (restore func()) {
	old := defaultPath
	defaultPath = p
	return func() { defaultPath = old }
}

// ArrayKeys returns the dotted keys of the tables of every array of tables,
// such as "notify.webhook.url".
func ArrayKeys() []string {
	var keys []string
	for _, a := range arrayDefs {
		for _, d := range a.keys(0) {
			keys = append(keys, a.path+"."+d.path)
		}
	}
	return keys
}
