"""The migration hand-over of one task, from a preempted provider to the next
(sans-IO).

Theory of operation
-------------------
A provider whose owner wants the machine back sends a preemption notice on
the task stream (`synord.protocols.taskstream.Preempt`: grace period, deadline).
The consumer decides how the task moves (`decide_mode`: is there time to
move a fresh checkpoint, or only the last one it holds, or nothing?), asks
for a stop-checkpoint or cancels, and restores the task elsewhere:

    provider: Notice(grace) --------------------------> RUNNING -> NOTIFIED
    consumer: Decide(mode) (local)                       NOTIFIED -> NOTIFIED
    consumer: RequestStop(push_to?)  [mode full] -------> NOTIFIED -> STOPPING
    consumer: Cancel                 [partial / restart] NOTIFIED -> CANCELLING
    provider: FinalCheckpoint(pushed_to?) --------------> STOPPING -> CHECKPOINTED
    provider: CheckpointFailed --------------------------> STOPPING -> CANCELLING
              (the consumer downgrades: partial if it holds a checkpoint, else
              restart, and cancels)
    provider: Exited(handed_back) ----------------------> any live state -> HANDED_OVER
    consumer: (without a notice) Exited(handed_back) ---> RUNNING -> HANDED_OVER (restart)

Where the checkpoint goes: with ``push_to`` (the next provider was agreed
before the stop, and the consumer granted it a transfer) the old provider
uploads it there directly and the consumer keeps only its digest
(``route = "direct"``); otherwise it streams through the consumer
(``route = "via-consumer"``).  The provider's side of this table is the same
events seen from the other end: it sends Notice, FinalCheckpoint,
CheckpointFailed and Exited, and receives RequestStop and Cancel.

Restore (`restore_plan`) is a pure decision at the next launch: the mode, the
checkpoint the consumer holds (or that was pushed to that very provider), and
whether the local copy is intact give the restore body of `task.start`, the
route and the mode the history records.  The mode ``restart-from-checkpoint``
is the lost-provider path (no notice, no hand-over; `synord.jobs` sets it).

No sockets, no clocks: the grace left is computed by the caller from the
notice's deadline and passed in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

CONSUMER, PROVIDER = "consumer", "provider"
MODES = ("full", "partial", "restart")
RESTORING_MODES = ("full", "partial", "restart-from-checkpoint")


class State(str, enum.Enum):
    RUNNING = "RUNNING"
    NOTIFIED = "NOTIFIED"
    STOPPING = "STOPPING"
    CANCELLING = "CANCELLING"
    CHECKPOINTED = "CHECKPOINTED"
    HANDED_OVER = "HANDED_OVER"

    def __str__(self) -> str:
        return self.value


class HandoverError(Exception):
    def __init__(self, role: str, event: str, state: State, reason: str):
        super().__init__(f"{role} cannot {event} in state {state}: {reason}")
        self.role, self.event, self.state, self.reason = role, event, state, reason


@dataclass(frozen=True)
class Thresholds:
    full: float = 0.8
    partial: float = 0.3


def decide_mode(bandwidth_bps: float, grace_s: float, checkpoint_bytes: int,
                checkpointable: bool, have_checkpoint: bool,
                thresholds: Thresholds = Thresholds()) -> tuple[str, float]:
    """(mode, ratio) for one task: ratio = bandwidth × grace / checkpoint size;
    ≥ full → "full" (a fresh checkpoint moves), ≥ partial and a checkpoint held
    → "partial" (the newest one we hold moves), else "restart"."""
    if not checkpointable:
        return "restart", 0.0
    size = max(1, checkpoint_bytes)
    ratio = bandwidth_bps * max(0.0, grace_s) / size
    if ratio >= thresholds.full:
        return "full", ratio
    if ratio >= thresholds.partial and have_checkpoint:
        return "partial", ratio
    return "restart", ratio


# --- events -------------------------------------------------------------------

@dataclass(frozen=True)
class Notice:
    grace_s: float
    reason: str = ""


@dataclass(frozen=True)
class Decide:
    mode: str
    ratio: float = 0.0


@dataclass(frozen=True)
class RequestStop:
    push_to: str | None = None  # the next provider's peer id, when granted a direct push


@dataclass(frozen=True)
class Cancel:
    pass


@dataclass(frozen=True)
class FinalCheckpoint:
    pushed_to: str | None = None


@dataclass(frozen=True)
class CheckpointFailed:
    pass


@dataclass(frozen=True)
class Exited:
    handed_back: bool


S = State
_LIVE = (S.RUNNING, S.NOTIFIED, S.STOPPING, S.CANCELLING, S.CHECKPOINTED)
TRANSITIONS: dict[str, dict[State, dict[type, State]]] = {
    CONSUMER: {
        S.NOTIFIED: {Decide: S.NOTIFIED, RequestStop: S.STOPPING, Cancel: S.CANCELLING},
        S.STOPPING: {Cancel: S.CANCELLING},
    },
    PROVIDER: {
        S.RUNNING: {Notice: S.NOTIFIED, Exited: S.HANDED_OVER},
        S.NOTIFIED: {Exited: S.HANDED_OVER},
        S.STOPPING: {FinalCheckpoint: S.CHECKPOINTED, CheckpointFailed: S.CANCELLING, Exited: S.HANDED_OVER},
        S.CANCELLING: {Exited: S.HANDED_OVER, FinalCheckpoint: S.CANCELLING},
        S.CHECKPOINTED: {Exited: S.HANDED_OVER},
    },
}


@dataclass
class Handover:
    role: str
    checkpointable: bool
    have_checkpoint: bool = False  # the consumer holds a (periodic) checkpoint of the task
    state: State = State.RUNNING
    mode: str | None = None
    ratio: float = 0.0
    grace_s: float = 0.0
    reason: str = ""
    route: str | None = None  # "direct" | "via-consumer" once the final checkpoint came
    history: list[str] = field(default_factory=list)

    @property
    def peer_role(self) -> str:
        return PROVIDER if self.role == CONSUMER else CONSUMER

    @property
    def preempted(self) -> bool:
        return self.state is not State.RUNNING

    def send(self, event: Any) -> None:
        self._process(self.role, event)

    def receive(self, event: Any) -> None:
        self._process(self.peer_role, event)

    # --- the consumer's decisions (each applies and returns what to send) ------

    def notice(self, grace_s: float, reason: str, bandwidth_bps: float, checkpoint_bytes: int,
               thresholds: Thresholds = Thresholds()) -> str:
        """Consumer: a notice came; decide the mode (applied) and return it."""
        self.receive(Notice(grace_s, reason))
        mode, ratio = decide_mode(bandwidth_bps, grace_s, checkpoint_bytes or 1, self.checkpointable,
                                  self.have_checkpoint, thresholds)
        self.send(Decide(mode, ratio))
        return mode

    def checkpoint_failed(self) -> bool:
        """Consumer: the provider could not take the stop-checkpoint; True if we must cancel now."""
        if self.state is not State.STOPPING:
            return False  # a periodic checkpoint failed: nothing to hand over yet
        self.receive(CheckpointFailed())
        self.mode = "partial" if self.have_checkpoint else "restart"
        return True

    def exited(self, handed_back: bool) -> str | None:
        """The task ended: the restore mode if it moves (None: it really ended)."""
        if not (self.preempted or handed_back):
            return None
        self.receive(Exited(handed_back))
        return self.mode or "restart"

    # The one place where state changes.
    def _process(self, role: str, event: Any) -> None:
        name = type(event).__name__
        new = TRANSITIONS[role].get(self.state, {}).get(type(event))
        if new is None:
            raise HandoverError(role, name, self.state, "illegal event for this state")
        if isinstance(event, Decide) and event.mode not in MODES:
            raise HandoverError(role, name, self.state, f"unknown mode {event.mode!r}")
        if isinstance(event, RequestStop) and self.mode != "full":
            raise HandoverError(role, name, self.state, "a stop-checkpoint is for a full move only")
        if isinstance(event, Notice):
            self.grace_s, self.reason = max(0.0, event.grace_s), event.reason
        elif isinstance(event, Decide):
            self.mode, self.ratio = event.mode, event.ratio
        elif isinstance(event, FinalCheckpoint):
            self.route = "direct" if event.pushed_to else "via-consumer"
            if self.state is State.STOPPING:
                self.have_checkpoint = True
        elif isinstance(event, Exited) and self.mode is None:
            self.mode = "restart"  # handed back without a notice we heard: nothing to restore from
        self.history.append(name)
        self.state = new


@dataclass(frozen=True)
class RestorePlan:
    mode: str                  # what the history records ("initial" on a first start)
    restore: dict | None       # task.start's restore body: {sha256, offsets}, or None
    route: str | None          # "direct" | "via-consumer" | None
    push: bool                 # the consumer must upload its copy first


def restore_plan(mode: str | None, checkpoint: dict | None, peer: str, intact: bool) -> RestorePlan:
    """How the next start restores: ``checkpoint`` is what the consumer holds
    ({sha256, offsets, path, at_provider}); ``intact``: its local copy still
    matches its digest (the caller hashed it)."""
    ck = checkpoint
    if mode not in RESTORING_MODES or not ck:
        return RestorePlan(mode or "initial", None, None, False)
    restore = {"sha256": ck["sha256"], "offsets": ck["offsets"]}
    if ck.get("at_provider") == peer:
        return RestorePlan(mode, restore, "direct", False)  # the old provider uploaded it here
    if not ck.get("path") or not intact:
        return RestorePlan("restart", None, None, False)
    return RestorePlan(mode, restore, "via-consumer", True)
