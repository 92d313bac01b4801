"""Content-addressed blob transfer (`/synord/transfer/1.0.0`), resumable.

    sender                                  receiver
    envelope blob.offer {sha256, size, kind} ->
                                            <- {"have": n}      (bytes it already holds; == size: cached)
    {"blob": size - n} + raw bytes from n  ->
                                            <- {"ok": true} | {"error": reason}

The receiver appends to a partial file and checks the sha256 of the whole
file before it becomes visible under its digest; a mismatch deletes the
partial file. Only the offer is signed: the bytes are bound to it by the hash.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from .envelope import message_type
from .framing import CHUNK, FramedStream
from .pacing import PACER

TRANSFER_PROTOCOL = "/synord/transfer/1.0.0"
KINDS = ("artifact", "checkpoint", "volume", "input")  # volume: a service's named volume (synord.volumes); input: a task's stdin blob (a shard)
MAX_BLOB_BYTES = 16 << 30
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
BLOCKS_IN_FLIGHT = 4  # of about CHUNK bytes each, between the network reader and the disk writer


class TransferError(Exception):
    """A transfer refused or broken; ``slug`` is a stable reason for counting."""

    def __init__(self, message: str, slug: str = "refused"):
        super().__init__(message)
        self.slug = slug


def _check_offer(body: Any) -> None:
    if not isinstance(body, dict) or set(body) - {"sha256", "size", "kind", "job_id", "grant"}:
        raise ValueError("offer must be a map of sha256, size, kind, job_id, grant")
    if not isinstance(body.get("grant", b""), bytes) or len(body.get("grant", b"")) > 2048:
        raise ValueError("grant must be an encoded envelope of at most 2 KiB")
    if not isinstance(body.get("sha256"), str) or not _SHA_RE.fullmatch(body["sha256"]):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    size = body.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BLOB_BYTES:
        raise ValueError(f"size must be an integer in [0, {MAX_BLOB_BYTES}]")
    if body.get("kind") not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if not isinstance(body.get("job_id", ""), str) or len(body.get("job_id", "")) > 64:
        raise ValueError("job_id must be a short string")


def _check_grant(body: Any) -> None:
    if not isinstance(body, dict) or set(body) != {"job_id", "from", "to"} or not all(
            isinstance(v, str) and 0 < len(v) <= 64 for v in body.values()):
        raise ValueError("grant must be a map of job_id, from, to (short strings)")


message_type("blob.offer", _check_offer)
# A consumer's permission for one provider (`from`) to upload a checkpoint of its
# job straight to another (`to`), which otherwise only accepts uploads from
# peers it holds an agreement with. Carried inside the offer as `grant`.
message_type("blob.grant", _check_grant)


def _hash_into(f, digest) -> None:
    while block := f.read(1 << 20):
        digest.update(block)


async def _store_blob(stream: FramedStream, f, digest, left: int) -> OSError | None:
    """Read ``left`` raw bytes into ``f`` and ``digest``; the error that stopped
    the writes, if any (the bytes are still read, so the sender hears why).

    Disk writes and hashing run in one worker thread for the whole blob (both
    release the GIL), at most BLOCKS_IN_FLIGHT blocks behind the network reads:
    they were a quarter of a receiver's CPU, spent with the connection idle.
    A thread hand-over per block (trio.to_thread) cost more than the write
    itself on a loaded box: the reader waited ~10 ms per MiB for the round
    trip (bench/bench_transfer.py)."""
    failed: OSError | None = None
    token = trio.lowlevel.current_trio_token()
    slots = trio.Semaphore(BLOCKS_IN_FLIGHT)  # bounded memory
    blocks: queue.SimpleQueue = queue.SimpleQueue()

    def release_slot() -> None:
        try:
            token.run_sync_soon(slots.release)
        except trio.RunFinishedError:
            pass

    def writer() -> None:
        nonlocal failed
        while (pieces := blocks.get()) is not None:
            block = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            digest.update(block)
            if failed is None:
                try:
                    f.write(block)
                except OSError as exc:  # our disk is full: keep reading
                    failed = exc
            release_slot()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, writer)
        try:
            while left:
                # a block is the pieces as they came (about CHUNK bytes), joined by the
                # writer: joining them here was a copy into fresh memory on the event loop
                pieces, size = [], 0
                while left and size < CHUNK:
                    piece = await stream.read_some(min(left, CHUNK - size))
                    pieces.append(piece)
                    size += len(piece)
                    left -= len(piece)
                await PACER.take(size)
                await slots.acquire()
                blocks.put(pieces)
        finally:
            blocks.put(None)  # the writer ends after what it holds, also on an error here
    if failed is None:
        try:
            await trio.to_thread.run_sync(os.fsync, f.fileno())
        except OSError as exc:
            failed = exc
    return failed


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        _hash_into(f, h)
    return h.hexdigest()


class BlobStore:
    """Files named by their sha256 in one directory; partial uploads beside them."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, trio.Lock] = {}

    def lock(self, sha: str) -> trio.Lock:
        """One upload of a given blob at a time (two consumers may send the same one)."""
        return self._locks.setdefault(sha, trio.Lock())

    def path(self, sha: str) -> Path:
        if not _SHA_RE.fullmatch(sha):
            raise TransferError(f"not a sha256: {sha!r}")
        return self.dir / sha

    def has(self, sha: str) -> bool:
        return self.path(sha).exists()

    def partial(self, sha: str) -> Path:
        return self.path(sha).with_name(f"{sha}.part")  # validated like the blob's own name

    def add_file(self, src: Path) -> str:
        """Copy-free import of a local file (hard link when possible); returns its sha256."""
        sha = sha256_of(src)
        dest = self.path(sha)
        if not dest.exists():
            # Unique per call: several submissions of one file may import it at once.
            tmp = self.dir / f".{sha}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
            try:
                os.link(src, tmp)
            except OSError:
                import shutil
                shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
            # rename(2) does nothing when both names are links to one inode (another import
            # linked the same file first): the temp name is then still there.
            tmp.unlink(missing_ok=True)
        return sha


