package xraystats

// The Go code for Xray's gRPC API in internal/xraypb is generated from our
// own minimal copies of Xray's .proto files in proto/. Needs protoc.
//go:generate sh proto/generate.sh
