"""One forwarded TCP connection relayed over its `/synord/forward/1` stream,
the same code on both sides (`synord.jobs.forward_service` on the provider,
`synord.jobs.forward_client` on the consumer).

Every frame in and out goes through the `ForwardChannel` machine. Memory is
bounded: each direction reads at most `MAX_CHUNK` bytes and does not read
again until they are written on (the stream's and the socket's own flow
control push back). The connection ends, on both sides, at both eofs, when
either side breaks or resets, after ``idle_s`` without a byte either way, or
when ``ended`` is set (the task ended, the forward was stopped).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from synord.protocols.forward import MAX_CHUNK, MAX_FRAME, Data, Eof, ForwardChannel, ForwardViolation
from synord.protocols.framing import FrameError, FramedStream
from synord.protocols.refusals import REFUSALS

log = logging.getLogger("synord.jobs.forward")

# Defaults of config [forward] (both sides): connections one job may have at once, idle timeout.
MAX_PER_JOB = 16
IDLE_S = 300.0


@dataclass
class Outcome:
    how: str  # "closed" (both eofs), "idle", "ended", "aborted", "violation"
    sent: int
    received: int


async def relay(stream: FramedStream, conn: trio.abc.HalfCloseableStream, channel: ForwardChannel,
                idle_s: float, where: str, ended: trio.Event | None = None) -> Outcome:
    """Relay until the connection ends (see the module docstring); closes ``conn``
    and ``stream`` (reset unless both sides ended cleanly). Never raises for
    what the peer or the socket did."""
    how = "closed"
    stream.max_frame = MAX_FRAME  # a peer's frame longer than one chunk is refused before it is read
    idle = trio.CancelScope(deadline=trio.current_time() + idle_s)

    def touch() -> None:
        idle.deadline = trio.current_time() + idle_s

    async def outward() -> None:  # the socket -> the stream
        while True:
            data = await conn.receive_some(MAX_CHUNK)
            touch()
            if not data:
                channel.sent_eof()
                await stream.send({"eof": True})
                return
            channel.sent_data(len(data))
            await stream.send({"d": data})

    async def inward() -> None:  # the stream -> the socket
        while True:
            event = channel.receive(await stream.receive())
            touch()
            if isinstance(event, Data):
                await conn.send_all(event.data)
            elif isinstance(event, Eof):
                await conn.send_eof()
                return

    async def guarded(direction, scope: trio.CancelScope) -> None:
        """One direction; what the peer or the socket did ends the whole connection."""
        nonlocal how
        try:
            await direction()
        except (ForwardViolation, FrameError) as exc:
            if isinstance(exc, ForwardViolation):
                slug = exc.slug
            elif "exceeds" in str(exc):
                slug = "oversize"
            elif str(exc).startswith("malformed"):
                slug = "bad_frame"
            else:  # the stream ended inside a frame: a broken peer, not a hostile one
                slug = None
            if slug is not None:
                REFUSALS.count(where, slug)
                how = "violation"
                log.info("forward stream refused", extra={"peer": stream.remote_peer[:16], "reason": slug})
            elif how == "closed":
                how = "aborted"
            scope.cancel()
        except Exception as exc:  # EOF without eof, a reset, a broken socket or stream
            if how == "closed":
                how = "aborted"
            log.debug("forward aborted: %s: %s", type(exc).__name__, exc)
            scope.cancel()

    async def until_ended(scope: trio.CancelScope) -> None:
        nonlocal how
        await ended.wait()
        how = "ended"
        scope.cancel()

    try:
        with idle:
            async with trio.open_nursery() as nursery:
                if ended is not None:
                    nursery.start_soon(until_ended, nursery.cancel_scope)
                async with trio.open_nursery() as pair:
                    pair.start_soon(guarded, outward, nursery.cancel_scope)
                    pair.start_soon(guarded, inward, nursery.cancel_scope)
                nursery.cancel_scope.cancel()  # both directions done: stop watching
        if idle.cancelled_caught and how == "closed":
            how = "idle"
    finally:
        with trio.CancelScope(shield=True):
            await _close(stream, conn, clean=how == "closed" and channel.done)
    return Outcome(how, channel.sent, channel.received)


async def _close(stream: FramedStream, conn: trio.abc.HalfCloseableStream, clean: bool) -> None:
    with trio.move_on_after(2):
        try:
            await conn.aclose()
        except Exception:
            pass
        try:
            if clean:
                await stream.raw.close()
            else:
                await stream.raw.reset()  # the other side must not wait for an eof
        except Exception:
            pass
