#!/bin/bash
# Prepares everything bench/gpu_check.sh needs beyond Python 3.12 on a bare GPU box with
# no network, into bench/gpu_check/carry/ (git-ignored, < 60 MiB):
#   crun/            crun and every library it links (with the loader), run through that loader
#   image/           an OCI image layout: busybox + cuda_check + the C runtime it and libcuda need
#   wheelhouse/      manylinux wheels (cp312, and this host's Python for a local dry run) of what
#                    the check imports, and synord's own wheel (the full dependency set is ~150 MiB:
#                    scipy, numpy, matplotlib, wasmtime... none of which the check path imports)
# Run here (network, Debian with crun, gcc, busybox-static): bash bench/gpu_check_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
CARRY=bench/gpu_check/carry
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=/work/main/.venv/bin/python
rm -rf "$CARRY" && mkdir -p "$CARRY"/{crun/lib,wheelhouse,build}

# 1. crun with its libraries and loader (the target's glibc may be older than Debian 12's).
CRUN=$(command -v crun)
cp "$CRUN" "$CARRY/crun/crun.bin"
for lib in $(ldd "$CRUN" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do cp -L "$lib" "$CARRY/crun/lib/"; done
cat > "$CARRY/crun/crun" <<'SH'
#!/bin/sh
# crun through its own loader and libraries (prepared by bench/gpu_check_prepare.sh)
d=$(dirname "$(readlink -f "$0")")
exec "$d/lib/ld-linux-x86-64.so.2" --library-path "$d/lib" "$d/crun.bin" "$@"
SH
chmod +x "$CARRY/crun/crun"
"$CARRY/crun/crun" --version | head -1

# 2. the CUDA check program and the image it runs in.
gcc -O2 -Wall -o "$CARRY/build/cuda_check" bench/gpu_check/cuda_check.c -ldl
"$PY" - "$CARRY" <<'PYEOF'
import subprocess, sys
from pathlib import Path
sys.path.insert(0, ".")
from synord.runtimes import oci_build as oci
carry = Path(sys.argv[1])
prog = carry / "build" / "cuda_check"
files = {"/cuda/cuda_check": prog.read_bytes()}
# The C runtime cuda_check needs, and what libcuda.so.1 links (libm, libpthread, librt, libdl).
libs = {l.split("=>")[1].split()[0] for l in subprocess.run(["ldd", str(prog)], capture_output=True,
        text=True).stdout.splitlines() if "=>" in l}
for name in ("libm.so.6", "libpthread.so.0", "librt.so.1", "libdl.so.2", "libgcc_s.so.1", "libstdc++.so.6"):
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"):
        if Path(d, name).exists():
            libs.add(str(Path(d, name)))
            break
for lib in sorted(libs):
    files["/lib/x86_64-linux-gnu/" + Path(lib).name] = Path(lib).resolve().read_bytes()
files["/lib64/ld-linux-x86-64.so.2"] = Path("/lib64/ld-linux-x86-64.so.2").resolve().read_bytes()
digest = oci.build_busybox_image(carry / "image", files=files, entrypoint=["/cuda/cuda_check"])
print("image", digest, "with", len(files), "files")
PYEOF
rm -rf "$CARRY/build"

# 3. wheels: what the check imports, for Python 3.12 (the target) and this host (a dry run here).
PKGS="trio>=0.25 psutil>=5.9 nvidia-ml-py>=12 pyyaml>=6"
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$CARRY/wheelhouse" $PKGS
"$PY" -m pip download -q --only-binary=:all: -d "$CARRY/wheelhouse" $PKGS
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$CARRY/wheelhouse" "$REPO"
rm -rf "$REPO/build"
du -sh "$CARRY"
