"""OCI image verification and unpacking (synord.runtimes.oci): no container runtime needed."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from synord.runtimes import oci, oci_build
from synord.runtimes.base import SpecError


def layer(*entries) -> bytes:
    """entries: (name, kind, payload) with kind file|dir|sym|link|chr|fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, payload in entries:
            ti = tarfile.TarInfo(name)
            ti.mode = 0o755 if kind == "dir" else 0o644
            data = None
            if kind == "file":
                data = payload.encode() if isinstance(payload, str) else payload
                ti.size = len(data)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, payload
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, payload
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def image(tmp_path: Path, *layers: bytes, compress=True) -> Path:
    d = tmp_path / "img"
    oci_build.build_image(d, list(layers), cmd=["/bin/true"], env=["A=1"], workdir="/w", compress=compress)
    return d


@pytest.mark.parametrize("compress", [True, False])
def test_layers_and_whiteouts(tmp_path, compress):
    l1 = layer(("etc", "dir", None), ("etc/keep", "file", "k"), ("etc/gone", "file", "g"),
               ("opq", "dir", None), ("opq/old", "file", "o"), ("f", "file", "v1"),
               ("lib", "dir", None), ("usr", "dir", None), ("usr/lib", "dir", None))
    l2 = layer(("etc/.wh.gone", "file", ""), ("opq/new", "file", "n"), ("opq/.wh..wh..opq", "file", ""),
               ("f", "file", "v2"), ("bin", "sym", "/usr/bin"), ("lib", "dir", None),
               ("l", "sym", "usr/lib"), ("l/via-link", "file", "x"), ("hard", "link", "etc/keep"),
               ("p", "fifo", None))
    root = tmp_path / "root"
    conf = oci.unpack_image(image(tmp_path, l1, l2, compress=compress), root)
    assert (conf.cmd, conf.env, conf.workdir) == (["/bin/true"], ["A=1"], "/w")
    assert conf.digest.startswith("sha256:")
    assert (root / "etc/keep").read_text() == "k" and not (root / "etc/gone").exists()
    assert sorted(os.listdir(root / "opq")) == ["new"]  # opaque dir keeps only this layer's entries
    assert (root / "f").read_text() == "v2"
    assert os.readlink(root / "bin") == "/usr/bin"  # absolute symlinks may exist, just not be followed
    assert (root / "usr/lib/via-link").read_text() == "x"  # in-root relative symlink followed
    assert os.stat(root / "hard").st_ino == os.stat(root / "etc/keep").st_ino


@pytest.mark.parametrize("entries", [
    [("../escape", "file", "x")],
    [("/abs", "file", "x")],
    [("a/../../escape", "file", "x")],
    [("esc", "sym", "../../.."), ("esc/owned", "file", "x")],        # write through ../ symlink
    [("null", "chr", None)],                                          # device node
    [("h", "link", "../../etc/passwd")],                              # hard link out of the root
], ids=["dotdot", "absolute", "inner-dotdot", "rel-symlink", "device", "hardlink"])
def test_hostile_layers_refused(tmp_path, entries):
    img = image(tmp_path, layer(*entries))
    root = tmp_path / "sub" / "root"
    with pytest.raises(SpecError):
        oci.unpack_image(img, root)
    assert not root.exists()  # partial rootfs removed
    assert not (tmp_path / "escape").exists() and not Path("/tmp/owned").exists()


def test_absolute_symlink_is_rerooted_not_followed_on_host(tmp_path):
    marker = tmp_path / "hostdir"
    marker.mkdir()
    img = image(tmp_path, layer(("esc", "sym", str(marker)), ("esc/owned", "file", "x"),
                                ("var", "dir", None), ("run", "dir", None), ("var/run", "sym", "/run"),
                                ("var/run/pid", "file", "1")))
    root = tmp_path / "root"
    oci.unpack_image(img, root)
    assert not (marker / "owned").exists()  # the host path was never written
    assert (root / str(marker).lstrip("/") / "owned").read_text() == "x"
    assert (root / "run/pid").read_text() == "1"


