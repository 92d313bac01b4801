"""Back-off for providers that do not answer a proposal (sans-IO, unix ms).

A provider that lets a proposal time out is skipped by matching until its
back-off passes: ``base_ms`` after the first silence, doubling per further
silence up to ``max_ms``.  An agreement clears it.  Kept across placement
passes (one object per daemon); the silences also count against the peer's
reputation in the ledger, which is persisted.  Bounded: the oldest entries go
first past ``max_peers``.
"""

from __future__ import annotations

from collections import OrderedDict


class Backoff:
    def __init__(self, base_ms: int = 5_000, max_ms: int = 300_000, max_peers: int = 10_000):
        self.base_ms, self.max_ms, self.max_peers = base_ms, max_ms, max_peers
        self._peers: OrderedDict[str, tuple[int, int]] = OrderedDict()  # peer -> (silences, until)

    def failed(self, peer: str, now: int) -> int:
        """One more silence from ``peer``; returns when it may be tried again."""
        n = self._peers.pop(peer, (0, 0))[0] + 1
        until = now + min(self.max_ms, self.base_ms * 2 ** min(n - 1, 30))
        self._peers[peer] = (n, until)
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)
        return until

    def succeeded(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def blocked(self, peer: str, now: int) -> bool:
        entry = self._peers.get(peer)
        return entry is not None and now < entry[1]

    def to_json(self, now: int) -> dict[str, dict[str, int]]:
        return {p: {"silences": n, "retry_in_ms": max(0, until - now)} for p, (n, until) in self._peers.items()}
