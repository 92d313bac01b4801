"""A resumed upload: the receiver hashes the bytes it already held plus the
new ones as they are stored (no second read of the file, issue 20), so a
partial file that is not the blob's start is caught by the digest."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
import trio.testing

from synord.protocols.envelope import EnvelopeValidator, seal
from synord.protocols.framing import FramedStream
from synord.protocols.identity import Identity
from synord.protocols.transfer import BlobStore, TransferError, receive_file, send_file

from test_mesh import _Mem  # a trio in-memory byte stream as our framing's ByteStream


async def _upload(store: BlobStore, blob, sha: str) -> tuple[int, object]:
    """(bytes the sender sent, what the receiver returned or raised)."""
    sender = Identity.generate()
    offer = seal(sender, "blob.offer", {"sha256": sha, "size": blob.stat().st_size, "kind": "artifact"})
    a, b = trio.testing.memory_stream_pair()
    outcome = {}

    async def allow(peer, offer):
        return None

    async def receiver():
        try:
            outcome["got"] = await receive_file(FramedStream(_Mem(b), remote_peer=sender.peer_id), store,
                                                EnvelopeValidator().check, allow)
        except TransferError as exc:
            outcome["got"] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        try:
            sent = await send_file(FramedStream(_Mem(a)), offer.encode(), blob)
        except TransferError:
            sent = -1
    return sent, outcome["got"]


async def test_a_resumed_upload_sends_the_rest_and_checks_the_whole_blob(tmp_path):
    data = os.urandom((3 << 20) + 4321)
    sha = hashlib.sha256(data).hexdigest()
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    store = BlobStore(tmp_path / "store")
    have = (1 << 20) + 123
    store.partial(sha).write_bytes(data[:have])

    sent, (offer, path) = await _upload(store, blob, sha)
    assert sent == len(data) - have
    assert path.read_bytes() == data and not store.partial(sha).exists()


async def test_a_partial_file_that_is_not_the_blob_start_fails_the_digest(tmp_path):
    data = os.urandom(2 << 20)
    sha = hashlib.sha256(data).hexdigest()
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    store = BlobStore(tmp_path / "store")
    store.partial(sha).write_bytes(b"x" * 5000)  # the right length, the wrong bytes

    sent, got = await _upload(store, blob, sha)
    assert sent == -1 and isinstance(got, TransferError) and got.slug == "sha_mismatch"
    assert not store.partial(sha).exists() and not store.has(sha)
    # the next attempt starts over and succeeds
    sent, (offer, path) = await _upload(store, blob, sha)
    assert sent == len(data) and path.read_bytes() == data


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1])
async def test_whole_uploads_of_edge_sizes(tmp_path, size):
    data = os.urandom(size)
    sha = hashlib.sha256(data).hexdigest()
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    store = BlobStore(tmp_path / "store")
    sent, (offer, path) = await _upload(store, blob, sha)
    assert sent == size and path.read_bytes() == data
