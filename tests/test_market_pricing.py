"""Pricing policy (cost, demand clamps, fee, preemptible discount) and reservations."""

import pytest

from synord.protocols.orders import Ask
from synord.market.book import OrderBook
from synord.market.pricing import GIB, PricingPolicy, demand_multiplier, derive_asks, unit_cost, unit_price
from synord.market.reservations import CapacityPool, InsufficientCapacity, ReservationError

from test_market_book import NOW, bid

CAP = {"cpus": 4.0, "memory_bytes": 8 * GIB, "gpus": 0, "runtimes": ["wasm", "container"]}


def test_unit_cost_is_power_plus_depreciation():
    p = PricingPolicy(electricity_per_kwh=0.5, watts_per_core=10, depreciation_per_core_hour=0.01,
                      depreciation_per_gib_hour=0.001)
    assert unit_cost(p, "cpu", 2.0) == pytest.approx(0.010 * 0.5 + 0.01 + 0.002)
    g = PricingPolicy(electricity_per_kwh=0.5, watts_per_gpu=300, depreciation_per_gpu_hour=0.1,
                      depreciation_per_gib_hour=0)
    assert unit_cost(g, "gpu", 80.0) == pytest.approx(0.15 + 0.1)


def test_demand_multiplier_clamps():
    p = PricingPolicy()
    assert demand_multiplier(p, 0, 0) == 1.0
    assert demand_multiplier(p, 1000, 0) == 0.5    # glut: floor
    assert demand_multiplier(p, 0, 1000) == 2.0    # scarcity: ceiling
    assert demand_multiplier(p, 3, 5) == pytest.approx(1.5)
    assert demand_multiplier(PricingPolicy(demand_min=0.8, demand_max=1.2), 0, 1000) == 1.2
    with pytest.raises(ValueError):
        PricingPolicy(demand_min=1.5)


def test_fee_margin_and_preemptible_discount():
    p = PricingPolicy(margin=0.0, protocol_fee=0.0, preemptible_discount=0.3)
    base = unit_price(p, "cpu", 2.0)
    assert base == pytest.approx(unit_cost(p, "cpu", 2.0))
    assert unit_price(p, "cpu", 2.0, preemptible=True) == pytest.approx(base * 0.7)
    fee = PricingPolicy(margin=0.0, protocol_fee=0.05)
    assert unit_price(fee, "cpu", 2.0) == pytest.approx(base * 1.05)
    assert unit_price(p, "cpu", 2.0, demand=2.0) == pytest.approx(base * 2)


def test_derive_asks_from_capacity_and_book():
    p = PricingPolicy(region="eu-west")
    asks = derive_asks(CAP, p, now=NOW)
    assert len(asks) == 1 and asks[0].resource_class == "cpu"
    a = asks[0]
    assert (a.cores, a.memory, a.runtimes, a.seq, a.region) == (4.0, 8 * GIB, ("wasm", "container"), NOW, "eu-west")
    assert a.expires == NOW + p.ttl_ms
    assert a.price == pytest.approx(unit_price(p, "cpu", 2.0), rel=1e-6)
    Ask.from_body(a.to_body())  # valid on the wire
    # demand in the book raises the price, to the clamp
    book = OrderBook()
    for i in range(50):
        book.add(bid(f"b{i}", peer=f"C{i}"), NOW)
    hot = derive_asks(CAP, p, now=NOW, supply_demand=book.supply_demand)[0]
    assert hot.price == pytest.approx(a.price * 2.0, rel=1e-6)
    cheap = derive_asks(CAP, p, now=NOW, preemptible=True)[0]
    assert cheap.preemptible and cheap.price == pytest.approx(a.price * 0.7, rel=1e-6)


def test_derive_gpu_ask_and_nothing_without_runtimes():
    cap = dict(CAP, gpus=2, gpu_class="nvidia-h100")
    asks = {a.resource_class: a for a in derive_asks(cap, PricingPolicy(), now=NOW)}
    assert set(asks) == {"cpu", "gpu"}
    assert asks["gpu"].gpus == 2 and asks["gpu"].gpu_class == "nvidia-h100" and asks["gpu"].price > asks["cpu"].price
    assert derive_asks(dict(CAP, runtimes=[]), PricingPolicy(), now=NOW) == []


def test_reservation_exactly_one_of_ten():
    pool = CapacityPool({"cpus": 4, "memory_bytes": 8 * GIB})
    got, refused = [], []
    for i in range(10):
        try:
            got.append(pool.reserve(f"c{i}", {"cpus": 4, "memory_bytes": GIB}, NOW, 5_000))
        except InsufficientCapacity as exc:
            refused.append(exc)
    assert len(got) == 1 and len(refused) == 9
    assert all(e.resource == "cpus" and "need 4, free 0" in str(e) for e in refused)


def test_reservation_expiry_commit_release_and_vanishing_capacity():
    pool = CapacityPool({"cpus": 2, "memory_bytes": GIB})
    pool.reserve("a", {"cpus": 2}, NOW, 1_000)
    with pytest.raises(InsufficientCapacity):
        pool.reserve("b", {"cpus": 1}, NOW + 999, 1_000)
    pool.reserve("b", {"cpus": 1}, NOW + 1_000, 1_000)  # "a" expired: capacity is back
    assert pool.get("a") is None
    pool.commit("b", NOW + 100_000)
    assert pool.expire(NOW + 50_000) == [] and pool.get("b").committed
    with pytest.raises(ReservationError):
        pool.commit("nope", NOW)
    assert pool.release("b") and not pool.release("b")
    pool.set_capacity({"cpus": 0, "memory_bytes": 0})
    with pytest.raises(InsufficientCapacity, match="cpus"):
        pool.reserve("c", {"cpus": 1}, NOW, 1_000)
