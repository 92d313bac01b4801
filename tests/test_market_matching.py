"""Matching: every constraint, explanation counts, price-time priority, router weights."""

import pytest

from synord.market.book import OrderBook
from synord.market.matching import CONSTRAINTS, match
from synord.market.router import PeerInfo, Router, RouterWeights

from test_market_book import NOW, ask, bid


@pytest.mark.parametrize("constraint,ask_kw,bid_kw", [
    ("expired", dict(expires=NOW), {}),
    ("runtime", dict(runtimes=("container",)), dict(runtime="wasm")),
    ("memory", dict(memory=1 << 30), dict(memory=2 << 30)),
    ("cores", dict(cores=1.0), dict(cores=2.0)),
    ("accelerator", dict(gpus=1, gpu_class="amd-mi300"), dict(gpus=1, gpu_class="nvidia-h100")),
    ("accelerator", dict(gpus=1, gpu_class="nvidia-h100"), dict(gpus=2)),
    ("region", dict(region="us-east"), dict(region="eu-west")),
    ("reputation", dict(peer="shady"), dict(min_reputation=0.8)),
    ("duration", dict(max_duration_s=60), dict(duration_s=600)),
    ("preemptible", dict(preemptible=True), dict(preemptible_ok=False)),
    ("price", dict(price=5.0), dict(max_price=2.0)),
])
def test_each_constraint_excludes_and_is_explained(constraint, ask_kw, bid_kw):
    rep = {"shady": 0.2, "P1": 0.9}
    info = lambda peer: PeerInfo(reputation=rep.get(peer))
    b = bid(**bid_kw)
    res = match(b, [ask(**ask_kw)], now=NOW, peer_info=info)
    assert not res and res.excluded[constraint] == 1 and res.considered == 1
    assert constraint in res.explain()
    # the same ask without the offending setting matches
    assert match(b, [ask(gpus=b.gpus, gpu_class=b.gpu_class, region=b.region)], now=NOW, peer_info=info)


def test_explanation_counts_each_ask_once_by_first_failed_constraint():
    asks = [ask("r1", runtimes=("container",)), ask("r2", runtimes=("microvm",), price=9.0),
            ask("m1", memory=1), ask("c1", cores=0.5), ask("p1", price=9.0), ask("p2", price=8.0)]
    res = match(bid(max_price=2.0), asks, now=NOW)
    assert res.considered == 6
    assert {k: v for k, v in res.excluded.items() if v} == {"runtime": 2, "memory": 1, "cores": 1, "price": 2}
    assert "6 considered" in res.explain() and "runtime excluded 2" in res.explain()
    assert res.to_json()["excluded"]["price"] == 2
    empty = match(bid(), [], now=NOW)
    assert "no ask of class 'cpu'" in empty.explain()


def test_book_match_counts_are_exact_when_nothing_matches():
    book = OrderBook()
    for i in range(5):
        book.add(ask(f"p{i}", peer=f"P{i}", price=10.0 + i), NOW)
    book.add(ask("rt", peer="X", price=0.1, runtimes=("microvm",)), NOW)
    res = book.match(bid(max_price=1.0), NOW)
    assert not res and res.excluded["price"] == 5 and res.excluded["runtime"] == 1


def test_price_time_priority_without_router_preferences():
    # equal peer info and load: the router keeps price-time order
    asks = [ask("late", peer="A", price=1.0, ts=20), ask("early", peer="B", price=1.0, ts=10),
            ask("cheap", peer="C", price=0.8, ts=30), ask("pricey", peer="D", price=1.9, ts=0)]
    res = match(bid(max_price=2.0), asks, now=NOW, router=Router(RouterWeights(cost=1, latency=0, capability=0,
                                                                              reputation=0, load=0)))
    assert [c.ask.id for c in res.candidates] == ["cheap", "early", "late", "pricey"]
    book = OrderBook()
    for a in asks:
        book.add(a, NOW)
    assert [c.ask.id for c in book.match(bid(max_price=2.0), NOW).candidates] == ["cheap", "early", "late", "pricey"]


def test_shortlist_bounds_candidates_and_own_asks_are_skipped():
    asks = [ask(f"a{i}", peer=f"P{i}", price=1.0 + i / 100) for i in range(20)]
    res = match(bid(), asks, now=NOW, shortlist=3, exclude_peers=["P0"])
    assert [c.ask.id for c in res.candidates] == ["a1", "a2", "a3"]


def test_router_weights_change_the_winner():
    cheap_far = ask("cheap", peer="far", price=1.0)
    dear_near = ask("dear", peer="near", price=1.8, load=0.0)
    info = {"far": PeerInfo(rtt_ms=400, reputation=0.3), "near": PeerInfo(rtt_ms=2, reputation=0.95)}
    b = bid(max_price=2.0)
    cost_only = Router(RouterWeights(cost=1, latency=0, capability=0, reputation=0, load=0))
    latency_rep = Router(RouterWeights(cost=0.1, latency=1, capability=0, reputation=1, load=0))
    assert match(b, [cheap_far, dear_near], now=NOW, peer_info=info.get, router=cost_only).best.ask.id == "cheap"
    assert match(b, [cheap_far, dear_near], now=NOW, peer_info=info.get, router=latency_rep).best.ask.id == "dear"


def test_router_components():
    r = Router()
    c = r.components(ask(price=1.0, load=0.25, perf=3.0), bid(max_price=4.0), PeerInfo(rtt_ms=50, reputation=0.9))
    assert c == pytest.approx({"cost": 0.75, "latency": 0.5, "capability": 0.75, "reputation": 0.9, "load": 0.75,
                                "spread": 1.0})
    unknown = r.components(ask(), bid())
    assert unknown["latency"] == unknown["capability"] == unknown["reputation"] == 0.5
    load_only = Router(RouterWeights(cost=0, latency=0, capability=0, reputation=0, load=1))
    assert load_only.score(ask(load=0.9), bid()) < load_only.score(ask(load=0.1), bid())
    with pytest.raises(ValueError):
        RouterWeights(cost=-1)
    with pytest.raises(ValueError):
        RouterWeights(0, 0, 0, 0, 0, 0)


def test_constraint_list_is_complete():
    assert set(CONSTRAINTS) >= {"runtime", "memory", "cores", "accelerator", "region", "reputation", "price"}
