"""The task stream after the agreement (`/synord/task/1.0.0`, sans-IO).

Theory of operation
-------------------
Everything that decides which frame may come when, and whether its content
is acceptable, lives in this file; the trio drivers (`synord.jobs.task_client`
on the consumer, `synord.jobs.task_server` on the provider) only move frames
between the stream and this machine.  The same `TaskStream` class runs on both
sides: a side feeds it what it sends (`send`, which returns the wire frame)
and what it receives (`receive`, which returns a typed event or a `Refused`).
An event is checked against the table of the role that *emitted* it, so a
provider cannot send a consumer's frame and vice versa.  No sockets, no
clocks: heartbeats carry the sender's ``now_ms``; liveness is `synord.protocols.lease`.

    consumer: Open (task.start / task.attach envelope) -----> IDLE -> OPENING
    provider: Progress {phase, done, total}* (start only) --> OPENING -> OPENING
    provider: Started  {"started": true} -------------------> OPENING -> STREAMING
    provider: Error    {"error": text} ---------------------> OPENING | STREAMING -> CLOSED
    provider: Output   {"o", "off", "d"} -------------------> STREAMING
    provider: Heartbeat {"hb": ms} -------------------------> STREAMING
    provider: Preempt  {"preempt": {grace_s, deadline_ms, reason}}  STREAMING
    provider: Checkpoint {"ckpt": {sha256, bytes, offsets, final[, pushed_to]}}
                        pushed_to: STREAMING; else -> BLOB (its bytes follow)
    provider: Blob     {"blob": bytes} + raw bytes ---------> BLOB -> STREAMING
    provider: CheckpointError {"ckpt_error": text} ---------> STREAMING
    provider: Exit     {"exit": {code, reason, usage, error, handed_back, offsets}}
                                                             STREAMING -> EXITED
    consumer: Cancel   {"cancel": true} --------------------> STREAMING | BLOB
    consumer: CheckpointRequest {"checkpoint": {stop[, push_to]}}  STREAMING | BLOB
    consumer: Renew    {"renew": k} (a service pays period k) --> STREAMING | BLOB
    provider: ServiceInfo {"service": {restarts, paid, volumes}} --> STREAMING
    provider: Volume   {"volume": {name, sha256, bytes}} ---> STREAMING -> BLOB (a service's named
              volume as a tar, its bytes follow: sent before the exit frame of a service handed back)
              (a service's state: synord.protocols.servicelease; volumes: {name: bytes})

Output offsets: the consumer's machine holds, per stream, how many bytes it
has (``have``, restored from the store or a checkpoint's offsets).  An
output frame that starts past ``have`` is a gap and is dropped (offsets stay
true; the exit frame's final offsets then show what is missing, `gap`); one
that ends at or before ``have`` is a replay (after a restore) and is dropped
silently; an overlap is trimmed.  The provider's machine numbers what it
sends the same way, from where the consumer said it is.

Peer input: a frame that is not what the table allows, or whose content fails
a check, becomes `Refused(slug, fatal)`: the driver counts it
(`REFUSALS.count(WHERE, slug)`) and, if ``fatal``, ends the placement as lost
(the frame's content would drive a file name or a read loop).  Non-fatal
refusals are dropped frames; the state never changes on a refusal.  Our own
illegal sends raise `TaskStreamError` (a bug here, not peer input).
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .framing import CHUNK
from .tasks import TaskSpecError, check_progress
from .servicelease import MAX_PERIODS as _MAX_PERIOD
from .servicespec import NAME_RE as _VOLUME
from .transfer import MAX_BLOB_BYTES

CONSUMER, PROVIDER = "consumer", "provider"
WHERE = "task_output"  # the refusal counter's `where` for frames a provider sends us
STREAMS = ("stdout", "stderr")
MAX_TEXT = 1024  # error / ckpt_error / preempt reason: longer is cut, never trusted
_SHA = re.compile(r"[0-9a-f]{64}")
_MAX_OFFSET = 1 << 62


class State(str, enum.Enum):
    IDLE = "IDLE"
    OPENING = "OPENING"
    STREAMING = "STREAMING"
    BLOB = "BLOB"
    EXITED = "EXITED"
    CLOSED = "CLOSED"

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({State.EXITED, State.CLOSED})


class TaskStreamError(Exception):
    """Our own side tried an event that is illegal in this state."""

    def __init__(self, role: str, event: str, state: State, reason: str):
        super().__init__(f"{role} cannot {event} in state {state}: {reason}")
        self.role, self.event, self.state, self.reason = role, event, state, reason


@dataclass(frozen=True)
class Refused:
    """A peer frame refused: ``slug`` is the counted reason (ours, stable);
    ``fatal``: the placement cannot go on (the driver treats it as lost)."""
    slug: str
    detail: str
    fatal: bool = False


# --- events (one per frame kind) ----------------------------------------------

@dataclass(frozen=True)
class Open:
    envelope: bytes  # sealed task.start / task.attach (checked by the provider's driver)

    def frame(self) -> dict:
        return {"env": self.envelope}


@dataclass(frozen=True)
class Progress:
    phase: str
    done: int | None = None
    total: int | None = None

    def frame(self) -> dict:
        return {"progress": {"phase": self.phase, "done": self.done, "total": self.total}}


@dataclass(frozen=True)
class Started:
    def frame(self) -> dict:
        return {"started": True}


@dataclass(frozen=True)
class Error:
    text: str

    def frame(self) -> dict:
        return {"error": self.text}


@dataclass(frozen=True)
class Output:
    stream: str
    offset: int
    data: bytes

    def frame(self) -> dict:
        return {"o": self.stream, "off": self.offset, "d": self.data}


@dataclass(frozen=True)
class Heartbeat:
    at_ms: int

    def frame(self) -> dict:
        return {"hb": self.at_ms}


@dataclass(frozen=True)
class ServiceInfo:
    """A service's state as its provider sees it: restarts, the last period paid, volume sizes."""
    restarts: int
    paid: int
    volumes: dict = field(default_factory=dict)

    def frame(self) -> dict:
        return {"service": {"restarts": self.restarts, "paid": self.paid, "volumes": dict(self.volumes)}}


