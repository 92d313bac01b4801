"""The forward protocol (`/synord/forward/1`): one TCP connection from the
consumer's machine to a port inside a running task's sandbox (`synord forward`).

Theory of operation.  The consumer opens one stream per TCP connection and
sends, in a frame ``{"env": bytes}``, a signed envelope

  forward.open   {job_id, port: 1..65535, check?: bool}

(``check``: answer whether a connection would be accepted, then close without
connecting: `synord forward` asks once before it listens.)

The provider accepts only from the task's consumer (the stream's authenticated
peer, who must also have signed the envelope) and only to a port named in the
task's signed agreement terms; it connects to that port inside the sandbox's
network namespace and answers ``{"ok": true}``, or ``{"error": text, "code":
CODE}`` (CODE in ERROR_CODES) and closes.  Then both sides send

  {"d": bytes}      1..MAX_CHUNK bytes of the connection, in order
  {"eof": true}     the sender's side of the TCP connection is done writing

Each direction ends with one ``eof``; after both the stream is closed.  A
stream that ends without them (reset, closed early) aborts the connection on
the other side.  Nothing else is allowed: any other frame, data before the
answer or after that direction's eof, an oversized chunk, is a protocol
violation that ends the connection and is counted by its slug.

`ForwardChannel` below is the whole rule set, the same class for both roles
(OPENER = the consumer, ACCEPTER = the provider); drivers feed it what they
receive and tell it what they send.  No sockets, no clocks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .envelope import message_type
from .tasks import _ID_RE, TaskSpecError

FORWARD_PROTOCOL = "/synord/forward/1"
OPEN_TYPE = "forward.open"
OPEN_TIMEOUT_S = 15.0  # the opening request and its answer, each way
MAX_CHUNK = 64 * 1024  # bytes in one {"d": ...} frame: also what a side reads at once
MAX_FRAME = MAX_CHUNK + 64  # a frame once relaying, its msgpack map included: a longer one is refused unread
ERROR_CODES = ("forbidden", "no_task", "not_running", "unsupported", "port_not_agreed", "busy",
               "bad_request", "connection_refused")

OPENER, ACCEPTER = "opener", "accepter"


def check_open(body: Any) -> None:
    if not isinstance(body, dict) or not {"job_id", "port"} <= set(body) <= {"job_id", "port", "check"}:
        raise TaskSpecError("forward.open body must be a map of job_id, port and check")
    if not isinstance(body.get("check", False), bool):
        raise TaskSpecError("check must be a bool")
    if not isinstance(body["job_id"], str) or not _ID_RE.fullmatch(body["job_id"]):
        raise TaskSpecError(f"job_id must match {_ID_RE.pattern}")
    port = body["port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise TaskSpecError("port must be an integer in 1..65535")


def open_body(job_id: str, port: int, check: bool = False) -> dict:
    body = {"job_id": job_id, "port": port, **({"check": True} if check else {})}
    check_open(body)
    return body


message_type(OPEN_TYPE, check_open)


class State(enum.Enum):
    OPENING = "opening"  # the open request is out, no answer yet
    OPEN = "open"        # relaying (each direction until its eof)
    CLOSED = "closed"    # both eofs, a refusal, or a violation


class ForwardViolation(Exception):
    """The peer broke the protocol; ``slug`` is the counted reason (ours, stable)."""

    def __init__(self, slug: str, message: str):
        super().__init__(message)
        self.slug = slug


@dataclass(frozen=True)
class Accepted:
    pass


@dataclass(frozen=True)
class Refused:
    code: str
    message: str


@dataclass(frozen=True)
class Data:
    data: bytes


@dataclass(frozen=True)
class Eof:
    pass


class ForwardChannel:
    """One forwarded connection's stream, as either party sees it.

    ``receive(frame)`` checks a frame from the peer and returns its event;
    ``accepted()`` / ``sent_data(n)`` / ``sent_eof()`` record what we sent (the
    accepter's answer, our data, our eof).  ``done`` once both directions
    have ended cleanly."""

    def __init__(self, role: str):
        if role not in (OPENER, ACCEPTER):
            raise ValueError(f"unknown role {role!r}")
        self.role = role
        self.state = State.OPENING
        self.peer_eof = False
        self.our_eof = False
        self.received = 0  # bytes of data from the peer
        self.sent = 0      # bytes of data to the peer

    @property
    def done(self) -> bool:
        return self.state is State.CLOSED or (self.peer_eof and self.our_eof)

    def _fail(self, slug: str, message: str) -> ForwardViolation:
        self.state = State.CLOSED
        return ForwardViolation(slug, message)

    def accepted(self) -> None:
        if self.role != ACCEPTER or self.state is not State.OPENING:
            raise RuntimeError(f"{self.role} cannot accept in state {self.state.value}")
        self.state = State.OPEN

    def sent_data(self, n: int) -> None:
        if self.state is not State.OPEN or self.our_eof or not 0 < n <= MAX_CHUNK:
            raise RuntimeError(f"cannot send {n} bytes in state {self.state.value} (eof sent: {self.our_eof})")
        self.sent += n

    def sent_eof(self) -> None:
        if self.state is not State.OPEN or self.our_eof:
            raise RuntimeError(f"cannot send eof in state {self.state.value}")
        self.our_eof = True
        if self.peer_eof:
            self.state = State.CLOSED

    def receive(self, frame: Any) -> Accepted | Refused | Data | Eof:
        if self.state is State.CLOSED:
            raise self._fail("after_close", "frame after the forward ended")
        if not isinstance(frame, dict):
            raise self._fail("bad_frame", "a forward frame is a map")
        if self.state is State.OPENING:
            if self.role != OPENER:
                raise self._fail("unexpected_frame", "frame before the open request was answered")
            return self._answer(frame)
        if len(frame) != 1:
            raise self._fail("bad_frame", "a forward frame is a map of one field")
        if "d" in frame:
            data = frame["d"]
            if not isinstance(data, bytes) or not data:
                raise self._fail("bad_frame", "data must be non-empty bytes")
            if len(data) > MAX_CHUNK:
                raise self._fail("oversize", f"a chunk of {len(data)} bytes exceeds {MAX_CHUNK}")
            if self.peer_eof:
                raise self._fail("data_after_eof", "data after the peer's eof")
            self.received += len(data)
            return Data(data)
        if frame.get("eof") is True:
            if self.peer_eof:
                raise self._fail("duplicate_eof", "a second eof")
            self.peer_eof = True
            if self.our_eof:
                self.state = State.CLOSED
            return Eof()
        raise self._fail("unexpected_frame", "unknown forward frame")

    def _answer(self, frame: dict) -> Accepted | Refused:
        if frame.get("ok") is True:
            self.state = State.OPEN
            return Accepted()
        if "error" in frame:
            self.state = State.CLOSED
            # the code is matched against our list (peer text never becomes a label)
            code = frame.get("code") if frame.get("code") in ERROR_CODES else "failed"
            return Refused(code, str(frame["error"])[:300])
        raise self._fail("unexpected_frame", "expected the answer to the open request")
