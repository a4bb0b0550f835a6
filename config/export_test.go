package config

// SetDefaultPath makes Load read p instead of DefaultPath until restore is
// called.
func SetDefaultPath(p string) (restore func()) {
	old := defaultPath
	defaultPath = p
	return func() { defaultPath = old }
}
