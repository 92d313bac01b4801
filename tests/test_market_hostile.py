"""The consumer's side of the market against hostile or silent providers, fed
envelopes without sockets (issue 12, items 5 and 7, and the soak spread):
one peer's many cheap silent asks cost a placement one hedge and get it backed
off; never two agreements for one bid; no agreement above the matched ask or
the spending cap; receipts bounded by the lease the consumer saw."""

import os

import pytest

from synord.protocols.envelope import decode, now_ms, seal
from synord.protocols.identity import Identity
from synord.protocols.negotiation import Agreement, Propose, Terms
from synord.protocols.receipts import issue
from synord.protocols.refusals import REFUSALS
from synord.market.book import PEER_QUOTA, OrderBook
from synord.market.matching import match
from synord.market.negotiator import Consumer
from synord.market.router import PeerInfo, RecentPlacements
from synord.market.spending import SpendingCap

from test_market_book import ask as mk_ask, bid as mk_bid
from test_negotiation import C_ID, P_ID, TO, deliver, make_provider, proposal


class Silent:
    """A provider that never answers anything."""

    def __init__(self):
        self.got = []

    def receive(self, data):
        self.got.append(decode(data))
        return []


def clocked():
    t = [now_ms()]
    return t, (lambda: t[0])


def types(sends):
    return [(s.to, s.envelope.type) for s in sends]


def test_eight_silent_cheap_asks_cost_one_hedge_and_the_liar_is_backed_off():
    t, clock = clocked()
    liar = Identity.generate()
    honest = make_provider(price=1.0, clock=clock)
    book = OrderBook(max_asks_per_peer=4)
    liar_asks = [mk_ask(f"z{i}", peer=liar.peer_id, price=0.0, expires=t[0] + 600_000) for i in range(8)]
    results = [book.add(a, t[0]) for a in liar_asks + [honest.asks["a1"]]]
    assert results.count(PEER_QUOTA) == 4  # the book holds at most 4 asks of one peer
    res = match(mk_bid(), book.asks("cpu"), now=t[0], presorted=True, per_peer=1, shortlist=8)
    assert [c.ask.peer for c in res.candidates] == [liar.peer_id, P_ID.peer_id]
    assert res.excluded["peer_cap"] == 3
    silent, lost_rep = Silent(), []
    cons = Consumer(C_ID, timeouts=TO, clock=clock, hedge_ms=300,
                    on_no_answer=lambda peer, nid: lost_rep.append(peer))
    parties = {P_ID.peer_id: honest, liar.peer_id: silent, C_ID.peer_id: cons}
    before = REFUSALS.get("negotiate", "no_answer")
    assert types(deliver(cons.place(mk_bid(), res), parties)) == [(liar.peer_id, "propose")]
    assert cons.tick(t[0] + 299) == []
    t[0] += 300  # the liar is silent: the next candidate is proposed to as well
    log = deliver(cons.tick(), parties)
    assert types(log) == [(P_ID.peer_id, "propose"), (C_ID.peer_id, "agreement"),
                          (P_ID.peer_id, "countersign"), (liar.peer_id, "reject")]
    pl = cons.placements["b1"]
    assert pl.state == "active" and pl.negotiation.provider == P_ID.peer_id
    assert decode(log[-1].envelope.encode()).body["reason"] == "withdrawn"
    # Withdrawn after a hedge of silence counts as no answer: backed off, reputation hit.
    assert REFUSALS.get("negotiate", "no_answer") == before + 1 and lost_rep == [liar.peer_id]
    assert cons.backoff.blocked(liar.peer_id, t[0])
    (p,) = cons.place(mk_bid(id="skip"), [liar_asks[0], honest.asks["a1"]])
    assert p.to == P_ID.peer_id and "backed off" in cons.placements["skip"].explain()
    deliver([p], parties)
    assert cons.placements["skip"].state == "active"
    # Once the back-off passes, a proposal that times out backs it off again, for longer.
    t[0] += cons.backoff.base_ms
    cons.place(mk_bid(id="b2"), [liar_asks[0]])
    t[0] += TO.propose_ms
    assert all(to != liar.peer_id for to, _ in types(cons.tick()))
    assert cons.placements["b2"].state == "failed" and "proposal timeout" in cons.placements["b2"].explain()
    assert REFUSALS.get("negotiate", "no_answer") == before + 2 and lost_rep == [liar.peer_id] * 2
    again = match(mk_bid(id="b3"), book.asks("cpu"), now=t[0], presorted=True, per_peer=1,
                  skip_peer=lambda p: cons.backoff.blocked(p, t[0]))
    assert [c.ask.peer for c in again.candidates] == [P_ID.peer_id] and again.excluded["backed_off"] == 4
    # With nobody else to ask, a backed-off provider is still a last resort.
    alone = match(mk_bid(id="b4"), liar_asks[:1], now=t[0], skip_peer=lambda p: cons.backoff.blocked(p, t[0]))
    assert [c.ask.peer for c in alone.candidates] == [liar.peer_id]
    assert cons.backoff.blocked(liar.peer_id, t[0] + cons.backoff.base_ms)  # doubled
    assert not cons.backoff.blocked(liar.peer_id, t[0] + 2 * cons.backoff.base_ms)


