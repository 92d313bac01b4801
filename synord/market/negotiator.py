"""The two parties of a negotiation, driving `synord.protocols.negotiation`.

`Provider` and `Consumer` take envelopes (or raw bytes) and return the
envelopes to send as `Send(to, envelope)`; the daemon only moves bytes over
``/synord/negotiate/1.0.0`` streams and calls `tick` when `next_deadline`
passes (`run_timers` does that under trio).  Time comes from ``clock`` (unix
ms), so tests drive everything with plain integers or a MockClock.

Provider admission, in order: the ask is ours and live at the proposed seq,
runtime, price, quantity within the ask, duration, the contributor-limit
hook (``admission(consumer, proposal) -> reason | None``), then an atomic reservation
in the ask's pool *and* the host pool.  Each refusal is a ``reject`` with a
reason code (`REASONS`) and a human detail.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable

import trio

from synord.protocols.envelope import Envelope, EnvelopeValidator, Rejected, now_ms, seal
from synord.protocols.identity import Identity
from synord.protocols.negotiation import (
    CONSUMER, PROVIDER, Agreement, BodyError, Countersign, End, Negotiation,
    NegotiationError, Propose, Reject, Reserve, State, Terms, Timeouts, event_from_envelope,
)
from synord.protocols.orders import Ask, Bid
from synord.protocols.receipt_delivery import (  # noqa: F401 (the constants: re-exported)
    RECEIPT_RESEND_FIRST_MS, RECEIPT_RESEND_FOR_MS, RECEIPT_RESEND_MAX_MS, ReceiptDeliveries,
)
from synord.protocols.receipts import (
    Observed, ReceiptAck, ReceiptError, SignedReceipt, countersign as countersign_receipt, issue, verify_receipt,
)
from synord.protocols.refusals import REFUSALS

from .backoff import Backoff

from .matching import MatchResult
from .reservations import CapacityPool, InsufficientCapacity
from .spending import SpendingCap

log = logging.getLogger(__name__)

NEGOTIATE_PROTOCOL = "/synord/negotiate/1.0.0"
REASONS = ("not_our_ask", "unknown_ask", "stale_ask", "ask_expired", "runtime", "price",
           "exceeds_ask", "duration", "admission", "capacity", "bad_agreement", "timeout",
           "withdrawn", "spend_cap")
MESSAGE_TTL_MS = 30_000
MAX_SETTLING = 10_000  # agreements kept for receipts after their lease ended
# A receipt the consumer has not acknowledged (it was down, or the message was
# lost) goes out again: the schedule is synord/protocols/receipt_delivery.py's.


@dataclass(frozen=True)
class Send:
    to: str  # peer id (text)
    envelope: Envelope


class _Party:
    def __init__(self, identity: Identity, clock: Callable[[], int] | None, timeouts: Timeouts | None,
                 validator: EnvelopeValidator | None):
        self.identity = identity
        self.peer_id = identity.peer_id
        self.clock = clock or now_ms
        self.timeouts = timeouts or Timeouts()
        self.validator = validator or EnvelopeValidator()
        self.dropped: Counter[str] = Counter()  # why incoming messages were ignored

    def receive(self, data: bytes, peer: bytes | None = None) -> list[Send]:
        """Raw bytes from a stream: validate (signature, expiry, replay), then handle."""
        env = self.validator.check(data, self.clock(), peer)
        if isinstance(env, Rejected):
            self.dropped[env.reason] += 1
            return []
        return self.handle(env)

    def _seal(self, to: str, event) -> Send:
        return Send(to, seal(self.identity, event.type, event.to_body(), MESSAGE_TTL_MS, now=self.clock()))

    def _event(self, env: Envelope):
        try:
            return event_from_envelope(env)
        except BodyError:
            self.dropped["bad_body"] += 1
            return None

    def handle(self, env: Envelope) -> list[Send]:  # pragma: no cover - abstract
        raise NotImplementedError

    def next_deadline(self) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def tick(self, now: int | None = None) -> list[Send]:  # pragma: no cover - abstract
        raise NotImplementedError


class Provider(_Party):
    def __init__(self, identity: Identity, pool: CapacityPool, *, clock: Callable[[], int] | None = None,
                 timeouts: Timeouts | None = None, validator: EnvelopeValidator | None = None,
                 admission: Callable[[str, Propose], str | None] | None = None,
                 on_agreement: Callable[[Negotiation], None] | None = None,
                 on_end: Callable[[Negotiation], None] | None = None,
                 on_receipt: Callable[[SignedReceipt], None] | None = None,
                 on_receipt_issued: Callable[[SignedReceipt, int], None] | None = None,
                 on_receipt_closed: Callable[[bytes], None] | None = None, devices=None):
        super().__init__(identity, clock, timeouts, validator)
        self.pool = pool
        self.devices = devices  # synord.gpu_devices.GpuAllocator: GPUs by UUID, or None
        self.on_receipt = on_receipt  # e.g. Ledger.record, with both signatures
        self.on_receipt_issued = on_receipt_issued  # e.g. keep it until acknowledged
        self.on_receipt_closed = on_receipt_closed  # acknowledged or given up: aid
        self._unacked: OrderedDict[bytes, SignedReceipt] = OrderedDict()
        self._delivery = ReceiptDeliveries()  # when each unacknowledged receipt goes out again
        self.admission = admission
        self.on_agreement = on_agreement
        self.on_end = on_end
        self.asks: dict[str, Ask] = {}
        self._ask_pools: dict[str, CapacityPool] = {}
        self._res_ask: dict[str, str] = {}  # reservation key -> ask id
        self.negotiations: dict[tuple[str, bytes], Negotiation] = {}
        self.finished: list[Negotiation] = []

    # --- our asks -------------------------------------------------------------

    def offer(self, ask: Ask) -> None:
        """Publish-side twin: the ask we also gossip.  A new seq replaces it;
        reservations already made against it stay counted."""
        ask.peer = self.peer_id
        self.asks[ask.id] = ask
        cap = {"cpus": ask.cores, "memory_bytes": ask.memory, "gpus": ask.gpus}
        pool = self._ask_pools.get(ask.id)
        if pool is None:
            self._ask_pools[ask.id] = CapacityPool(cap)
        else:
            pool.set_capacity(cap)

    def withdraw(self, ask_id: str) -> None:
        self.asks.pop(ask_id, None)

    # --- incoming -------------------------------------------------------------

    def handle(self, env: Envelope) -> list[Send]:
        if env.type == "receipt_ack":
            return self._receipt_ack(env)
        ev = self._event(env)
        if ev is None:
            return []
        sender, now = env.sender_id, self.clock()
        key = (sender, ev.nid)
        if isinstance(ev, Propose):
            if key in self.negotiations:
                self.dropped["duplicate_proposal"] += 1
                return []
            return self._admit(sender, ev, now)
        m = self.negotiations.get(key)
        if m is None:
            self.dropped["unknown_negotiation"] += 1
            return []
        if m.check_timeout(now) is not None:
            # Deadline passed before tick() ran: the reservation is gone (same instant).
            self._reap(m)
            self.dropped["late"] += 1
            return []
        try:
            m.receive(ev, now)
        except NegotiationError as exc:
            self.dropped[exc.reason.split(":")[0]] += 1
            if isinstance(ev, Countersign) and m.state is State.AGREED:
                out = self._reject(m, sender, "bad_agreement", str(exc), now)
                return out
            return []
        if isinstance(ev, Countersign):
            self.pool.commit(self._key(m), m.terms.expires)
            self._ask_pools[m.terms.ask_id].commit(self._key(m), m.terms.expires)
            if self.on_agreement:
                self.on_agreement(m)
        self._reap(m)
        return []

    def _admit(self, consumer: str, p: Propose, now: int) -> list[Send]:
        m = Negotiation(PROVIDER, p.nid, consumer, self.peer_id, self.timeouts)
        try:
            m.receive(p, now)
        except NegotiationError as exc:
            self.dropped[exc.reason] += 1
            return []
        self.negotiations[(consumer, p.nid)] = m
        reason, detail = self._refusal(consumer, p, now)
        if reason is None:
            need = {"cpus": p.cores, "memory_bytes": p.memory, "gpus": p.gpus}
            key, ask_pool = self._key(m), self._ask_pools[p.ask_id]
            try:
                ask_pool.reserve(key, need, now, self.timeouts.countersign_ms)
                try:
                    self.pool.reserve(key, need, now, self.timeouts.countersign_ms)
                except InsufficientCapacity:
                    ask_pool.release(key)
                    raise
            except InsufficientCapacity as exc:
                reason, detail = "capacity", str(exc)
        ask = self.asks.get(p.ask_id)
        devices: tuple[str, ...] = ()
        if reason is None and p.gpus and self.devices is not None:
            try:  # the very devices, held in the same step as the capacity
                devices = self.devices.reserve(self._key(m), p.gpus, ask.gpu_class, runtime=p.runtime)
            except InsufficientCapacity as exc:
                reason, detail = "capacity", str(exc)
        if reason is None and p.ask_price is not None and ask.price > p.ask_price:
            # The consumer countersigns no more than the ask it matched. Checked after the
            # capacity: a full provider (whose price also rose with its load) says it is full.
            reason, detail = "price", f"ask price rose to {ask.price:g} (matched at {p.ask_price:g})"
        if reason is not None:
            return self._reject(m, consumer, reason, detail, now)
        m.send(Reserve(), now)
        terms = Terms(
            aid=os.urandom(16), nid=p.nid, consumer=consumer, provider=self.peer_id,
            ask_id=p.ask_id, ask_seq=p.ask_seq, bid_id=p.bid_id, bid_seq=p.bid_seq,
            resource_class=p.resource_class, cores=p.cores, memory=p.memory, gpus=p.gpus,
            gpu_class=ask.gpu_class if p.gpus else None, runtime=p.runtime, price=ask.price,
            units=_units(p), duration_s=p.duration_s,
            heartbeat_ms=self.timeouts.heartbeat_ms, created=now, expires=now + p.duration_s * 1000,
            devices=devices, ports=p.ports)
        agreement = Agreement(terms, terms.sign(self.identity))
        m.send(agreement, now)
        return [self._seal(consumer, agreement)]

    def _refusal(self, consumer: str, p: Propose, now: int) -> tuple[str | None, str]:
        if p.ask_peer != self.peer_id:
            return "not_our_ask", "the proposal names another provider"
        ask = self.asks.get(p.ask_id)
        if ask is None:
            return "unknown_ask", f"no live ask {p.ask_id!r} (withdrawn?)"
        if p.ask_seq > ask.seq:
            # An older seq is served at the live price (checked against
            # max_price below): periodic re-announcements must not make every
            # in-flight proposal fail.
            return "stale_ask", f"ask {ask.id} is at seq {ask.seq}, proposal names {p.ask_seq}"
        if ask.expires <= now:
            return "ask_expired", f"ask {ask.id} expired"
        if p.resource_class != ask.resource_class:
            return "stale_ask", f"ask {ask.id} is of class {ask.resource_class}"
        if p.runtime not in ask.runtimes:
            return "runtime", f"{p.runtime} not offered (offered: {', '.join(ask.runtimes)})"
        if ask.price > p.max_price:
            return "price", f"ask price {ask.price:g} > max {p.max_price:g}"
        if p.cores > ask.cores or p.memory > ask.memory or p.gpus > ask.gpus:
            return "exceeds_ask", "need exceeds the ask's quantity"
        if p.gpus and p.gpu_class is not None and p.gpu_class != ask.gpu_class:
            return "exceeds_ask", f"accelerator {p.gpu_class} not offered"
        if not ask.min_duration_s <= p.duration_s <= ask.max_duration_s:
            return "duration", f"{p.duration_s}s outside [{ask.min_duration_s}, {ask.max_duration_s}]"
        if self.admission is not None:
            why = self.admission(consumer, p)
            if why:
                return "admission", why
        return None, ""

    def _reject(self, m: Negotiation, consumer: str, reason: str, detail: str, now: int) -> list[Send]:
        rej = Reject(m.nid, reason, detail)
        m.send(rej, now)
        self._release(m)
        self._reap(m)
        return [self._seal(consumer, rej)]

    # --- time -----------------------------------------------------------------

    def next_deadline(self) -> int | None:
        times = [t for m in self.negotiations.values() for t in (m.deadline, m.next_heartbeat) if t is not None]
        if (at := self._delivery.next_deadline()) is not None:
            times.append(at)
        return min(times, default=None)

    def tick(self, now: int | None = None) -> list[Send]:
        """Timeouts (releasing reservations), our due heartbeats, receipts to resend."""
        now = self.clock() if now is None else now
        out: list[Send] = []
        for m in list(self.negotiations.values()):
            if m.check_timeout(now) is not None:
                self._reap(m)
            elif m.heartbeat_due(now):
                out.append(self._seal(m.consumer, m.heartbeat(now)))
        resend, gave_up = self._delivery.tick(now)
        for aid in gave_up:
            sr = self._unacked.get(aid)
            if sr is not None:
                log.warning("receipt never acknowledged; giving up", extra={
                    "consumer": sr.receipt.consumer[:16], "aid": aid.hex()})
            self._close_receipt(aid)
        for aid in resend:
            sr = self._unacked.get(aid)
            if sr is None:
                self._close_receipt(aid)
                continue
            out.append(Send(sr.receipt.consumer,
                            seal(self.identity, "receipt", sr.to_body(), MESSAGE_TTL_MS, now=now)))
        return out

    def end(self, consumer: str, nid: bytes, outcome: str, reason: str = "") -> list[Send]:
        m = self.negotiations[(consumer, nid)]
        ev = End(nid, outcome, reason)
        m.send(ev, self.clock())
        self._reap(m)
        return [self._seal(consumer, ev)]

    def settle(self, consumer: str, nid: bytes, *, cpu_s: float, peak_memory: int,
               outcome: str = "completed", reason: str = "", gpu: dict | None = None,
               started: int | None = None) -> list[Send]:
        """The run is over: end the lease (if still on) and send the signed receipt.
        Metering (cpu_s, peak_memory) comes from the runtime. ``started``: where the
        bill starts when periods before it were billed already (a service)."""
        m = self.negotiations.get((consumer, nid)) or next(
            (f for f in reversed(self.finished) if (f.consumer, f.nid) == (consumer, nid)), None)
        if m is None or m.terms is None or m.csig is None:
            raise KeyError("no countersigned agreement for this negotiation")
        out = self.end(consumer, nid, outcome, reason) if not m.done else []
        now = self.clock()
        ended = min(now, m.terms.expires)
        sr = issue(self.identity, m.terms, cpu_s=cpu_s, peak_memory=peak_memory,
                   started=m.terms.created if started is None else min(started, ended),
                   ended=ended, outcome=outcome, gpu=gpu)
        return out + [self._deliver(consumer, sr, now)]

    def bill_period(self, consumer: str, nid: bytes, period: Terms, *, cpu_s: float = 0.0,
                    peak_memory: int = 0) -> list[Send]:
        """A service's period is over (synord.protocols.servicelease): its own signed
        receipt, on ``period`` (the agreement narrowed to that window), lease untouched."""
        m = self.negotiations.get((consumer, nid))
        if m is None or m.terms is None or m.csig is None:
            raise KeyError("no countersigned agreement for this negotiation")
        sr = issue(self.identity, period, cpu_s=cpu_s, peak_memory=peak_memory,
                   started=period.created, ended=period.expires, outcome="completed")
        return [self._deliver(consumer, sr, self.clock())]

    def _deliver(self, consumer: str, sr: SignedReceipt, now: int) -> Send:
        """Keep a receipt we signed until acknowledged (resent on the delivery schedule)."""
        self._unacked[sr.receipt.aid] = sr
        self._delivery.issue(sr.receipt.aid, now)
        if self.on_receipt_issued:
            self.on_receipt_issued(sr, now)
        while len(self._unacked) > MAX_SETTLING:
            self._close_receipt(self._unacked.popitem(last=False)[0])
        return Send(consumer, seal(self.identity, "receipt", sr.to_body(), MESSAGE_TTL_MS, now=now))

    def resume_receipt(self, sr: SignedReceipt, first_sent: int) -> None:
        """A receipt issued before our restart and not yet acknowledged: resend it
        (now, then on the usual schedule, until an hour after ``first_sent``)."""
        self._unacked[sr.receipt.aid] = sr
        self._delivery.resume(sr.receipt.aid, first_sent, self.clock())

    def _receipt_ack(self, env: Envelope) -> list[Send]:
        ack = ReceiptAck.from_body(env.body)
        sr = self._unacked.get(ack.aid)
        if sr is None or env.sender_id != sr.receipt.consumer:
            self.dropped["unknown_receipt"] += 1
            REFUSALS.count("receipt_ack", "unknown_receipt")
            return []
        full = replace(sr, csig=ack.csig)
        if not verify_receipt(full):
            self.dropped["bad_receipt_signature"] += 1
            REFUSALS.count("receipt_ack", "bad_signature")
            return []
        self._delivery.ack(ack.aid)
        self._close_receipt(ack.aid)
        if self.on_receipt:
            self.on_receipt(full)
        return []

    def _close_receipt(self, aid: bytes) -> None:
        self._unacked.pop(aid, None)
        self._delivery.forget(aid)
        if self.on_receipt_closed:
            self.on_receipt_closed(aid)

    def _key(self, m: Negotiation) -> str:
        return f"{m.consumer}/{m.nid.hex()}"

    def _release(self, m: Negotiation) -> None:
        key = self._key(m)
        self.pool.release(key)
        if self.devices is not None:
            self.devices.release(key)
        if m.proposal is not None and m.proposal.ask_id in self._ask_pools:
            self._ask_pools[m.proposal.ask_id].release(key)

    def _reap(self, m: Negotiation) -> None:
        if m.done:
            self._release(m)
            self.negotiations.pop((m.consumer, m.nid), None)
            self.finished.append(m)
            del self.finished[:-1000]
            if self.on_end and m.agreement is not None and m.csig is not None:
                self.on_end(m)


def _units(p: Propose) -> float:
    return p.cores if p.resource_class == "cpu" else float(p.gpus)


@dataclass
class Placement:
    """One bid being placed.  Candidates are proposed to in order; while one
    has not answered for ``hedge_ms`` the next is proposed to as well (at most
    ``parallel`` in flight, one per provider).  The first agreement is
    countersigned; every other proposal of the placement is withdrawn
    (``reject`` reason ``withdrawn``) so its provider releases at once: never
    two agreements for one bid."""
    bid: Bid
    candidates: list[Ask]
    index: int = -1
    negotiation: Negotiation | None = None  # the agreed one once active
    attempts: list[tuple[str, str, str]] = field(default_factory=list)  # (provider, ask id, outcome)
    state: str = "negotiating"  # negotiating | active | failed | ended | lost
    ports: tuple[int, ...] = ()  # exposed TCP ports: proposed, then in the agreement's terms
    live: dict[bytes, tuple[Negotiation, Ask]] = field(default_factory=dict)  # nid -> in flight
    hedge_at: int | None = None
    winner: Ask | None = None
    hold: bool = False  # a gang member's: agreed but countersigned only with the others (commit_held)

    @property
    def current(self) -> Ask | None:
        if self.winner is not None:
            return self.winner
        return self.candidates[self.index] if 0 <= self.index < len(self.candidates) else None

    def explain(self) -> str:
        tried = "; ".join(f"{p[:16]}/{a}: {why}" for p, a, why in self.attempts)
        return f"{self.state} after {len(self.attempts)} attempt(s): {tried}" if tried else self.state


def _agreement_refusal(reason: str) -> str:
    """A stable refusal slug for a bad agreement (never peer text)."""
    if "price" in reason:
        return "agreement_price"
    if "signature" in reason:
        return "agreement_signature"
    return "agreement_terms"


class Consumer(_Party):
    def __init__(self, identity: Identity, *, clock: Callable[[], int] | None = None,
                 timeouts: Timeouts | None = None, validator: EnvelopeValidator | None = None,
                 on_agreement: Callable[[Placement], None] | None = None,
                 on_failed: Callable[[Placement], None] | None = None,
                 on_lost: Callable[[Placement], None] | None = None,
                 on_receipt: Callable[[SignedReceipt], None] | None = None,
                 on_no_answer: Callable[[str, bytes], None] | None = None,
                 parallel: int = 2, hedge_ms: int = 1_000, backoff: Backoff | None = None,
                 spending: SpendingCap | None = None):
        super().__init__(identity, clock, timeouts, validator)
        self.on_agreement, self.on_failed, self.on_lost = on_agreement, on_failed, on_lost
        self.on_receipt = on_receipt  # e.g. Ledger.record
        self.on_no_answer = on_no_answer  # (provider, nid): e.g. count it against its reputation
        self.parallel, self.hedge_ms = max(1, parallel), hedge_ms
        self.backoff = backoff if backoff is not None else Backoff()
        self.spending = spending
        self._agreed: OrderedDict[bytes, Terms] = OrderedDict()  # aid -> terms, awaiting receipt
        self._observed: OrderedDict[bytes, list] = OrderedDict()  # aid -> [countersigned at, end seen or None]
        self._acked: OrderedDict[bytes, tuple[str, ReceiptAck]] = OrderedDict()  # aid -> (provider, our ack)
        self.placements: dict[str, Placement] = {}       # bid id -> placement
        self._by_nid: dict[bytes, Placement] = {}

    def expect_receipt(self, terms: Terms, ended: int | None = None) -> None:
        """An agreement made before our restart (terms from the job store): its
        receipt, when it comes or is resent, gets countersigned if it bills no
        more than the lease we saw (from the agreement to ``ended``, or to the
        receipt's arrival while the task may still run)."""
        self._agreed[terms.aid] = terms
        self._observe(terms.aid, terms.created, ended)
        if self.spending is not None:
            self.spending.commit(terms, terms.created)
        while len(self._agreed) > MAX_SETTLING:
            self._agreed.popitem(last=False)

    def forget_receipt(self, aid: bytes) -> None:
        """A receipt we expected will not come (a service's period cut short by its end,
        which the agreement's own receipt bills): nothing stays committed for it."""
        if self._agreed.pop(aid, None) is not None:
            self._observed.pop(aid, None)
            if self.spending is not None:
                self.spending.settle(aid, 0.0, self.clock())

    def observe_end(self, aid: bytes, at: int) -> None:
        """The job path saw the task end (exit on the task stream, or the lease lost) at ``at``."""
        seen = self._observed.get(aid)
        if seen is not None and (seen[1] is None or at < seen[1]):
            seen[1] = at

    def _observe(self, aid: bytes, start: int, end: int | None = None) -> None:
        self._observed[aid] = [start, end]
        while len(self._observed) > MAX_SETTLING:
            self._observed.popitem(last=False)

    def busy(self) -> Counter[str]:
        """Proposals in flight and leases on, per provider (the router spreads on it)."""
        return Counter(m.provider for nid, pl in self._by_nid.items() if nid in pl.live
                       for m in (pl.live[nid][0],))

    def place(self, bid: Bid, candidates: MatchResult | Iterable[Ask], hold: bool = False,
              ports: tuple[int, ...] = ()) -> list[Send]:
        """Start placing ``bid``: propose to the first candidate (more follow by hedging).
        ``hold``: stop at the provider's signed agreement (its capacity held until its
        countersign timeout); `commit_held` countersigns, `release_held` withdraws.
        ``ports``: the TCP ports the task exposes, proposed and then in the signed terms."""
        asks = [c.ask for c in candidates.candidates] if isinstance(candidates, MatchResult) else list(candidates)
        pl = Placement(bid, asks, hold=hold, ports=ports)
        self.placements[bid.id] = pl
        return self._launch(pl, self.clock())

    def _launch(self, pl: Placement, now: int) -> list[Send]:
        """Propose to the next usable candidate; fail the placement when none is
        left and none is in flight."""
        while True:
            pl.index += 1
            ask = pl.current
            if ask is None:
                break
            if any(a.peer == ask.peer for _, a in pl.live.values()):
                continue  # one proposal per provider at a time
            if self.backoff.blocked(ask.peer, now) and (pl.live or any(
                    not self.backoff.blocked(a.peer, now) for a in pl.candidates[pl.index + 1:])):
                # Skipped while someone else may answer; a last resort all the same.
                pl.attempts.append((ask.peer, ask.id, "backed off: did not answer before"))
                continue
            b = pl.bid
            p = Propose(os.urandom(16), ask.peer, ask.id, ask.seq, b.id, b.seq, b.resource_class, b.cores,
                        b.memory, b.runtime, b.max_price, b.duration_s, b.gpus, b.gpu_class, ask_price=ask.price,
                        ports=pl.ports)
            m = Negotiation(CONSUMER, p.nid, self.peer_id, ask.peer, self.timeouts)
            m.send(p, now)
            pl.live[p.nid] = (m, ask)
            self._by_nid[p.nid] = pl
            pl.hedge_at = now + self.hedge_ms if len(pl.live) < self.parallel else None
            return [self._seal(ask.peer, p)]
        pl.hedge_at = None
        if not pl.live and pl.state == "negotiating":
            pl.state = "failed"
            if self.on_failed:
                self.on_failed(pl)
        return []

    def give_up(self, bid_id: str, detail: str) -> list[Send]:
        """Our caller stopped waiting: withdraw every proposal still in flight."""
        pl = self.placements.pop(bid_id, None)
        if pl is None or pl.state != "negotiating":
            return []
        now = self.clock()
        pl.state = "failed"
        for m, _ in pl.live.values():
            self._if_silent(m, now)
        return [self._withdraw(pl, m, now, "withdrawn", detail) for m, _ in list(pl.live.values())]

    def _if_silent(self, m: Negotiation, now: int) -> None:
        """A proposal withdrawn unanswered after ``hedge_ms`` (we moved on because
        of that silence) counts as no answer, like one that timed out: an
        attacker's asks must not be worth a free hedge on every placement."""
        if m.state is State.PROPOSED and m.deadline is not None \
                and now - (m.deadline - self.timeouts.propose_ms) >= self.hedge_ms:
            self._silent(m, now)

    def _silent(self, m: Negotiation, now: int) -> None:
        self.backoff.failed(m.provider, now)
        REFUSALS.count("negotiate", "no_answer")
        if self.on_no_answer:
            self.on_no_answer(m.provider, m.nid)

    def _drop(self, pl: Placement, nid: bytes) -> None:
        pl.live.pop(nid, None)
        self._by_nid.pop(nid, None)

    def _withdraw(self, pl: Placement, m: Negotiation, now: int, reason: str, detail: str) -> Send:
        rej = Reject(m.nid, reason, detail)
        m.send(rej, now)
        self._drop(pl, m.nid)
        return self._seal(m.provider, rej)

    def handle(self, env: Envelope) -> list[Send]:
        if env.type == "receipt":
            return self._receipt(env)
        ev = self._event(env)
        if ev is None:
            return []
        pl = self._by_nid.get(ev.nid)
        entry = pl.live.get(ev.nid) if pl else None
        if entry is None or env.sender_id != entry[0].provider:
            self.dropped["unknown_negotiation"] += 1
            return []
        m, ask = entry
        now = self.clock()
        if m.deadline is not None and now >= m.deadline:
            self.dropped["late"] += 1
            return self.tick(now)  # applies the timeout (next candidate or lost)
        try:
            m.receive(ev, now)
        except NegotiationError as exc:
            self.dropped[exc.reason.split(":")[0]] += 1
            if isinstance(ev, Agreement) and m.state is State.PROPOSED:
                # Tampered, above the ask we matched, or not what we asked for:
                # say so (the provider releases at once) and try the next candidate.
                REFUSALS.count("negotiate", _agreement_refusal(exc.reason))
                pl.attempts.append((m.provider, ask.id, f"bad_agreement: {exc.reason}"))
                return [self._withdraw(pl, m, now, "bad_agreement", exc.reason)] + self._launch(pl, now)
            return []
        if isinstance(ev, Agreement):
            return self._agreement(pl, m, ask, ev.terms, now)
        if isinstance(ev, Reject):
            pl.attempts.append((m.provider, ask.id, m.reason))
            self._drop(pl, m.nid)
            if pl.state == "negotiating":
                return self._launch(pl, now)
            if pl.negotiation is m:
                pl.state = "ended"
            return []
        if isinstance(ev, End):
            self._drop(pl, m.nid)
            if pl.negotiation is m:
                pl.state = "ended"
                if m.terms is not None:
                    self.observe_end(m.terms.aid, now)
            elif pl.state == "negotiating":
                pl.attempts.append((m.provider, ask.id, m.reason or "ended"))
                return self._launch(pl, now)
        return []

    def _agreement(self, pl: Placement, m: Negotiation, ask: Ask, terms: Terms, now: int) -> list[Send]:
        if pl.state != "negotiating":
            # Another candidate agreed first: this one is withdrawn, never countersigned.
            return [self._withdraw(pl, m, now, "withdrawn", "placed elsewhere")]
        why = self.spending.refusal(terms, now) if self.spending is not None else None
        if why:
            REFUSALS.count("negotiate", "spend_cap")
            pl.attempts.append((m.provider, ask.id, why))
            return [self._withdraw(pl, m, now, "spend_cap", why)] + self._launch(pl, now)
        if pl.hold:  # a gang member (synord.protocols.gang): countersigned with the others or not at all
            pl.state, pl.negotiation, pl.winner, pl.hedge_at = "held", m, ask, None
            if self.on_agreement:
                self.on_agreement(pl)
            return []
        return self._countersign(pl, m, ask, terms, now)

    def commit_held(self, bid_id: str) -> list[Send]:
        """Countersign a held agreement; LookupError when the hold is gone (expired, ended)."""
        pl = self.placements.get(bid_id)
        now = self.clock()
        m = pl.negotiation if pl is not None and pl.state == "held" else None
        if m is None or m.check_timeout(now) is not None or m.state is not State.AGREED:
            raise LookupError("the hold is gone")
        return self._countersign(pl, m, pl.winner, m.terms, now)

    def release_held(self, bid_id: str, detail: str) -> list[Send]:
        """Withdraw a held (or still proposed) gang member: its provider releases at once."""
        pl = self.placements.get(bid_id)
        if pl is None or pl.state == "negotiating":
            return self.give_up(bid_id, detail)
        del self.placements[bid_id]
        now = self.clock()
        return [self._withdraw(pl, m, now, "withdrawn", detail) for m, _ in list(pl.live.values())
                if m.state in (State.PROPOSED, State.AGREED)]

    def _countersign(self, pl: Placement, m: Negotiation, ask: Ask, terms: Terms, now: int) -> list[Send]:
        cs = Countersign(m.nid, terms.aid, terms.sign(self.identity))
        m.send(cs, now)
        pl.state, pl.negotiation, pl.winner, pl.hedge_at = "active", m, ask, None
        pl.attempts.append((m.provider, ask.id, "agreed"))
        out = [self._seal(m.provider, cs)]
        for nid, (other, _) in list(pl.live.items()):
            if nid != m.nid:
                self._if_silent(other, now)
                out.append(self._withdraw(pl, other, now, "withdrawn", "placed elsewhere"))
        self.backoff.succeeded(m.provider)
        if self.spending is not None:
            self.spending.commit(terms, now)
        self._agreed[terms.aid] = terms
        self._observe(terms.aid, now)
        while len(self._agreed) > MAX_SETTLING:
            self._agreed.popitem(last=False)
        if self.on_agreement:
            self.on_agreement(pl)
        return out

    def _receipt(self, env: Envelope) -> list[Send]:
        try:
            sr = SignedReceipt.from_body(env.body)
        except BodyError:
            REFUSALS.count("receipt", "bad_body")
            self.dropped["bad_body"] += 1
            return []
        terms = self._agreed.get(sr.receipt.aid)
        done = self._acked.get(sr.receipt.aid)
        if terms is None and done is not None and env.sender_id == done[0]:
            # Resent because our ack was lost: acknowledge again, record nothing new.
            self.dropped["duplicate_receipt"] += 1
            return [Send(done[0], seal(self.identity, "receipt_ack", done[1].to_body(), MESSAGE_TTL_MS,
                                       now=self.clock()))]
        if terms is None or env.sender_id != terms.provider:
            REFUSALS.count("receipt", "unknown_agreement")
            self.dropped["unknown_receipt"] += 1
            return []
        now = self.clock()
        seen = self._observed.get(sr.receipt.aid)
        observed = None if seen is None else Observed(seen[0], seen[1] if seen[1] is not None else now)
        try:
            full = countersign_receipt(self.identity, sr, terms, observed)
        except ReceiptError as exc:
            REFUSALS.count("receipt", exc.slug)
            log.warning("receipt refused", extra={"provider": terms.provider[:16], "aid": terms.aid.hex(),
                                                  "reason": str(exc)})
            self.dropped[f"bad_receipt: {exc}"] += 1
            return []
        del self._agreed[sr.receipt.aid]
        self._observed.pop(sr.receipt.aid, None)
        if self.spending is not None:
            self.spending.settle(sr.receipt.aid, sr.receipt.amount, now)
        if self.on_receipt:
            self.on_receipt(full)
        ack = ReceiptAck(sr.receipt.aid, full.csig)
        self._acked[sr.receipt.aid] = (terms.provider, ack)
        while len(self._acked) > MAX_SETTLING:
            self._acked.popitem(last=False)
        return [Send(terms.provider, seal(self.identity, "receipt_ack", ack.to_body(), MESSAGE_TTL_MS,
                                          now=self.clock()))]

    def next_deadline(self) -> int | None:
        times = [t for nid, pl in self._by_nid.items() if nid in pl.live
                 for t in (pl.live[nid][0].deadline, pl.live[nid][0].next_heartbeat) if t is not None]
        times += [pl.hedge_at for pl in self._by_nid.values() if pl.hedge_at is not None]
        return min(times, default=None)

    def tick(self, now: int | None = None) -> list[Send]:
        now = self.clock() if now is None else now
        out: list[Send] = []
        for pl in list({id(p): p for p in self._by_nid.values()}.values()):
            for nid, (m, ask) in list(pl.live.items()):
                if m.check_timeout(now) is not None:
                    self._drop(pl, nid)
                    if m.state is State.LOST:
                        pl.state = "lost"
                        if m.terms is not None:
                            self.observe_end(m.terms.aid, now)
                        if self.on_lost:
                            self.on_lost(pl)
                        continue
                    pl.attempts.append((m.provider, ask.id, m.reason))
                    if pl.state == "held":
                        pl.state = "expired"  # the gang's commit finds the hold gone
                    if m.reason == "proposal timeout":
                        # Silence costs the next placements nothing: skip it for a while.
                        self._silent(m, now)
                    if pl.state == "negotiating":
                        out += self._launch(pl, now)
                elif m.heartbeat_due(now):
                    out.append(self._seal(m.provider, m.heartbeat(now)))
            if pl.state == "negotiating" and pl.hedge_at is not None and now >= pl.hedge_at:
                out += self._launch(pl, now)
        return out

    def end(self, bid_id: str, outcome: str, reason: str = "") -> list[Send]:
        pl = self.placements[bid_id]
        m = pl.negotiation
        ev = End(m.nid, outcome, reason)
        m.send(ev, self.clock())
        pl.state = "ended"
        self._drop(pl, m.nid)
        if m.terms is not None:
            self.observe_end(m.terms.aid, self.clock())
        return [self._seal(m.provider, ev)]


async def run_timers(party: _Party, send: Callable[[Send], "trio.Awaitable"], clock: Callable[[], int],
                     idle_poll_s: float = 1.0) -> None:
    """Call ``party.tick`` whenever its next deadline passes; forever (cancel to stop).

    ``clock`` must agree with trio's clock (``trio.current_time``) for MockClock
    tests; the daemon passes wall-clock ms and polls at least every ``idle_poll_s``.
    """
    while True:
        deadline = party.next_deadline()
        wait = idle_poll_s if deadline is None else min(idle_poll_s, max(0.0, (deadline - clock()) / 1000.0))
        await trio.sleep(wait)
        for s in party.tick(clock()):
            await send(s)
