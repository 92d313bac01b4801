"""The consumer's spending cap over a sliding period (sans-IO, unix ms).

Each agreement commits its worst case (price * units * duration / 3600) when
we countersign it; its receipt replaces that with the amount actually billed.
A new agreement is countersigned only if what is committed within the period
plus its worst case stays under the cap.  Receipts are persisted in the
ledger, so a restarted daemon reloads the period's spending from there
(`load`).
"""

from __future__ import annotations

from collections import OrderedDict

from synord.protocols.negotiation import Terms
from synord.protocols.receipts import amount_for


def worst_case(terms: Terms) -> float:
    return amount_for(terms.price, terms.units, terms.duration_s)


class SpendingCap:
    def __init__(self, cap: float, period_ms: int, max_entries: int = 100_000):
        self.cap, self.period_ms, self.max_entries = cap, period_ms, max_entries
        self._spent: OrderedDict[bytes, tuple[int, float]] = OrderedDict()  # aid -> (ts, amount)

    def spent(self, now: int) -> float:
        since = now - self.period_ms
        return sum(a for ts, a in self._spent.values() if ts > since)

    def refusal(self, terms: Terms, now: int) -> str | None:
        """Why countersigning ``terms`` would break the cap, or None."""
        spent, more = self.spent(now), worst_case(terms)
        if spent + more > self.cap:
            return (f"spending cap: {spent:g} committed + {more:g} for this lease > {self.cap:g} "
                    f"per {self.period_ms // 1000}s")
        return None

    def commit(self, terms: Terms, now: int) -> None:
        self._put(terms.aid, now, worst_case(terms))

    def settle(self, aid: bytes, amount: float, ts: int) -> None:
        """The receipt's amount replaces the worst case (dated when it was committed)."""
        self._put(aid, self._spent.get(aid, (ts, 0.0))[0], amount)

    def _put(self, aid: bytes, ts: int, amount: float) -> None:
        self._spent.pop(aid, None)
        self._spent[aid] = (ts, amount)
        while len(self._spent) > self.max_entries:
            self._spent.popitem(last=False)