def test_two_agreements_for_one_bid_only_the_first_is_countersigned():
    t, clock = clocked()
    p2_id = Identity.generate()
    p1, p2 = make_provider(clock=clock), make_provider(p2_id, clock=clock)
    cons = Consumer(C_ID, timeouts=TO, clock=clock, hedge_ms=100)
    parties = {P_ID.peer_id: p1, p2_id.peer_id: p2, C_ID.peer_id: cons}
    (a,) = cons.place(mk_bid(), [p1.asks["a1"], p2.asks["a1"]])
    t[0] += 100
    (b,) = cons.tick()
    (ag1,) = p1.receive(a.envelope.encode())
    (ag2,) = p2.receive(b.envelope.encode())
    out = cons.receive(ag2.envelope.encode())  # the second candidate answers first
    assert types(out) == [(p2_id.peer_id, "countersign"), (P_ID.peer_id, "reject")]
    deliver(out, parties)
    assert cons.receive(ag1.envelope.encode()) == []  # late: never countersigned
    assert len(p1.pool) == 0 and not p1.negotiations  # released at once
    assert len(p2.pool) == 1 and cons.placements["b1"].negotiation.provider == p2_id.peer_id


def hostile_agreement(hostile: Identity, prop: Propose, price: float, duration_s: int = 600) -> Agreement:
    now = now_ms()
    t = Terms(aid=os.urandom(16), nid=prop.nid, consumer=C_ID.peer_id, provider=hostile.peer_id,
              ask_id=prop.ask_id, ask_seq=prop.ask_seq, bid_id=prop.bid_id, bid_seq=prop.bid_seq,
              resource_class="cpu", cores=prop.cores, memory=prop.memory, gpus=0, gpu_class=None,
              runtime=prop.runtime, price=price, units=prop.cores, duration_s=duration_s, heartbeat_ms=500,
              created=now, expires=now + duration_s * 1000)
    return Agreement(t, t.sign(hostile))


def test_agreement_above_the_matched_ask_is_refused_whatever_the_limit():
    hostile = Identity.generate()
    cheap = mk_ask("h1", peer=hostile.peer_id, price=0.0001, expires=now_ms() + 600_000)
    cons = Consumer(C_ID, timeouts=TO)
    (p,) = cons.place(mk_bid(max_price=1e9), [cheap])  # no limit of the user's own
    prop = Propose.from_body(p.envelope.body)
    assert prop.ask_price == 0.0001
    before = REFUSALS.get("negotiate", "agreement_price")
    out = cons.receive(seal(hostile, "agreement", hostile_agreement(hostile, prop, 1e6).to_body()).encode())
    assert types(out) == [(hostile.peer_id, "reject")]
    assert REFUSALS.get("negotiate", "agreement_price") == before + 1
    pl = cons.placements["b1"]
    assert pl.state == "failed" and "price" in pl.explain()


