"""The lease of one agreement: is the other party still there? (sans-IO)

Theory of operation
-------------------
An agreement has ONE lease, and this is the one place that decides it is
lost.  Two sources say the peer is alive, and both feed the same lease:

    NEGOTIATION  a heartbeat on /synord/negotiate (synord.protocols.negotiation),
                 every ``heartbeat_ms`` of the agreed terms, both directions;
    TASK         any frame on the task stream (synord.protocols.taskstream): output,
                 ``{"hb": ms}`` heartbeats, checkpoints, progress.

    LIVE  --heard(source, now)--> LIVE           deadline = now + timeout_ms
    LIVE  --expire(now >= deadline)--> LOST      nobody heard for timeout_ms
    LIVE  --end(reason)--> ENDED                 the agreement ended (End on the negotiation)
    ENDED --heard / expire--> ENDED / LOST       the task stream still owes its last frames
                                                 (the exit frame may cross the End): its
                                                 silence still means lost
    LOST: terminal; heard() is ignored there (a late frame revives nothing)

The deadline is the latest sign of life from *either* source plus the
timeout: a provider whose task stream is busy (a checkpoint blob in flight)
but whose daemon still heartbeats on the negotiation is not lost, and a
consumer that re-attached after its own restart (no negotiation any more)
keeps its lease on task frames alone.  ``timeout_ms`` is the tightest limit
any holder asked for (`limit`): the negotiation's ``heartbeat_ms *
missed_heartbeats`` and the job path's ``jobs.lease_timeout_s``.

Drivers ask (`remaining_ms`, `expire`); they never keep a clock of their own.
No sockets, no clocks: every call takes ``now`` (ms, any monotonic origin the
caller keeps consistently).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

NEGOTIATION, TASK = "negotiation", "task"
SOURCES = (NEGOTIATION, TASK)


class LeaseState(str, enum.Enum):
    LIVE = "LIVE"
    LOST = "LOST"
    ENDED = "ENDED"

    def __str__(self) -> str:
        return self.value


class LeaseError(Exception):
    """An event the lease cannot take in its state (names event, state, reason)."""

    def __init__(self, event: str, state: LeaseState, reason: str):
        super().__init__(f"lease cannot {event} in state {state}: {reason}")
        self.event, self.state, self.reason = event, state, reason


@dataclass(frozen=True)
class Heard:
    source: str
    type = "heard"


@dataclass(frozen=True)
class Expire:
    """Local: the caller's clock says the deadline passed."""
    type = "expire"


@dataclass(frozen=True)
class EndLease:
    reason: str = ""
    type = "end"


S = LeaseState
TRANSITIONS: dict[LeaseState, dict[type, LeaseState]] = {
    S.LIVE: {Heard: S.LIVE, Expire: S.LOST, EndLease: S.ENDED},
    S.ENDED: {Heard: S.ENDED, Expire: S.LOST, EndLease: S.ENDED},
    S.LOST: {Heard: S.LOST, EndLease: S.LOST},     # lost stays lost: the driver already moved on
}


@dataclass
class Lease:
    timeout_ms: int
    started: int  # ms: the lease counts from here until something is heard
    state: LeaseState = LeaseState.LIVE
    last_heard: dict[str, int] = field(default_factory=dict)
    reason: str = ""

    def __post_init__(self) -> None:
        if self.timeout_ms <= 0:
            raise ValueError("a lease timeout must be positive")

    @property
    def deadline(self) -> int:
        return max([self.started, *self.last_heard.values()]) + self.timeout_ms

    @property
    def lost(self) -> bool:
        return self.state is LeaseState.LOST

    def limit(self, timeout_ms: int) -> None:
        """A holder that needs to know sooner tightens the timeout (never loosens it)."""
        if timeout_ms > 0:
            self.timeout_ms = min(self.timeout_ms, int(timeout_ms))

    def heard(self, source: str, now: int) -> None:
        if source not in SOURCES:
            raise LeaseError("heard", self.state, f"unknown source {source!r}")
        self._process(Heard(source), now)

    def end(self, reason: str, now: int) -> None:
        self._process(EndLease(reason), now)

    def remaining_ms(self, now: int) -> int:
        """How long a driver may wait for the next sign of life (0: ask `expire`)."""
        if self.state is LeaseState.LOST:
            return 0
        return max(0, self.deadline - now)

    def expire(self, now: int) -> bool:
        """Apply the deadline: True if the lease is (now) lost."""
        if self.state is not LeaseState.LOST and now >= self.deadline:
            self._process(Expire(), now)
        return self.lost

    # The one place where state changes.
    def _process(self, event, now: int) -> None:
        new = TRANSITIONS[self.state].get(type(event))
        if new is None:
            raise LeaseError(type(event).__name__, self.state, "illegal event for this state")
        if isinstance(event, Heard) and self.state is not LeaseState.LOST:
            self.last_heard[event.source] = max(now, self.last_heard.get(event.source, now))
        elif isinstance(event, Expire):
            silent = max(0, now - max([self.started, *self.last_heard.values()]))
            self.reason = f"no sign of life for {silent / 1000:g} s"
        elif isinstance(event, EndLease) and self.state is LeaseState.LIVE:
            self.reason = event.reason
        self.state = new
