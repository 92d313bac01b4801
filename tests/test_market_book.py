"""Order bodies and the local book share: replacement, cancel, expiry, bounds, JSON."""

import json

import pytest

from synord.protocols.envelope import EnvelopeValidator, decode, seal
from synord.protocols.identity import Identity
from synord.protocols.orders import Ask, Bid, Cancel, OrderError, order_from_envelope
from synord.market.book import OrderBook

NOW = 1_700_000_000_000


def ask(id="a1", peer="P1", price=1.0, seq=1, ts=0, expires=NOW + 60_000, cls="cpu", **kw):
    base = dict(cores=4.0, memory=8 << 30, runtimes=("wasm", "container"))
    base.update(kw)
    return Ask(id=id, seq=seq, resource_class=cls, price=price, expires=expires, peer=peer, ts=ts, **base)


def bid(id="b1", peer="C1", max_price=2.0, seq=1, ts=0, expires=NOW + 60_000, **kw):
    base = dict(resource_class="cpu", cores=2.0, memory=1 << 30, runtime="wasm", duration_s=600,
                deadline=NOW + 30_000)
    base.update(kw)
    return Bid(id=id, seq=seq, max_price=max_price, expires=expires, peer=peer, ts=ts, **base)


def test_order_roundtrip_through_envelope():
    ident = Identity.generate()
    a = ask(gpu_class=None, region="eu-west")
    env = decode(seal(ident, "ask", a.to_body(), now=NOW).encode())
    got = order_from_envelope(env)
    assert got.peer == ident.peer_id and got.ts == NOW
    assert (got.price, got.cores, got.runtimes, got.region) == (1.0, 4.0, ("wasm", "container"), "eu-west")
    b = order_from_envelope(decode(seal(ident, "bid", bid().to_body(), now=NOW).encode()))
    assert b.runtime == "wasm" and b.max_price == 2.0
    c = order_from_envelope(decode(seal(ident, "cancel", Cancel("a1", "cpu", "ask", 3).to_body()).encode()))
    assert (c.id, c.side, c.seq, c.peer) == ("a1", "ask", 3, ident.peer_id)


@pytest.mark.parametrize("field,value,msg", [
    ("price", -1.0, "price"), ("price", float("nan"), "price"), ("cores", "4", "cores"),
    ("runtimes", ["docker"], "unknown runtime"), ("runtimes", [], "runtimes"),
    ("class", "CPU!", "class"), ("id", "x" * 65, "id"), ("seq", True, "seq"),
    ("memory", -5, "memory"), ("load", 1.5, "load"),
])
def test_ask_body_rejected(field, value, msg):
    body = ask().to_body()
    body[field] = value
    with pytest.raises(OrderError, match=msg):
        Ask.from_body(body)


def test_order_size_bound_and_validator_rejects_bad_body():
    body = ask().to_body()
    body.update({f"x{i}": "y" * 60 for i in range(20)})
    with pytest.raises(OrderError, match="too many fields|larger than"):
        Ask.from_body(body)
    ident = Identity.generate()
    bad = ask().to_body()
    bad["price"] = -3.0
    v = EnvelopeValidator()
    assert v.check(seal(ident, "ask", bad).encode()).reason == "bad_body"
    b = bid().to_body()
    del b["runtime"]
    assert v.check(seal(ident, "bid", b).encode()).reason == "bad_body"


def test_replacement_by_higher_seq_only():
    book = OrderBook()
    assert book.add(ask(price=3.0, seq=5), NOW) == "added"
    assert book.add(ask(price=1.0, seq=4), NOW) == "stale_seq"
    assert book.add(ask(price=1.0, seq=5), NOW) == "stale_seq"
    assert book.best_ask("cpu").price == 3.0
    assert book.add(ask(price=2.0, seq=6), NOW) == "replaced"
    assert len(book) == 1 and book.best_ask("cpu").price == 2.0
    assert book.supply_demand("cpu") == (4.0, 0.0)


