#!/usr/bin/env bash
# Installs bwagent as a systemd service on a Debian machine, as root:
# the binary, the unit, the documented default configuration (as an example;
# the agent needs no configuration file), and starts it when systemd runs.
# Safe to run again: it replaces the binary and restarts the service.
#
#   install.sh BINARY
#   install.sh --print-unit    print the unit it installs
set -euo pipefail
cd "$(dirname "$0")/.."

# The unit is the Debian package's (scripts/bwagent.service) with this
# install's paths under /usr/local.
unit() {
	sed -e 's|^ExecStart=/usr/sbin/bwagent$|ExecStart=/usr/local/sbin/bwagent|' \
		-e 's|^Documentation=file:///usr/share/doc/bwagent/|Documentation=file:///usr/local/share/doc/bwagent/|' \
		scripts/bwagent.service
}
if [ "${1:-}" = "--print-unit" ]; then
	unit
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "install: run as root (sudo $0)" >&2
	exit 1
fi
bin=${1:?usage: install.sh path/to/bwagent}

install -D -m 0755 "$bin" /usr/local/sbin/bwagent
install -D -m 0755 "$(dirname "$bin")/bwctl" /usr/local/bin/bwctl
# The bash tool's command, for operators' scripts: mapped onto bwctl.
install -D -m 0755 scripts/cek-bw-limit /usr/bin/cek-bw-limit
unit >/etc/systemd/system/bwagent.service.tmp
chmod 0644 /etc/systemd/system/bwagent.service.tmp
mv /etc/systemd/system/bwagent.service.tmp /etc/systemd/system/bwagent.service
install -D -m 0644 config/example.toml /etc/bwagent/bwagent.toml.example
install -D -m 0644 README.md /usr/local/share/doc/bwagent/README.md
# The unit lets the agent write only where these exist (ProtectSystem=strict):
# the operators' files and the limits file's directory.
install -d -m 0755 /etc/myvpn/usage /etc/myvpn/blocked_users /etc/xray
install -d -m 0700 /var/lib/bwagent

if [ -d /run/systemd/system ]; then
	if systemctl is-active --quiet bw-limit-check 2>/dev/null; then
		echo "install: stopping the bash tool's bw-limit-check service (bwagent replaces it)"
		systemctl disable --now bw-limit-check
	fi
	systemctl daemon-reload
	systemctl enable bwagent
	systemctl restart bwagent
	echo "install: bwagent is running: systemctl status bwagent; journalctl -u bwagent -f"
else
	echo "install: systemd is not running here; start the agent with /usr/local/sbin/bwagent"
fi
