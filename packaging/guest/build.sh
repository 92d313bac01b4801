#!/bin/sh
# Build the microVM guest: an uncompressed vmlinux and the base initramfs.
#
#   packaging/guest/build.sh [OUT_DIR]      (default: packaging/guest/out)
#
# Produces in OUT_DIR:
#   vmlinux        uncompressed ELF kernel of Debian's current linux-image-*-amd64
#                  (serial 8250 console and initramfs support are built in)
#   base.cpio      newc archive holding /init (init.c, static) and its mount points;
#                  the runtime appends one per-task cpio (rootfs + task files)
#   busybox        busybox-static, for building plain rootfs directories
#   manifest.json  kernel version and sha256 of each piece
#   cache/         the downloaded kernel .deb (kept: reruns do not download)
# Idempotent: each step is skipped when its output is up to date.
# Needs: apt-get, dpkg-deb, gcc (static glibc), cpio, python3, busybox-static.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$HERE/out}
mkdir -p "$OUT/cache"
OUT=$(cd "$OUT" && pwd)

# 1. Kernel: the version the linux-image-amd64 metapackage points at today.
PKG=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
if [ -z "$PKG" ]; then
    # No apt metadata: reuse whatever kernel .deb is cached.
    DEB=$(ls "$OUT"/cache/linux-image-*-amd64_*.deb 2>/dev/null | tail -n1 || true)
    [ -n "$DEB" ] || { echo "build.sh: cannot resolve linux-image-amd64 (run apt-get update)" >&2; exit 1; }
else
    DEB=$(ls "$OUT"/cache/"$PKG"_*.deb 2>/dev/null | tail -n1 || true)
    if [ -z "$DEB" ]; then
        echo "build.sh: downloading $PKG" >&2
        # apt's _apt user may not write into OUT: download in a temp dir it can reach.
        TMPD=$(mktemp -d)
        chmod 777 "$TMPD"
        (cd "$TMPD" && apt-get download -q "$PKG" >&2)
        mv "$TMPD"/"$PKG"_*.deb "$OUT/cache/"
        rm -rf "$TMPD"
        DEB=$(ls "$OUT"/cache/"$PKG"_*.deb | tail -n1)
    fi
fi
KVER=$(basename "$DEB" | sed 's/^linux-image-\(.*\)_.*_amd64\.deb$/\1/')

if [ ! -s "$OUT/vmlinux" ] || [ "$DEB" -nt "$OUT/vmlinux" ] || [ "$HERE/extract_vmlinux.py" -nt "$OUT/vmlinux" ]; then
    echo "build.sh: extracting vmlinux from $(basename "$DEB")" >&2
    X=$(mktemp -d)
    dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$X" --wildcards './boot/vmlinuz-*' './boot/config-*'
    python3 "$HERE/extract_vmlinux.py" "$X"/boot/vmlinuz-* "$OUT/vmlinux"
    cp "$X"/boot/config-* "$OUT/kernel.config"
    rm -rf "$X"
fi

# 2. Base initramfs: our init, statically linked, plus its mount points.
if [ ! -s "$OUT/init" ] || [ "$HERE/init.c" -nt "$OUT/init" ]; then
    echo "build.sh: compiling init" >&2
    gcc -static -Os -Wall -o "$OUT/init.tmp" "$HERE/init.c"
    strip "$OUT/init.tmp"
    mv "$OUT/init.tmp" "$OUT/init"
fi
if [ ! -s "$OUT/base.cpio" ] || [ "$OUT/init" -nt "$OUT/base.cpio" ]; then
    echo "build.sh: packing base.cpio" >&2
    S=$(mktemp -d)
    mkdir -p "$S/dev" "$S/proc" "$S/sys" "$S/synord" "$S/rootfs"
    cp "$OUT/init" "$S/init"
    chmod 0755 "$S/init"
    (cd "$S" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible -R 0:0 > "$OUT/base.cpio.tmp")
    mv "$OUT/base.cpio.tmp" "$OUT/base.cpio"
    rm -rf "$S"
fi

# 3. busybox-static: the runtime builds plain rootfs directories from it.
BB=/bin/busybox
[ -x "$BB" ] || BB=$(command -v busybox || true)
if [ -z "$BB" ] || ldd "$BB" >/dev/null 2>&1; then
    echo "build.sh: warning: no static busybox (apt-get install busybox-static)" >&2
elif [ ! -s "$OUT/busybox" ] || [ "$BB" -nt "$OUT/busybox" ]; then
    cp "$BB" "$OUT/busybox"
fi

cat > "$OUT/manifest.json.tmp" <<JSON
{"kernel_version": "$KVER",
 "kernel_package": "$(basename "$DEB")",
 "vmlinux_sha256": "$(sha256sum "$OUT/vmlinux" | cut -d' ' -f1)",
 "base_cpio_sha256": "$(sha256sum "$OUT/base.cpio" | cut -d' ' -f1)"}
JSON
mv "$OUT/manifest.json.tmp" "$OUT/manifest.json"
echo "build.sh: guest ready in $OUT (kernel $KVER)" >&2