def test_cancel_and_tombstone_blocks_late_older_copy():
    book = OrderBook()
    book.add(ask(seq=2), NOW)
    assert not book.cancel(Cancel("a1", "cpu", "ask", 1, "P1"))  # older cancel: no effect
    assert len(book) == 1
    assert book.cancel(Cancel("a1", "cpu", "ask", 2, "P1"))
    assert len(book) == 0
    assert book.add(ask(seq=2), NOW) == "cancelled"  # gossip echo of the cancelled order
    assert book.add(ask(seq=3), NOW) == "added"     # a genuinely newer one is fine
    assert not book.cancel(Cancel("a1", "cpu", "ask", 9, "OTHER"))  # another peer cannot cancel it
    assert len(book) == 1


def test_expiry():
    book = OrderBook()
    assert book.add(ask(expires=NOW), NOW) == "expired"
    book.add(ask(id="short", expires=NOW + 10), NOW)
    book.add(ask(id="long", expires=NOW + 1000), NOW)
    book.add(ask(id="long", seq=2, expires=NOW + 5), NOW)  # replaced: the old expiry entry is stale
    assert book.best_ask("cpu", now=NOW + 20) is None or book.best_ask("cpu", now=NOW + 20).id != "short"
    assert book.expire(NOW + 20) == 2
    assert len(book) == 0 and book.supply_demand("cpu") == (0.0, 0.0)


def test_price_time_priority_best_bid_ask_and_depth():
    book = OrderBook()
    book.add(ask("late", price=1.0, ts=20), NOW)
    book.add(ask("early", peer="P2", price=1.0, ts=10), NOW)
    book.add(ask("cheap", peer="P3", price=0.5, ts=30), NOW)
    assert [a.id for a in book.asks("cpu")] == ["cheap", "early", "late"]
    book.add(bid("lo", max_price=1.0, ts=1), NOW)
    book.add(bid("hi", peer="C2", max_price=3.0, ts=2), NOW)
    assert book.best_bid("cpu").id == "hi"
    d = book.depth("cpu")
    assert d["asks"] == [[0.5, 4.0, 1], [1.0, 8.0, 2]]
    assert d["bids"] == [[3.0, 2.0, 1], [1.0, 2.0, 1]]


def test_peer_quota_and_global_bound_evicts_least_competitive():
    book = OrderBook(max_orders=3, max_per_peer=2)
    assert book.add(ask("x1", peer="flood", price=1), NOW) == "added"
    assert book.add(ask("x2", peer="flood", price=1), NOW) == "added"
    assert book.add(ask("x3", peer="flood", price=1), NOW) == "peer_quota"
    assert book.add(ask("y1", peer="P2", price=5.0), NOW) == "added"
    # full: a better ask evicts the worst one (price 5) ...
    assert book.add(ask("z1", peer="P3", price=0.1), NOW) == "added"
    assert book.get("ask", "P2", "y1") is None and book.evicted == 1 and len(book) == 3
    # ... a worse one than everything present is refused
    assert book.add(ask("z2", peer="P4", price=9.0), NOW) == "book_full"


def test_expired_orders_are_purged_before_live_ones_are_evicted():
    book = OrderBook(max_orders=2)
    book.add(ask("e", peer="P1", price=0.01, expires=NOW + 1), NOW)
    book.add(ask("k", peer="P2", price=0.1), NOW)
    assert book.add(ask("n", peer="P3", price=9.0), NOW + 5) == "added"
    assert {a.id for a in book.asks("cpu")} == {"k", "n"} and book.evicted == 0


