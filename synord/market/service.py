"""The market component of the daemon: gossip ↔ book, our asks, negotiation
streams, reservations and the ledger.

Provider side: asks are derived from the offerable capacity (hwprobe +
contributor limits) and the pricing policy, published on the orders topic of
their class, re-published before they expire and cancelled when the
contributor pauses. Proposals arrive on ``/synord/negotiate/1.0.0``; the
`Provider` party admits, reserves atomically and signs.

Consumer side: bids are matched locally against the share of the book we
hold; `negotiate` runs one proposal against one candidate and returns the
double-signed terms, or raises PlacementRejected with the provider's reason.

Transport: the parties return ``Send(to, envelope)``; each goes out on one
persistent stream per peer as a frame ``{"to": "provider"|"consumer", "env":
bytes}`` (the role of the *receiving* party).
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from typing import Callable

import trio

from synord.protocols.admission import RANK
from synord.protocols.envelope import EnvelopeValidator, now_ms, seal
from synord.protocols.framing import FramedStream
from synord.protocols.identity import b58decode
from synord.protocols.kad import class_key
from synord.protocols.mesh import envelope_validator
from synord.protocols.negotiation import NegotiationError, Terms, Timeouts
from synord.protocols.orders import Ask, Bid, Cancel
from synord.protocols.pacing import Pacer
from synord.protocols.receipts import SignedReceipt
from synord.protocols.refusals import REFUSALS
from synord.protocols.topics import orders as orders_topic

from ..store import from_json_safe, json_safe
from .backoff import Backoff
from .book import FULL, PEER_QUOTA, OrderBook
from .ledger import Ledger
from .matching import Candidate
from .negotiator import NEGOTIATE_PROTOCOL, REASONS, Consumer, Placement, Provider, Send, run_timers
from .port import HoldRefused, Needs, PlacementRejected
from .pricing import PricingPolicy, derive_asks
from .reservations import CapacityPool
from .router import PeerInfo, RecentPlacements
from .spending import SpendingCap

log = logging.getLogger("synord.market")

ORDER_TYPES = ("ask", "bid", "cancel")
REPUBLISH_FRACTION = 0.5  # re-announce asks when half their TTL has passed
DHT_FIND_EVERY_S = 10.0  # a consumer with no candidate asks the DHT for a class's providers this often
DHT_DIAL_PROVIDERS = 8  # ... and dials this many of those it finds


class MarketService:
    def __init__(self, identity, store, mesh, *, offer: Callable[[], dict],
                 contributing: Callable[[], bool], policy: PricingPolicy,
                 classes: Callable[[], list[str]], preemptible: bool = False,
                 min_price: float = 0.0, allow_peers: list[str] | None = None,
                 deny_peers: list[str] | None = None, timeouts: Timeouts | None = None,
                 on_agreement: Callable[[Terms], None] | None = None, max_price: float = 1.0,
                 spend_cap: float = 10.0, spend_period_s: float = 86_400.0, max_asks_per_peer: int = 16,
                 candidates_per_peer: int = 1, parallel_proposals: int = 2, hedge_s: float = 1.0,
                 backoff_s: float = 5.0, devices=None):
        self.identity = identity
        self.peer_id = identity.peer_id
        self.store = store
        self.mesh = mesh  # synord.protocols.mesh.Mesh
        self.offer = offer
        self.contributing = contributing
        self.policy = policy
        self.classes = classes
        self.preemptible = preemptible
        self.min_price = min_price
        self.allow = set(allow_peers or [])
        self.deny = set(deny_peers or [])
        self.book = OrderBook(max_asks_per_peer=max_asks_per_peer)
        self.max_price = max_price  # per unit-hour, when the job names none
        self.candidates_per_peer = candidates_per_peer
        self.backoff = Backoff(base_ms=int(backoff_s * 1000), max_ms=max(300_000, int(backoff_s * 1000)))
        self.spending = SpendingCap(spend_cap, int(spend_period_s * 1000))
        self.recent = RecentPlacements()  # spreads our jobs over equal providers
        self.ledger = Ledger(store.conn, self.peer_id)
        self.validator = EnvelopeValidator()
        self.pool = CapacityPool(self._capacity())
        self.timeouts = timeouts or Timeouts()
        self.provider = Provider(identity, self.pool, timeouts=self.timeouts, validator=self.validator,
                                 admission=self._admission, on_agreement=self._on_agreement,
                                 on_receipt=self._record, on_receipt_issued=self._keep_receipt,
                                 on_receipt_closed=self._drop_receipt, devices=devices)
        self._resume_receipts()
        for aid, ended, amount in self.ledger.paid_since(now_ms() - self.spending.period_ms):
            self.spending.settle(aid, amount, ended)
        self.consumer = Consumer(identity, timeouts=self.timeouts, validator=self.validator,
                                 on_agreement=self._placement_done, on_failed=self._placement_done,
                                 on_lost=self._on_lost, on_receipt=self._record,
                                 on_no_answer=self._no_answer, parallel=parallel_proposals,
                                 hedge_ms=int(hedge_s * 1000), backoff=self.backoff, spending=self.spending)
        self.on_agreement = on_agreement
        self._waiting: dict[str, trio.Event] = {}
        self._bid_of: dict[bytes, str] = {}  # agreement id -> bid id (consumer side)
        self._out: dict[str, FramedStream] = {}
        self._out_lock: dict[str, trio.Lock] = {}
        self._paced: dict[bytes, list] = {}  # peer -> [its negotiation message pacer, open streams]
        self._our_asks: list[Ask] = []
        self._subscribed: set[str] = set()
        self._provided: set[str] = set()  # classes we announce in the DHT
        self._dht_asked: dict[str, float] = {}  # class -> when we last looked its providers up
        self._republish = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.agreements = 0

    # ---- lifecycle ---------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.mesh.set_handler(NEGOTIATE_PROTOCOL, self._handle_stream)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for cls in sorted(set(self.classes()) | {"cpu"}):
                await self._subscribe(cls)
            nursery.start_soon(run_timers, self.provider, self._to_consumer, now_ms)
            nursery.start_soon(run_timers, self.consumer, self._to_provider, now_ms)
            nursery.start_soon(self._ask_loop)
            nursery.start_soon(self._expire_loop)
            nursery.start_soon(self._republish_for_newcomers, self.mesh.events())
            task_status.started()

    async def _subscribe(self, cls: str) -> None:
        if cls in self._subscribed:
            return
        self._subscribed.add(cls)
        channel = await self.mesh.subscribe(orders_topic(cls), envelope_validator(
            self.validator, ORDER_TYPES,
            on_reject=lambda r: log.debug("order rejected", extra={"reason": r.reason})))
        self._nursery.start_soon(self._receive_orders, channel)

    async def _receive_orders(self, channel) -> None:
        async for msg in channel:
            try:
                result = self.book.apply(msg.value, now_ms())
            except Exception as exc:  # a valid envelope with an unusable order
                log.debug("order ignored", extra={"error": str(exc)})
                continue
            if result in (PEER_QUOTA, FULL):
                REFUSALS.count("book", result)
            log.debug("order", extra={"from": msg.origin[:16], "result": result})

    async def _republish_for_newcomers(self, events) -> None:
        """Gossip has no history: a peer that (re)joins hears our asks only when we
        publish again, so publish again soon after someone connects."""
        async for ev in events:
            if ev.kind == "connected" and self._our_asks:
                await trio.sleep(0.5)  # let its subscriptions reach us first; batches bursts
                self._republish.set()

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            self.book.expire(now_ms())
            self.pool.expire(now_ms())

    # ---- our asks ------------------------------------------------------------------

    def _capacity(self) -> dict:
        off = self.offer() or {}
        return {"cpus": float(off.get("cpus", 0.0)), "memory_bytes": int(off.get("memory_bytes", 0)),
                "gpus": int(off.get("gpus", 0))}

    def offer_changed(self) -> None:
        self._republish.set()

    async def _ask_loop(self) -> None:
        while True:
            await self.publish_asks()
            with trio.move_on_after(self.policy.ttl_ms / 1000 * REPUBLISH_FRACTION):
                await self._republish.wait()
            self._republish = trio.Event()

    async def publish_asks(self) -> None:
        now = now_ms()
        if not self.contributing():
            await self.withdraw_asks()
            return
        off = dict(self.offer() or {})
        if not off.get("allowed", True):
            await self.withdraw_asks()
            return
        self.pool.set_capacity(self._capacity())
        asks = derive_asks(off, self.policy, now=now, preemptible=self.preemptible,
                           supply_demand=self.book.supply_demand, load=float(off.get("load", 0.0)))
        for ask in asks:
            if ask.price < self.min_price:
                ask.price = self.min_price  # the operator's price floor
            self.provider.offer(ask)
            env = seal(self.identity, "ask", ask.to_body(), ttl_ms=self.policy.ttl_ms)
            self.book.apply(env, now)  # our share includes our own asks
            await self._publish(ask.resource_class, env.encode())
        self._provide_classes({a.resource_class for a in asks})
        gone = {a.id for a in self._our_asks} - {a.id for a in asks}
        for ask_id in gone:
            await self._cancel(next(a for a in self._our_asks if a.id == ask_id))
        self._our_asks = asks

    async def withdraw_asks(self) -> None:
        for ask in self._our_asks:
            await self._cancel(ask)
        self._our_asks = []
        self._provide_classes(set())

    def _provide_classes(self, classes: set[str]) -> None:
        """Providers are found by class in the DHT: consumers not subscribed to a
        class's order topic look them up there (`_find_class_providers`)."""
        for cls in classes - self._provided:
            self.mesh.provide(class_key(cls))
        for cls in self._provided - classes:
            self.mesh.unprovide(class_key(cls))
        self._provided = set(classes)

    async def _find_class_providers(self, cls: str) -> None:
        """Dial the providers of ``cls`` the DHT knows: once connected they publish
        their asks again (`_republish_for_newcomers`), and we hear them."""
        found = await self.mesh.find_providers(class_key(cls))
        connected = set(self.mesh.connected_peers())
        fresh = [(p, addrs) for p, addrs in found if p != self.peer_id and p not in connected]
        log.info("dht providers", extra={"class": cls, "found": len(found), "dialling": len(fresh)})
        async with trio.open_nursery() as nursery:
            for peer, addrs in fresh[:DHT_DIAL_PROVIDERS]:
                nursery.start_soon(self.mesh.reach, peer, addrs)

    async def _cancel(self, ask: Ask) -> None:
        self.provider.withdraw(ask.id)
        env = seal(self.identity, "cancel", Cancel(ask.id, ask.resource_class, "ask", ask.seq).to_body())
        self.book.apply(env, now_ms())
        await self._publish(ask.resource_class, env.encode())

    async def _publish(self, cls: str, data: bytes) -> None:
        await self._subscribe(cls)
        try:
            await self.mesh.publish(orders_topic(cls), data)
        except Exception as exc:  # no peers yet: the next round re-announces
            log.debug("publish failed", extra={"error": str(exc)})

    # ---- provider: admission and agreements -----------------------------------------

    def _admission(self, consumer: str, proposal) -> str | None:
        if not self.contributing():
            return "this provider is paused by its owner"
        if consumer in self.deny or (self.allow and consumer not in self.allow):
            return "this provider does not serve that peer"
        off = self.offer() or {}
        if not off.get("allowed", True):
            return off.get("why_not") or "contributor limits forbid work now"
        return None

    def _on_agreement(self, negotiation) -> None:
        self.agreements += 1
        log.info("agreement signed", extra={"consumer": negotiation.consumer[:16],
                                            "price": negotiation.terms.price})
        self.book.record_trade(negotiation.terms.resource_class, negotiation.terms.price,
                               negotiation.terms.units, now_ms(), negotiation.terms.aid.hex())
        if self.on_agreement:
            self.on_agreement(negotiation.terms)

    def provider_settle(self, terms: Terms, cpu_s: float, peak_memory: int, outcome: str,
                        gpu: dict | None = None, started: int | None = None) -> None:
        """The task under ``terms`` ended: end the lease, release, send the signed receipt
        (``gpu``: synord.gpu_meter's totals for its devices; ``started``: a service's
        first unbilled millisecond)."""
        try:
            sends = self.provider.settle(terms.consumer, terms.nid, cpu_s=cpu_s,
                                         peak_memory=peak_memory, outcome=outcome, gpu=gpu, started=started)
        except KeyError:
            log.warning("no agreement to settle", extra={"aid": terms.aid.hex()})
            return
        self._nursery.start_soon(self._send_all, sends, "consumer")

    def provider_bill_period(self, terms: Terms, period: Terms, cpu_s: float = 0.0,
                             peak_memory: int = 0) -> None:
        """A service's period under ``terms`` is over: send its own signed receipt."""
        try:
            sends = self.provider.bill_period(terms.consumer, terms.nid, period, cpu_s=cpu_s,
                                              peak_memory=peak_memory)
        except KeyError:
            log.warning("no agreement to bill a period of", extra={"aid": terms.aid.hex()})
            return
        self._nursery.start_soon(self._send_all, sends, "consumer")

    def receipt(self, aid: bytes) -> dict | None:
        """The countersigned usage receipt of one of our agreements, once it has arrived."""
        return self.ledger.receipt(aid)

    def expect_receipt(self, terms: Terms, ended_ms: int | None = None) -> None:
        """After our restart: agreements whose receipt we have not countersigned yet
        (``ended_ms``: when we saw that task end, if we did)."""
        if not self.ledger.has_receipt(terms.aid):
            self.consumer.expect_receipt(terms, ended_ms)

    def forget_receipt(self, terms: Terms) -> None:
        """Consumer: no receipt will come for ``terms`` (a service's unfinished period)."""
        self.consumer.forget_receipt(terms.aid)

    def observed_end(self, terms: Terms, at_ms: int | None = None) -> None:
        """Consumer: the job path saw the task under ``terms`` end; its receipt may
        bill no longer than the lease we saw."""
        self.consumer.observe_end(terms.aid, now_ms() if at_ms is None else at_ms)

    # Receipts we issued are kept in the store until acknowledged, so a restart
    # of ours does not lose them: the provider resends them after it.
    def _keep_receipt(self, sr: SignedReceipt, first_sent: int) -> None:
        try:
            self.store.kv_set(f"receipt_out:{sr.receipt.aid.hex()}",
                              {"receipt": json_safe(sr.to_body()), "first_sent": first_sent})
        except sqlite3.Error as exc:  # a full disk: it still goes out, but is not resent after a restart
            log.warning("receipt not kept", extra={"aid": sr.receipt.aid.hex(), "error": str(exc)})

    def _drop_receipt(self, aid: bytes) -> None:
        try:
            self.store.kv_delete(f"receipt_out:{aid.hex()}")
        except sqlite3.Error as exc:  # kept: resent after a restart, and countersigned once
            log.warning("receipt not dropped", extra={"aid": aid.hex(), "error": str(exc)})

    def _resume_receipts(self) -> None:
        for key, row in self.store.kv_items("receipt_out:"):
            try:
                sr = SignedReceipt.from_body(from_json_safe(row["receipt"]))
                self.provider.resume_receipt(sr, int(row["first_sent"]))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("unreadable stored receipt dropped", extra={"key": key, "error": str(exc)})
                self.store.kv_delete(key)

    def _record(self, receipt) -> None:
        try:
            self.ledger.record(receipt)
        except Exception as exc:
            log.warning("receipt not recorded", extra={"error": str(exc)})

    # ---- consumer: matching and negotiation ---------------------------------------------

    def _bid(self, needs: Needs, bid_id: str | None = None) -> Bid:
        now = now_ms()
        return Bid(id=bid_id or uuid.uuid4().hex[:16], seq=now, resource_class=needs.resource_class,
                   cores=float(needs.cores), memory=int(needs.memory), runtime=needs.runtime,
                   max_price=float(needs.max_price if needs.max_price is not None else self.max_price),
                   duration_s=int(needs.duration_s), deadline=now + 60_000, expires=now + 60_000,
                   gpus=needs.gpus, gpu_class=needs.gpu_class, peer=self.peer_id, ts=now,
                   gpu_memory=needs.gpu_memory, cuda=needs.cuda,
                   priority=RANK[needs.priority])  # batch 0, normal 1, high 2 (gossiped; the proposal names it)

    def _peer_info(self, peer: str, busy=None, now: int | None = None) -> PeerInfo:
        return PeerInfo(reputation=self.ledger.reputation(peer),
                        ours=(busy or {}).get(peer, 0) + self.recent.get(peer, now or now_ms()))

    def _match(self, needs: Needs, exclude: tuple[str, ...] = (), shortlist: int = 8):
        bid, now, busy = self._bid(needs), now_ms(), self.consumer.busy()
        return self.book.match(bid, now,  # the book's indexes answer a bid nothing can serve
                     peer_info=lambda p: self._peer_info(p, busy, now), exclude_peers=(self.peer_id, *exclude),
                     shortlist=shortlist, per_peer=self.candidates_per_peer,
                     skip_peer=lambda p: self.backoff.blocked(p, now))

    def candidates(self, needs: Needs, exclude: tuple[str, ...] = (), shortlist: int = 8) -> list[Candidate]:
        return self._match(needs, exclude, shortlist).candidates

    def explain(self, needs: Needs) -> str:
        return self._match(needs).explain()

    async def announce_bid(self, needs: Needs, bid_id: str) -> None:
        """Publish the bid (the book's demand side; consumers match locally)."""
        bid = self._bid(needs, bid_id)
        env = seal(self.identity, "bid", bid.to_body(), ttl_ms=60_000)
        self.book.apply(env, now_ms())
        await self._publish(needs.resource_class, env.encode())
        cls, now = needs.resource_class, trio.current_time()
        if (not self.candidates(needs) and self._nursery is not None
                and (cls not in self._dht_asked or now - self._dht_asked[cls] >= DHT_FIND_EVERY_S)):
            self._dht_asked[cls] = now  # not subscribed until now, or no one heard: ask the DHT
            self._nursery.start_soon(self._find_class_providers, cls)

    async def negotiate(self, candidate: Candidate, needs: Needs) -> Terms:
        return await self.negotiate_any([candidate], needs)

    async def negotiate_any(self, candidates: list[Candidate], needs: Needs,
                            within_s: float | None = None) -> Terms:
        """Place on one of ``candidates`` (best first; hedged: a slow one does not
        hold up the next, see `Placement`); the double-signed terms, or
        PlacementRejected with every candidate's answer."""
        bid = self._bid(needs)
        done = self._waiting[bid.id] = trio.Event()
        try:
            await self._send_all(self.consumer.place(bid, [c.ask for c in candidates], ports=needs.ports,
                                                     priority=needs.priority, preemptible=needs.preemptible),
                                 "provider")
            # Bounded: each candidate answers or times out within propose_ms.
            wait = len(candidates) * (self.timeouts.propose_ms / 1000) + 1
            with trio.move_on_after(wait if within_s is None else min(wait, within_s)):
                await done.wait()
            pl: Placement = self.consumer.placements[bid.id]
        finally:
            self._waiting.pop(bid.id, None)
        for provider, ask_id, why in pl.attempts:
            if why != "agreed":
                log.info("candidate rejected us", extra={"provider": provider[:16], "ask": ask_id, "reason": why})
        if pl.state == "active" and pl.negotiation is not None and pl.negotiation.terms is not None:
            terms = pl.negotiation.terms
            self._bid_of[terms.aid] = bid.id
            self.recent.add(terms.provider, now_ms())
            self.book.record_trade(terms.resource_class, terms.price, terms.units, now_ms(),
                                   terms.aid.hex())
            return terms
        # Our own wait ran out: withdraw what is still in flight.
        await self._send_all(self.consumer.give_up(bid.id, "gave up"), "provider")
        if not pl.attempts:
            raise PlacementRejected("no answer from the provider")
        raise PlacementRejected("; ".join(f"{p[:12]}: {why}" for p, _, why in pl.attempts[-4:]))

    # ---- consumer: gang members (synord.protocols.gang decides; these move the messages) ----

    async def hold(self, candidate: Candidate, needs: Needs) -> tuple[Terms, int]:
        """Propose to one provider and stop at its signed agreement: its capacity is held
        for us until the returned deadline (ms), uncountersigned. HoldRefused (with the
        reason slug) when it says no or does not answer."""
        bid = self._bid(needs)
        done = self._waiting[bid.id] = trio.Event()
        try:
            await self._send_all(self.consumer.place(bid, [candidate.ask], hold=True, ports=needs.ports),
                                 "provider")
            with trio.move_on_after(self.timeouts.propose_ms / 1000 + 1):
                await done.wait()
            pl: Placement = self.consumer.placements[bid.id]
        except BaseException:  # the gang let go while we asked: the provider releases at once
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self._send_all(self.consumer.release_held(bid.id, "withdrawn"), "provider")
            raise
        finally:
            self._waiting.pop(bid.id, None)
        m = pl.negotiation
        if pl.state == "held" and m is not None and m.terms is not None and m.deadline is not None:
            self._bid_of[m.terms.aid] = bid.id
            return m.terms, m.deadline
        await self._send_all(self.consumer.release_held(bid.id, "gave up"), "provider")
        why = pl.attempts[-1][2] if pl.attempts else "timeout"
        slug = "timeout" if "timeout" in why else why.split(":")[0].strip()
        raise HoldRefused(slug if slug in REASONS or slug == "timeout" else "other", why)

    async def commit_held(self, terms: Terms) -> bool:
        """Countersign a held agreement; False when the hold is gone."""
        bid_id = self._bid_of.get(terms.aid, "")
        try:
            sends = self.consumer.commit_held(bid_id)
        except LookupError:
            return False
        self.recent.add(terms.provider, now_ms())
        self.book.record_trade(terms.resource_class, terms.price, terms.units, now_ms(), terms.aid.hex())
        await self._send_all(sends, "provider")
        return True

    async def release_held(self, terms: Terms, detail: str) -> None:
        """Withdraw a held agreement: the provider releases its capacity at once."""
        bid_id = self._bid_of.pop(terms.aid, None)
        if bid_id is not None:
            await self._send_all(self.consumer.release_held(bid_id, detail[:200]), "provider")

    def _no_answer(self, provider: str, nid: bytes) -> None:
        """A provider let a proposal time out: it costs it reputation (persisted)."""
        self._record_outcome(nid, provider, "no_answer")
        log.info("provider did not answer; backed off", extra={"provider": provider[:16]})

    def _record_outcome(self, key: bytes, provider: str, outcome: str) -> None:
        try:
            self.ledger.record_outcome(key, provider, outcome, now_ms())
        except Exception as exc:  # a full disk must not stop placement
            log.warning("outcome not recorded", extra={"error": str(exc)})

    async def abandon(self, terms: Terms, reason: str) -> None:
        """Consumer: we will not use this agreement (e.g. the launch failed): end the
        lease so the provider releases what it reserved for us."""
        bid_id = self._bid_of.pop(terms.aid, None)
        if bid_id is None or bid_id not in self.consumer.placements:
            return
        try:
            sends = self.consumer.end(bid_id, "abandoned", reason[:200])
        except NegotiationError:
            sends = []  # the lease already ended (the provider gave up first)
        self.consumer.placements.pop(bid_id, None)
        await self._send_all(sends, "provider")

    def lease(self, terms: Terms):
        """Consumer: the agreement's one lease (synord.protocols.lease), held by its negotiation
        while the placement is on; the job path feeds it task frames and asks it."""
        pl = self.consumer.placements.get(self._bid_of.get(terms.aid, ""))
        m = pl.negotiation if pl is not None else None
        if m is None or m.terms is None or m.terms.aid != terms.aid:
            return None
        return m.lease

    def lease_done(self, terms: Terms) -> None:
        """Consumer: the task under ``terms`` is over; forget the placement."""
        bid_id = self._bid_of.pop(terms.aid, None)
        if bid_id is not None:
            self.consumer.placements.pop(bid_id, None)

    def _placement_done(self, pl: Placement) -> None:
        ev = self._waiting.get(pl.bid.id)
        if ev is not None:
            ev.set()

    def _on_lost(self, pl: Placement) -> None:
        terms = pl.negotiation.terms if pl.negotiation else None
        if terms is not None:
            self.ledger.record_outcome(terms.aid, terms.provider, "abandoned", now_ms())
        log.warning("lease lost", extra={"provider": (pl.current.peer if pl.current else "?")[:16]})

    # ---- transport ------------------------------------------------------------------------

    async def _send_all(self, sends: list[Send], to_role: str) -> None:
        for s in sends:
            await self._send(s, to_role)

    async def _to_consumer(self, s: Send) -> None:
        await self._send(s, "consumer")

    async def _to_provider(self, s: Send) -> None:
        await self._send(s, "provider")

    async def _send(self, s: Send, to_role: str) -> None:
        """One envelope to the ``to_role`` party of peer ``s.to``, on our stream to it."""
        frame = {"to": to_role, "env": s.envelope.encode()}
        lock = self._out_lock.setdefault(s.to, trio.Lock())
        async with lock:
            for attempt in (1, 2):  # a stale stream gets one reconnect
                try:
                    stream = self._out.get(s.to)
                    if stream is None:
                        with trio.fail_after(5):
                            stream = await self.mesh.open_stream(s.to, NEGOTIATE_PROTOCOL)
                        self._out[s.to] = stream
                    await stream.send(frame)
                    return
                except Exception as exc:
                    self._out.pop(s.to, None)
                    if attempt == 2:  # the state machines' timeouts handle the loss
                        log.info("negotiation message not delivered",
                                 extra={"to": s.to[:16], "type": s.envelope.type, "error": str(exc)})

    async def _handle_stream(self, stream: FramedStream) -> None:
        peer = stream.remote_peer
        try:
            peer_bytes = b58decode(peer)
        except Exception:
            return
        # A peer over its message rate is slowed down (we stop reading its stream),
        # not dropped as gossip is: a lost end or countersign would hold capacity
        # until the lease times out, a lost proposal would cost it a backoff.
        paced = self._paced.setdefault(peer_bytes, [Pacer(int(self.validator.rate_per_peer)), 0])
        paced[1] += 1
        try:
            while True:
                frame = await stream.receive()
                if not isinstance(frame, dict) or not isinstance(frame.get("env"), bytes):
                    continue
                await paced[0].take(1)
                if frame.get("to") == "provider":
                    await self._send_all(self.provider.receive(frame["env"]), "consumer")
                else:
                    await self._send_all(self.consumer.receive(frame["env"]), "provider")
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:
            log.info("negotiation stream failed", extra={"peer": peer[:16], "error": str(exc)})
        finally:
            paced[1] -= 1
            if paced[1] == 0:
                self._paced.pop(peer_bytes, None)
            with trio.move_on_after(1):
                await stream.close()

    # ---- API -------------------------------------------------------------------------------

    def book_json(self, cls: str | None = None) -> dict:
        now = now_ms()
        return {"classes": self.book.to_json(cls, now=now), "asks_published": len(self._our_asks),
                "agreements": self.agreements, "backed_off": self.backoff.to_json(now),
                "spent": self.spending.spent(now)}

    def ledger_json(self) -> dict:
        return self.ledger.to_json()
