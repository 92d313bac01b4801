"""Match a bid against asks: constraints, then price-time, then router score.

1. Constraint filter, checked in the order of `CONSTRAINTS`; an ask is
   charged to the *first* constraint it fails, so the explanation of an
   empty result says exactly how many asks each constraint excluded.
2. Price-time priority: the first ``shortlist`` asks that pass, cheapest
   first, earliest on equal price.  With a presorted input (the book's), the
   scan stops at the first ask over the bid's limit once one has passed.
3. Router score re-ranks that shortlist (stable: equal scores keep
   price-time order).  The consumer tries candidates in this order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from synord.protocols.orders import Ask, Bid, cuda_tuple

from .router import UNKNOWN, PeerInfo, PeerLookup, Router

CONSTRAINTS = ("expired", "own", "runtime", "memory", "cores", "accelerator", "gpu_memory", "cuda", "region",
               "reputation", "duration", "preemptible", "price")


@dataclass(slots=True)
class Candidate:
    ask: Ask
    score: float
    components: dict[str, float]


@dataclass
class MatchResult:
    bid: Bid
    candidates: list[Candidate]
    considered: int
    excluded: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.candidates)

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def explain(self) -> str:
        if self.candidates:
            c = self.candidates[0]
            return (f"{len(self.candidates)} candidate(s); best {c.ask.peer[:16]}/{c.ask.id} "
                    f"at {c.ask.price:g} per unit-hour (score {c.score:.3f})")
        if not self.considered:
            return f"no ask of class {self.bid.resource_class!r} in the book"
        why = ", ".join(f"{name} excluded {n} ({_need(self.bid, name)})"
                        for name, n in self.excluded.items() if n)
        return f"no ask matched: {self.considered} considered; {why}"

    def to_json(self) -> dict[str, Any]:
        return {"considered": self.considered, "excluded": dict(self.excluded),
                "candidates": [{"peer": c.ask.peer, "id": c.ask.id, "seq": c.ask.seq,
                                "price": c.ask.price, "score": c.score} for c in self.candidates],
                "explanation": self.explain()}


def _need(bid: Bid, name: str) -> str:
    return {
        "expired": "ask expired", "own": "our own asks",
        "runtime": f"need runtime {bid.runtime}", "memory": f"need {bid.memory} bytes",
        "cores": f"need {bid.cores:g} cores",
        "accelerator": f"need {bid.gpus} x {bid.gpu_class or 'any'} accelerator",
        "gpu_memory": f"need {bid.gpu_memory} bytes on each GPU",
        "cuda": f"need CUDA compute capability >= {bid.cuda}",
        "region": f"need region {bid.region}", "reputation": f"need reputation >= {bid.min_reputation:g}",
        "duration": f"need {bid.duration_s}s", "preemptible": "bid refuses preemptible asks",
        "price": f"max {bid.max_price:g} per unit-hour",
        "peer_cap": "more asks from a provider already shortlisted",
        "backed_off": "provider did not answer recently",
    }[name]


def first_failed(ask: Ask, bid: Bid, now: int, info: PeerInfo, own: frozenset[str] = frozenset()) -> str | None:
    """Name of the first constraint ``ask`` fails for ``bid``, or None."""
    if ask.expires <= now:
        return "expired"
    if ask.peer in own:
        return "own"
    if bid.runtime not in ask.runtimes:
        return "runtime"
    if ask.memory < bid.memory:
        return "memory"
    if ask.cores < bid.cores:
        return "cores"
    if bid.gpus > 0 and (ask.gpus < bid.gpus or (bid.gpu_class is not None and ask.gpu_class != bid.gpu_class)):
        return "accelerator"
    if bid.gpus > 0 and bid.gpu_memory and (ask.gpu_memory or 0) < bid.gpu_memory:
        return "gpu_memory"
    if bid.gpus > 0 and bid.cuda and (ask.cuda is None or cuda_tuple(ask.cuda) < cuda_tuple(bid.cuda)):
        return "cuda"
    if bid.region is not None and ask.region != bid.region:
        return "region"
    if bid.min_reputation > 0 and (0.5 if info.reputation is None else info.reputation) < bid.min_reputation:
        return "reputation"
    if not ask.min_duration_s <= bid.duration_s <= ask.max_duration_s:
        return "duration"
    if ask.preemptible and not bid.preemptible_ok:
        return "preemptible"
    if ask.price > bid.max_price:
        return "price"
    return None


def match(bid: Bid, asks: Iterable[Ask], *, now: int, peer_info: PeerLookup | None = None,
          router: Router | None = None, shortlist: int = 5, presorted: bool = False,
          exclude_peers: Iterable[str] = (), per_peer: int = 0,
          skip_peer: Callable[[str], bool] | None = None) -> MatchResult:
    """``per_peer`` > 0 caps the shortlisted asks of one provider (so one peer's
    many cheap asks cannot fill it); ``skip_peer`` defers providers under
    back-off: they are shortlisted only when no other ask passes (a slow
    provider is still better than none)."""
    router = router or _DEFAULT_ROUTER
    own = frozenset(exclude_peers)
    if not presorted:
        asks = sorted(asks, key=lambda a: (a.price, a.ts))
    excluded = dict.fromkeys(CONSTRAINTS, 0)
    passed: list[tuple[Ask, PeerInfo]] = []
    considered = 0
    per: dict[str, int] = {}
    deferred: list[tuple[Ask, PeerInfo]] = []
    cls, max_price = bid.resource_class, bid.max_price
    for ask in asks:
        if ask.resource_class != cls:
            continue
        considered += 1
        if passed and presorted and ask.price > max_price:
            break  # the rest costs at least as much; counts only matter when nothing passed
        if per_peer and per.get(ask.peer, 0) >= per_peer:
            excluded["peer_cap"] = excluded.get("peer_cap", 0) + 1
            continue
        info = UNKNOWN if peer_info is None else peer_info(ask.peer)
        reason = first_failed(ask, bid, now, info, own)
        if reason is None and skip_peer is not None and skip_peer(ask.peer):
            reason = "backed_off"
            if len(deferred) < shortlist:
                deferred.append((ask, info))
        if reason is not None:
            excluded[reason] = excluded.get(reason, 0) + 1
            continue
        per[ask.peer] = per.get(ask.peer, 0) + 1
        passed.append((ask, info))
        if len(passed) >= shortlist:
            break
    if not passed:
        passed = deferred
    rate = router.rate
    cands = [Candidate(a, *rate(a, bid, i)) for a, i in passed]
    cands.sort(key=_neg_score)  # stable: ties keep price-time order
    return MatchResult(bid, cands, considered, excluded)


def _neg_score(c: Candidate) -> float:
    return -c.score


_DEFAULT_ROUTER = Router()
