"""Router score: how good a placement on an ask's peer would be.

score = sum(weight_i * component_i) / sum(weights), every component in [0, 1]
(higher is better):

* cost        1 - price / bid.max_price (free = 1, at the limit = 0)
* latency     ref / (ref + rtt_ms); unknown rtt = 0.5
* capability  perf / (perf + 1) from the ask's measured throughput per unit
              (1.0 = reference machine); unknown = 0.5
* reputation  from the ledger, 0..1; unknown peer = 0.5 (neutral prior)
* load        1 - provider utilisation announced in the ask
* spread      1 / (1 + ours), ours = our proposals and leases there now plus
              our recent placements there (decayed): the announced load lags
              by up to half an ask TTL (and is the host's, whoever loads it), so
              without this a soak of jobs all lands on the one best-scored
              provider
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from synord.protocols.orders import Ask, Bid


@dataclass(frozen=True)
class RouterWeights:
    cost: float = 0.4
    latency: float = 0.15
    capability: float = 0.15
    reputation: float = 0.2
    load: float = 0.1
    spread: float = 0.25

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"router weight {f.name} must be >= 0")
        if sum(getattr(self, f.name) for f in fields(self)) <= 0:
            raise ValueError("at least one router weight must be > 0")


@dataclass(frozen=True)
class PeerInfo:
    rtt_ms: float | None = None
    reputation: float | None = None
    ours: float = 0.0  # our placements on this peer, live and recent (decayed)


PeerLookup = Callable[[str], PeerInfo]
UNKNOWN = PeerInfo()


class Router:
    def __init__(self, weights: RouterWeights | None = None, latency_ref_ms: float = 50.0):
        self.weights = weights or RouterWeights()
        self.latency_ref_ms = latency_ref_ms
        w = self.weights
        self._total = w.cost + w.latency + w.capability + w.reputation + w.load + w.spread

    def components(self, ask: Ask, bid: Bid, info: PeerInfo = UNKNOWN) -> dict[str, float]:
        return self.rate(ask, bid, info)[1]

    def score(self, ask: Ask, bid: Bid, info: PeerInfo = UNKNOWN) -> float:
        return self.rate(ask, bid, info)[0]

    def rate(self, ask: Ask, bid: Bid, info: PeerInfo = UNKNOWN) -> tuple[float, dict[str, float]]:
        """(score, components) in one pass: this runs for every shortlisted ask,
        hence conditionals rather than min/max calls."""
        mp, price = bid.max_price, ask.price
        cost = 1.0 if mp <= 0 else (1.0 - price / mp if price < mp else 0.0)
        rtt, rep, perf, ld = info.rtt_ms, info.reputation, ask.perf, ask.load
        ref = self.latency_ref_ms
        latency = 0.5 if rtt is None else (ref / (ref + rtt) if rtt > 0 else 1.0)
        capability = 0.5 if perf is None else perf / (perf + 1.0)
        reputation = 0.5 if rep is None else (0.0 if rep < 0 else 1.0 if rep > 1 else rep)
        load = 1.0 if ld <= 0 else (0.0 if ld >= 1 else 1.0 - ld)
        spread = 1.0 / (1.0 + info.ours) if info.ours > 0 else 1.0
        w = self.weights
        score = (w.cost * cost + w.latency * latency + w.capability * capability
                 + w.reputation * reputation + w.load * load + w.spread * spread) / self._total
        return score, {"cost": cost, "latency": latency, "capability": capability,
                       "reputation": reputation, "load": load, "spread": spread}


class RecentPlacements:
    """How many of our placements went to each peer lately, decaying with a
    half-life (unix ms): the ``ours`` of `PeerInfo`, together with what is in
    flight.  Bounded: past ``max_peers`` the faintest is forgotten."""

    def __init__(self, half_life_ms: int = 120_000, max_peers: int = 10_000):
        self.half_life_ms, self.max_peers = half_life_ms, max_peers
        self._peers: dict[str, tuple[float, int]] = {}  # peer -> (value, at)

    def get(self, peer: str, now: int) -> float:
        value, at = self._peers.get(peer, (0.0, now))
        return value * 0.5 ** (max(0, now - at) / self.half_life_ms)

    def add(self, peer: str, now: int) -> None:
        self._peers[peer] = (self.get(peer, now) + 1.0, now)
        if len(self._peers) > self.max_peers:
            del self._peers[min(self._peers, key=lambda p: self.get(p, now))]
