package control

// The Go code for the control API in internal/controlpb is generated from
// proto/control.proto. Needs protoc.
//go:generate sh proto/generate.sh