async def send_file(stream: FramedStream, offer_envelope: bytes, path: Path,
                    progress: Callable[[int, int], None] | None = None) -> int:
    """Offer ``path`` and send what the receiver lacks; returns bytes actually sent."""
    await stream.send({"offer": offer_envelope})
    reply = await stream.receive()
    if not isinstance(reply, dict) or "have" not in reply:
        raise TransferError(str(reply.get("error") if isinstance(reply, dict) else reply))
    size = path.stat().st_size
    have = int(reply["have"])
    if not 0 <= have <= size:
        raise TransferError(f"receiver claims {have} of {size} bytes")
    await stream.send({"blob": size - have})
    sent = 0
    with open(path, "rb") as f:
        f.seek(have)
        while block := f.read(CHUNK):
            await PACER.take(len(block))  # the contributor's bandwidth cap
            await stream.raw.write(block)
            sent += len(block)
            if progress:
                progress(have + sent, size)
    reply = await stream.receive()
    if not (isinstance(reply, dict) and reply.get("ok")):
        raise TransferError(str(reply.get("error") if isinstance(reply, dict) else reply))
    return sent


Authorize = Callable[[str, dict], Awaitable[str | None]]


async def receive_file(stream: FramedStream, store: BlobStore, verify_offer: Callable[[bytes], Any],
                       authorize: Authorize) -> tuple[dict, Path]:
    """Serve one offer: returns (offer body, path of the verified blob)."""
    first = await stream.receive()
    env = verify_offer(first.get("offer") if isinstance(first, dict) else None)
    offer = env.body
    if env.sender_id != stream.remote_peer:
        await stream.send({"error": "offer not signed by the connected peer"})
        raise TransferError("offer sender mismatch", "wrong_signer")
    try:
        reason = await authorize(stream.remote_peer, offer)
    except TransferError as exc:  # refused with a slug of its own (e.g. storage-full)
        reason, slug = str(exc), exc.slug
    else:
        slug = "unauthorized"
    if reason:
        await stream.send({"error": reason})
        raise TransferError(reason, slug)
    async with store.lock(offer["sha256"]):
        return offer, await _receive_locked(stream, store, offer)


async def _receive_locked(stream: FramedStream, store: BlobStore, offer: dict) -> Path:
    sha, size = offer["sha256"], offer["size"]
    final = store.path(sha)
    if final.exists():
        await stream.send({"have": size})
        head = await stream.receive()
        if head != {"blob": 0}:
            raise TransferError("sender sent bytes for a cached blob", "bad_header")
        await stream.send({"ok": True})
        return final
    part = store.partial(sha)
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    await stream.send({"have": have})
    head = await stream.receive()
    left = head.get("blob") if isinstance(head, dict) else None
    if left != size - have:
        raise TransferError(f"expected {size - have} bytes, sender announced {left!r}", "bad_header")
    digest = hashlib.sha256()
    with open(part, "ab+", buffering=0) as f:
        if have:  # resuming: the bytes already held count towards the digest
            f.seek(0)
            await trio.to_thread.run_sync(_hash_into, f, digest)
        failed = await _store_blob(stream, f, digest, left)
    if failed is not None:
        part.unlink(missing_ok=True)
        await stream.send({"error": f"provider storage full: {failed.strerror or failed}"})
        raise TransferError(f"cannot store the blob: {failed.strerror or failed}", "storage-full") from failed
    actual = digest.hexdigest()
    if actual != sha:
        part.unlink(missing_ok=True)
        await stream.send({"error": f"sha256 mismatch: offered {sha}, received {actual}"})
        raise TransferError("sha256 mismatch", "sha_mismatch")
    os.replace(part, final)
    await stream.send({"ok": True})
    return final
