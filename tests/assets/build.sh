#!/usr/bin/env bash
# Build test assets into tests/assets/build/ (gitignored). Idempotent: a target
# is rebuilt only when its source is newer. Usage: build.sh [section...]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/build"

# wasm: test modules for tests/test_runtime_wasm.py and bench/bench_wasm.py
# (Debian: clang lld wasi-libc libclang-rt-14-dev-wasm32).
build_wasm() {
    local out="$OUT/wasm" src="$HERE/wasm"
    if ! command -v clang >/dev/null; then
        echo "build.sh: no clang, skipping the wasm test modules (their tests will skip)" >&2
        return 0
    fi
    mkdir -p "$out"
    if [[ "$src/probe.c" -nt "$out/probe.wasm" ]]; then
        clang --target=wasm32-wasi -O2 -Wl,--strip-all -o "$out/probe.wasm.tmp" "$src/probe.c"
        mv "$out/probe.wasm.tmp" "$out/probe.wasm"
    fi
    # A reactor: no main, _initialize + exported step functions. __stack_pointer
    # must be exported (needs mutable-globals) so a checkpoint can carry it. No
    # --strip-all: it makes clang run wasm-opt, which rejects exported mutable globals.
    if [[ "$src/counter.c" -nt "$out/counter.wasm" ]]; then
        clang --target=wasm32-wasi -O2 -mexec-model=reactor -mmutable-globals \
            -Wl,--export=__stack_pointer \
            -o "$out/counter.wasm.tmp" "$src/counter.c"
        mv "$out/counter.wasm.tmp" "$out/counter.wasm"
    fi
}

# images: reproducible busybox OCI images (layout dir + oci-archive) from
# tests/assets/images/<name>/ for the container/microVM tests, bench and demo
# (Debian: busybox-static).
build_images() {
    local out="$OUT/images" src="$HERE/images" py="$HERE/../../.venv/bin/python"
    [[ -x "$py" ]] || py=python3
    mkdir -p "$out"
    for dir in "$src"/*/; do
        local name
        name="$(basename "$dir")"
        if [[ -f "$out/$name.tar" ]] && [[ -z "$(find "$dir" -newer "$out/$name.tar" -print -quit)" ]]; then
            continue
        fi
        rm -rf "$out/$name" "$out/$name.tar"
        PYTHONPATH="$HERE/../.." "$py" - "$dir" "$out/$name" <<'PY'
import sys
from pathlib import Path
from synord.runtimes.oci_build import build_busybox_image, pack_oci_archive
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
files = {"/" + p.relative_to(src).as_posix(): p.read_bytes() for p in sorted(src.rglob("*")) if p.is_file()}
digest = build_busybox_image(dest, files=files)
sha = pack_oci_archive(dest, dest.with_name(dest.name + ".tar"))
dest.with_name(dest.name + ".tar.sha256").write_text(sha + "\n")
print(f"image {dest.name}: manifest {digest}, archive sha256:{sha}")
PY
    done
}

# Runs the named sections, or every build_* function defined above.
main() {
    local sections=("$@")
    [[ ${#sections[@]} -gt 0 ]] || mapfile -t sections < <(compgen -A function build_ | sed 's/^build_//')
    for s in "${sections[@]}"; do
        "build_$s"
    done
}

main "$@"
