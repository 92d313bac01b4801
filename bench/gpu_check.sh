#!/bin/bash
# The real-GPU check: on a bare Linux box with an NVIDIA driver, Python 3.12, root, and no
# network, in well under 5 minutes:
#   1. `synord probe --json` with the real NVML,
#   2. a real CUDA workload (bench/gpu_check/cuda_check.c: dlopen libcuda.so.1, JIT an
#      embedded PTX kernel, run it, check every result) inside a crun container, the GPU
#      injected by synord's own CDI path (synord.gpu_devices -> synord.runtimes.cdi -> synord.runtimes.container),
# and prints what it saw. Needs bench/gpu_check/carry/ from bench/gpu_check_prepare.sh.
# Exit 0: CUDA OK in the container; 1: no NVIDIA driver/GPU; 2: set-up problem; 3: the check failed.
set -u
cd "$(dirname "$0")/.."
CARRY=$PWD/bench/gpu_check/carry
PY=${PYTHON:-}
for c in python3.12 python3; do  # the first that runs (a pyenv shim may exist without its version)
    [ -n "$PY" ] && break
    "$c" -c 'import sys' 2>/dev/null && PY=$(command -v "$c")
done
if [ ! -d "$CARRY/wheelhouse" ]; then
    echo "gpu_check: $CARRY missing: run bench/gpu_check_prepare.sh where there is network" >&2
    exit 2
fi
WORK=$(mktemp -d /tmp/synord-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
echo "== python: $($PY --version 2>&1) ($PY)"
"$PY" -m venv "$WORK/venv" || { echo "gpu_check: cannot create a venv with $PY" >&2; exit 2; }
V="$WORK/venv/bin"
"$V/pip" install -q --no-index --find-links "$CARRY/wheelhouse" trio psutil nvidia-ml-py pyyaml &&
    "$V/pip" install -q --no-index --no-deps "$CARRY"/wheelhouse/synord-*.whl ||
    { echo "gpu_check: offline install from the wheelhouse failed" >&2; exit 2; }
# Run the installed synord (not this checkout) from a neutral directory, crun from the carry.
cd "$WORK" && PATH="$CARRY/crun:$PATH" SYNORD_HOME="$WORK/home" \
    timeout 280 "$V/python" "$OLDPWD/bench/gpu_check/gpu_check.py" "$CARRY"