def _blobs(img: Path) -> list[Path]:
    return sorted((img / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)


def test_bad_digest_and_missing_blob(tmp_path):
    img = image(tmp_path, layer(("a", "file", "hello")))
    biggest = _blobs(img)[-1]
    biggest.write_bytes(biggest.read_bytes()[:-1] + b"\0")
    with pytest.raises(SpecError, match="digest"):
        oci.read_image(img)
    biggest.unlink()
    with pytest.raises(SpecError, match="missing"):
        oci.unpack_image(img, tmp_path / "root")


def test_diff_id_mismatch(tmp_path):
    img = image(tmp_path, layer(("a", "file", "hello")))
    # Rewrite the config with a wrong diff_id, re-address config, manifest and index consistently.
    index = json.loads((img / "index.json").read_text())
    mpath = img / "blobs/sha256" / index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads(mpath.read_text())
    cpath = img / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]
    config = json.loads(cpath.read_text())
    config["rootfs"]["diff_ids"] = ["sha256:" + "0" * 64]
    cblob = json.dumps(config).encode()
    import hashlib
    cd = hashlib.sha256(cblob).hexdigest()
    (img / "blobs/sha256" / cd).write_bytes(cblob)
    manifest["config"].update(digest="sha256:" + cd, size=len(cblob))
    mblob = json.dumps(manifest).encode()
    md = hashlib.sha256(mblob).hexdigest()
    (img / "blobs/sha256" / md).write_bytes(mblob)
    index["manifests"][0].update(digest="sha256:" + md, size=len(mblob))
    (img / "index.json").write_text(json.dumps(index))
    with pytest.raises(SpecError, match="diff_id"):
        oci.unpack_image(img, tmp_path / "root")


def test_garbage_inputs(tmp_path):
    with pytest.raises(SpecError):
        oci.unpack_image(tmp_path / "nope", tmp_path / "r")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(SpecError):
        oci.unpack_image(tmp_path / "junk.tar", tmp_path / "r")
    d = tmp_path / "d"
    d.mkdir()
    (d / "index.json").write_text("[1, 2]")
    with pytest.raises(SpecError):
        oci.unpack_image(d, tmp_path / "r")


def test_busybox_image_and_archive_are_reproducible(tmp_path):
    try:
        oci_build.busybox_binary()
    except SpecError as e:
        pytest.skip(f"this machine has no static busybox: {e}")
    files = {"/work/run.sh": "#!/bin/sh\necho hi\n"}
    d1 = oci_build.build_busybox_image(tmp_path / "a", files=files)
    d2 = oci_build.build_busybox_image(tmp_path / "b", files=files)
    assert d1 == d2
    t1 = oci_build.pack_oci_archive(tmp_path / "a", tmp_path / "a.tar")
    t2 = oci_build.pack_oci_archive(tmp_path / "b", tmp_path / "b.tar")
    assert t1 == t2
    root = tmp_path / "root"
    conf = oci.unpack_image(tmp_path / "a.tar", root)
    assert conf.digest == d1 and conf.cmd == ["/bin/sh"]
    assert (root / "work/run.sh").read_text() == "#!/bin/sh\necho hi\n"
    assert os.readlink(root / "bin/sh") == "busybox"
    out = subprocess.run([str(root / "bin/busybox"), "echo", "ok"], capture_output=True).stdout
    assert out == b"ok\n"


def test_interop_with_umoci_and_skopeo(tmp_path):
    if not (shutil.which("umoci") and shutil.which("skopeo")):
        pytest.skip("this machine has no umoci or no skopeo on PATH")
    try:
        oci_build.busybox_binary()
    except SpecError as e:
        pytest.skip(f"this machine has no static busybox: {e}")
    ours = tmp_path / "ours"
    oci_build.build_busybox_image(ours, files={"/work/x": "x"})
    # umoci reads our layout, adds a layer with a whiteout; we read umoci's result.
    subprocess.run(["umoci", "unpack", "--image", f"{ours}:latest", str(tmp_path / "b")], check=True,
                   capture_output=True)
    (tmp_path / "b/rootfs/work/x").unlink()
    (tmp_path / "b/rootfs/work/y").write_text("y")
    subprocess.run(["umoci", "repack", "--image", f"{ours}:v2", str(tmp_path / "b")], check=True,
                   capture_output=True)
    root = tmp_path / "root"
    oci.unpack_image(ours, root, ref="v2")
    assert not (root / "work/x").exists() and (root / "work/y").read_text() == "y"
    # skopeo turns it into an oci-archive, which we read too.
    subprocess.run(["skopeo", "copy", f"oci:{ours}:v2", f"oci-archive:{tmp_path / 'img.tar'}:v2"],
                   check=True, capture_output=True)
    oci.unpack_image(tmp_path / "img.tar", tmp_path / "root2")
    assert (tmp_path / "root2/work/y").read_text() == "y"
