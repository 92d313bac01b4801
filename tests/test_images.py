"""Images accepted (synord.runtimes.oci.check_image, the one check consumers and providers
call): gzip and zstd layers, OCI layout / oci-archive / docker-archive, a tag or
digest to pick, the host's platform from an index. Images are built here (our
builder, the `zstd` tool, skopeo); the end-to-end cases run through real daemons."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from synord.runtimes import oci, oci_build
from synord.runtimes.artifacts import check_artifact
from synord.runtimes.base import SpecError

from jobs_helpers import start_mesh, wait_job

needs_zstd = pytest.mark.skipif(not shutil.which("zstd"), reason="needs the zstd tool to build a zstd layer")
needs_skopeo = pytest.mark.skipif(not shutil.which("skopeo"), reason="needs skopeo to write a docker-archive")


def _small_image(dest: Path, text: str = "hello\n") -> Path:
    tar = oci_build._layer_tar([oci_build._tarinfo("hello", b"0", 0o644, len(text))], {"hello": text.encode()})
    oci_build.build_image(dest, [tar], cmd=["/bin/true"], env=["A=1"])
    return dest


def _put(layout: Path, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _manifest_desc(layout: Path) -> dict:
    return json.loads((layout / "index.json").read_text())["manifests"][0]


def _rewrite_layers(layout: Path, fn) -> None:
    """Rewrite each layer descriptor with fn(desc, blob) -> (media type, new blob); new manifest."""
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / desc["digest"][7:]).read_bytes())
    for layer in manifest["layers"]:
        mt, data = fn(layer, (blobs / layer["digest"][7:]).read_bytes())
        layer.update(mediaType=mt, **_put(layout, data))
    desc.update(_put(layout, json.dumps(manifest).encode()))
    (layout / "index.json").write_text(json.dumps(index))


def zstd_image(layout: Path) -> Path:
    """Recompress every gzip layer of ``layout`` with the zstd tool (tar+zstd)."""
    def recompress(layer, blob):
        raw = gzip.decompress(blob)
        return oci.MT_LAYER_ZSTD, subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True,
                                                 check=True).stdout
    _rewrite_layers(layout, recompress)
    return layout


@needs_zstd
def test_zstd_layers_are_accepted_and_unpacked(tmp_path):
    img = zstd_image(_small_image(tmp_path / "img", "from zstd\n"))
    assert oci.read_image(img)[1][0]["mediaType"] == oci.MT_LAYER_ZSTD
    check_artifact("container", img)  # the consumer's pre-check
    oci.unpack_image(img, tmp_path / "root")
    assert (tmp_path / "root" / "hello").read_text() == "from zstd\n"


def test_an_unsupported_layer_is_refused_by_the_one_check(tmp_path):
    img = _small_image(tmp_path / "img")
    _rewrite_layers(img, lambda layer, blob: ("application/vnd.oci.image.layer.v1.tar+bzip2", blob))
    for check in (lambda: check_artifact("container", img), lambda: oci.check_image(img),
                  lambda: oci.unpack_image(img, tmp_path / "root")):
        with pytest.raises(SpecError, match=r"unsupported layer media type .*tar\+bzip2"):
            check()


def _tag(src: Path, dest: Path, tag: str) -> None:
    subprocess.run(["skopeo", "copy", "-q", f"oci:{src}:latest", f"oci:{dest}:{tag}"], check=True,
                   capture_output=True)


@needs_skopeo
def test_tag_or_digest_picks_one_of_several(tmp_path):
    multi = tmp_path / "multi"
    _tag(_small_image(tmp_path / "a", "one\n"), multi, "one")
    _tag(_small_image(tmp_path / "b", "two\n"), multi, "two")
    with pytest.raises(SpecError, match="holds 2 images; name a tag or digest"):
        oci.check_image(multi)
    two = oci.check_image(multi, "two")
    assert oci.check_image(multi, two.digest).digest == two.digest
    with pytest.raises(SpecError, match="no manifest tagged 'three'"):
        oci.check_image(multi, "three")
    # what travels: one image, no ref needed on the provider
    oci.export_image(multi, two.digest, tmp_path / "out")
    assert oci.check_image(tmp_path / "out").digest == two.digest
    oci.unpack_image(tmp_path / "out", tmp_path / "root")
    assert (tmp_path / "root" / "hello").read_text() == "two\n"


@needs_skopeo
def test_docker_archive(tmp_path):
    src = _small_image(tmp_path / "img", "from docker\n")
    archive = tmp_path / "app.tar"
    subprocess.run(["skopeo", "copy", "-q", f"oci:{src}:latest", f"docker-archive:{archive}:example/app:v1"],
                   check=True, capture_output=True)
    for ref in (None, "v1", "example/app:v1"):
        conf = oci.check_image(archive, ref)
        assert conf.cmd == ["/bin/true"] and conf.env == ["A=1"]
    with pytest.raises(SpecError, match="no manifest tagged 'v2'"):
        oci.check_image(archive, "v2")
    oci.unpack_image(archive, tmp_path / "root")
    assert (tmp_path / "root" / "hello").read_text() == "from docker\n"
    oci.export_image(archive, None, tmp_path / "out")  # travels as an OCI layout
    assert (tmp_path / "out" / "oci-layout").exists()
    assert oci.check_image(tmp_path / "out").cmd == ["/bin/true"]


def _with_platforms(tmp_path: Path, platforms: dict[str, Path]) -> Path:
    """A layout whose one tag is a nested index of ``platforms`` (arch -> single-image layout)."""
    out = tmp_path / "index"
    (out / "blobs" / "sha256").mkdir(parents=True)
    entries = []
    for arch, layout in platforms.items():
        for blob in (layout / "blobs" / "sha256").iterdir():
            shutil.copy(blob, out / "blobs" / "sha256" / blob.name)
        d = _manifest_desc(layout)
        entries.append({"mediaType": oci.MT_MANIFEST, "digest": d["digest"], "size": d["size"],
                        "platform": {"os": "linux", "architecture": arch}})
    nested = json.dumps({"schemaVersion": 2, "mediaType": oci.MT_INDEX, "manifests": entries}).encode()
    top = {"mediaType": oci.MT_INDEX, **_put(out, nested), "annotations": {oci.REF_ANNOTATION: "latest"}}
    (out / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return out


def test_the_hosts_platform_is_picked_from_an_index(tmp_path):
    _os, arch, _variant = oci.host_platform()
    ours = _small_image(tmp_path / "ours", "ours\n")
    other = _small_image(tmp_path / "other", "s390x\n")
    other_arch = "s390x" if arch != "s390x" else "riscv64"
    both = _with_platforms(tmp_path, {other_arch: other, arch: ours})
    assert oci.check_image(both).digest == _manifest_desc(ours)["digest"]
    oci.unpack_image(both, tmp_path / "root")
    assert (tmp_path / "root" / "hello").read_text() == "ours\n"
    shutil.rmtree(both)
    foreign = _with_platforms(tmp_path, {other_arch: other})
    with pytest.raises(SpecError, match=f"no linux/{arch} manifest \\(has linux/{other_arch}\\)"):
        oci.check_image(foreign)


# ---- through real daemons ------------------------------------------------------------

def _container_runtime_or_skip() -> None:
    from synord.runtimes import get_runtime
    av = get_runtime("container").available()
    if not av.available:
        pytest.skip(f"no container runtime here: {av.reason}")


def _busybox(dest: Path, hello: str) -> Path:
    oci_build.build_busybox_image(dest, files={"/hello": hello})
    return dest


@needs_zstd
@needs_skopeo
def test_images_through_the_mesh(cluster, tmp_path):
    """A refused image is refused once, at submission, before anything is reserved;
    a zstd-layer image and a tag of a docker-archive run on a provider."""
    _container_runtime_or_skip()
    consumer, provs = start_mesh(cluster, 2)

    bad = _busybox(tmp_path / "bad", "never\n")
    _rewrite_layers(bad, lambda layer, blob: ("application/vnd.oci.image.layer.v1.tar+bzip2", blob))
    res = consumer.cli("run", "--runtime", "container", str(bad), "--", "cat", "/hello", check=False)
    assert res.returncode != 0
    assert res.stderr.count("unsupported layer media type") == 1, res.stderr
    assert consumer.get("/v1/jobs") == []  # nothing submitted, nothing reserved

    zimg = zstd_image(_busybox(tmp_path / "z", "zstd layers run\n"))
    res = consumer.cli("run", "--runtime", "container", str(zimg), "--", "cat", "/hello", timeout=180)
    assert res.stdout == "zstd layers run\n", res.stderr

    src = _busybox(tmp_path / "d", "docker-archive v2\n")
    archive = tmp_path / "app.tar"
    subprocess.run(["skopeo", "copy", "-q", f"oci:{src}:latest", f"docker-archive:{archive}:example/app:v2"],
                   check=True, capture_output=True)
    res = consumer.cli("run", "--runtime", "container", "--image-ref", "example/app:v2", str(archive),
                       "--", "cat", "/hello", timeout=180)
    assert res.stdout == "docker-archive v2\n", res.stderr
    jobs = consumer.get("/v1/jobs")
    assert len(jobs) == 2 and all(wait_job(consumer, j["id"])["state"] == "succeeded" for j in jobs)
    for p in provs:  # no provider ever saw the refused image
        assert "image refused" not in p.log() and "unsupported layer" not in p.log()
