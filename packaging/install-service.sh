#!/usr/bin/env bash
# Install (or upgrade) synord as a systemd service on a provider host. Run as root.
#
#   packaging/install-service.sh [--wheel FILE] [options]
#
# 1. Debian packages the sandboxes need (crun/runc/runsc, QEMU, skopeo, ...);
# 2. a venv of its own, PREFIX/venv (default /opt/synord/venv), with synord
#    installed from a wheel (--wheel, else one built from this checkout);
# 3. the microVM guest kernel into the venv's data dir (PREFIX/venv/share/synord/guest),
#    copied from this checkout's packaging/guest/out or built there;
# 4. the service user and groups (sysusers), the unit, the state directory
#    /var/lib/synord (0750: members of group synord may use the CLI) and an identity;
# 5. systemctl enable, then start, or restart when it already ran (an upgrade).
# Idempotent: re-running with a newer wheel upgrades in place and restarts.
#
# Options:
#   --wheel FILE       install this wheel (default: build one from this checkout)
#   --prefix DIR       install root for the venv (default /opt/synord)
#   --destdir DIR      stage every file under DIR (packaging, tests); the unit still
#                      names the final paths
#   --user NAME        service user and group (default synord)
#   --pip-args "ARGS"  extra pip install arguments (e.g. "--no-index --find-links /srv/wheels")
#   --no-apt           do not apt-get install anything
#   --no-start         install and enable nothing in systemd (files only)
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
wheel="" prefix=/opt/synord destdir="" user=synord pip_args="" apt=1 start=1
while (($#)); do
  case "$1" in
    --wheel) wheel=$(realpath "$2"); shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --destdir) destdir=$(realpath -m "$2"); shift 2 ;;
    --user) user=$2; shift 2 ;;
    --pip-args) pip_args=$2; shift 2 ;;
    --no-apt) apt=0; shift ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-service: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "install-service: run as root" >&2; exit 1; }
log() { printf '==> %s\n' "$*" >&2; }

venv=$destdir$prefix/venv
state=$destdir/var/lib/synord
unitdir=$destdir/etc/systemd/system
sysusersdir=$destdir/usr/lib/sysusers.d

# 1. Debian packages for the sandboxes (the service runs them rootless: no docker, no daemon as root)
if ((apt)); then
  pkgs=(python3 python3-venv python3-dev gcc libc6-dev libgmp-dev crun runc runsc skopeo busybox-static
        qemu-system-x86 cpio zstd xz-utils)
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
fi

# 2. The venv and the wheel
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "$wheel" ]; then  # with the venv's pip: Debian's python3 has none
  log "building a wheel from $src"
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip wheel -q --no-deps --disable-pip-version-check $pip_args -w "$tmp" "$src"
  wheel=$(ls "$tmp"/synord-*.whl)
fi
[ -f "$wheel" ] || { echo "install-service: no wheel at $wheel" >&2; exit 1; }
before=$("$venv/bin/python" -m pip show synord 2>/dev/null | sed -n 's/^Version: //p' || true)
log "installing $(basename "$wheel") into $venv"
# Dependencies as needed, then the package itself again: a rebuilt wheel of the same
# version must replace the old files too.
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q --disable-pip-version-check $pip_args "$wheel"
# shellcheck disable=SC2086
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall $pip_args "$wheel"
after=$("$venv/bin/python" -m pip show synord | sed -n 's/^Version: //p')

# 3. The microVM guest kernel, where the installed runtime looks for it
guest=$venv/share/synord/guest
if [ -f "$src/packaging/guest/out/vmlinux" ] && [ -f "$src/packaging/guest/out/base.cpio" ]; then
  log "guest kernel: $src/packaging/guest/out -> $guest"
  mkdir -p "$guest.new"
  for f in vmlinux base.cpio manifest.json busybox; do
    [ -e "$src/packaging/guest/out/$f" ] && cp -a "$src/packaging/guest/out/$f" "$guest.new/"
  done
  rm -rf "$guest.old"; [ -d "$guest" ] && mv "$guest" "$guest.old"
  mv "$guest.new" "$guest"; rm -rf "$guest.old"
elif [ ! -f "$guest/vmlinux" ]; then
  log "building the guest kernel into $guest"
  sh "$src/packaging/guest/build.sh" "$guest" || log "guest build failed: no microVM tasks until it is built"
fi
chmod -R a+rX "$guest" 2>/dev/null || true
install -D -m 0644 "$src/packaging/README.md" "$venv/share/synord/README.md"  # the unit's Documentation=

# 4. User, unit, state directory, identity
mkdir -p "$sysusersdir" "$unitdir"
sed "s/^\([gum]\) synord /\1 $user /" "$src/packaging/systemd/synord.sysusers" > "$sysusersdir/$user.conf"
chmod 0644 "$sysusersdir/$user.conf"
if ! getent passwd "$user" >/dev/null; then
  log "creating user $user"
  if command -v systemd-sysusers >/dev/null && [ -z "$destdir" ]; then
    systemd-sysusers "$sysusersdir/$user.conf"
  else
    getent group "$user" >/dev/null || groupadd --system "$user"
    useradd --system --gid "$user" --home-dir /var/lib/synord --no-create-home \
      --shell /usr/sbin/nologin --comment "synord compute mesh daemon" "$user"
  fi
fi
if [ -z "$destdir" ]; then
  for g in kvm render video; do  # what SupplementaryGroups= names must exist
    getent group "$g" >/dev/null || groupadd --system "$g"
  done
fi
sed -e "s#/opt/synord/venv#$prefix/venv#g" -e "s/^User=synord$/User=$user/" -e "s/^Group=synord$/Group=$user/" \
  "$src/packaging/systemd/synord.service" > "$unitdir/synord.service"
chmod 0644 "$unitdir/synord.service"
install -d -o "$user" -g "$user" -m 0750 "$state"
if [ ! -f "$state/identity.key" ]; then
  log "creating the node identity in $state"
  SYNORD_HOME=$state "$venv/bin/synord" --home "$state" init >/dev/null
fi
chown -R "$user:$user" "$state"
[ -f "$state/api.token" ] && chmod 0640 "$state/api.token"

# 5. systemd
if ((!start)); then
  log "installed synord $after (--no-start: systemd left alone)"
  exit 0
fi
if [ ! -d /run/systemd/system ]; then
  log "installed synord $after; systemd is not running here (PID 1 is $(cat /proc/1/comm)): not enabled, not started"
  exit 0
fi
if [ -n "$destdir" ]; then
  log "installed synord $after under $destdir (--destdir): systemd left alone"
  exit 0
fi
systemctl daemon-reload
systemctl enable -q synord.service
if systemctl is-active -q synord.service; then
  log "restarting synord (${before:-none} -> $after)"
  systemctl restart synord.service
else
  log "starting synord $after"
  systemctl start synord.service
fi
systemctl --no-pager --lines=5 status synord.service || true
