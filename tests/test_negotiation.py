"""Negotiation: the sans-IO machine (every transition, illegal events, signatures,
replays, timeouts) and the Provider/Consumer parties fed envelopes without sockets."""

import dataclasses

import msgpack

import pytest
import trio
import trio.testing

from synord.protocols.envelope import decode, now_ms, seal
from synord.protocols.identity import Identity
from synord.protocols.negotiation import (
    CONSUMER, PROVIDER, TRANSITIONS, Agreement, Countersign, End, Heartbeat, Negotiation,
    NegotiationError, Propose, Reject, Reserve, State, Terms, Timeout, Timeouts,
)
from synord.market.negotiator import Consumer, Provider, run_timers
from synord.market.reservations import CapacityPool

from test_market_book import ask as mk_ask, bid as mk_bid

C_ID, P_ID, X_ID = Identity.generate(), Identity.generate(), Identity.generate()
NID = b"n" * 16
T0 = 1_700_000_000_000
TO = Timeouts(propose_ms=1000, countersign_ms=2000, heartbeat_ms=500, missed_heartbeats=3)


def proposal(**kw):
    base = dict(nid=NID, ask_peer=P_ID.peer_id, ask_id="a1", ask_seq=1, bid_id="b1", bid_seq=1,
                resource_class="cpu", cores=2.0, memory=1 << 30, runtime="wasm", max_price=2.0, duration_s=600)
    base.update(kw)
    return Propose(**base)


def terms(**kw):
    base = dict(aid=b"a" * 16, nid=NID, consumer=C_ID.peer_id, provider=P_ID.peer_id, ask_id="a1", ask_seq=1,
                bid_id="b1", bid_seq=1, resource_class="cpu", cores=2.0, memory=1 << 30, gpus=0, gpu_class=None,
                runtime="wasm", price=1.5, units=2.0, duration_s=600, heartbeat_ms=500, created=T0,
                expires=T0 + 600_000)
    base.update(kw)
    return Terms(**base)


def agreement(**kw):
    t = terms(**kw)
    return Agreement(t, t.sign(P_ID))


def pair():
    return (Negotiation(CONSUMER, NID, C_ID.peer_id, P_ID.peer_id, TO),
            Negotiation(PROVIDER, NID, C_ID.peer_id, P_ID.peer_id, TO))


def both(role, event, c, p, now=T0):
    """Apply an event emitted by ``role`` on both sides."""
    (c.send if role == CONSUMER else c.receive)(event, now)
    (p.send if role == PROVIDER else p.receive)(event, now)


def to_active(c, p):
    both(CONSUMER, proposal(), c, p)
    p.send(Reserve(), T0)
    ag = agreement()
    both(PROVIDER, ag, c, p)
    both(CONSUMER, Countersign(NID, ag.terms.aid, ag.terms.sign(C_ID)), c, p)


# --- the machine ---------------------------------------------------------

def test_happy_path_both_sides_in_step():
    c, p = pair()
    both(CONSUMER, proposal(), c, p)
    assert c.state is p.state is State.PROPOSED and c.deadline == T0 + 1000
    p.send(Reserve(), T0)
    assert p.state is State.RESERVED and c.state is State.PROPOSED  # reservation never crosses the wire
    ag = agreement()
    both(PROVIDER, ag, c, p)
    assert c.state is p.state is State.AGREED and p.deadline == T0 + 2000
    both(CONSUMER, Countersign(NID, ag.terms.aid, ag.terms.sign(C_ID)), c, p)
    assert c.state is p.state is State.ACTIVE and c.terms == p.terms
    assert p.deadline == T0 + 1500 and p.next_heartbeat == T0 + 500
    hb = c.heartbeat(T0 + 400)
    p.receive(hb, T0 + 400)
    assert p.deadline == T0 + 1900
    both(PROVIDER, End(NID, "completed", "exit 0"), c, p)
    assert c.state is p.state is State.ENDED and c.outcome == "completed" and p.deadline is None


def _drive(state, role):
    c, p = pair()
    m = c if role == CONSUMER else p
    if state is State.IDLE:
        return m
    both(CONSUMER, proposal(), c, p)
    if state is State.PROPOSED:
        return m
    if state is State.RESERVED:
        p.send(Reserve(), T0)
        return p
    ag = agreement()
    both(PROVIDER, ag, c, p)
    if state is State.AGREED:
        return m
    both(CONSUMER, Countersign(NID, ag.terms.aid, ag.terms.sign(C_ID)), c, p)
    return m


