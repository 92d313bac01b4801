"""Length-prefixed msgpack frames and chunked blobs over any byte stream.

Why our own framing: py-libp2p's varint readers give up after 100 short reads,
which breaks payloads above ~6 MiB.  Here every read loops until it has what it
needs (no retry cap) and large payloads go out in bounded chunks.

Wire form (see docs/WIRE.md, "Stream framing"):

    frame = u32 big-endian length N || N bytes of one msgpack object
    blob  = frame {"blob": total_size} || total_size raw bytes

A blob's raw bytes carry no per-chunk headers; the writer sends them in
``CHUNK`` pieces and the reader consumes them in pieces of at most ``CHUNK``.
A request/response exchange is one blob each way; a handler that fails answers
with the frame {"error": text} instead of a blob header.

The byte stream only needs ``async read(n) -> bytes`` (b"" at end of stream)
and ``async write(data)``; backends adapt their native streams to that.
"""

from __future__ import annotations

import math
import struct
from collections.abc import AsyncIterator
from typing import Any, NoReturn, Protocol

import msgpack
import trio

from . import streamlimits
from .streamlimits import Refusal, StreamGuard

MAX_FRAME = 4 * 1024 * 1024          # one msgpack frame
MAX_BLOB = 1024 * 1024 * 1024        # default cap for one received blob
CHUNK = 1024 * 1024
_LEN = struct.Struct(">I")


class FrameError(Exception):
    """The peer broke the framing rules (oversized, malformed, truncated)."""


class RemoteError(Exception):
    """The peer's handler answered with an error frame."""


class StreamLimitError(FrameError):
    """The peer was too slow or held too much (``reason``: a `streamlimits.Refusal`);
    the stream has been reset and the refusal counted."""

    def __init__(self, reason: str):
        super().__init__(f"stream refused: {reason}")
        self.reason = reason