def test_to_json_matches_cli_contract():
    book = OrderBook()
    book.add(ask(price=1.5), NOW)
    book.add(bid(max_price=1.0), NOW)
    book.add(ask("g", cls="gpu", gpus=1, gpu_class="nvidia-h100", price=3.0), NOW)
    book.record_trade("cpu", 1.25, 2.0, NOW, "ab12")
    doc = json.loads(json.dumps(book.to_json(now=NOW)))
    assert set(doc) == {"cpu", "gpu"}
    cpu = doc["cpu"]
    assert set(cpu) >= {"asks", "bids", "best_ask", "best_bid", "last_trade", "depth"}
    assert cpu["best_ask"] == 1.5 and cpu["best_bid"] == 1.0
    assert cpu["last_trade"]["price"] == 1.25
    assert cpu["asks"][0]["peer"] == "P1" and cpu["asks"][0]["price"] == 1.5
    only = book.to_json("gpu", now=NOW)
    assert list(only) == ["gpu"] and only["gpu"]["bids"] == [] and only["gpu"]["last_trade"] is None


def test_apply_gossip_envelopes():
    ident = Identity.generate()
    book = OrderBook()
    v = EnvelopeValidator()
    env = v.check(seal(ident, "ask", ask(seq=1).to_body(), now=NOW).encode(), now=NOW)
    assert book.apply(env, NOW) == "added" and book.best_ask("cpu").peer == ident.peer_id
    env = v.check(seal(ident, "cancel", Cancel("a1", "cpu", "ask", 1).to_body(), now=NOW).encode(), now=NOW)
    assert book.apply(env, NOW) == "cancelled" and len(book) == 0
    assert book.apply(env, NOW) == "ignored"


def test_gossip_order_is_parsed_once_and_completed_from_its_envelope():
    """decode() parses the body to check it; the book takes that very order
    (sender and time filled in from the envelope) instead of parsing again."""
    ident = Identity.generate()
    env = decode(seal(ident, "ask", ask(price=1.5).to_body(), now=NOW).encode())
    assert isinstance(env.parsed, Ask) and env.parsed.peer == ""
    got = order_from_envelope(env)
    assert got is env.parsed and (got.peer, got.ts, got.price) == (ident.peer_id, NOW, 1.5)
    assert order_from_envelope(env) is got and (got.peer, got.ts) == (ident.peer_id, NOW)
    book = OrderBook()
    assert book.apply(env, NOW) == "added"
    assert book.apply(env, NOW) == "stale_seq" and len(book) == 1  # the same envelope again
    # an envelope sealed here was never decoded: its body is parsed
    mine = seal(ident, "ask", ask(id="own", price=2.0).to_body(), now=NOW + 1)
    assert mine.parsed is None and book.apply(mine, NOW) == "added"
    assert book.get("ask", ident.peer_id, "own").ts == NOW + 1
    other = Identity.generate()
    c = order_from_envelope(decode(seal(other, "cancel", Cancel("own", "cpu", "ask", 9).to_body()).encode()))
    assert c.peer == other.peer_id and not book.cancel(c)  # not its order


def test_expiry_index_compacts_and_stays_exact():
    """Replaced and removed orders leave stale expiry entries; past a bound the
    index is rebuilt, a sweep of many orders at once keeps the count of stale
    entries exact, and nothing is lost or swept twice."""
    book = OrderBook(max_orders=10_000, max_per_peer=10_000, max_asks_per_peer=10_000)
    for i in range(100):
        book.add(ask(f"live{i}", expires=NOW + 60_000), NOW)
    for seq in range(1, 3000):  # one ask replaced 2999 times: 2998 stale entries
        assert book.add(ask("r", seq=seq, expires=NOW + 30_000 + seq), NOW) in ("added", "replaced")
    assert len(book) == 101 and book._expiry_stale <= len(book) + 1024
    for i in range(2000):
        book.add(ask(f"short{i}", peer=f"S{i % 7}", expires=NOW + 100 + i % 3), NOW)
    # one sweep removes 2000 orders (a sweep that counted them stale before taking
    # their entries out would rebuild the index under its own feet)
    assert book.expire(NOW + 1_000) == 2000
    assert len(book) == 101 and {a.id for a in book.asks("cpu")} == {"r"} | {f"live{i}" for i in range(100)}
    assert book.expire(NOW + 40_000) == 1 and book.expire(NOW + 60_000) == 100
    assert len(book) == 0 and not book._expiry and book._expiry_stale == 0
    assert book.supply_demand("cpu") == (0.0, 0.0)