@dataclass(frozen=True)
class Volume:
    """A service's named volume, packed (synord.volumes), travelling with it: a blob follows."""
    name: str
    sha256: str
    size: int

    def frame(self) -> dict:
        return {"volume": {"name": self.name, "sha256": self.sha256, "bytes": self.size}}


@dataclass(frozen=True)
class Renew:
    """The consumer pays the service's period ``period`` (synord.protocols.servicelease)."""
    period: int

    def frame(self) -> dict:
        return {"renew": self.period}


@dataclass(frozen=True)
class Preempt:
    grace_s: float
    deadline_ms: int
    reason: str

    def frame(self) -> dict:
        return {"preempt": {"grace_s": self.grace_s, "deadline_ms": self.deadline_ms, "reason": self.reason}}

    def notice(self) -> dict:
        return self.frame()["preempt"]


@dataclass(frozen=True)
class Checkpoint:
    sha256: str
    size: int
    offsets: dict
    final: bool
    pushed_to: str | None = None  # sent straight to the next provider: no blob follows

    def frame(self) -> dict:
        info = {"sha256": self.sha256, "bytes": self.size, "offsets": dict(self.offsets), "final": self.final}
        if self.pushed_to is not None:
            info["pushed_to"] = self.pushed_to
        return {"ckpt": info}


@dataclass(frozen=True)
class Blob:
    size: int  # raw bytes that follow the frame on the stream

    def frame(self) -> dict:
        return {"blob": self.size}


@dataclass(frozen=True)
class CheckpointError:
    text: str

    def frame(self) -> dict:
        return {"ckpt_error": self.text}


