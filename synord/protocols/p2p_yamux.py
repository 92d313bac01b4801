"""A lean yamux data path for py-libp2p: the same wire format (yamux 1.0.0 as
specified by hashicorp/yamux and go-yamux), less Python per frame.

py-libp2p 0.8.1 spends ~0.15 ms of Python on each received 64 KiB frame
(bench/bench_transfer.py, cProfile): debug log lines formatted whether logged
or not, a trio lock and a cancel scope per frame, its window tuning reading
environment variables on every read; a sender takes two locks per frame, and
polls every 10 ms while its window is shut.  Here:

- the reader loop takes header and body from the lean Noise session's buffer
  (`p2p_noise.LeanNoiseSession`), a deadline only when the body must be waited
  for, and no lock (nothing here awaits half-way through a change);
- a stream writes up to WRITE_BATCH bytes of frames in one secure write;
- the receive window starts at the spec's 256 KiB and doubles (up to
  MAX_WINDOW, py-libp2p's and go-yamux's 16 MiB) while the reader drains half
  a window within 4 round trips (GROW_WITHIN_S at least); credit goes back
  once per half window;
- a writer waiting for window wakes on the update (an event), not a poll.

Memory: a stream buffers at most its window (the peer may send no more), and
a window only grows while our reader keeps draining it; what is held for those
bytes stays within ~2x of them (small payloads are copied, tiny ones gathered:
see `_Pieces`, `LeanNoiseSession.read_piece`).  Hostile frames (a version or
type we do not know, more data than the window allows, an oversized frame)
end the connection with a GO_AWAY (protocol error) and are counted, as is a
frame body not sent within BODY_WAIT_S.
"""

from __future__ import annotations

import logging
import struct
from collections import deque

import trio
from libp2p.io.utils import read_exactly
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamError, MuxedStreamReset
from libp2p.stream_muxer.yamux.yamux import (
    DEFAULT_WINDOW_SIZE, FLAG_ACK, FLAG_FIN, FLAG_RST, FLAG_SYN, GO_AWAY_PROTOCOL_ERROR,
    HEADER_SIZE, MAX_WINDOW_SIZE, TYPE_DATA, TYPE_GO_AWAY, TYPE_PING, TYPE_WINDOW_UPDATE,
    YAMUX_HEADER_FORMAT, Yamux, YamuxStream)

from .p2p_noise import MAX_PLAINTEXT
from .refusals import REFUSALS

log = logging.getLogger("synord.mesh")

_HEADER = struct.Struct(YAMUX_HEADER_FORMAT)
FRAME_PAYLOAD = MAX_PLAINTEXT - HEADER_SIZE  # header + payload fit one Noise message
COALESCE = 4096               # received pieces smaller than this are gathered, not kept one by one
# frames per secure write (other streams wait behind it); bench_transfer.py,
# sender CPU per MiB: 1 MiB cost more (2.2-2.6 ms vs 1.5-1.9), 128 KiB the same
WRITE_BATCH = 256 * 1024
MAX_WINDOW = MAX_WINDOW_SIZE   # 16 MiB
GROW_WITHIN_S = 0.05           # half a window drained this fast: the window is the limit
WINDOW_WAIT_S = 5.0            # py-libp2p's limit on a shut send window
BODY_WAIT_S = 60.0             # py-libp2p's limit on a frame body announced but not sent


class YamuxProtocolError(Exception):
    def __init__(self, slug: str, message: str):
        super().__init__(message)
        self.slug = slug


