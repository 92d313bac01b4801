"""This node's share of the order book.

Orders are keyed by (side, peer, order id).  Per resource class, asks are
kept sorted by (price, ts) and bids by (-max_price, ts): iterating a side is
price-time priority, and `matching` stops as soon as prices run past the
bid's limit.  Memory is bounded in two ways:

* a per-peer quota (one peer cannot fill the book), refused with
  ``peer_quota``, and a tighter one on asks (``max_asks_per_peer``): a
  provider needs one ask per resource class, and a peer flooding the book
  with cheap asks must not crowd out the consumer's candidates;
* a global cap: expired orders go first, then the least competitive order
  (the last one in price-time order) of the fullest class side is evicted; a
  new order that would itself be that least competitive one is refused with
  ``book_full``.

Cancels leave a bounded tombstone so that an older copy of the order arriving
late through gossip does not resurrect it.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left, insort
from itertools import chain
from operator import itemgetter
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from sortedcontainers import SortedList

from protocols.orders import Ask, Bid, Cancel, order_from_envelope

ADDED, REPLACED = "added", "replaced"
STALE, EXPIRED, CANCELLED, PEER_QUOTA, FULL = "stale_seq", "expired", "cancelled", "peer_quota", "book_full"


@dataclass(slots=True)
class Trade:
    price: float
    units: float
    ts: int
    agreement_id: str = ""


class _Side:
    """One side of one class: price levels, each in time order.

    Only a new price level touches the sorted list; an order at an existing
    level is a bisect into a short list.  Entries are (price key, ts, n, order)
    with price key = price for asks, -max_price for bids (best first).
    """
    __slots__ = ("prices", "levels", "units", "count")

    def __init__(self) -> None:
        self.prices = SortedList()
        self.levels: dict[float, list[tuple]] = {}
        self.units = 0.0
        self.count = 0

    def add(self, entry: tuple) -> None:
        p = entry[0]
        level = self.levels.get(p)
        if level is None:
            self.levels[p] = [entry[1:]]
            self.prices.add(p)
        else:
            insort(level, entry[1:])
        self.count += 1

    def remove(self, entry: tuple) -> None:
        p = entry[0]
        level = self.levels[p]
        del level[bisect_left(level, entry[1:3])]
        if not level:
            del self.levels[p]
            self.prices.remove(p)
        self.count -= 1

    def orders(self) -> Iterator:
        """Orders best first (price, then time), iterated at C speed."""
        return map(_ORDER, chain.from_iterable(map(self.levels.__getitem__, self.prices)))

    def worst(self) -> tuple:
        p = self.prices[-1]
        return (p, *self.levels[p][-1])


_ORDER = itemgetter(2)


class _ClassBook:
    __slots__ = ("asks", "bids", "last_trade")

    def __init__(self) -> None:
        self.asks = _Side()
        self.bids = _Side()
        self.last_trade: Trade | None = None


def _sort_key(order: Ask | Bid, n: int) -> tuple:
    price = order.price if order.side == "ask" else -order.max_price
    return (price, order.ts, n, order)


class OrderBook:
    def __init__(self, max_orders: int = 100_000, max_per_peer: int = 1_000,
                 max_tombstones: int = 100_000, max_asks_per_peer: int = 16):
        self.max_orders = max_orders
        self.max_per_peer = max_per_peer
        self.max_asks_per_peer = max_asks_per_peer
        self._asks_per_peer: Counter[str] = Counter()
        self.max_tombstones = max_tombstones
        self._classes: dict[str, _ClassBook] = {}
        self._by_key: dict[tuple[str, str, str], tuple] = {}  # key -> sort entry
        self._expiry: list[tuple[int, int, tuple[str, str, str]]] = []
        self._tombstones: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._per_peer: Counter[str] = Counter()
        self._n = itertools.count()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._by_key)

    # --- writes -------------------------------------------------------------

    def add(self, order: Ask | Bid, now: int) -> str:
        """Insert or replace; returns ``added``/``replaced`` or the refusal reason."""
        if order.expires <= now:
            return EXPIRED
        key = (order.side, order.peer, order.id)
        old = self._by_key.get(key)
        if old is not None and old[3].seq >= order.seq:
            return STALE
        if self._tombstones.get(key, -1) >= order.seq:
            return CANCELLED
        if old is not None:
            self._remove(key)
        elif self._per_peer[order.peer] >= self.max_per_peer or (
                order.side == "ask" and self._asks_per_peer[order.peer] >= self.max_asks_per_peer):
            return PEER_QUOTA
        entry = _sort_key(order, next(self._n))
        if len(self._by_key) >= self.max_orders and not self._make_room(entry, now):
            return FULL
        book = self._classes.get(order.resource_class)
        if book is None:
            book = self._classes[order.resource_class] = _ClassBook()
        side = book.asks if order.side == "ask" else book.bids
        side.add(entry)
        side.units += order.units
        self._by_key[key] = entry
        self._per_peer[order.peer] += 1
        if order.side == "ask":
            self._asks_per_peer[order.peer] += 1
        heapq.heappush(self._expiry, (order.expires, entry[2], key))
        if len(self._expiry) > 2 * len(self._by_key) + 1024:
            self._compact_expiry()
        return REPLACED if old is not None else ADDED

    def apply(self, env: Any, now: int) -> str:
        """An accepted ``ask``/``bid``/``cancel`` envelope from gossip -> the book.
        Returns ``added``/``replaced``/``cancelled``/``ignored`` or a refusal reason."""
        order = order_from_envelope(env)
        if isinstance(order, Cancel):
            return CANCELLED if self.cancel(order) else "ignored"
        return self.add(order, now)

    def cancel(self, cancel: Cancel) -> bool:
        """Remove (peer, id) if ``cancel.seq`` >= its seq; True when something was removed."""
        key = (cancel.side, cancel.peer, cancel.id)
        self._tombstones[key] = max(cancel.seq, self._tombstones.get(key, -1))
        self._tombstones.move_to_end(key)
        while len(self._tombstones) > self.max_tombstones:
            self._tombstones.popitem(last=False)
        entry = self._by_key.get(key)
        if entry is not None and entry[3].seq <= cancel.seq:
            self._remove(key)
            return True
        return False

    def expire(self, now: int) -> int:
        """Drop every order whose expiry is <= now; returns how many."""
        dropped = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, n, key = heapq.heappop(self._expiry)
            entry = self._by_key.get(key)
            if entry is not None and entry[2] == n:
                self._remove(key)
                dropped += 1
        return dropped

    def remove(self, side: str, peer: str, order_id: str) -> bool:
        key = (side, peer, order_id)
        if key in self._by_key:
            self._remove(key)
            return True
        return False

    def record_trade(self, resource_class: str, price: float, units: float, ts: int,
                     agreement_id: str = "") -> None:
        book = self._classes.get(resource_class)
        if book is None:
            book = self._classes[resource_class] = _ClassBook()
        book.last_trade = Trade(price, units, ts, agreement_id)

    def _remove(self, key: tuple[str, str, str]) -> None:
        entry = self._by_key.pop(key)
        order = entry[3]
        book = self._classes[order.resource_class]
        side = book.asks if order.side == "ask" else book.bids
        side.remove(entry)
        side.units -= order.units
        self._per_peer[order.peer] -= 1
        if self._per_peer[order.peer] <= 0:
            del self._per_peer[order.peer]
        if order.side == "ask":
            self._asks_per_peer[order.peer] -= 1
            if self._asks_per_peer[order.peer] <= 0:
                del self._asks_per_peer[order.peer]

    def _make_room(self, entry: tuple, now: int) -> bool:
        if self.expire(now) and len(self._by_key) < self.max_orders:
            return True
        order = entry[3]
        sides = [(s.count, name, kind, s) for name, b in self._classes.items()
                 for kind, s in (("ask", b.asks), ("bid", b.bids)) if s.count]
        if not sides:
            return False
        _, name, kind, fullest = max(sides, key=lambda t: t[0])
        worst = fullest.worst()
        if name == order.resource_class and kind == order.side and entry[:3] >= worst[:3]:
            return False  # the newcomer would be the one to go
        victim = worst[3]
        self._remove((victim.side, victim.peer, victim.id))
        self.evicted += 1
        return True

    def _compact_expiry(self) -> None:
        self._expiry = [(e[3].expires, e[2], k) for k, e in self._by_key.items()]
        heapq.heapify(self._expiry)

    # --- reads --------------------------------------------------------------

    def classes(self) -> list[str]:
        return sorted(self._classes)

    def get(self, side: str, peer: str, order_id: str) -> Ask | Bid | None:
        entry = self._by_key.get((side, peer, order_id))
        return None if entry is None else entry[3]

    def asks(self, resource_class: str) -> Iterator[Ask]:
        """Asks of a class in price-time order (may include not-yet-purged expired ones)."""
        book = self._classes.get(resource_class)
        return iter(()) if book is None else book.asks.orders()

    def bids(self, resource_class: str) -> Iterator[Bid]:
        book = self._classes.get(resource_class)
        return iter(()) if book is None else book.bids.orders()

    def best_ask(self, resource_class: str, now: int | None = None) -> Ask | None:
        return next((a for a in self.asks(resource_class) if now is None or a.expires > now), None)

    def best_bid(self, resource_class: str, now: int | None = None) -> Bid | None:
        return next((b for b in self.bids(resource_class) if now is None or b.expires > now), None)

    def last_trade(self, resource_class: str) -> Trade | None:
        book = self._classes.get(resource_class)
        return None if book is None else book.last_trade

    def supply_demand(self, resource_class: str) -> tuple[float, float]:
        """(ask units, bid units) currently in the book for a class."""
        book = self._classes.get(resource_class)
        return (0.0, 0.0) if book is None else (book.asks.units, book.bids.units)

    def depth(self, resource_class: str, levels: int = 10) -> dict[str, list[list[float]]]:
        """Aggregated price levels: ``[[price, units, orders], ...]`` best first."""
        out: dict[str, list[list[float]]] = {}
        for kind, it in (("asks", self.asks(resource_class)), ("bids", self.bids(resource_class))):
            rows: list[list[float]] = []
            for o in it:
                p = o.price if kind == "asks" else o.max_price
                if rows and rows[-1][0] == p:
                    rows[-1][1] += o.units
                    rows[-1][2] += 1
                elif len(rows) == levels:
                    break
                else:
                    rows.append([p, o.units, 1])
            out[kind] = rows
        return out

    def match(self, bid: Bid, now: int, **kwargs: Any):
        """Rank this book's asks for ``bid`` (see `matching.match`)."""
        from .matching import match
        return match(bid, self.asks(bid.resource_class), now=now, presorted=True, **kwargs)

    def to_json(self, resource_class: str | None = None, now: int | None = None,
                limit: int = 100) -> dict[str, Any]:
        """The ``synord book --json`` document: one entry per resource class."""
        names = [resource_class] if resource_class is not None else self.classes()
        out: dict[str, Any] = {}
        for name in names:
            asks = [_order_json(a) for a in itertools.islice(self._live(self.asks(name), now), limit)]
            bids = [_order_json(b) for b in itertools.islice(self._live(self.bids(name), now), limit)]
            ba, bb, lt = self.best_ask(name, now), self.best_bid(name, now), self.last_trade(name)
            out[name] = {
                "asks": asks, "bids": bids,
                "best_ask": None if ba is None else ba.price,
                "best_bid": None if bb is None else bb.max_price,
                "last_trade": None if lt is None else {"price": lt.price, "units": lt.units,
                                                        "ts": lt.ts, "agreement_id": lt.agreement_id},
                "depth": self.depth(name),
            }
        return out

    @staticmethod
    def _live(orders: Iterable, now: int | None) -> Iterator:
        return (o for o in orders if now is None or o.expires > now)


def _order_json(o: Ask | Bid) -> dict[str, Any]:
    d = {"peer": o.peer, "ts": o.ts, **o.to_body()}
    d["units"] = o.units
    return d
