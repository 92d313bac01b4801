"""Router score: how good a placement on an ask's peer would be.

score = sum(weight_i * component_i) / sum(weights), every component in [0, 1]
(higher is better):

* cost        1 - price / bid.max_price (free = 1, at the limit = 0)
* latency     ref / (ref + rtt_ms); unknown rtt = 0.5
* capability  perf / (perf + 1) from the ask's measured throughput per unit
              (1.0 = reference machine); unknown = 0.5
* reputation  from the ledger, 0..1; unknown peer = 0.5 (neutral prior)
* load        1 - provider utilisation announced in the ask
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from protocols.orders import Ask, Bid


@dataclass(frozen=True)
class RouterWeights:
    cost: float = 0.4
    latency: float = 0.15
    capability: float = 0.15
    reputation: float = 0.2
    load: float = 0.1

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


PeerLookup = Callable[[str], PeerInfo]
UNKNOWN = PeerInfo()


class Router:
    def __init__(self, weights: RouterWeights | None = None, latency_ref_ms: float = 50.0):
        self.weights = weights or RouterWeights()
        self.latency_ref_ms = latency_ref_ms
        w = self.weights
        self._pairs = (("cost", w.cost), ("latency", w.latency), ("capability", w.capability),
                       ("reputation", w.reputation), ("load", w.load))
        self._total = sum(v for _, v in self._pairs)

    def components(self, ask: Ask, bid: Bid, info: PeerInfo = UNKNOWN) -> dict[str, float]:
        cost = 1.0 if bid.max_price <= 0 else max(0.0, 1.0 - ask.price / bid.max_price)
        latency = 0.5 if info.rtt_ms is None else self.latency_ref_ms / (self.latency_ref_ms + max(0.0, info.rtt_ms))
        capability = 0.5 if ask.perf is None else ask.perf / (ask.perf + 1.0)
        reputation = 0.5 if info.reputation is None else min(1.0, max(0.0, info.reputation))
        load = 1.0 - min(1.0, max(0.0, ask.load))
        return {"cost": cost, "latency": latency, "capability": capability,
                "reputation": reputation, "load": load}

    def score(self, ask: Ask, bid: Bid, info: PeerInfo = UNKNOWN) -> float:
        c = self.components(ask, bid, info)
        return sum(w * c[name] for name, w in self._pairs) / self._total