class _Pieces:
    """A stream's received bytes as the frames' payloads (views into decrypted
    Noise messages), joined once when read.  A bytearray grown per frame and
    emptied per read was reallocated over and over: ~400 page faults per MiB."""

    __slots__ = ("parts", "size")

    def __init__(self) -> None:
        self.parts: deque = deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def append(self, piece) -> None:
        """Small pieces are gathered into one bytearray: an object per tiny frame
        would make a window of 1-byte frames cost ~50x its bytes."""
        if len(piece) < COALESCE:
            tail = self.parts[-1] if self.parts else None
            if type(tail) is bytearray and len(tail) < FRAME_PAYLOAD:
                tail += piece
            else:
                self.parts.append(bytearray(piece))
        else:
            self.parts.append(piece)
        self.size += len(piece)

    def clear(self) -> None:
        self.parts.clear()
        self.size = 0

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes (all when n < 0), oldest first."""
        parts = self.parts
        if n < 0 or n >= self.size:
            out = b"".join(parts)
            self.clear()
            return out
        pieces, left = [], n
        while left:
            head = parts[0]
            if len(head) <= left:
                pieces.append(parts.popleft())
                left -= len(head)
            elif type(head) is bytearray:  # in place: byte-by-byte readers (varints) stay O(1)
                pieces.append(head[:left])
                del head[:left]
                left = 0
            else:  # a view: slicing copies nothing
                pieces.append(head[:left])
                parts[0] = head[left:]
                left = 0
        self.size -= n
        return b"".join(pieces)


class LeanYamuxStream(YamuxStream):
    def __init__(self, stream_id: int, conn: "LeanYamux", is_initiator: bool) -> None:
        super().__init__(stream_id, conn, is_initiator)
        self._unacked = 0          # bytes our reader took, not yet credited to the peer
        self._credited_at = -1e9   # trio time of the last credit
        self._window_event: trio.Event | None = None

    # recv_window + buffered + _unacked == target_recv_window: the peer never
    # holds credit for more than a window of unread bytes.
    async def _credit(self, n: int) -> None:
        self._unacked += n
        if self._unacked < self.target_recv_window // 2:
            return
        now = trio.current_time()
        grow = 0
        # go-yamux's rule (credit due again within 4 round trips), at least GROW_WITHIN_S
        fast = max(GROW_WITHIN_S, 4 * self.conn.rtt())
        if now - self._credited_at < fast and self.target_recv_window < MAX_WINDOW:
            grow = min(self.target_recv_window, MAX_WINDOW - self.target_recv_window)
            self.target_recv_window += grow
        self._credited_at = now
        delta, self._unacked = self._unacked + grow, 0
        self.recv_window += delta
        await self.send_window_update(delta)

    def _window_opened(self) -> None:
        if self._window_event is not None:
            self._window_event.set()

    async def read(self, n: int | None = -1) -> bytes:
        if n is None:
            n = -1
        conn, sid = self.conn, self.stream_id
        while True:
            buf = conn.stream_buffers.get(sid)
            if buf:
                data = buf.take(n)
                if self.closed and not buf:  # fully closed and drained: drop the bookkeeping
                    conn._finalize_stream_locked(self, fully_closed=True)
                await self._credit(len(data))
                return data
            if buf is None or self.reset_received or self.recv_closed:
                if self.reset_received:
                    raise MuxedStreamReset("Stream was reset")
                raise MuxedStreamEOF("Stream is closed for receiving")
            event = conn.stream_events.get(sid)
            if event is None or conn.event_shutting_down.is_set():
                raise MuxedStreamEOF("Connection shut down")
            await event.wait()
            if sid in conn.stream_events:
                conn.stream_events[sid] = trio.Event()

    async def _wait_window(self) -> None:
        deadline = trio.current_time() + WINDOW_WAIT_S
        while self.send_window <= 0 and not self.closed and not self.send_closed:
            left = deadline - trio.current_time()
            if left <= 0:
                raise MuxedStreamError("Timed out waiting for window update after 5 seconds.")
            self._window_event = event = trio.Event()
            # an update sets the event; a connection torn down elsewhere only marks
            # the stream closed, so look again now and then
            with trio.move_on_after(min(left, 0.1)):
                await event.wait()
        self._window_event = None

    async def write(self, data: bytes) -> None:
        total, sent = len(data), 0
        with memoryview(data) as view:
            while sent < total:
                if self.send_closed:
                    raise MuxedStreamError("Stream is closed for sending")
                if self.closed:
                    raise MuxedStreamError("Stream is closed")
                if self.send_window <= 0:
                    await self._wait_window()
                    continue
                n = min(self.send_window, total - sent, WRITE_BATCH)
                # one allocation, one copy (join): a bytearray grown per frame was
                # reallocated (and copied again) as it grew
                parts = []
                for off in range(sent, sent + n, FRAME_PAYLOAD):
                    part = view[off:min(off + FRAME_PAYLOAD, sent + n)]
                    parts += (_HEADER.pack(0, TYPE_DATA, 0, self.stream_id, len(part)), part)
                frames = b"".join(parts)
                self.send_window -= n  # before the await: concurrent writers see it
                await self.conn._write_frame(frames)
                sent += n


class LeanYamux(Yamux):
    async def _write_frame(self, data) -> None:
        async with self._write_lock:
            await self.secured_conn.write(data)

    async def open_stream(self) -> YamuxStream:
        await self.stream_backlog_semaphore.acquire()
        if self.event_shutting_down.is_set():
            self.stream_backlog_semaphore.release()
            raise MuxedStreamError("Connection is shutting down")
        sid = self.next_stream_id
        self.next_stream_id += 2
        stream = LeanYamuxStream(sid, self, True)
        stream._owns_backlog_slot = True
        self._register(stream)
        try:
            await self._write_frame(_HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, sid, 0))
        except Exception as exc:
            stream._backlog_slot_released = True
            self.stream_backlog_semaphore.release()
            self.streams.pop(sid, None)
            self.stream_buffers.pop(sid, None)
            self.stream_events.pop(sid, None)
            raise MuxedStreamError(f"Failed to send SYN: {exc}") from exc
        return stream

    def _register(self, stream: LeanYamuxStream) -> None:
        self.streams[stream.stream_id] = stream
        self.stream_buffers[stream.stream_id] = _Pieces()
        self.stream_events[stream.stream_id] = trio.Event()

    # -- the reader ------------------------------------------------------------
    async def handle_incoming(self) -> None:
        sconn = self.secured_conn
        if hasattr(sconn, "read_piece"):  # the lean Noise session
            read_header, read_piece, buffered = sconn.read_exactly, sconn.read_piece, sconn.buffered
        else:  # any other secure connection: its read(n)
            async def read_header(n: int) -> bytes:
                return await read_exactly(sconn, n)

            read_piece = read_header

            def buffered() -> int:
                return 0
        self._read_piece, self._buffered = read_piece, buffered
        try:
            while not self.event_shutting_down.is_set():
                version, typ, flags, sid, length = _HEADER.unpack(await read_header(HEADER_SIZE))
                if version != 0 or typ > TYPE_GO_AWAY:
                    raise YamuxProtocolError("bad-frame", f"yamux frame version {version} type {typ}")
                if typ == TYPE_DATA or typ == TYPE_WINDOW_UPDATE:
                    await self._on_stream_frame(typ, flags, sid, length)
                elif typ == TYPE_PING:
                    await self._on_ping(flags, length)
                else:
                    log.debug("yamux: GO_AWAY (code %d) from %s", length, self.peer_id)
                    break
        except YamuxProtocolError as exc:
            REFUSALS.count("yamux", exc.slug)
            log.info("yamux: refused %s: %s; closing the connection", self.peer_id, exc)
            with trio.move_on_after(1):
                try:
                    await self._write_frame(_HEADER.pack(0, TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR))
                except Exception:
                    pass
        except trio.TooSlowError:
            REFUSALS.count("yamux", "body-timeout")
            log.info("yamux: frame body from %s did not come within %.0f s", self.peer_id, BODY_WAIT_S)
        except Exception as exc:  # the connection ended (EOF, reset, a refused Noise message)
            log.debug("yamux: connection to %s ended: %s: %s", self.peer_id, type(exc).__name__, exc)
        self.event_shutting_down.set()
        await self._cleanup_on_error()

    async def _read_body(self, length: int):
        if self._buffered() >= length:
            return await self._read_piece(length)
        with trio.fail_after(BODY_WAIT_S):
            return await self._read_piece(length)

    async def _on_stream_frame(self, typ: int, flags: int, sid: int, length: int) -> None:
        stream = self.streams.get(sid)
        announce = None
        if flags & FLAG_SYN:
            if stream is not None:  # a second SYN for a live stream: reset it (as py-libp2p)
                if typ == TYPE_DATA:
                    await self._discard(length)
                await self._write_frame(_HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0))
                return
            stream = announce = LeanYamuxStream(sid, self, False)
            self._register(stream)
        if stream is None:  # a stream we closed or reset: its data is late, drop it
            if typ == TYPE_DATA:
                await self._discard(length)
            return
        if typ == TYPE_DATA:
            if length > stream.recv_window:
                raise YamuxProtocolError(
                    "window-exceeded", f"{length} bytes on stream {sid}, window {stream.recv_window}")
            if length:
                piece = await self._read_body(length)
                buf = self.stream_buffers.get(sid)
                if buf is not None:  # else the stream ended meanwhile: drop it
                    buf.append(piece)
                stream.recv_window -= length
        elif length:  # a window update: the peer read our data
            stream.send_window += length
            stream._window_opened()
        if flags & FLAG_FIN:
            stream.recv_closed = True
            if stream.send_closed:
                stream.closed = True
        if flags & FLAG_RST:
            stream.closed = stream.reset_received = True
            stream._window_opened()
        event = self.stream_events.get(sid)
        if event is not None and (length and typ == TYPE_DATA or flags & (FLAG_FIN | FLAG_RST)):
            event.set()
        if stream.closed:
            self._finalize_stream_locked(stream, fully_closed=True)
        if announce is not None:
            if not flags & FLAG_RST:  # SYN+RST: delivered reset, no ACK (as py-libp2p)
                await self._write_frame(_HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_ACK, sid, 0))
            await self.new_stream_send_channel.send(announce)

    async def _discard(self, length: int) -> None:
        if length > MAX_WINDOW:
            raise YamuxProtocolError("oversized-frame", f"data frame of {length} bytes")
        while length:
            take = min(length, DEFAULT_WINDOW_SIZE)
            await self._read_body(take)
            length -= take

    async def _on_ping(self, flags: int, opaque: int) -> None:
        if flags & FLAG_SYN:
            await self._write_frame(_HEADER.pack(0, TYPE_PING, FLAG_ACK, 0, opaque))
        elif flags & FLAG_ACK:
            rtt = trio.current_time() - self._ping_sent_time
            self._rtt = rtt if self._rtt == 0.0 else (self._rtt + rtt) / 2
            self._ping_event.set()
