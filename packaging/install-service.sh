#!/usr/bin/env bash
# Install synord as a systemd service on a provider host (root).
#   packaging/install-service.sh [SRC_DIR]   (default: this checkout)
set -euo pipefail
src=$(cd "${1:-$(dirname "$0")/..}" && pwd)
dest=/opt/synord
[ "$(id -u)" = 0 ] || { echo "install-service: run as root" >&2; exit 1; }
"$src/quickstart.sh" setup
if [ "$src" != "$dest" ]; then
  mkdir -p "$dest"
  cp -a "$src/." "$dest/"
  rm -rf "$dest/.venv"
  (cd "$dest" && python3 -m venv .venv && .venv/bin/pip install -q "$dest")
fi
install -m 0644 "$src/packaging/systemd/synord.sysusers" /usr/lib/sysusers.d/synord.conf
systemd-sysusers /usr/lib/sysusers.d/synord.conf
install -m 0644 "$src/packaging/systemd/synord.service" /etc/systemd/system/synord.service
install -d -o synord -g synord -m 0700 /var/lib/synord
[ -f /var/lib/synord/identity.key ] || runuser -u synord -- "$dest/.venv/bin/synord" --home /var/lib/synord init
systemctl daemon-reload
systemctl enable --now synord.service
systemctl --no-pager status synord.service | head -5
