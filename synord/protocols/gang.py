"""All-or-nothing placement of a gang of N tasks on N distinct providers (sans-IO).

Theory of operation
-------------------
A gang is N ordinary agreements (`synord.protocols.negotiation`) that only
become countersigned together.  Nothing new crosses the wire: a member's
*hold* is the provider's reservation between its signed ``agreement`` and the
consumer's ``countersign`` (negotiation state RESERVED/AGREED, released at
once on a ``reject`` and by itself after ``countersign_ms``); *commit* is the
countersign; *release* is a ``reject`` with reason ``withdrawn``.  This file
decides, for the consumer's coordinator, which members to ask, when all are
held and so may be committed, and when to let go of everything.

Each member is a `Member` machine; its table is keyed by the role that
*emitted* the event, never by "who we are" (as in negotiation.py), so the same
rules describe the coordinator's view and the provider member's:

    coordinator: Reserve --------------------> IDLE -> ASKED        (a proposal)
    member:      Held(aid, until) -----------> ASKED -> HELD        (a signed agreement: capacity held
                                                                     until ``until``)
    member:      Refused(reason) ------------> ASKED -> REFUSED     (a reject: price, capacity, admission…)
    coordinator: Commit ---------------------> HELD -> COMMITTED    (the countersign)
    coordinator: Release --------------------> ASKED|HELD -> RELEASED (the member frees the capacity at once)
    local:       Expire ---------------------> ASKED|HELD -> EXPIRED (held: ``until`` is near, the provider's
                                                                     own countersign timeout, so a vanished
                                                                     consumer never blocks capacity; asked:
                                                                     no answer within ``answer_ms``)

Retries are idempotent: a second Held with the same agreement id in HELD, a
Commit in COMMITTED, a Release of a member already released, refused or
expired change nothing.  A Held arriving after we released (it crossed our
release on the wire) is answered by another Release: the member must never
keep capacity for a gang that gave up.  Anything else (a Held naming another
agreement, a Commit of a member not held) raises `GangError` naming role,
event, state and reason, and leaves the state unchanged.

The coordinator (`Gang`):

- A round reserves ``size`` distinct members at once, *no-wait*: a provider
  that cannot hold refuses at once, nobody queues behind anybody, so two
  consumers competing for overlapping member sets can never deadlock.  A
  provider's capacity is reserved atomically (market.reservations), so they
  can never double-book either: at most one of them holds a slot.
- Any refusal or expiry ends the round: every other member is released *at
  once* (the lost race costs the winner nothing).  A member that refused for a
  lasting reason (price, admission, runtime…) is dropped from the candidates;
  one that was only full (``capacity``, ``timeout``) goes to the back of the
  order.  The next round starts after a randomized, growing back-off (seeded
  `random.Random`, so tests replay interleavings), which breaks the symmetry
  of two coordinators that keep colliding.
- A member silent for ``answer_ms`` (a lost message, a stalled provider) ends
  the round like a busy one.
- Once all ``size`` are held, the gang commits only if the earliest hold still
  has ``commit_margin_ms`` to run (the provider's clock started a little before
  ours); else it releases all and tries again.
- The gang fails when fewer than ``size`` candidates are left that did not
  refuse for a lasting reason, or at ``deadline``; while enough exist but some
  are busy (their asks gone from the book for now), it waits.  Members are reserved in sorted peer-id order (a global order:
  two coordinators that pick the same set collide on the same first member).

No sockets, no clocks: callers pass ``now`` (ms) and perform the returned
actions (`Reserve`, `Commit`, `Release`), feeding back `Held`/`Refused`.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Any

COORDINATOR, MEMBER, LOCAL = "coordinator", "member", "local"
MAX_GANG = 16  # members of one gang (each is a negotiation and a task stream)
# Refusals that may pass (the member was busy, or slow): the member stays a candidate.
TRANSIENT = frozenset({"capacity", "timeout", "no_answer", "expired", "stale_ask", "late"})


class State(str, enum.Enum):
    IDLE = "IDLE"
    ASKED = "ASKED"
    HELD = "HELD"
    REFUSED = "REFUSED"
    COMMITTED = "COMMITTED"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"

    def __str__(self) -> str:
        return self.value


class GangError(Exception):
    """An event illegal in this state, or whose content fails a check."""

    def __init__(self, role: str, event: str, state: Any, reason: str):
        super().__init__(f"{role} cannot {event} in state {state}: {reason}")
        self.role, self.event, self.state, self.reason = role, event, state, reason


# --- events (each names its member) ------------------------------------------

@dataclass(frozen=True)
class Reserve:
    peer: str


@dataclass(frozen=True)
class Held:
    peer: str
    aid: bytes
    until: int  # ms: the hold ends (the consumer-side countersign deadline)


@dataclass(frozen=True)
class Refused:
    peer: str
    reason: str  # a slug (negotiator.REASONS or "timeout"): never peer text


@dataclass(frozen=True)
class Commit:
    peer: str


@dataclass(frozen=True)
class Release:
    peer: str
    reason: str = "withdrawn"


@dataclass(frozen=True)
class Expire:
    peer: str


S = State
TRANSITIONS: dict[str, dict[State, dict[type, State]]] = {
    COORDINATOR: {
        S.IDLE: {Reserve: S.ASKED},
        S.ASKED: {Release: S.RELEASED},
        S.HELD: {Commit: S.COMMITTED, Release: S.RELEASED},
        S.COMMITTED: {Commit: S.COMMITTED},
        S.RELEASED: {Release: S.RELEASED},
        S.REFUSED: {Release: S.REFUSED},
        S.EXPIRED: {Release: S.EXPIRED},
    },
    MEMBER: {
        S.ASKED: {Held: S.HELD, Refused: S.REFUSED},
        S.HELD: {Held: S.HELD},  # the same hold again (a retry)
        S.COMMITTED: {Held: S.COMMITTED},
        S.REFUSED: {Refused: S.REFUSED},
        S.RELEASED: {Held: S.RELEASED, Refused: S.RELEASED},  # crossed our release
        S.EXPIRED: {Held: S.EXPIRED, Refused: S.EXPIRED},
    },
    LOCAL: {
        S.ASKED: {Expire: S.EXPIRED},
        S.HELD: {Expire: S.EXPIRED},
    },
}


@dataclass
class Member:
    peer: str
    rank: int
    state: State = State.IDLE
    aid: bytes | None = None
    until: int | None = None
    asked_at: int | None = None
    reason: str = ""

    def process(self, role: str, event: Any) -> bool:
        """Apply ``event`` (emitted by ``role``); True when the state or the hold changed."""
        name = type(event).__name__
        new = TRANSITIONS[role].get(self.state, {}).get(type(event))
        if new is None:
            raise GangError(role, name, self.state, "illegal event for this state")
        if getattr(event, "peer", self.peer) != self.peer:
            raise GangError(role, name, self.state, "event for another member")
        if isinstance(event, Held) and self.state in (State.HELD, State.COMMITTED):
            if event.aid != self.aid:
                raise GangError(role, name, self.state, "a second hold naming another agreement")
            return False  # the same hold again
        if isinstance(event, Held) and new is State.HELD:
            self.aid, self.until = event.aid, event.until
        elif isinstance(event, Held):
            self.aid = event.aid  # a late hold: the caller releases it again
        elif isinstance(event, (Refused, Release)) and self.state not in (S.RELEASED, S.REFUSED, S.EXPIRED):
            self.reason = event.reason
        elif isinstance(event, Expire):
            self.reason = "expired"
        changed = new is not self.state
        self.state = new
        return changed


class Phase(str, enum.Enum):
    RESERVING = "RESERVING"
    BACKOFF = "BACKOFF"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Timing:
    commit_margin_ms: int = 1_000  # the earliest hold must still run this long to commit
    answer_ms: int = 6_000         # a member silent this long after the ask is given up on
    backoff_ms: int = 200          # first back-off after a lost round (randomized, doubling)
    backoff_max_ms: int = 3_000


@dataclass
class Gang:
    """The consumer's coordinator: ``size`` members out of ``candidates`` (best first)."""
    size: int
    candidates: list[str]
    deadline: int
    seed: int | None = None
    timing: Timing = field(default_factory=Timing)
    phase: Phase = Phase.BACKOFF
    members: dict[str, Member] = field(default_factory=dict)  # this round's
    rounds: int = 0
    wake: int | None = None  # when tick() has something to do
    reason: str = ""
    refusals: dict[str, str] = field(default_factory=dict)  # peer -> last refusal slug

    def __post_init__(self) -> None:
        if not 1 <= self.size <= MAX_GANG:
            raise ValueError(f"a gang has 1 to {MAX_GANG} members")
        if len(set(self.candidates)) != len(self.candidates):
            raise ValueError("candidates must be distinct peers")
        self._rng = random.Random(self.seed)
        self._order = list(self.candidates)  # every peer ever offered, best first
        self._available = set(self.candidates)  # those the book offers now
        self._dropped: set[str] = set()  # refused for a lasting reason

    @property
    def done(self) -> bool:
        return self.phase in (Phase.COMMITTED, Phase.FAILED)

    def ranked(self) -> list[Member]:
        return sorted(self.members.values(), key=lambda m: m.rank)

    def start(self, now: int) -> list[Any]:
        """The first round's reservations."""
        return self._round(now)

    def update_candidates(self, candidates: list[str]) -> None:
        """A fresher view of who offers now (a busy provider's ask may be gone from the
        book for a while); used from the next round on."""
        self._available = set(candidates)
        self._order += [p for p in candidates if p not in self._order]

    # --- what the members said -------------------------------------------------------------

    def held(self, peer: str, aid: bytes, until: int, now: int) -> list[Any]:
        m = self._member(peer, MEMBER, "Held")
        before = m.state
        changed = m.process(MEMBER, Held(peer, aid, until))
        if before in (State.RELEASED, State.EXPIRED):
            return [self._release(m, "withdrawn", force=True)]
        return self._maybe_commit(now) if changed else []  # else: the same hold again

    def refused(self, peer: str, reason: str, now: int) -> list[Any]:
        m = self._member(peer, MEMBER, "Refused")
        if not m.process(MEMBER, Refused(peer, reason)) or self.phase is not Phase.RESERVING:
            return []
        self.refusals[peer] = reason
        if reason in TRANSIENT:
            self._order.remove(peer)
            self._order.append(peer)  # busy: ask the others first next round
        else:
            self._dropped.add(peer)  # it will not take this gang: never ask again
        return self._lose_round(now, f"{peer[:12]} refused ({reason})")

    # --- time ------------------------------------------------------------------------------

    def tick(self, now: int) -> list[Any]:
        if self.done:
            return []
        if now >= self.deadline:
            out = self._release_all("gave up")
            self._fail(f"no {self.size} providers held together before the deadline"
                       + (f" (last: {self.reason})" if self.reason else ""))
            return out
        if self.phase is Phase.BACKOFF and self.wake is not None and now >= self.wake:
            return self._round(now)
        if self.phase is Phase.RESERVING:
            late = [m for m in self.members.values() if m.until is not None and m.state is State.HELD
                    and now >= m.until - self.timing.commit_margin_ms]
            silent = [m for m in self.members.values() if m.state is State.ASKED
                      and now >= m.asked_at + self.timing.answer_ms]
            for m in late + silent:
                m.process(LOCAL, Expire(m.peer))
            for m in silent:  # a lost answer, or a slow provider: others first next round
                self.refusals[m.peer] = "timeout"
                self._order.remove(m.peer)
                self._order.append(m.peer)
            if late or silent:
                return self._lose_round(now, f"{(late + silent)[0].peer[:12]}: "
                                        + ("hold ran out before all were held" if late else "no answer"))
            return self._maybe_commit(now)
        return []

    def next_deadline(self) -> int | None:
        if self.done:
            return None
        times = [self.deadline] + ([self.wake] if self.wake is not None else [])
        times += [m.until - self.timing.commit_margin_ms for m in self.members.values()
                  if m.state is State.HELD and m.until is not None]
        times += [m.asked_at + self.timing.answer_ms for m in self.members.values() if m.state is State.ASKED]
        return min(times)

    # --- inside ----------------------------------------------------------------------------

    def _member(self, peer: str, role: str, event: str) -> Member:
        m = self.members.get(peer)
        if m is None:
            raise GangError(role, event, self.phase, "not a member of this round")
        return m

    def _known(self) -> list[str]:
        return [p for p in self._order if p not in self._dropped]

    def _round(self, now: int) -> list[Any]:
        known = self._known()
        if len(known) < self.size:
            self._fail(f"only {len(known)} of {self.size} providers would take it"
                       + (f" ({self._refusal_summary()})" if self.refusals else ""))
            return []
        eligible = [p for p in known if p in self._available]
        if len(eligible) < self.size:  # some are busy now: wait for the book to offer them again
            self.reason = f"{len(eligible)} of {self.size} providers free"
            self.phase, self.wake = Phase.BACKOFF, now + self._backoff()
            return []
        chosen = eligible[:self.size]
        self.rounds += 1
        self.phase, self.wake = Phase.RESERVING, None
        # Ranks follow the global (sorted peer id) order too: every member computes the same roster.
        self.members = {p: Member(p, rank) for rank, p in enumerate(sorted(chosen))}
        out = []
        for m in self.ranked():
            m.process(COORDINATOR, Reserve(m.peer))
            m.asked_at = now
            out.append(Reserve(m.peer))
        return out

    def _maybe_commit(self, now: int) -> list[Any]:
        ms = self.ranked()
        if self.phase is not Phase.RESERVING or not all(m.state is State.HELD for m in ms):
            return []
        if min(m.until for m in ms) - now < self.timing.commit_margin_ms:
            for m in ms:
                if m.until - now < self.timing.commit_margin_ms:
                    m.process(LOCAL, Expire(m.peer))
            return self._lose_round(now, "a hold ran out before all were held")
        out = []
        for m in ms:
            m.process(COORDINATOR, Commit(m.peer))
            out.append(Commit(m.peer))
        self.phase, self.wake = Phase.COMMITTED, None
        return out

    def _lose_round(self, now: int, why: str) -> list[Any]:
        self.reason = why
        out = self._release_all("withdrawn")
        known = self._known()
        if len(known) < self.size:
            self._fail(f"only {len(known)} of {self.size} providers would take it ({self._refusal_summary()})")
            return out
        self.phase, self.wake = Phase.BACKOFF, now + self._backoff()
        return out

    def _backoff(self) -> int:
        """Randomized (seeded) and growing with the rounds lost: two coordinators that
        collided do not collide again in lockstep."""
        base = min(self.timing.backoff_max_ms, self.timing.backoff_ms << min(max(self.rounds - 1, 0), 8))
        return int(base * self._rng.uniform(0.5, 1.5))

    def _release_all(self, reason: str) -> list[Any]:
        return [r for m in self.ranked() if (r := self._release(m, reason)) is not None]

    def _release(self, m: Member, reason: str, force: bool = False) -> Release | None:
        if m.state in (State.ASKED, State.HELD):
            m.process(COORDINATOR, Release(m.peer, reason))
            return Release(m.peer, reason)
        if force:  # a hold that crossed our release on the wire: let it go again
            return Release(m.peer, reason)
        return None

    def _fail(self, why: str) -> None:
        self.phase, self.wake, self.reason = Phase.FAILED, None, why

    def _refusal_summary(self) -> str:
        return ", ".join(f"{p[:12]}: {r}" for p, r in sorted(self.refusals.items()))