def _event(cls):
    return {Propose: proposal(), Reserve: Reserve(), Reject: Reject(NID, "capacity", "none left"),
            Agreement: agreement(), Countersign: Countersign(NID, b"a" * 16, terms().sign(C_ID)),
            Heartbeat: Heartbeat(NID, 1), End: End(NID, "completed"), Timeout: Timeout("x")}[cls]


ALL = [(emitter, state, cls, new) for emitter, table in TRANSITIONS.items()
       for state, row in table.items() for cls, new in row.items()]


@pytest.mark.parametrize("emitter,state,cls,new", ALL,
                         ids=[f"{e}-{s.value}-{c.__name__}" for e, s, c, _ in ALL])
def test_every_transition(emitter, state, cls, new):
    # Apply on the machine of each role that can be in `state` and see this event.
    applied = 0
    for owner in (CONSUMER, PROVIDER):
        if state is State.RESERVED and owner == CONSUMER:
            continue  # the consumer never observes RESERVED
        if cls in (Timeout, Reserve) and owner != emitter:
            continue  # local events exist only on the emitter's side
        m = _drive(state, owner)
        (m.send if owner == emitter else m.receive)(_event(cls), T0 + 1)
        assert m.state is new, (owner, m.state)
        applied += 1
    assert applied


@pytest.mark.parametrize("role", [CONSUMER, PROVIDER])
def test_illegal_events_raise_naming_role_event_state(role):
    events = [Propose, Reserve, Reject, Agreement, Countersign, Heartbeat, End]
    checked = 0
    for state in (State.IDLE, State.PROPOSED, State.AGREED, State.ACTIVE):
        for cls in events:
            legal = TRANSITIONS[role].get(state, {})
            if cls in legal:
                continue
            m = _drive(state, PROVIDER if role == CONSUMER else CONSUMER)  # the peer's view
            with pytest.raises(NegotiationError) as ei:
                m.receive(_event(cls), T0) if m.role != role else m.send(_event(cls), T0)
            assert (ei.value.role, ei.value.event, ei.value.state) == (role, cls.__name__, state)
            assert f"{role} cannot {cls.__name__} in state {state.value}" in str(ei.value)
            assert m.state is state  # unchanged
            checked += 1
    assert checked >= 15
    both_end = _drive(State.ACTIVE, CONSUMER)
    both_end.send(End(NID, "completed"), T0)
    with pytest.raises(NegotiationError, match="state ENDED"):
        both_end.receive(Heartbeat(NID, 5), T0)


def test_tampered_agreement_signature_rejected():
    c, _ = pair()
    c.send(proposal(), T0)
    good = agreement()
    tampered = Agreement(dataclasses.replace(good.terms, price=0.01), good.psig)
    with pytest.raises(NegotiationError, match="bad provider signature"):
        c.receive(tampered, T0)
    forged = Agreement(good.terms, good.terms.sign(X_ID))  # signed by someone else
    with pytest.raises(NegotiationError, match="bad provider signature"):
        c.receive(forged, T0)
    assert c.state is State.PROPOSED
    c.receive(good, T0)
    assert c.state is State.AGREED


def test_agreement_terms_must_match_proposal():
    c, _ = pair()
    c.send(proposal(max_price=1.0, cores=4.0), T0)
    with pytest.raises(NegotiationError, match="cores, price"):
        c.receive(agreement(price=1.5, cores=2.0), T0)
    with pytest.raises(NegotiationError, match="parties"):
        c.receive(Agreement(terms(consumer=X_ID.peer_id), terms(consumer=X_ID.peer_id).sign(P_ID)), T0)


def test_tampered_countersign_and_replayed_heartbeat_rejected():
    c, p = pair()
    both(CONSUMER, proposal(), c, p)
    ag = agreement()
    both(PROVIDER, ag, c, p)
    with pytest.raises(NegotiationError, match="bad consumer signature"):
        p.receive(Countersign(NID, ag.terms.aid, ag.terms.sign(X_ID)), T0)
    with pytest.raises(NegotiationError, match="another agreement"):
        p.receive(Countersign(NID, b"z" * 16, ag.terms.sign(C_ID)), T0)
    p.receive(Countersign(NID, ag.terms.aid, ag.terms.sign(C_ID)), T0)
    p.receive(Heartbeat(NID, 1), T0)
    p.receive(Heartbeat(NID, 2), T0)
    with pytest.raises(NegotiationError, match="replay"):
        p.receive(Heartbeat(NID, 2), T0)
    with pytest.raises(NegotiationError, match="negotiation id"):
        p.receive(Heartbeat(b"x" * 16, 3), T0)


