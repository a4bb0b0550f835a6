// Package xrayconf discovers the Xray users of a server from Xray-core's own
// JSON config: for each inbound that has users (VLESS, VMess, Trojan,
// Shadowsocks, Shadowsocks 2022), its tag and each client's email, level and
// account, which is what Xray's HandlerService needs to add the user again
// after removing it. It also finds the address of Xray's gRPC API, tells
// whether the config enables the stats that per-user accounting needs, and
// finds the file of Xray's access log ("log": {"access": PATH}), which names
// the user of each connection (see [Config.AccessLog]).
//
// The package reads the config as Xray v26 does (the references below are to
// Xray-core's source as of v26.3.27):
//
//   - Comments: "//", "#" and "/* */" are dropped before the JSON is decoded
//     (infra/conf/json/reader.go); nothing else is relaxed, so a trailing
//     comma is a syntax error; text after the config's closing brace is
//     ignored, as Xray decodes only the first JSON value
//     (infra/conf/serial/loader.go). Keys match case-insensitively, as
//     encoding/json does for Xray.
//   - Several files (xray -confdir DIR, or -c given more than once) are read
//     in order and merged by Config.Override (infra/conf/xray.go): a later
//     file's top-level object ("api", "stats", "policy", "routing", ...)
//     replaces the earlier one as a whole when it is present and not null;
//     each of its inbounds replaces the first inbound loaded so far with the
//     same tag (also the empty tag: an untagged inbound replaces the first
//     untagged one) and is otherwise appended. Outbounds are replaced by tag
//     too, but new ones are prepended unless the file name contains "tail";
//     this package does not read outbounds. -confdir takes the directory's
//     files whose names match ^.+\.(json|jsonc|toml|yaml|yml)$ in
//     os.ReadDir (lexical) order (main/run.go). This package reads JSON
//     only: a .toml, .yaml or .yml file is an [ErrUnsupported] error rather
//     than a silently partial config.
//   - Users (infra/conf/vless.go, vmess.go, trojan.go, shadowsocks.go):
//     VLESS clients have id, flow (an empty flow takes the inbound's
//     settings.flow), email and level; VMess clients id, email and level
//     (alterId is gone); Trojan clients password, email and level. A classic
//     Shadowsocks inbound with "clients" takes each client's OWN method (the
//     inbound's settings.method is not a default for them; a client without
//     one makes Xray refuse the config); without "clients" it is a
//     single-user inbound of settings.method, settings.password and
//     settings.email. A method of the "2022-blake3-" family makes a
//     Shadowsocks 2022 inbound: with clients, a multi-user inbound whose
//     clients' passwords are their keys; without, a single-user inbound;
//     with clients that have an "address", a relay. Only the multi-user
//     inbounds of each protocol (and classic Shadowsocks) can add and remove
//     users through the API.
//   - Xray refuses two clients of one VLESS, VMess or Trojan inbound with
//     the same email, compared case-insensitively, and two inbounds with the
//     same non-empty tag; this package does too ([ErrInvalid]).
//   - The log (infra/conf/log.go): a later file's "log" replaces the
//     earlier one as a whole. log.access is a file, "none" or empty (the
//     standard output); log.loglevel "none" turns the access log off too.
//   - The API (infra/conf/api.go, app/commander): with "api.listen" set,
//     Xray's gRPC server listens there itself; otherwise it is reached
//     through the inbound whose tag is "api.tag" (usually a dokodemo-door
//     inbound on 127.0.0.1), routed to the outbound of that tag by a routing
//     rule. An inbound without "listen" listens on all addresses.
//
// Parse checks only the parts of a config that it reads; `xray run -test`
// checks the rest. Problems that do not stop discovery (a client without an
// email, an email that cannot be a bwagent user name, an inbound without a
// tag, ...) are listed in [Config.Problems]; errors wrap [ErrNoConfig],
// [ErrSyntax], [ErrInvalid] or [ErrUnsupported] and name the file, and the
// line and column for JSON errors. The package never logs.
package xrayconf
