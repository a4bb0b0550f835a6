package main

// version is bwagent's version, set at build time by make build and make
// deb with -ldflags "-X main.version=..." (scripts/version.sh); bwctl has
// its own, set the same way.
var version = "dev"
