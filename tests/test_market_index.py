"""The book's indexes answer exactly what a full scan answers (issue 20).

`OrderBook.match` explains a bid that nothing can serve from per-shape counts
instead of visiting every ask.  Here random books (adds, replacements,
cancels, sweeps; expired and own asks; reputation floors and back-off) are
matched both ways: the book's answer against `matching.match` over a
brute-force reference list kept by the test, sorted by price, then time, then
arrival.  Candidates, their order, counts and explanation must be equal."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from synord.protocols.orders import Ask, Bid, Cancel
from synord.market.book import OrderBook
from synord.market.matching import match
from synord.market.router import PeerInfo

NOW = 1_700_000_000_000
PEERS = ("P0", "P1", "P2", "P3", "P4")
REPUTATION = {"P0": 0.9, "P1": 0.2, "P2": None, "P3": 0.6}

# few values each, and bids that often pass every static constraint: shapes
# that "might pass" are where the index must hand over to the scan
shapes = st.fixed_dictionaries({
    "runtimes": st.sampled_from((("wasm",), ("wasm", "container"), ("wasm", "container"), ("container",))),
    "memory": st.sampled_from((1 << 30, 4 << 30)),
    "cores": st.sampled_from((1.0, 8.0)),
    "gpus": st.sampled_from((0, 0, 1)),
    "gpu_class": st.sampled_from((None, None, "h100")),
    "region": st.sampled_from((None, None, "eu")),
    "max_duration_s": st.sampled_from((60, 3600, 3600)),
    "preemptible": st.sampled_from((False, False, True)),
})
prices = st.sampled_from((0.5, 1.0, 1.5, 2.0, 3.0))
expiries = st.sampled_from((NOW - 1, NOW + 1, NOW + 1_500, NOW + 60_000))

add_op = st.tuples(st.just("add"), st.integers(0, 40), st.sampled_from(PEERS), shapes, prices,
                   expiries, st.integers(0, 5))
cancel_op = st.tuples(st.just("cancel"), st.integers(0, 40), st.sampled_from(PEERS))
expire_op = st.tuples(st.just("expire"), st.sampled_from((NOW - 1_000, NOW, NOW + 1_000)))
ops = st.lists(st.one_of(add_op, add_op, add_op, cancel_op, expire_op), max_size=60)

bids = st.fixed_dictionaries({
    "runtime": st.sampled_from(("wasm", "wasm", "container", "microvm")),
    "memory": st.sampled_from((0, 0, 2 << 30, 8 << 30)),
    "cores": st.sampled_from((1.0, 1.0, 4.0, 16.0)),
    "gpus": st.sampled_from((0, 0, 1)),
    "gpu_class": st.sampled_from((None, "h100")),
    "region": st.sampled_from((None, None, "eu")),
    "duration_s": st.sampled_from((30, 30, 600)),
    "preemptible_ok": st.sampled_from((True, True, False)),
    "max_price": st.sampled_from((0.4, 0.5, 1.0, 1.2, 2.0, 10.0)),
    "min_reputation": st.sampled_from((0.0, 0.0, 0.5)),
})
match_args = st.fixed_dictionaries({
    "exclude_peers": st.sets(st.sampled_from(PEERS), max_size=2).map(tuple),
    "per_peer": st.sampled_from((0, 1)),
    "backed_off": st.sets(st.sampled_from(PEERS), max_size=2),
    "shortlist": st.sampled_from((1, 5)),
})


def _ask(i: int, peer: str, shape: dict, price: float, expires: int, ts: int, seq: int) -> Ask:
    return Ask(id=f"a{i}", seq=seq, resource_class="cpu", price=price, expires=expires, peer=peer, ts=ts,
               **shape)


def _replay(operations) -> tuple[OrderBook, dict]:
    """The book after ``operations``, and the test's own model of its asks:
    key -> (ask, arrival number)."""
    book = OrderBook(max_orders=10_000, max_per_peer=10_000, max_asks_per_peer=10_000)
    model: dict[tuple, tuple[Ask, int]] = {}
    seqs: dict[tuple, int] = {}
    for n, op in enumerate(operations):
        if op[0] == "add":
            _, i, peer, shape, price, expires, ts = op
            key = ("ask", peer, f"a{i}")
            seqs[key] = seqs.get(key, 0) + 1
            a = _ask(i, peer, shape, price, expires, ts, seqs[key])
            got = book.add(a, NOW - 1_000)
            assert got == ("expired" if expires <= NOW - 1_000 else "replaced" if key in model else "added")
            if got != "expired":
                model[key] = (a, n)
        elif op[0] == "cancel":
            _, i, peer = op
            key = ("ask", peer, f"a{i}")
            seqs[key] = seqs.get(key, 0) + 1
            assert book.cancel(Cancel(f"a{i}", "cpu", "ask", seqs[key], peer)) == (key in model)
            model.pop(key, None)
        else:
            swept = book.expire(op[1])
            gone = [k for k, (a, _) in model.items() if a.expires <= op[1]]
            assert swept == len(gone)
            for k in gone:
                del model[k]
    return book, model


def _same(a, b) -> None:
    assert [c.ask.id + c.ask.peer for c in a.candidates] == [c.ask.id + c.ask.peer for c in b.candidates]
    assert a.to_json() == b.to_json()
    assert a.explain() == b.explain()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.lists(st.tuples(bids, match_args, st.sampled_from((NOW - 500, NOW, NOW + 1_000))),
                     min_size=1, max_size=4))
def test_indexed_match_equals_brute_force(operations, queries):
    book, model = _replay(operations)
    reference = [a for a, _ in sorted(model.values(), key=lambda an: (an[0].price, an[0].ts, an[1]))]
    assert list(book.asks("cpu")) == reference
    info = lambda peer: PeerInfo(reputation=REPUTATION.get(peer))
    for b, kw, now in queries:
        bid = Bid(id="b", seq=1, resource_class="cpu", deadline=NOW, expires=NOW + 60_000, peer="C", **b)
        args = dict(now=now, peer_info=info, exclude_peers=kw["exclude_peers"], per_peer=kw["per_peer"],
                    shortlist=kw["shortlist"], skip_peer=kw["backed_off"].__contains__)
        _same(book.match(bid, **args), match(bid, reference, presorted=True, **args))


# asks that differ only in price and owner, and bids every shape can serve
# statically: the index decides on each shape's cheapest price alone
plain = st.sampled_from(({"runtimes": ("wasm",), "memory": 1 << 30, "cores": 1.0},
                         {"runtimes": ("wasm",), "memory": 1 << 30, "cores": 2.0}))
price_ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 15), st.sampled_from(PEERS), plain, prices, expiries,
              st.integers(0, 3)),
    cancel_op.filter(lambda op: op[1] <= 15), expire_op), max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(price_ops, st.lists(st.tuples(prices, st.sets(st.sampled_from(PEERS), max_size=1).map(tuple)),
                           min_size=1, max_size=4))
def test_indexed_price_exclusion_equals_brute_force(operations, queries):
    book, model = _replay(operations)
    reference = [a for a, _ in sorted(model.values(), key=lambda an: (an[0].price, an[0].ts, an[1]))]
    for max_price, own in queries:
        bid = Bid(id="b", seq=1, resource_class="cpu", cores=1.0, memory=0, runtime="wasm", duration_s=30,
                  max_price=max_price - 0.25, deadline=NOW, expires=NOW + 60_000, peer="C")
        for b in (bid, Bid(**{**{f: getattr(bid, f) for f in bid.__slots__}, "max_price": max_price})):
            _same(book.match(b, NOW, exclude_peers=own), match(b, reference, now=NOW, presorted=True,
                                                                 exclude_peers=own))


def test_an_unservable_bid_is_answered_from_the_index_and_counts_every_ask():
    """A big book: the index answers (not the scan), with the scan's counts,
    including expired asks not yet swept and our own asks."""
    book = OrderBook(max_orders=50_000, max_per_peer=50_000, max_asks_per_peer=50_000)
    reference = []
    for i in range(20_000):
        a = Ask(id=f"a{i}", seq=1, resource_class="cpu", cores=float(1 << (i % 4)), memory=(1 + i % 3) << 30,
                price=0.5 + (i % 7) / 4, expires=NOW - 5 if i % 1000 == 0 else NOW + 60_000,
                runtimes=(("wasm",), ("wasm", "container"))[i % 2], peer="ME" if i % 500 == 1 else f"P{i % 97}",
                ts=i)
        assert book.add(a, NOW - 10) == "added"
        reference.append(a)
    reference.sort(key=lambda a: (a.price, a.ts))
    for needs in (dict(cores=64.0, max_price=9.0), dict(cores=1.0, max_price=0.1),
                  dict(cores=1.0, runtime="microvm", max_price=9.0)):
        kw = dict(runtime="wasm", memory=1 << 30, duration_s=60) | needs
        bid = Bid(id="b", seq=1, resource_class="cpu", deadline=NOW, expires=NOW + 60_000, peer="C", **kw)
        own = frozenset({"ME"})
        assert book._unservable(bid, NOW, own) is not None, "the index did not answer"
        got = book.match(bid, NOW, exclude_peers=own)
        _same(got, match(bid, reference, now=NOW, presorted=True, exclude_peers=own))
        assert got.considered == 20_000 and got.excluded["expired"] == 20 and got.excluded["own"] > 0