def test_timeouts():
    c, p = pair()
    both(CONSUMER, proposal(), c, p)
    assert c.check_timeout(T0 + 999) is None
    assert c.check_timeout(T0 + 1000) == Timeout("proposal") and c.state is State.EXPIRED
    p.send(Reserve(), T0)
    p.send(agreement(), T0)
    assert p.check_timeout(T0 + 2000).what == "countersign" and p.state is State.EXPIRED
    c, p = pair()
    to_active(c, p)
    assert p.check_timeout(T0 + 1499) is None
    assert p.check_timeout(T0 + 1500).what == "heartbeat" and p.state is State.LOST and p.outcome == "abandoned"
    with pytest.raises(NegotiationError, match="local"):
        _drive(State.PROPOSED, CONSUMER).receive(Timeout("x"), T0)


# --- the parties -----------------------------------------------------------

def deliver(sends, parties):
    """Carry every Send to its addressee until nothing more is sent; returns all sends."""
    log, queue = [], list(sends)
    while queue:
        s = queue.pop(0)
        log.append(s)
        queue += parties[s.to].receive(s.envelope.encode())
    return log


def make_provider(identity=P_ID, cores=4.0, price=1.0, **kw):
    pool = CapacityPool({"cpus": cores, "memory_bytes": 16 << 30})
    prov = Provider(identity, pool, timeouts=TO, **kw)
    prov.offer(mk_ask("a1", cores=cores, price=price, expires=now_ms() + 3_600_000, max_duration_s=86_400))
    return prov


def test_parties_agree_heartbeat_and_end():
    prov = make_provider()
    agreed = []
    cons = Consumer(C_ID, timeouts=TO, on_agreement=agreed.append)
    parties = {P_ID.peer_id: prov, C_ID.peer_id: cons}
    log = deliver(cons.place(mk_bid(cores=2.0), [prov.asks["a1"]]), parties)
    assert [s.envelope.type for s in log] == ["propose", "agreement", "countersign"]
    (m,) = prov.negotiations.values()
    assert m.state is State.ACTIVE and agreed[0].state == "active"
    assert prov.pool.get(f"{C_ID.peer_id}/{m.nid.hex()}").committed
    assert prov.pool.free()["cpus"] == 2.0
    assert agreed[0].negotiation.terms == m.terms and m.terms.price == 1.0
    hb = cons.tick(now_ms() + TO.heartbeat_ms)
    assert [s.envelope.type for s in hb] == ["heartbeat"]
    deliver(hb, parties)
    deliver(prov.end(C_ID.peer_id, m.nid, "completed"), parties)
    assert m.state is State.ENDED and prov.pool.free()["cpus"] == 4.0 and cons.placements["b1"].state == "ended"


def test_ten_consumers_race_for_one_ask():
    prov = make_provider(cores=4.0)
    consumers = [Consumer(Identity.generate(), timeouts=TO) for _ in range(10)]
    parties = {P_ID.peer_id: prov, **{c.peer_id: c for c in consumers}}
    # All ten proposals are in flight before any answer comes back.
    proposals = [s for c in consumers for s in c.place(mk_bid(cores=4.0), [prov.asks["a1"]])]
    answers = [a for s in proposals for a in prov.receive(s.envelope.encode())]
    assert sorted(a.envelope.type for a in answers) == ["agreement"] + ["reject"] * 9
    rejects = [decode(a.envelope.encode()).body for a in answers if a.envelope.type == "reject"]
    assert all(r["reason"] == "capacity" and "insufficient cpus: need 4, free 0" in r["detail"] for r in rejects)
    deliver(answers, parties)
    states = sorted(c.placements["b1"].state for c in consumers)
    assert states == ["active"] + ["failed"] * 9
    loser = next(c for c in consumers if c.placements["b1"].state == "failed")
    assert "capacity: insufficient cpus" in loser.placements["b1"].explain()
    assert len(prov.pool) == 1


