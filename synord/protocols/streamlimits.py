"""Limits on what peers' streams may hold: deadlines, open-stream caps, buffered bytes.

Theory of operation.  Every inbound stream a peer opens on one of our
protocols costs a slot and, while a frame is being assembled, the bytes that
arrived so far.  A hostile peer can open many streams and stall each one
before its first frame or in the middle of one (a header declaring 4 MiB, a
few bytes sent): without limits each such stream waits forever and pins what
it buffered.  So, once for every protocol (the mesh backend applies this when
it hands a stream to a handler, and `synord.protocols.framing` when it reads):

- a stream must deliver its first frame within ``first_frame_s`` and each
  later frame header within ``idle_s`` of the previous frame (``None`` for
  protocols whose peer legitimately stays quiet once accepted: a task's or an
  exec session's consumer only speaks to cancel or type);
- once a frame header (or a blob's body) has started, every piece of it must
  arrive within ``frame_s``;
- open inbound streams are capped per peer and in total;
- bytes held for frames not yet complete are capped per peer and in total;
  they are charged as they arrive and released when the frame is handed
  over or the stream ends.

Every refusal is counted as ``REFUSALS.count("streams", reason)``; the
reasons are the ``Refusal`` constants below.  This module holds the rules and
the bookkeeping only (no I/O), so it is tested by calling it.

Why not py-libp2p's resource manager (``libp2p.rcmgr``): its stream limit is
one global counter (no per-peer cap) that also counts the library's own
gossip, identify and ping streams and our outbound streams, its memory
accounting is not tied to stream buffers, and its refusals would not reach
our /metrics.  The limits that matter here are per peer and per frame, which
only the layer that reads frames can see.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .refusals import REFUSALS

WHERE = "streams"


class Refusal:
    TOO_MANY_PEER = "too_many_streams_peer"
    TOO_MANY_TOTAL = "too_many_streams_total"
    BUFFER_PEER = "buffered_bytes_peer"
    BUFFER_TOTAL = "buffered_bytes_total"
    FIRST_FRAME = "first_frame_timeout"
    IDLE = "idle_timeout"
    FRAME_BODY = "frame_body_timeout"


@dataclass(frozen=True)
class StreamLimits:
    first_frame_s: float = 10.0
    idle_s: float | None = 300.0
    frame_s: float = 30.0
    max_streams_per_peer: int = 64
    max_streams_total: int = 1024
    max_buffered_per_peer: int = 16 * 1024 * 1024
    max_buffered_total: int = 128 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("first_frame_s", "frame_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.idle_s is not None and not self.idle_s > 0:
            raise ValueError("idle_s must be positive (or None for no limit)")
        for name in ("max_streams_per_peer", "max_streams_total",
                     "max_buffered_per_peer", "max_buffered_total"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


class StreamBudget:
    """Open inbound streams and buffered bytes, per peer and in total, for one node."""

    def __init__(self, limits: StreamLimits | None = None):
        self.limits = limits or StreamLimits()
        self._streams: Counter[str] = Counter()
        self._bytes: Counter[str] = Counter()
        self.streams_total = 0
        self.buffered_total = 0

    def open_stream(self, peer: str) -> str | None:
        """Admit one more inbound stream from ``peer``; the refusal reason, or None."""
        lim = self.limits
        if self._streams[peer] >= lim.max_streams_per_peer:
            return _refuse(Refusal.TOO_MANY_PEER)
        if self.streams_total >= lim.max_streams_total:
            return _refuse(Refusal.TOO_MANY_TOTAL)
        self._streams[peer] += 1
        self.streams_total += 1
        return None

    def close_stream(self, peer: str) -> None:
        if self._streams[peer] > 0:
            self._streams[peer] -= 1
            self.streams_total -= 1
        if not self._streams[peer]:
            del self._streams[peer]

    def reserve(self, peer: str, n: int) -> str | None:
        """Charge ``n`` buffered bytes to ``peer``; the refusal reason, or None."""
        lim = self.limits
        if self._bytes[peer] + n > lim.max_buffered_per_peer:
            return _refuse(Refusal.BUFFER_PEER)
        if self.buffered_total + n > lim.max_buffered_total:
            return _refuse(Refusal.BUFFER_TOTAL)
        self._bytes[peer] += n
        self.buffered_total += n
        return None

    def release(self, peer: str, n: int) -> None:
        n = min(n, self._bytes[peer])
        self._bytes[peer] -= n
        self.buffered_total -= n
        if not self._bytes[peer]:
            del self._bytes[peer]

    def buffered_of(self, peer: str) -> int:
        return self._bytes[peer]


class StreamGuard:
    """One stream's share of a `StreamBudget` and its deadlines (see the module text).

    ``inbound`` streams get the first-frame and idle deadlines (``idle=False``
    drops the latter) and are charged to the budget, which the handler wrapper
    settles when the stream ends.  Streams we opened keep their callers' own
    deadlines for whole replies and get only the frame-body deadline: we choose
    how many we open, and an abandoned one must not leave bytes charged.
    """

    def __init__(self, budget: StreamBudget | None, peer: str, limits: StreamLimits,
                 inbound: bool, idle: bool = True):
        self.budget = budget  # None: deadlines only (streams we opened; see below)
        self.peer = peer
        self.inbound = inbound
        self.first_frame_s = limits.first_frame_s if inbound else None
        self.idle_s = limits.idle_s if inbound and idle else None
        self.frame_s = limits.frame_s
        self.held = 0

    def header_deadline(self, frames_received: int) -> tuple[float | None, str]:
        """Seconds allowed until the next frame header, and the refusal if it is late."""
        if frames_received == 0:
            return self.first_frame_s, Refusal.FIRST_FRAME
        return self.idle_s, Refusal.IDLE

    def reserve(self, n: int) -> str | None:
        if self.budget is None:
            return None
        refusal = self.budget.reserve(self.peer, n)
        if refusal is None:
            self.held += n
        return refusal

    def release(self, n: int | None = None) -> None:
        n = self.held if n is None else min(n, self.held)
        if self.budget is not None:
            self.budget.release(self.peer, n)
        self.held -= n


def _refuse(reason: str) -> str:
    REFUSALS.count(WHERE, reason)
    return reason


def count(reason: str) -> None:
    """Count a refusal decided elsewhere (a deadline that fired)."""
    REFUSALS.count(WHERE, reason)