@dataclass(frozen=True)
class Exit:
    code: int | None
    reason: str | None
    usage: Any
    error: str | None
    handed_back: bool
    offsets: dict | None  # where each output stream ends (None: the provider did not say)

    def frame(self) -> dict:
        return {"exit": {"code": self.code, "reason": self.reason, "usage": self.usage, "error": self.error,
                         "handed_back": self.handed_back, "offsets": self.offsets}}

    def as_dict(self) -> dict:
        return self.frame()["exit"]


@dataclass(frozen=True)
class Cancel:
    def frame(self) -> dict:
        return {"cancel": True}


@dataclass(frozen=True)
class CheckpointRequest:
    stop: bool
    push_to: dict | None = None  # {peer, grant, addrs}: send it straight to the next provider

    def frame(self) -> dict:
        request: dict[str, Any] = {"stop": self.stop}
        if self.push_to is not None:
            request["push_to"] = self.push_to
        return {"checkpoint": request}


# --- the table ---------------------------------------------------------------

S = State
TRANSITIONS: dict[str, dict[State, dict[type, State]]] = {
    CONSUMER: {
        S.IDLE: {Open: S.OPENING},
        S.STREAMING: {Cancel: S.STREAMING, CheckpointRequest: S.STREAMING, Renew: S.STREAMING},
        S.BLOB: {Cancel: S.BLOB, CheckpointRequest: S.BLOB, Renew: S.BLOB},
        S.EXITED: {Cancel: S.EXITED},  # a cancel crossing the exit frame is harmless
    },
    PROVIDER: {
        S.OPENING: {Progress: S.OPENING, Started: S.STREAMING, Error: S.CLOSED},
        S.STREAMING: {Output: S.STREAMING, Heartbeat: S.STREAMING, Preempt: S.STREAMING,
                      Checkpoint: S.STREAMING, CheckpointError: S.STREAMING, Exit: S.EXITED,
                      ServiceInfo: S.STREAMING, Volume: S.STREAMING,
                      Error: S.CLOSED},
        S.BLOB: {Blob: S.STREAMING},
    },
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(v: Any) -> str:
    """Peer text: a bounded string (what it is for a log or an error message)."""
    return (v if isinstance(v, str) else str(v))[:MAX_TEXT]


def _offsets_ok(v: Any) -> bool:
    return isinstance(v, dict) and len(v) <= 2 and set(v) <= set(STREAMS) and all(
        _is_int(x) and 0 <= x <= _MAX_OFFSET for x in v.values())


def parse(role: str, frame: Any) -> Any:
    """The typed event a frame from ``role`` carries, or a `Refused` (content checks)."""
    if not isinstance(frame, dict):
        return Refused("not_a_map", "a task frame must be a map")
    if role == CONSUMER:
        if frame.get("cancel"):
            return Cancel()
        req = frame.get("checkpoint")
        if isinstance(req, dict):
            push = req.get("push_to")
            if push is not None and not (isinstance(push, dict) and isinstance(push.get("peer"), str)
                                         and isinstance(push.get("grant"), bytes)
                                         and isinstance(push.get("addrs", []), list)):
                push = None  # a broken push request: the checkpoint goes through the consumer
            return CheckpointRequest(bool(req.get("stop")), push)
        if "renew" in frame:
            k = frame["renew"]
            if not _is_int(k) or not 0 < k <= _MAX_PERIOD:
                return Refused("bad_renewal", "renew must name a period number")
            return Renew(k)
        return Refused("unknown_frame", "not a consumer task frame")
    if "o" in frame:
        s, off, data = frame.get("o"), frame.get("off"), frame.get("d")
        if s not in STREAMS or not _is_int(off) or not 0 <= off <= _MAX_OFFSET or not isinstance(data, bytes):
            return Refused("bad_output_frame", "output frame without stream, offset or bytes")
        if len(data) > CHUNK:
            return Refused("oversize_output", f"output frame of {len(data)} bytes exceeds {CHUNK}")
        return Output(s, off, data)
    if "hb" in frame:
        return Heartbeat(frame["hb"] if _is_int(frame["hb"]) else 0)
    if "volume" in frame:
        v = frame["volume"]
        # its name and digest name files here and its size drives a read loop
        if not (isinstance(v, dict) and isinstance(v.get("name"), str) and _VOLUME.fullmatch(v["name"])
                and isinstance(v.get("sha256"), str) and _SHA.fullmatch(v["sha256"])
                and _is_int(v.get("bytes")) and 0 <= v["bytes"] <= MAX_BLOB_BYTES):
            return Refused("bad_volume_frame", "volume frame without name, digest or size", fatal=True)
        return Volume(v["name"], v["sha256"], v["bytes"])
    if "service" in frame:
        info = frame["service"]
        vols = info.get("volumes", {}) if isinstance(info, dict) else None
        if not (isinstance(info, dict) and _is_int(info.get("restarts")) and 0 <= info["restarts"] <= _MAX_PERIOD
                and _is_int(info.get("paid")) and 0 <= info["paid"] <= _MAX_PERIOD
                and isinstance(vols, dict) and len(vols) <= 8
                and all(isinstance(k, str) and _VOLUME.fullmatch(k) and _is_int(v) and 0 <= v <= _MAX_OFFSET
                        for k, v in vols.items())):
            return Refused("bad_service_frame", "service frame without restarts, paid or volume sizes")
        return ServiceInfo(info["restarts"], info["paid"], dict(vols))
    if "ckpt" in frame:
        info = frame["ckpt"]
        if not isinstance(info, dict):
            return Refused("bad_checkpoint_frame", "checkpoint frame is not a map", fatal=True)
        sha, size, offsets = info.get("sha256"), info.get("bytes"), info.get("offsets") or {}
        # its digest names a file here and its size drives a read loop
        if not (isinstance(sha, str) and _SHA.fullmatch(sha) and _is_int(size) and 0 <= size <= MAX_BLOB_BYTES):
            return Refused("bad_checkpoint_frame", "checkpoint frame without digest or size", fatal=True)
        if not _offsets_ok(offsets):
            return Refused("bad_checkpoint_frame", "checkpoint offsets out of range", fatal=True)
        pushed = info.get("pushed_to")
        if pushed is not None and not (isinstance(pushed, str) and 0 < len(pushed) <= 128):
            return Refused("bad_checkpoint_frame", "pushed_to is not a peer id", fatal=True)
        return Checkpoint(sha, size, dict(offsets), bool(info.get("final")), pushed)
    if "blob" in frame:
        size = frame["blob"]
        if not _is_int(size) or not 0 <= size <= MAX_BLOB_BYTES:
            return Refused("bad_blob_header", "blob header without a size", fatal=True)
        return Blob(size)
    if "ckpt_error" in frame:
        return CheckpointError(_text(frame["ckpt_error"]))
    if "preempt" in frame:
        n = frame["preempt"]
        if not isinstance(n, dict):
            return Refused("bad_preempt_frame", "preemption notice is not a map", fatal=True)
        deadline, grace = n.get("deadline_ms", 0), n.get("grace_s", 0.0)
        if not _is_int(deadline) or deadline < 0:
            deadline = 0  # no usable deadline: no grace (restart elsewhere)
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not math.isfinite(grace):
            grace = 0.0
        reason = n.get("reason")
        return Preempt(float(grace), deadline, _text(reason) if reason is not None else "")
    if "exit" in frame:
        ex = frame["exit"]
        if not isinstance(ex, dict):
            return Refused("bad_exit_frame", "exit frame is not a map", fatal=True)
        code = ex.get("code")
        reason, error = ex.get("reason"), ex.get("error")
        final = ex.get("offsets")
        return Exit(code if _is_int(code) else None, _text(reason) if reason else None, ex.get("usage"),
                    _text(error) if error else None, ex.get("handed_back") is True,
                    dict(final) if _offsets_ok(final) and set(final) == set(STREAMS) else None)
    if "progress" in frame:
        try:
            p = check_progress(frame["progress"])
        except TaskSpecError:
            return Refused("bad_progress_frame", "malformed progress frame")
        return Progress(p["phase"], p["done"], p["total"])
    if frame.get("started") is True:
        return Started()
    if "error" in frame:
        return Error(_text(frame["error"]))
    return Refused("unknown_frame", "not a provider task frame")


@dataclass
class TaskStream:
    role: str
    have: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STREAMS})
    state: State = State.IDLE
    blob_expected: int | None = None  # BLOB: the size the checkpoint frame announced
    checkpoint: Checkpoint | None = None  # the last checkpoint announced
    exit: Exit | None = None
    preempt: Preempt | None = None

    def __post_init__(self) -> None:
        if self.role not in (CONSUMER, PROVIDER):
            raise ValueError(f"role must be {CONSUMER!r} or {PROVIDER!r}")
        if self.role == PROVIDER and self.state is State.IDLE:
            self.state = State.OPENING  # the provider's stream exists once the opening frame came

    @property
    def peer_role(self) -> str:
        return PROVIDER if self.role == CONSUMER else CONSUMER

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def send(self, event: Any) -> dict:
        """Apply our own event; its wire frame."""
        new = TRANSITIONS[self.role].get(self.state, {}).get(type(event))
        if new is None:
            raise TaskStreamError(self.role, type(event).__name__, self.state, "illegal event for this state")
        self._apply(self.role, event, new)
        return event.frame()

    def output(self, stream: str, offset: int, data: bytes) -> list[dict]:
        """Provider: the frames for ``data``, which starts at ``offset`` of ``stream``, in CHUNKs."""
        return [self.send(Output(stream, offset + i, data[i:i + CHUNK])) for i in range(0, len(data), CHUNK)]

    def receive(self, frame: Any) -> Any:
        """A peer frame: its typed event (applied), or `Refused` (state unchanged).
        An `Output` event carries only the bytes that are new to us (or is None
        when it was a replay of bytes we have)."""
        event = parse(self.peer_role, frame)
        if isinstance(event, Refused):
            return event
        new = TRANSITIONS[self.peer_role].get(self.state, {}).get(type(event))
        if new is None:
            slug = "frame_after_exit" if self.done else "wrong_order"
            return Refused(slug, f"{type(event).__name__} in state {self.state}",
                           fatal=self.state is State.BLOB or isinstance(event, Blob))
        if isinstance(event, Blob) and event.size != self.blob_expected:
            return Refused("bad_blob_header", "blob size differs from its checkpoint frame", fatal=True)
        if isinstance(event, Output):
            kept = self._accept_output(event)
            if isinstance(kept, Refused) or kept is None:
                return kept
            event = kept
        self._apply(self.peer_role, event, new)
        return event

    def _accept_output(self, ev: Output) -> Output | Refused | None:
        have = self.have[ev.stream]
        if ev.offset + len(ev.data) <= have:
            return None  # already delivered (replayed after a restore)
        if ev.offset > have:
            # A gap: keep nothing past it (offsets stay true); the exit frame's
            # final offsets then show what is missing, and it is fetched again.
            return Refused("gap", f"{ev.stream} jumps from {have} to {ev.offset}")
        return Output(ev.stream, have, ev.data[have - ev.offset:])

    def _apply(self, role: str, event: Any, new: State) -> None:
        if isinstance(event, Output):
            self.have[event.stream] = event.offset + len(event.data)
        elif isinstance(event, Checkpoint):
            self.checkpoint = event
            if event.pushed_to is None:
                new, self.blob_expected = State.BLOB, event.size
        elif isinstance(event, Volume):
            new, self.blob_expected = State.BLOB, event.size
        elif isinstance(event, Blob):
            self.blob_expected = None
        elif isinstance(event, Preempt):
            self.preempt = event
        elif isinstance(event, Exit):
            self.exit = event
        self.state = new

    def gap(self) -> str | None:
        """Consumer, after the exit frame: what is missing of the output; None if nothing."""
        final = self.exit.offsets if self.exit is not None else None
        if final is None:
            return "the provider did not say where the output ends"
        short = [f"{s}: received {self.have[s]} of {final[s]} bytes" for s in STREAMS if self.have[s] != final[s]]
        return "; ".join(short) or None