def test_vanished_capacity_rejects_and_consumer_moves_on():
    p1 = make_provider()
    p2_id = Identity.generate()
    p2 = make_provider(p2_id, price=1.2)
    p1.pool.set_capacity({"cpus": 0, "memory_bytes": 0})  # owner came back to the desktop
    cons = Consumer(C_ID, timeouts=TO)
    parties = {P_ID.peer_id: p1, p2_id.peer_id: p2, C_ID.peer_id: cons}
    log = deliver(cons.place(mk_bid(), [p1.asks["a1"], p2.asks["a1"]]), parties)
    P1, P2, C = P_ID.peer_id, p2_id.peer_id, C_ID.peer_id
    assert [(s.to, s.envelope.type) for s in log] == [
        (P1, "propose"), (C, "reject"), (P2, "propose"), (C, "agreement"), (P2, "countersign")]
    pl = cons.placements["b1"]
    assert pl.state == "active" and pl.negotiation.provider == p2_id.peer_id
    assert pl.attempts[0][2].startswith("capacity: insufficient cpus")
    assert len(p1.pool) == 0 and len(p2.pool) == 1


@pytest.mark.parametrize("change,reason", [
    (dict(ask_seq=2), "stale_ask"), (dict(ask_id="nope"), "unknown_ask"), (dict(runtime="microvm"), "runtime"),
    (dict(max_price=0.5), "price"), (dict(cores=64.0), "exceeds_ask"), (dict(duration_s=100_000), "duration"),
])
def test_admission_refusals_have_reasons(change, reason):
    prov = make_provider()
    p = dataclasses.replace(proposal(), **change)
    (out,) = prov.receive(seal(C_ID, "propose", p.to_body()).encode())
    assert out.envelope.type == "reject" and decode(out.envelope.encode()).body["reason"] == reason
    assert len(prov.pool) == 0 and not prov.negotiations


def test_admission_hook_contributor_limits():
    prov = make_provider(admission=lambda consumer, p: "on battery" if p.cores > 1 else None)
    (out,) = prov.receive(seal(C_ID, "propose", proposal().to_body()).encode())
    body = decode(out.envelope.encode()).body
    assert (body["reason"], body["detail"]) == ("admission", "on battery")


def test_replayed_and_tampered_messages_rejected():
    prov = make_provider()
    cons = Consumer(C_ID, timeouts=TO)
    (prop,) = cons.place(mk_bid(), [prov.asks["a1"]])
    raw = prop.envelope.encode()
    (ag,) = prov.receive(raw)
    assert prov.receive(raw) == [] and prov.validator.rejected["replay"] == 1
    # same proposal re-signed with a fresh nonce: the negotiation id is taken
    assert prov.receive(seal(C_ID, "propose", prop.envelope.body).encode()) == []
    assert prov.dropped["duplicate_proposal"] == 1
    # a byte flipped in transit: the envelope signature fails
    wire = msgpack.unpackb(ag.envelope.encode())
    wire["b"] = wire["b"].replace(b"wasm", b"wasn")
    assert cons.receive(msgpack.packb(wire)) == [] and cons.dropped["bad_signature"] == 1
    (cs,) = cons.receive(ag.envelope.encode())
    prov.receive(cs.envelope.encode())
    (m,) = prov.negotiations.values()
    # an old heartbeat re-sealed (fresh nonce, same seq) is a replay at the protocol level
    hb = Heartbeat(m.nid, 1)
    assert prov.receive(seal(C_ID, "heartbeat", hb.to_body()).encode()) == []
    assert prov.receive(seal(C_ID, "heartbeat", hb.to_body()).encode()) == []
    assert prov.dropped["heartbeat seq 1 <= 1 (replay)"] == 1
    # a stranger cannot speak in someone else's negotiation
    assert prov.receive(seal(X_ID, "end", End(m.nid, "failed").to_body()).encode()) == []
    assert m.state is State.ACTIVE


