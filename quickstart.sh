#!/usr/bin/env bash
# The two quick-start commands (README):
#   ./quickstart.sh demo   install everything, then run `synord demo`
#   ./quickstart.sh test   install everything, then run the whole test suite
# Idempotent: each step checks what is already there. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc libc6-dev libgmp-dev # venv, fastecdsa build, static guest init
  crun runc runsc bubblewrap umoci skopeo busybox-static # container sandboxes, OCI images
  qemu-system-x86 cpio zstd xz-utils                     # microVMs and the guest image build
  pocl-opencl-icd ocl-icd-libopencl1                     # OpenCL on CPUs without a GPU
  clang lld wasi-libc libclang-rt-14-dev-wasm32 binaryen # building the test WASM modules
  iproute2 procps
  python3-gi gir1.2-gtk-3.0 gir1.2-ayatanaappindicator3-0.1 librsvg2-common # `synord tray`
  chromium chromium-driver fonts-dejavu-core             # the dashboard's browser test
  xvfb trayer xdotool x11-utils imagemagick desktop-file-utils dbus # the tray's tests
)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    if [ "$(id -u)" != 0 ]; then echo "quickstart: need root to install ${missing[*]}" >&2; exit 1; fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

install_venv() {
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
  fi
  local stamp=.venv/.synord-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "pip install -e .[test]"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
  fi
}

build_assets() {
  # Guest kernel + initramfs for microVMs, test WASM modules and OCI images.
  # Each script is idempotent and skips work whose output is newer than its inputs.
  for s in packaging/guest/build.sh tests/assets/build.sh; do
    if [ -f "$s" ]; then log "$s"; bash "$s"; fi
  done
}

setup() { install_apt; install_venv; build_assets; }

case "${1:-}" in
  demo)
    setup
    shift
    exec .venv/bin/synord demo "$@"
    ;;
  test)
    setup
    shift
    # -p no:cacheprovider: CI runs from a read-only-friendly clean clone
    # --durations: the slowest tests, to keep an eye on CI time (2 cores). Serial: with two
    # xdist workers timing-sensitive daemon tests failed under load. The testbed's tests
    # (network namespaces, hole punching) run in a pytest of their own, after the rest:
    # in one process with the rest, the first two NAT tests failed; alone they pass.
    rc=0
    .venv/bin/python -m pytest -p no:cacheprovider -ra --durations=30 -m "not netlab" "$@" || rc=$?
    nat=0
    .venv/bin/python -m pytest -p no:cacheprovider -ra -m netlab "$@" || nat=$?
    # exit 5 (no test selected) of one phase is fine when the other ran tests
    if [ "$nat" -eq 5 ] && [ "$rc" -ne 5 ]; then nat=0; fi
    if [ "$rc" -eq 5 ] && [ "$nat" -ne 5 ]; then rc=0; fi
    [ "$rc" -ne 0 ] && exit "$rc"
    exit "$nat"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: $0 demo|test|setup" >&2
    exit 2
    ;;
esac
