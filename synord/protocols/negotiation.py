"""Negotiation of one placement between a consumer and a provider (sans-IO).

Theory of operation
-------------------
Everything that affects states and transitions lives in this file, and the
same `Negotiation` class runs on both sides: each side feeds it the events
it sends (`send`) and the events it receives (`receive`); an event is
checked against the table of the role that *emitted* it, never against "who
we are", so neither side can cheat.  No sockets, no clocks: callers pass
``now`` (unix ms) and ask for `check_timeout` / `heartbeat_due`.

    consumer: Propose ------------------------------> IDLE -> PROPOSED
    provider: (admission, reservation) Reserve          PROPOSED -> RESERVED   (provider-local)
    provider: Agreement (provider-signed terms) ------> -> AGREED
    consumer: Countersign (same signing input) -------> AGREED -> ACTIVE (lease)
    either:   Heartbeat every heartbeat_ms ----------> ACTIVE -> ACTIVE
    either:   End (outcome, reason) ------------------> -> ENDED
    provider: Reject(reason) in PROPOSED/RESERVED/AGREED (admission, capacity,
              bad countersign); consumer: Reject before countersigning (bad
              signature, terms not what was asked) -> REJECTED
    local:    Timeout: no answer / no countersign -> EXPIRED (the provider
              releases its reservation); no heartbeat from the peer for
              heartbeat_ms * missed_heartbeats while ACTIVE -> LOST; that silence
              is the agreement's one `lease.Lease`, which the task stream feeds
              too (any task frame is a sign of life), so both agree on "lost"

RESERVED is only ever seen on the provider side (Reserve never crosses the
wire), so Agreement is legal from PROPOSED as well: that is the consumer's
view of the same conversation.  Content checks travel with transitions: an
Agreement must carry a valid provider signature and the proposed terms, a
Countersign a valid consumer signature over the same agreement, heartbeats
strictly increasing sequence numbers (an old one is a replay).  A failed
check raises `NegotiationError` naming role, event, state and reason, and
leaves the state unchanged.

Signatures (see docs/WIRE.md): ``AGREEMENT_DOMAIN || canonical(agreement)``
where `canonical` is msgpack with map keys sorted, shortest ints, float64.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .admission import DEFAULT_PRIORITY, PriorityError, check_priority
from .envelope import message_type
from .identity import Identity, verify
from .lease import NEGOTIATION, Lease
from .orders import MAX_CORES, MAX_DURATION_S, MAX_GPUS, MAX_MEMORY, MAX_PRICE, RUNTIMES
from .ports import wire_ports

CONSUMER, PROVIDER = "consumer", "provider"
AGREEMENT_DOMAIN = b"synord/agreement/1\x00"
NID_LEN = 16
MAX_REASON_LEN = 256
OUTCOMES = ("completed", "failed", "abandoned", "cancelled", "preempted")


class State(str, enum.Enum):
    IDLE = "IDLE"
    PROPOSED = "PROPOSED"
    RESERVED = "RESERVED"
    AGREED = "AGREED"
    ACTIVE = "ACTIVE"
    ENDED = "ENDED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    LOST = "LOST"

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({State.ENDED, State.REJECTED, State.EXPIRED, State.LOST})


class NegotiationError(Exception):
    """An event that is illegal in this state, or whose content fails a check."""

    def __init__(self, role: str, event: str, state: State, reason: str):
        super().__init__(f"{role} cannot {event} in state {state}: {reason}")
        self.role, self.event, self.state, self.reason = role, event, state, reason


def canonical(obj: Any) -> bytes:
    """Deterministic msgpack: map keys sorted, floats as float64, no NaN."""
    return msgpack.packb(_sorted(obj), use_bin_type=True)


def _sorted(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_sorted(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError("non-finite float in signed data")
    return obj


# --- events -----------------------------------------------------------------

class BodyError(ValueError):
    pass


def _get(b: dict, key: str, types: tuple, check=None) -> Any:
    if key not in b:
        raise BodyError(f"missing field {key!r}")
    v = b[key]
    if isinstance(v, bool) and bool not in types:
        raise BodyError(f"{key} has the wrong type")
    if not isinstance(v, types):
        raise BodyError(f"{key} has the wrong type")
    if check is not None and not check(v):
        raise BodyError(f"{key} out of range")
    return v


def _str(b: dict, key: str, max_len: int = 64, optional: bool = False) -> str | None:
    if optional and b.get(key) is None:
        return None
    return _get(b, key, (str,), lambda v: 0 < len(v) <= max_len)


def _devices(res: dict) -> tuple[str, ...]:
    """Device ids in an agreement: one per agreed GPU, each a short token."""
    v = res.get("devices")
    if v is None:
        return ()
    if not isinstance(v, list) or len(v) != res.get("gpus") or len(set(map(str, v))) != len(v) or not all(
            isinstance(d, str) and 0 < len(d) <= 64 and d.isprintable() and "/" not in d for d in v):
        raise BodyError("devices must list one distinct id (<= 64 characters) per agreed GPU")
    return tuple(v)


def _ports(b: dict) -> tuple[int, ...]:
    """Exposed TCP ports (a proposal's, an agreement's): present only when there are some."""
    if "ports" not in b:
        return ()
    try:
        return wire_ports(b["ports"])
    except ValueError as exc:
        raise BodyError(str(exc)) from None


def _priority(b: dict) -> tuple[str, bool]:
    """(priority, preemptible): absent means normal and not preemptible (synord.protocols.admission)."""
    try:
        priority = check_priority(b.get("priority", DEFAULT_PRIORITY))
    except PriorityError as exc:
        raise BodyError(str(exc)) from None
    preemptible = b.get("preemptible", False)
    if not isinstance(preemptible, bool):
        raise BodyError("preemptible has the wrong type")
    return priority, preemptible


def _priority_body(priority: str, preemptible: bool) -> dict:
    """Only what differs from the default travels (and is signed): older bodies stay valid."""
    return {**({"priority": priority} if priority != DEFAULT_PRIORITY else {}),
            **({"preemptible": True} if preemptible else {})}


def _nid(b: dict, key: str = "nid") -> bytes:
    return _get(b, key, (bytes,), lambda v: len(v) == NID_LEN)


def _u(b: dict, key: str, hi: int = 2**63 - 1) -> int:
    return _get(b, key, (int,), lambda v: 0 <= v <= hi)


def _f(b: dict, key: str, hi: float) -> float:
    return float(_get(b, key, (int, float), lambda v: math.isfinite(v) and 0 <= v <= hi))


def _map(body: Any) -> dict:
    if not isinstance(body, dict) or len(body) > 32:
        raise BodyError("body must be a map of at most 32 fields")
    return body


@dataclass(frozen=True)
class Propose:
    nid: bytes
    ask_peer: str
    ask_id: str
    ask_seq: int
    bid_id: str
    bid_seq: int
    resource_class: str
    cores: float
    memory: int
    runtime: str
    max_price: float
    duration_s: int
    gpus: int = 0
    gpu_class: str | None = None
    ask_price: float | None = None  # the price of the ask the consumer matched (optional)
    ports: tuple[int, ...] = ()  # TCP ports the task exposes (synord.protocols.ports); absent when none
    priority: str = DEFAULT_PRIORITY  # who runs first on a busy provider (synord.protocols.admission)
    preemptible: bool = False  # may be handed back to make room for a higher priority

    type = "propose"

    def to_body(self) -> dict:
        return {"nid": self.nid, "ask_peer": self.ask_peer, "ask_id": self.ask_id, "ask_seq": self.ask_seq,
                "bid_id": self.bid_id, "bid_seq": self.bid_seq, "class": self.resource_class,
                "cores": float(self.cores), "memory": self.memory, "runtime": self.runtime,
                "max_price": float(self.max_price), "duration_s": self.duration_s, "gpus": self.gpus,
                "gpu_class": self.gpu_class,
                **({} if self.ask_price is None else {"ask_price": float(self.ask_price)}),
                **({"ports": list(self.ports)} if self.ports else {}),
                **_priority_body(self.priority, self.preemptible)}

    @classmethod
    def from_body(cls, body: Any) -> "Propose":
        b = _map(body)
        runtime = _str(b, "runtime")
        if runtime not in RUNTIMES:
            raise BodyError(f"unknown runtime {runtime!r}")
        priority, preemptible = _priority(b)
        return cls(_nid(b), _str(b, "ask_peer"), _str(b, "ask_id"), _u(b, "ask_seq"), _str(b, "bid_id"),
                   _u(b, "bid_seq"), _str(b, "class", 32), _f(b, "cores", MAX_CORES), _u(b, "memory", MAX_MEMORY),
                   runtime, _f(b, "max_price", MAX_PRICE), _u(b, "duration_s", MAX_DURATION_S),
                   _u(b, "gpus", MAX_GPUS), _str(b, "gpu_class", 32, optional=True),
                   None if b.get("ask_price") is None else _f(b, "ask_price", MAX_PRICE), _ports(b),
                   priority, preemptible)


@dataclass(frozen=True)
class Reserve:
    """Provider-local: admission passed and capacity is reserved.  Never sent."""
    type = "reserve"


@dataclass(frozen=True)
class Reject:
    nid: bytes
    reason: str
    detail: str = ""

    type = "reject"

    def to_body(self) -> dict:
        return {"nid": self.nid, "reason": self.reason, "detail": self.detail[:MAX_REASON_LEN]}

    @classmethod
    def from_body(cls, body: Any) -> "Reject":
        b = _map(body)
        detail = b.get("detail", "")
        if not isinstance(detail, str) or len(detail) > MAX_REASON_LEN:
            raise BodyError("detail must be a string of at most 256 characters")
        return cls(_nid(b), _str(b, "reason"), detail)


@dataclass(frozen=True)
class Terms:
    """The agreement both parties sign."""
    aid: bytes
    nid: bytes
    consumer: str
    provider: str
    ask_id: str
    ask_seq: int
    bid_id: str
    bid_seq: int
    resource_class: str
    cores: float
    memory: int
    gpus: int
    gpu_class: str | None
    runtime: str
    price: float       # per unit-hour
    units: float
    duration_s: int
    heartbeat_ms: int
    created: int       # unix ms
    expires: int       # lease end, unix ms
    # The provider's device units (GPU UUIDs) reserved for this agreement; absent
    # (and so not in the signed body) when it has none.
    devices: tuple[str, ...] = ()
    # The TCP ports the consumer may forward to (synord forward); absent when none.
    ports: tuple[int, ...] = ()
    # Who runs first on a busy provider (synord.protocols.admission); signed only when not the default.
    priority: str = DEFAULT_PRIORITY
    preemptible: bool = False

    def to_body(self) -> dict:
        res = {"class": self.resource_class, "cores": float(self.cores), "memory": self.memory,
               "gpus": self.gpus, "gpu_class": self.gpu_class}
        if self.devices:
            res["devices"] = list(self.devices)
        return {"aid": self.aid, "nid": self.nid, "consumer": self.consumer, "provider": self.provider,
                "ask": {"id": self.ask_id, "seq": self.ask_seq}, "bid": {"id": self.bid_id, "seq": self.bid_seq},
                "resources": res,
                "runtime": self.runtime, "price": float(self.price), "units": float(self.units),
                "duration_s": self.duration_s, "heartbeat_ms": self.heartbeat_ms,
                "created": self.created, "expires": self.expires,
                **({"ports": list(self.ports)} if self.ports else {}),
                **_priority_body(self.priority, self.preemptible)}

    @classmethod
    def from_body(cls, body: Any) -> "Terms":
        b = _map(body)
        ask, bid, res = _map(_get(b, "ask", (dict,))), _map(_get(b, "bid", (dict,))), _map(_get(b, "resources", (dict,)))
        return cls(_nid(b, "aid"), _nid(b), _str(b, "consumer"), _str(b, "provider"), _str(ask, "id"),
                   _u(ask, "seq"), _str(bid, "id"), _u(bid, "seq"), _str(res, "class", 32),
                   _f(res, "cores", MAX_CORES), _u(res, "memory", MAX_MEMORY), _u(res, "gpus", MAX_GPUS),
                   _str(res, "gpu_class", 32, optional=True), _str(b, "runtime"), _f(b, "price", MAX_PRICE),
                   _f(b, "units", MAX_CORES + MAX_GPUS), _u(b, "duration_s", MAX_DURATION_S),
                   _u(b, "heartbeat_ms", 3_600_000), _u(b, "created"), _u(b, "expires"), _devices(res),
                   _ports(b), *_priority(b))

    def signing_input(self) -> bytes:
        # Kept on the (frozen) object: the same terms are signed and verified in turn.
        cached = self.__dict__.get("_signing_input")
        if cached is None:
            cached = AGREEMENT_DOMAIN + canonical(self.to_body())
            object.__setattr__(self, "_signing_input", cached)
        return cached

    def sign(self, identity: Identity) -> bytes:
        return identity.sign(self.signing_input())


@dataclass(frozen=True)
class Agreement:
    terms: Terms
    psig: bytes  # provider signature over terms.signing_input()

    type = "agreement"

    @property
    def nid(self) -> bytes:
        return self.terms.nid

    def to_body(self) -> dict:
        return {"nid": self.terms.nid, "terms": self.terms.to_body(), "psig": self.psig}

    @classmethod
    def from_body(cls, body: Any) -> "Agreement":
        b = _map(body)
        terms = Terms.from_body(_get(b, "terms", (dict,)))
        if _nid(b) != terms.nid:
            raise BodyError("nid differs from terms.nid")
        return cls(terms, _get(b, "psig", (bytes,), lambda v: len(v) == 64))


@dataclass(frozen=True)
class Countersign:
    nid: bytes
    aid: bytes
    csig: bytes  # consumer signature over the same terms.signing_input()

    type = "countersign"

    def to_body(self) -> dict:
        return {"nid": self.nid, "aid": self.aid, "csig": self.csig}

    @classmethod
    def from_body(cls, body: Any) -> "Countersign":
        b = _map(body)
        return cls(_nid(b), _nid(b, "aid"), _get(b, "csig", (bytes,), lambda v: len(v) == 64))


@dataclass(frozen=True)
class Heartbeat:
    nid: bytes
    seq: int

    type = "heartbeat"

    def to_body(self) -> dict:
        return {"nid": self.nid, "seq": self.seq}

    @classmethod
    def from_body(cls, body: Any) -> "Heartbeat":
        b = _map(body)
        return cls(_nid(b), _u(b, "seq"))


@dataclass(frozen=True)
class End:
    nid: bytes
    outcome: str
    reason: str = ""

    type = "end"

    def to_body(self) -> dict:
        return {"nid": self.nid, "outcome": self.outcome, "reason": self.reason[:MAX_REASON_LEN]}

    @classmethod
    def from_body(cls, body: Any) -> "End":
        b = _map(body)
        outcome = _str(b, "outcome")
        if outcome not in OUTCOMES:
            raise BodyError(f"outcome must be one of {', '.join(OUTCOMES)}")
        reason = b.get("reason", "")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_LEN:
            raise BodyError("reason must be a string of at most 256 characters")
        return cls(_nid(b), outcome, reason)


@dataclass(frozen=True)
class Timeout:
    """Local: a deadline passed (what: proposal, countersign, heartbeat)."""
    what: str
    type = "timeout"


WIRE_EVENTS = {c.type: c for c in (Propose, Reject, Agreement, Countersign, Heartbeat, End)}

for _name, _cls in WIRE_EVENTS.items():
    message_type(_name, _cls.from_body)


def event_from_envelope(env) -> Any:
    """The typed negotiation event inside an accepted envelope."""
    cls = WIRE_EVENTS.get(env.type)
    if cls is None:
        raise BodyError(f"not a negotiation message: {env.type}")
    if isinstance(env.parsed, cls):  # decode ran this very checker on the body: not twice
        return env.parsed
    return cls.from_body(env.body)


# --- the table --------------------------------------------------------------

S = State
TRANSITIONS: dict[str, dict[State, dict[type, State]]] = {
    CONSUMER: {
        S.IDLE: {Propose: S.PROPOSED},
        S.PROPOSED: {Reject: S.REJECTED, End: S.ENDED, Timeout: S.EXPIRED},
        S.RESERVED: {Reject: S.REJECTED, End: S.ENDED},  # as the provider sees it
        S.AGREED: {Countersign: S.ACTIVE, Reject: S.REJECTED, End: S.ENDED, Timeout: S.EXPIRED},
        S.ACTIVE: {Heartbeat: S.ACTIVE, End: S.ENDED, Timeout: S.LOST},
    },
    PROVIDER: {
        S.PROPOSED: {Reserve: S.RESERVED, Agreement: S.AGREED, Reject: S.REJECTED, Timeout: S.EXPIRED},
        S.RESERVED: {Agreement: S.AGREED, Reject: S.REJECTED, Timeout: S.EXPIRED},
        S.AGREED: {Reject: S.REJECTED, End: S.ENDED, Timeout: S.EXPIRED},
        S.ACTIVE: {Heartbeat: S.ACTIVE, End: S.ENDED, Timeout: S.LOST},
    },
}


@dataclass(frozen=True)
class Timeouts:
    propose_ms: int = 5_000        # consumer waits this long for agreement/reject
    countersign_ms: int = 5_000    # provider holds the reservation this long unsigned
    heartbeat_ms: int = 2_000
    missed_heartbeats: int = 3     # silence of heartbeat_ms * this -> LOST


@dataclass
class Negotiation:
    role: str
    nid: bytes
    consumer: str
    provider: str
    timeouts: Timeouts = field(default_factory=Timeouts)
    state: State = State.IDLE
    deadline: int | None = None
    proposal: Propose | None = None
    agreement: Agreement | None = None
    csig: bytes | None = None
    outcome: str | None = None
    reason: str = ""
    next_heartbeat: int | None = None
    lease: Lease | None = None  # the agreement's one lease (synord.protocols.lease), from the countersign on
    _sent_hb: int = 0
    _seen_hb: int = -1

    def __post_init__(self) -> None:
        if self.role not in (CONSUMER, PROVIDER):
            raise ValueError(f"role must be {CONSUMER!r} or {PROVIDER!r}")

    @property
    def peer_role(self) -> str:
        return PROVIDER if self.role == CONSUMER else CONSUMER

    @property
    def terms(self) -> Terms | None:
        return self.agreement.terms if self.agreement else None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def send(self, event: Any, now: int) -> None:
        self._process(self.role, event, now)

    def receive(self, event: Any, now: int) -> None:
        self._process(self.peer_role, event, now)

    def heartbeat(self, now: int) -> Heartbeat:
        """Our next heartbeat (applied as sent)."""
        hb = Heartbeat(self.nid, self._sent_hb + 1)
        self.send(hb, now)
        return hb

    def heartbeat_due(self, now: int) -> bool:
        return self.state is State.ACTIVE and self.next_heartbeat is not None and now >= self.next_heartbeat

    def check_timeout(self, now: int) -> Timeout | None:
        """If our deadline passed, apply and return the Timeout event."""
        if self.state is State.ACTIVE and self.lease is not None:
            self.deadline = self.lease.deadline  # the task stream may have heard the peer since
        if self.deadline is None or now < self.deadline or self.done:
            return None
        what = {State.ACTIVE: "heartbeat", State.AGREED: "countersign",
                State.RESERVED: "countersign"}.get(self.state, "proposal")
        ev = Timeout(what)
        self.send(ev, now)
        return ev

    # The one place where state changes.
    def _process(self, role: str, event: Any, now: int) -> None:
        new = TRANSITIONS[role].get(self.state, {}).get(type(event))
        name = type(event).__name__
        if new is None:
            raise NegotiationError(role, name, self.state, "illegal event for this state")
        if isinstance(event, Timeout) and role != self.role:
            raise NegotiationError(role, name, self.state, "timeouts are local events")
        if isinstance(event, Reserve) and self.role != PROVIDER:
            raise NegotiationError(role, name, self.state, "reservation is provider-local")
        nid = getattr(event, "nid", self.nid)
        if nid != self.nid:
            raise NegotiationError(role, name, self.state, "negotiation id mismatch")
        self._check(role, event, name)
        self._apply(role, event, new, now)

    def _check(self, role: str, event: Any, name: str) -> None:
        def fail(reason: str) -> None:
            raise NegotiationError(role, name, self.state, reason)

        if isinstance(event, Propose):
            if event.ask_peer != self.provider:
                fail("proposal addressed to another provider")
        elif isinstance(event, Agreement):
            t, p = event.terms, self.proposal
            # Signatures are checked on what a peer sent; ours we just made (a
            # verify costs as much as the rest of the negotiation's CPU).
            if role != self.role and not verify(self.provider, t.signing_input(), event.psig):
                fail("bad provider signature")
            if t.consumer != self.consumer or t.provider != self.provider:
                fail("agreement parties differ from the negotiation")
            mismatch = [f for f, ok in (
                ("ask", (t.ask_id, t.ask_seq) == (p.ask_id, p.ask_seq)),
                ("bid", (t.bid_id, t.bid_seq) == (p.bid_id, p.bid_seq)),
                ("class", t.resource_class == p.resource_class),
                ("runtime", t.runtime == p.runtime),
                ("cores", t.cores >= p.cores), ("memory", t.memory >= p.memory),
                ("gpus", t.gpus >= p.gpus and (p.gpu_class is None or t.gpu_class == p.gpu_class)),
                ("price", t.price <= p.max_price and (p.ask_price is None or t.price <= p.ask_price)),
                ("duration", t.duration_s >= p.duration_s),
                ("heartbeat", t.heartbeat_ms > 0),
                ("ports", t.ports == p.ports),
                # Signed as asked: a provider may not make a task preemptible, nor demote it.
                ("priority", (t.priority, t.preemptible) == (p.priority, p.preemptible)),
            ) if not ok]
            if mismatch:
                fail("terms differ from the proposal: " + ", ".join(mismatch))
        elif isinstance(event, Countersign):
            t = self.terms
            if event.aid != t.aid:
                fail("countersign for another agreement")
            if role != self.role and not verify(self.consumer, t.signing_input(), event.csig):
                fail("bad consumer signature")
        elif isinstance(event, Heartbeat):
            last = self._sent_hb if role == self.role else self._seen_hb
            if event.seq <= last:
                fail(f"heartbeat seq {event.seq} <= {last} (replay)")

    def _apply(self, role: str, event: Any, new: State, now: int) -> None:
        t = self.timeouts
        if isinstance(event, Propose):
            self.proposal = event
            self.deadline = now + t.propose_ms
        elif isinstance(event, (Reserve, Agreement)):
            if isinstance(event, Agreement):
                self.agreement = event
            self.deadline = now + t.countersign_ms
        elif isinstance(event, Countersign):
            self.csig = event.csig
            self._arm_lease(now)
        elif isinstance(event, Heartbeat):
            if role == self.role:
                self._sent_hb = event.seq
                self.next_heartbeat = now + self._hb_ms
            else:
                self._seen_hb = event.seq
                self.lease.heard(NEGOTIATION, now)
                self.deadline = self.lease.deadline
        elif isinstance(event, Reject):
            self.outcome, self.reason = "rejected", f"{event.reason}: {event.detail}" if event.detail else event.reason
        elif isinstance(event, End):
            self.outcome, self.reason = event.outcome, event.reason
        elif isinstance(event, Timeout):
            self.outcome = "abandoned" if self.state is State.ACTIVE else "expired"
            self.reason = f"{event.what} timeout"
        if self.lease is not None and isinstance(event, Timeout) and self.state is State.ACTIVE:
            self.lease.expire(max(now, self.lease.deadline))  # the lease says lost, and why
        self.state = new
        if new in TERMINAL:
            self.deadline = self.next_heartbeat = None
            if self.lease is not None:
                self.lease.end(self.reason, now)

    @property
    def _hb_ms(self) -> int:
        return self.terms.heartbeat_ms if self.terms else self.timeouts.heartbeat_ms

    def _arm_lease(self, now: int) -> None:
        self.lease = Lease(self._hb_ms * self.timeouts.missed_heartbeats, now)
        self.deadline = self.lease.deadline
        self.next_heartbeat = now + self._hb_ms