def test_tampered_agreement_refused_and_next_candidate_tried():
    p1 = make_provider()
    p2_id = Identity.generate()
    p2 = make_provider(p2_id)
    cons = Consumer(C_ID, timeouts=TO)
    (prop,) = cons.place(mk_bid(), [p1.asks["a1"], p2.asks["a1"]])
    (ag,) = p1.receive(prop.envelope.encode())
    body = dict(ag.envelope.body)
    body["terms"] = dict(body["terms"], price=0.0001)  # terms changed after signing
    out = cons.receive(seal(P_ID, "agreement", body).encode())
    assert [(s.to, s.envelope.type) for s in out] == [(P_ID.peer_id, "reject"), (p2_id.peer_id, "propose")]
    assert cons.placements["b1"].attempts[0][2] == "bad_agreement: bad provider signature"
    p1.receive(out[0].envelope.encode())
    assert len(p1.pool) == 0 and not p1.negotiations  # released at once


def test_timeouts_under_mockclock():
    async def main():
        base = now_ms()
        ms = lambda: base + int(trio.current_time() * 1000)
        pool = CapacityPool({"cpus": 4.0, "memory_bytes": 16 << 30})
        prov = Provider(P_ID, pool, timeouts=TO, clock=ms)
        prov.offer(mk_ask("a1", cores=4.0, expires=base + 3_600_000))
        lost = []
        cons = Consumer(C_ID, timeouts=TO, clock=ms, on_lost=lost.append)
        sent = []

        async def drop(s):  # the network eats everything the timers send
            sent.append(s.envelope.type)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_timers, prov, drop, ms)
            nursery.start_soon(run_timers, cons, drop, ms)
            # 1. agreement sent, countersign lost: the reservation is held, then released
            (prop,) = cons.place(mk_bid(id="b1"), [prov.asks["a1"]])
            (ag,) = prov.receive(prop.envelope.encode())
            assert len(pool) == 1
            await trio.sleep(TO.countersign_ms / 1000 - 0.01)
            assert len(pool) == 1
            await trio.sleep(0.02)
            assert len(pool) == 0 and prov.finished[-1].state is State.EXPIRED
            # (the consumer, which never got the agreement, gave up on its own)
            assert cons.placements["b1"].state == "failed"
            assert "proposal timeout" in cons.placements["b1"].explain()
            # ... and the silent provider is backed off (still tried when it is the only one)
            assert cons.backoff.blocked(P_ID.peer_id, ms())
            # 2. a live lease whose provider goes silent is detected as lost
            (prop,) = cons.place(mk_bid(id="b2"), [prov.asks["a1"]])
            (ag,) = prov.receive(prop.envelope.encode())
            (cs,) = cons.receive(ag.envelope.encode())
            prov.receive(cs.envelope.encode())
            assert cons.placements["b2"].state == "active"
            await trio.sleep(TO.heartbeat_ms * TO.missed_heartbeats / 1000 + 0.01)
            assert [p.bid.id for p in lost] == ["b2"] and cons.placements["b2"].state == "lost"
            assert "heartbeat" in sent
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_settle_exchanges_receipt_and_both_ledgers_record_it():
    import sqlite3

    from synord.market.ledger import Ledger

    pl_led, cl_led = Ledger(sqlite3.connect(":memory:"), P_ID.peer_id), Ledger(sqlite3.connect(":memory:"), C_ID.peer_id)
    prov = make_provider(on_receipt=pl_led.record)
    cons = Consumer(C_ID, timeouts=TO, on_receipt=cl_led.record)
    parties = {P_ID.peer_id: prov, C_ID.peer_id: cons}
    deliver(cons.place(mk_bid(cores=2.0), [prov.asks["a1"]]), parties)
    (m,) = prov.negotiations.values()
    log = deliver(prov.settle(C_ID.peer_id, m.nid, cpu_s=12.5, peak_memory=64 << 20), parties)
    assert [s.envelope.type for s in log] == ["end", "receipt", "receipt_ack"]
    assert len(pl_led.receipts()) == len(cl_led.receipts()) == 1
    assert pl_led.balance() == pytest.approx(-cl_led.balance()) and pl_led.balance() >= 0
    assert pl_led.receipts()[0]["cpu_s"] == 12.5 and prov.pool.free()["cpus"] == 4.0
    # a second copy of the receipt is not countersigned twice: the same ack goes back
    (again,) = cons.handle(log[1].envelope)
    assert again.envelope.type == "receipt_ack" and again.envelope.body == log[2].envelope.body
    assert cons.dropped["duplicate_receipt"] == 1 and len(cl_led.receipts()) == 1
    # settled and acknowledged: nothing is resent
    assert prov.tick(now_ms() + 10 * 60_000) == []