def test_provider_refuses_when_its_price_rose_above_the_matched_ask():
    prov = make_provider(price=1.0)
    (out,) = prov.receive(seal(C_ID, "propose", proposal(ask_price=0.5).to_body()).encode())
    body = decode(out.envelope.encode()).body
    assert (body["reason"], out.envelope.type) == ("price", "reject") and "rose" in body["detail"]
    assert len(prov.pool) == 0


def test_spending_cap_refuses_an_agreement_that_would_exceed_it():
    p2_id = Identity.generate()
    dear, cheap = make_provider(price=1.0), make_provider(p2_id, price=0.1)
    cap = SpendingCap(cap=1.0, period_ms=86_400_000)
    cons = Consumer(C_ID, timeouts=TO, spending=cap)
    parties = {P_ID.peer_id: dear, p2_id.peer_id: cheap, C_ID.peer_id: cons}
    before = REFUSALS.get("negotiate", "spend_cap")
    # 2 cores for 3600 s: 2.0 at the dear ask, 0.2 at the cheap one.
    log = deliver(cons.place(mk_bid(cores=2.0, duration_s=3600), [dear.asks["a1"], cheap.asks["a1"]]), parties)
    assert types(log) == [(P_ID.peer_id, "propose"), (C_ID.peer_id, "agreement"), (P_ID.peer_id, "reject"),
                          (p2_id.peer_id, "propose"), (C_ID.peer_id, "agreement"), (p2_id.peer_id, "countersign")]
    assert REFUSALS.get("negotiate", "spend_cap") == before + 1
    assert len(dear.pool) == 0 and cap.spent(now_ms()) == pytest.approx(0.2)


def test_receipt_billing_more_than_the_consumer_saw_is_refused():
    t, clock = clocked()
    recorded = []
    prov = make_provider(clock=clock)
    cons = Consumer(C_ID, timeouts=TO, clock=clock, on_receipt=recorded.append)
    parties = {P_ID.peer_id: prov, C_ID.peer_id: cons}
    deliver(cons.place(mk_bid(duration_s=3660), [prov.asks["a1"]]), parties)
    terms = cons.placements["b1"].negotiation.terms
    cons.observe_end(terms.aid, t[0] + 100)  # the job path saw the task exit after 0.1 s
    t[0] += 5_000
    before = REFUSALS.get("receipt", "over_observed")
    whole = issue(P_ID, terms, cpu_s=0.1, peak_memory=1, started=terms.created, ended=terms.created + 3_660_000)
    assert cons.receive(seal(P_ID, "receipt", whole.to_body(), now=t[0]).encode()) == []
    assert REFUSALS.get("receipt", "over_observed") == before + 1 and recorded == []
    fair = issue(P_ID, terms, cpu_s=0.1, peak_memory=1, started=terms.created, ended=terms.created + 150)
    (ack,) = cons.receive(seal(P_ID, "receipt", fair.to_body(), now=t[0]).encode())
    assert ack.envelope.type == "receipt_ack" and recorded[0].receipt.wall_s == 0.15


@pytest.mark.parametrize("announced_load", [0.0, 1.0])
def test_a_soak_spreads_over_equal_providers(announced_load):
    """Sequential jobs, each completing (reputation rises where it ran): with our
    recent placements in the score, they spread instead of all landing on one,
    whatever load the providers announce."""
    now = now_ms()
    asks = [mk_ask(f"a{i}", peer=f"P{i}", price=0.01, ts=i, load=announced_load, expires=now + 3_600_000)
            for i in range(5)]
    good = {a.peer: 0 for a in asks}
    recent = RecentPlacements()
    placed = []
    for i in range(50):
        at = now + i * 2_000
        res = match(mk_bid(id=f"j{i}", max_price=1.0), asks, now=now,
                    peer_info=lambda p: PeerInfo(reputation=(good[p] + 1) / (good[p] + 2), ours=recent.get(p, at)))
        peer = res.best.ask.peer
        placed.append(peer)
        recent.add(peer, at)
        good[peer] += 1
    counts = {p: placed.count(p) for p in good}
    assert len(set(placed)) == 5 and max(counts.values()) <= 15, counts
