"""Checkpoint archives (synord/jobs/checkpoints.py): the digest `pack` returns is
the file's, and `unpack` verifies it while extracting, refusing what is not a
plain file or directory."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from synord.jobs.checkpoints import CheckpointError, pack, restore_source, unpack
from synord.protocols.transfer import sha256_of


def _tree(tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "memory.bin").write_bytes(os.urandom(3 << 20))
    (src / "sub" / "state").write_text("steps=7")
    return src


def _tar(tmp_path, name, add):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add(tar)
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    return path


def test_pack_returns_the_files_digest_and_size_and_unpack_restores_the_tree(tmp_path):
    src = _tree(tmp_path)
    sha, size = pack(src, tmp_path / "a.tar")
    assert (sha, size) == (sha256_of(tmp_path / "a.tar"), (tmp_path / "a.tar").stat().st_size)
    sha2, _ = pack(src, tmp_path / "b.tar")
    assert sha2 == sha  # deterministic: the same tree, the same archive
    out = unpack(tmp_path / "a.tar", tmp_path / "out", expected_sha=sha)
    assert (out / "memory.bin").read_bytes() == (src / "memory.bin").read_bytes()
    assert (out / "sub" / "state").read_text() == "steps=7"


def test_unpack_refuses_a_digest_mismatch(tmp_path):
    src = _tree(tmp_path)
    sha, _ = pack(src, tmp_path / "a.tar")
    data = bytearray((tmp_path / "a.tar").read_bytes())
    data[-1] ^= 1  # in the end padding: still a valid tar, another digest
    (tmp_path / "a.tar").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        unpack(tmp_path / "a.tar", tmp_path / "out", expected_sha=sha)


def _symlink(tar):
    info = tarfile.TarInfo("link")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


def _escape(tar):
    info = tarfile.TarInfo("../outside")
    info.size = 1
    tar.addfile(info, io.BytesIO(b"x"))


@pytest.mark.parametrize("add", [_symlink, _escape], ids=["symlink", "dotdot"])
def test_unpack_refuses_entries_that_are_not_plain_files_inside(tmp_path, add):
    path = _tar(tmp_path, "bad.tar", add)
    with pytest.raises(CheckpointError, match="is not allowed"):
        unpack(path, tmp_path / "out", expected_sha=sha256_of(path))
    assert not (tmp_path / "outside").exists()


def test_unpack_refuses_garbage(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"not a tar archive " * 64)
    with pytest.raises(CheckpointError, match="not a valid archive"):
        unpack(path, tmp_path / "out")


def test_restore_source_links_an_archive_and_unpacks_the_rest(tmp_path):
    """A runtime that reads the archive itself gets the blob as it is (verified on
    arrival by the blob store), linked so the cache cannot take it away; any other
    gets it unpacked and verified."""
    src = _tree(tmp_path)
    blob = tmp_path / "blob"
    sha, _ = pack(src, blob)
    (tmp_path / "w1").mkdir()  # the task's workdir
    linked = restore_source(blob, tmp_path / "w1" / "restore", sha, archive=True)
    assert linked == tmp_path / "w1" / "restore.tar"
    assert sha256_of(linked) == sha
    blob.unlink()  # evicted from the cache: the task's copy stays
    assert sha256_of(linked) == sha
    out = restore_source(linked, tmp_path / "w2" / "restore", sha, archive=False)
    assert (out / "memory.bin").read_bytes() == (src / "memory.bin").read_bytes()
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        restore_source(linked, tmp_path / "w3" / "restore", "00" * 32, archive=False)
