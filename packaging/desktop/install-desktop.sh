#!/usr/bin/env bash
# Install the desktop pieces of synord for a contributor's session:
#   - the tray, started at login (XDG autostart: synord-tray.desktop)
#   - a "synord dashboard" launcher in the applications menu
#   - the icons (hicolor theme, scalable)
# The daemon itself runs as today (`synord daemon`, or packaging/install-service.sh).
#
#   packaging/desktop/install-desktop.sh [--system] [--synord PATH] [--uninstall]
#     (default)  for the current user: $XDG_CONFIG_HOME/autostart, $XDG_DATA_HOME/{applications,icons}
#     --system   for every user (root): /etc/xdg/autostart, /usr/share/{applications,icons}
#     --synord   the synord command to run (default: `synord` on PATH, else this checkout's .venv)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mode=user synord="" action=install
while (($#)); do
  case "$1" in
    --system) mode=system ;;
    --synord) synord=${2:?--synord needs a path}; shift ;;
    --uninstall) action=uninstall ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install-desktop: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$mode" = system ]; then
  [ "$(id -u)" = 0 ] || { echo "install-desktop: --system needs root" >&2; exit 1; }
  autostart=/etc/xdg/autostart apps=/usr/share/applications icons=/usr/share/icons/hicolor/scalable/apps
else
  config=${XDG_CONFIG_HOME:-$HOME/.config} data=${XDG_DATA_HOME:-$HOME/.local/share}
  autostart=$config/autostart apps=$data/applications icons=$data/icons/hicolor/scalable/apps
fi

if [ "$action" = uninstall ]; then
  rm -f "$autostart/synord-tray.desktop" "$apps/synord-dashboard.desktop" "$icons"/synord-*.svg
  echo "install-desktop: removed the tray autostart, the launcher and the icons"
  exit 0
fi

if [ -z "$synord" ]; then
  synord=$(command -v synord || true)
  [ -n "$synord" ] || synord=$root/.venv/bin/synord
fi
[ -x "$synord" ] || { echo "install-desktop: $synord is not an executable synord (use --synord PATH)" >&2; exit 1; }
synord=$(cd "$(dirname "$synord")" && pwd)/$(basename "$synord")  # absolute: autostart has no cwd
case "$synord" in *[[:space:]\"\'\\]*)
  echo "install-desktop: $synord: a path with spaces or quotes cannot go in Exec= unquoted" >&2; exit 1 ;;
esac

install -d "$autostart" "$apps" "$icons"
for name in synord-tray synord-dashboard; do
  tmp=$(mktemp --suffix=.desktop)
  sed "s|@SYNORD@|$synord|" "$here/$name.desktop.in" > "$tmp"
  if command -v desktop-file-validate >/dev/null; then desktop-file-validate "$tmp"; fi
  case "$name" in synord-tray) dest=$autostart ;; *) dest=$apps ;; esac
  install -m 0644 "$tmp" "$dest/$name.desktop"
  rm -f "$tmp"
done
install -m 0644 "$root"/synord/icons/synord-*.svg "$icons/"
if command -v gtk-update-icon-cache >/dev/null && [ -f "${icons%/scalable/apps}/index.theme" ]; then
  gtk-update-icon-cache -q "${icons%/scalable/apps}" || true
fi
echo "install-desktop: the tray starts at your next login (now: $synord tray &)"
echo "install-desktop: 'synord dashboard' is in the applications menu"
