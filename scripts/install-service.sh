#!/usr/bin/env bash
# Installs the systemd unit stapes.service (docs/operating.md). It never starts the service: installing and
# `systemctl daemon-reload` only; STAPES_ENABLE=1 also enables it at boot. On a machine where systemd is not
# running (a container, a CI runner), it installs the file and says so.
#   STAPES_UNIT_DIR  where the unit goes (default /etc/systemd/system)
#   STAPESD          the stapesd to run (default: this checkout's .venv/bin/stapesd)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
unit_dir="${STAPES_UNIT_DIR:-/etc/systemd/system}"
stapesd="${STAPESD:-$repo/.venv/bin/stapesd}"
unit="$unit_dir/stapes.service"

mkdir -p "$unit_dir"
new="$(sed -e "s|@STAPESD@|$stapesd|g" -e "s|@REPO@|$repo|g" "$repo/scripts/stapes.service.in")"
if [ -f "$unit" ] && [ "$(cat "$unit")" = "$new" ]; then
    echo "install-service: $unit is up to date"
else
    printf '%s\n' "$new" > "$unit.tmp"
    chmod 0644 "$unit.tmp"
    mv "$unit.tmp" "$unit"
    echo "install-service: installed $unit (runs $stapesd; not started: systemctl start stapes)"
fi

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload
    if [ "${STAPES_ENABLE:-0}" = 1 ]; then
        systemctl enable stapes.service
    fi
else
    echo "install-service: systemd is not running here; the unit takes effect where it does"
fi