def decode_frame(data: bytes, max_frame: int = MAX_FRAME) -> Any:
    """One frame's msgpack object; FrameError on anything that is not one."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False,
                               max_bin_len=max_frame, max_str_len=max_frame)
    except Exception as exc:  # msgpack raises many types on garbage
        raise FrameError(f"malformed frame: {type(exc).__name__}") from None


class ByteStream(Protocol):
    async def read(self, n: int) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...
    async def reset(self) -> None: ...


class FramedStream:
    """Frames and blobs over a ByteStream. Not safe for concurrent readers.

    With a ``guard`` (see `synord.protocols.streamlimits`) every wait for the peer has
    a deadline and every byte held for an unfinished frame is charged to the
    node's budget; a late or over-budget peer gets its stream reset and the
    reader a `StreamLimitError`.  Bytes are kept as they arrive, never
    allocated up front from a declared length.
    """

    def __init__(self, raw: ByteStream, remote_peer: str = "", protocol: str = "",
                 max_frame: int = MAX_FRAME, guard: StreamGuard | None = None):
        self.raw = raw
        self.remote_peer = remote_peer
        self.protocol = protocol
        self.max_frame = max_frame
        self.guard = guard
        self.frames_received = 0
        self._buf = bytearray()

    # -- reading ---------------------------------------------------------
    async def _pull(self, n: int, deadline: float, late: str) -> bytes:
        """One read from the backend by ``deadline`` (trio time), charged to the budget."""
        with trio.move_on_at(deadline) as scope:
            chunk = await self.raw.read(n)
        if scope.cancelled_caught:
            streamlimits.count(late)
            await self._refuse(late)
        if chunk and self.guard is not None:
            refusal = self.guard.reserve(len(chunk))
            if refusal is not None:
                await self._refuse(refusal)
        return chunk

    async def _refuse(self, reason: str) -> NoReturn:
        self.release()
        await self.raw.reset()
        raise StreamLimitError(reason)

    def _handed_over(self, n: int) -> None:
        if self.guard is not None:
            self.guard.release(n)

    def release(self) -> None:
        """Drop whatever is buffered and give its charge back (the stream has ended)."""
        self._buf = bytearray()
        if self.guard is not None:
            self.guard.release()

    def _body_deadline(self) -> float:
        frame_s = self.guard.frame_s if self.guard is not None else None
        return trio.current_time() + frame_s if frame_s is not None else math.inf

    async def _read_exactly(self, n: int) -> bytes:
        if len(self._buf) >= n:
            out = bytes(self._buf[:n])
            del self._buf[:n]
            self._handed_over(n)
            return out
        deadline = self._body_deadline()  # the whole piece, not each read
        parts = [bytes(self._buf)]
        have = len(self._buf)
        self._buf.clear()
        while have < n:
            chunk = await self._pull(min(n - have, CHUNK), deadline, Refusal.FRAME_BODY)
            if not chunk:
                raise FrameError(f"stream ended after {have} of {n} bytes")
            parts.append(chunk)
            have += len(chunk)
        data = b"".join(parts)
        del parts
        if have > n:  # a backend may return more than asked
            self._buf += data[n:]
            data = data[:n]
        self._handed_over(n)
        return data

    async def _read_header(self) -> int | None:
        """Frame length, or None on a clean end of stream before a frame."""
        timeout, late = (self.guard.header_deadline(self.frames_received)
                         if self.guard is not None else (None, ""))
        deadline = trio.current_time() + timeout if timeout is not None else math.inf
        while len(self._buf) < 4:
            chunk = await self._pull(CHUNK, deadline, late)
            if not chunk:
                if self._buf:
                    raise FrameError("stream ended inside a frame header")
                return None
            self._buf += chunk
        (n,) = _LEN.unpack(self._buf[:4])
        del self._buf[:4]
        self._handed_over(4)
        if n > self.max_frame:
            raise FrameError(f"frame of {n} bytes exceeds {self.max_frame}")
        return n

    async def receive(self) -> Any:
        """Next msgpack object; raises EOFError at a clean end of stream."""
        n = await self._read_header()
        if n is None:
            raise EOFError("stream closed by peer")
        data = await self._read_exactly(n)
        self.frames_received += 1
        return decode_frame(data, self.max_frame)

    async def iter_blob(self, max_bytes: int = MAX_BLOB) -> AsyncIterator[bytes]:
        """Yield a blob's bytes in chunks (for writing straight to disk)."""
        head = await self.receive()
        if isinstance(head, dict) and "error" in head:
            raise RemoteError(str(head["error"]))
        size = head.get("blob") if isinstance(head, dict) else None
        if not isinstance(size, int) or size < 0:
            raise FrameError(f"expected a blob header, got {type(head).__name__}")
        if size > max_bytes:
            raise FrameError(f"blob of {size} bytes exceeds {max_bytes}")
        left = size
        while left:
            piece = await self._read_exactly(min(left, CHUNK))
            left -= len(piece)
            yield piece

    async def read_raw(self, n: int) -> bytes:
        """Exactly ``n`` raw bytes (the body of a blob whose header the caller read)."""
        return await self._read_exactly(n)

    async def read_some(self, n: int) -> bytes:
        """Up to ``n`` raw bytes (at least one) as they arrive, without waiting to
        join a full piece: a blob's body goes to storage without that copy.
        FrameError if the stream ends first."""
        if self._buf:
            out = bytes(self._buf[:n])
            del self._buf[:n]
        else:
            out = await self._pull(n, self._body_deadline(), Refusal.FRAME_BODY)
            if not out:
                raise FrameError("stream ended inside a blob")
            if len(out) > n:  # a backend may return more than asked: keep the rest (still charged)
                self._buf += out[n:]
                out = out[:n]
        self._handed_over(len(out))
        return out

    async def receive_blob(self, max_bytes: int = MAX_BLOB) -> bytes:
        parts = [p async for p in self.iter_blob(max_bytes)]
        return b"".join(parts)

    # -- writing ---------------------------------------------------------
    async def send(self, obj: Any) -> None:
        data = msgpack.packb(obj, use_bin_type=True)
        if len(data) > self.max_frame:
            raise FrameError(f"frame of {len(data)} bytes exceeds {self.max_frame}")
        await self.raw.write(_LEN.pack(len(data)) + data)

    async def send_blob(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        await self.send({"blob": len(view)})
        for off in range(0, len(view), CHUNK):
            await self.raw.write(bytes(view[off:off + CHUNK]))

    async def send_error(self, text: str) -> None:
        await self.send({"error": text[:1000]})

    async def close(self) -> None:
        await self.raw.close()

    async def reset(self) -> None:
        await self.raw.reset()