def test_unacknowledged_receipt_is_resent_until_the_consumer_acks():
    import sqlite3

    from synord.market.ledger import Ledger
    from synord.market.negotiator import RECEIPT_RESEND_FOR_MS

    now = [now_ms()]
    pl_led, cl_led = Ledger(sqlite3.connect(":memory:"), P_ID.peer_id), Ledger(sqlite3.connect(":memory:"), C_ID.peer_id)
    prov = make_provider(on_receipt=pl_led.record, clock=lambda: now[0])
    cons = Consumer(C_ID, timeouts=TO, on_receipt=cl_led.record, clock=lambda: now[0])
    parties = {P_ID.peer_id: prov, C_ID.peer_id: cons}
    deliver(cons.place(mk_bid(cores=2.0), [prov.asks["a1"]]), parties)
    (m,) = prov.negotiations.values()
    sends = prov.settle(C_ID.peer_id, m.nid, cpu_s=3.0, peak_memory=1 << 20)
    assert [s.envelope.type for s in sends] == ["end", "receipt"]
    deliver(sends[:1], parties)  # the consumer is down: the receipt is lost
    assert prov.tick(now[0] + 1_000) == []  # not yet
    resent_at = []
    for _ in range(3):  # lost again and again: the gap doubles
        now[0] = prov.next_deadline()
        resent_at.append(now[0])
        (again,) = [s for s in prov.tick(now[0]) if s.envelope.type == "receipt"]
    assert resent_at[2] - resent_at[1] == 2 * (resent_at[1] - resent_at[0])
    now[0] = prov.next_deadline()
    log = deliver([s for s in prov.tick(now[0]) if s.envelope.type == "receipt"], parties)
    assert [s.envelope.type for s in log] == ["receipt", "receipt_ack"]
    assert len(pl_led.receipts()) == len(cl_led.receipts()) == 1
    assert prov.tick(now[0] + RECEIPT_RESEND_FOR_MS) == []  # acknowledged: done

    # A consumer that never answers: the provider gives up after an hour.
    deliver(cons.place(mk_bid(id="b2", cores=2.0), [prov.asks["a1"]]), parties)
    (m2,) = prov.negotiations.values()
    prov.settle(C_ID.peer_id, m2.nid, cpu_s=1.0, peak_memory=1 << 20)
    start = now[0]
    while (deadline := prov.next_deadline()) is not None and deadline - start <= RECEIPT_RESEND_FOR_MS + 120_000:
        now[0] = deadline
        prov.tick(now[0])
    assert prov._unacked == {} and len(pl_led.receipts()) == 1


def test_countersign_after_the_deadline_is_late_not_a_crash():
    t = [now_ms()]
    prov = make_provider(clock=lambda: t[0])
    cons = Consumer(C_ID, timeouts=TO, clock=lambda: t[0])
    (prop,) = cons.place(mk_bid(), [prov.asks["a1"]])
    (ag,) = prov.receive(prop.envelope.encode())
    (cs,) = cons.receive(ag.envelope.encode())
    t[0] += TO.countersign_ms  # the countersign arrives exactly at the deadline, before any tick
    assert prov.receive(cs.envelope.encode()) == []
    assert prov.dropped["late"] == 1 and len(prov.pool) == 0 and prov.finished[-1].state is State.EXPIRED


def test_a_full_provider_whose_price_rose_says_it_is_full():
    # Its price rises with its load; a proposal matched at the old price reaches it when it
    # has no room: "capacity" (the consumer backs off it), not "price".
    prov = make_provider(price=1.0)
    prov.pool.set_capacity({"cpus": 0, "memory_bytes": 0})
    (out,) = prov.receive(seal(C_ID, "propose", proposal(ask_price=0.5).to_body()).encode())
    assert decode(out.envelope.encode()).body["reason"] == "capacity"
    # With room, a risen price is refused as such, and nothing stays reserved.
    prov.pool.set_capacity({"cpus": 4.0, "memory_bytes": 16 << 30})
    (out,) = prov.receive(seal(C_ID, "propose", proposal(nid=b"m" * 16, ask_price=0.5).to_body()).encode())
    body = decode(out.envelope.encode()).body
    assert body["reason"] == "price" and "rose" in body["detail"]
    assert len(prov.pool) == 0 and not prov.negotiations
