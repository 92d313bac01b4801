"""This node's share of the order book.

Orders are keyed by (side, peer, order id), held per peer.  Per resource class, asks are
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

Per class, asks are also counted by *shape* (everything but price, expiry
and owner): a bid that nothing can serve is explained from those counts in
time proportional to the shapes, not the asks (`OrderBook._unservable`).

Cancels leave a bounded tombstone so that an older copy of the order arriving
late through gossip does not resurrect it.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left, insort
from itertools import chain
from operator import attrgetter
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

from sortedcontainers import SortedList

from synord.protocols.orders import CPU_CLASS, Ask, Bid, Cancel, order_from_envelope

from .matching import CONSTRAINTS, MatchResult, first_failed, match as _match
from .router import UNKNOWN

ADDED, REPLACED = "added", "replaced"
STALE, EXPIRED, CANCELLED, PEER_QUOTA, FULL = "stale_seq", "expired", "cancelled", "peer_quota", "book_full"


@dataclass(slots=True)
class Trade:
    price: float
    units: float
    ts: int
    agreement_id: str = ""


_TS = attrgetter("ts")


class _Side:
    """One side of one class: price levels, each a list of orders in time order.

    Only a new price level touches the sorted list; an order at an existing
    level is appended (or bisected in when it arrives out of time order).
    The price key is the price for asks, -max_price for bids (best first).
    The orders themselves are the entries: no per-order tuple.  ``units`` is
    kept for bids only: the asks' total comes from their shapes
    (`_ClassBook.ask_units`), one addition less per insert.
    """
    __slots__ = ("prices", "levels", "units", "count")

    def __init__(self) -> None:
        self.prices = SortedList()
        self.levels: dict[float, list] = {}
        self.units = 0.0
        self.count = 0

    # add() is inlined in OrderBook.add (the hot path)

    def remove(self, p: float, order: Ask | Bid) -> None:
        level = self.levels[p]
        i = bisect_left(level, order.ts, key=_TS)
        while level[i] is not order:
            i += 1
        del level[i]
        if not level:
            del self.levels[p]
            self.prices.remove(p)
        self.count -= 1

    def orders(self) -> Iterator:
        """Orders best first (price, then time), iterated at C speed."""
        return chain.from_iterable(map(self.levels.__getitem__, self.prices))

    def worst(self) -> tuple[float, Ask | Bid]:
        p = self.prices[-1]
        return p, self.levels[p][-1]


_UNKNOWN_LOW = float("-inf")  # below every price: an insert never takes it for the lowest


class _Shape:
    """Asks of one class that differ only in price, expiry and owner: they fail
    the same static constraints (runtime .. region, duration, preemptible), so a
    bid is checked once against ``probe`` (a member's copy at price 0, never
    expiring) instead of once per ask.  ``low`` is the cheapest member's price
    (``_UNKNOWN_LOW`` since that member left) and ``at_low`` how many cost that."""
    __slots__ = ("probe", "count", "low", "at_low")

    def __init__(self, ask: Ask) -> None:
        self.probe = replace(ask, id="", peer="", price=0.0, expires=1 << 63, ts=0)
        self.count = 0
        self.low = ask.price
        self.at_low = 0

    # add() is inlined in OrderBook.add

    def remove(self, price: float) -> None:
        self.count -= 1
        if price == self.low:
            self.at_low -= 1
            if not self.at_low:
                self.low = _UNKNOWN_LOW


def _shape(a: Ask) -> tuple:
    return (a.runtimes, a.memory, a.cores, a.gpus, a.gpu_class, a.region,
            a.min_duration_s, a.max_duration_s, a.preemptible)


class _Peer:
    """One peer's orders, by id: the book's key is (side, peer, id), held as
    two small dicts per peer rather than a tuple per order."""
    __slots__ = ("asks", "bids")

    def __init__(self) -> None:
        self.asks: dict[str, Ask] = {}  # at most max_asks_per_peer
        self.bids: dict[str, Bid] = {}


class _ClassBook:
    __slots__ = ("asks", "bids", "last_trade", "shapes")

    def __init__(self) -> None:
        self.asks = _Side()
        self.bids = _Side()
        self.last_trade: Trade | None = None
        self.shapes: dict[tuple, _Shape] = {}

    def ask_units(self) -> float:
        return sum(_units(g.probe) * g.count for g in self.shapes.values())


def _price_key(order: Ask | Bid) -> float:
    return order.price if order.side == "ask" else -order.max_price


def _units(order: Ask | Bid) -> float:
    return order.cores if order.resource_class == CPU_CLASS else float(order.gpus)


class OrderBook:
    def __init__(self, max_orders: int = 100_000, max_per_peer: int = 1_000,
                 max_tombstones: int = 100_000, max_asks_per_peer: int = 16):
        self.max_orders = max_orders
        self.max_per_peer = max_per_peer
        self.max_asks_per_peer = max_asks_per_peer
        self.max_tombstones = max_tombstones
        self._classes: dict[str, _ClassBook] = {}
        self._peers: dict[str, _Peer] = {}
        self._count = 0
        # Expiry in one-second buckets (a list per second, a heap of seconds):
        # a pointer per order instead of a heap tuple.  Replaced or cancelled
        # orders stay in their bucket until it is swept or compacted.
        self._expiry: dict[int, list] = {}
        self._expiry_secs: list[int] = []
        self._expiry_stale = 0  # entries of orders no longer held (removed, replaced)
        self._last_sec, self._last_bucket = -1, []  # the bucket the last insert went to
        self._tombstones: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return self._count

    # --- writes -------------------------------------------------------------

    def add(self, order: Ask | Bid, now: int) -> str:
        """Insert or replace; returns ``added``/``replaced`` or the refusal reason."""
        # The hot path (insert >= 500k/s, bench_market.py): adding to the shape,
        # the price level and the expiry bucket is inlined here.
        if order.expires <= now:
            return EXPIRED
        peer, oid, is_ask = order.peer, order.id, type(order) is Ask
        held = self._peers.get(peer)
        old = None if held is None else (held.asks if is_ask else held.bids).get(oid)
        if old is not None and old.seq >= order.seq:
            return STALE
        if self._tombstones and self._tombstones.get((order.side, peer, oid), -1) >= order.seq:
            return CANCELLED
        if old is not None:
            self._remove(old)
            held = self._peers.get(peer)
        elif held is not None:
            n = len(held.asks)
            if n + len(held.bids) >= self.max_per_peer or (is_ask and n >= self.max_asks_per_peer):
                return PEER_QUOTA
        if self._count >= self.max_orders:
            if not self._make_room(order, now):
                return FULL
            held = self._peers.get(peer)  # the eviction may have dropped it
        book = self._classes.get(order.resource_class)
        if book is None:
            book = self._classes[order.resource_class] = _ClassBook()
        if held is None:
            held = self._peers[peer] = _Peer()
        if is_ask:
            held.asks[oid] = order
            side, p = book.asks, order.price
            shape = (order.runtimes, order.memory, order.cores, order.gpus, order.gpu_class, order.region,
                     order.min_duration_s, order.max_duration_s, order.preemptible)  # = _shape(order)
            group = book.shapes.get(shape)
            if group is None:
                group = book.shapes[shape] = _Shape(order)
            group.count += 1
            if p == group.low:
                group.at_low += 1
            elif p < group.low:
                group.low, group.at_low = p, 1
        else:
            held.bids[oid] = order
            side, p = book.bids, -order.max_price
            side.units += _units(order)
        level = side.levels.get(p)
        if level is None:
            side.levels[p] = [order]
            side.prices.add(p)
        elif level[-1].ts <= order.ts:
            level.append(order)  # equal times keep arrival order, as a sequence number would
        else:
            insort(level, order, key=_TS)
        side.count += 1
        self._count += 1
        sec = order.expires // 1000
        if sec == self._last_sec:
            self._last_bucket.append(order)
        else:
            bucket = self._expiry.get(sec)
            if bucket is None:
                bucket = self._expiry[sec] = []
                heapq.heappush(self._expiry_secs, sec)
            bucket.append(order)
            self._last_sec, self._last_bucket = sec, bucket
        return ADDED if old is None else REPLACED

    def apply(self, env: Any, now: int) -> str:
        """An accepted ``ask``/``bid``/``cancel`` envelope from gossip -> the book.
        Returns ``added``/``replaced``/``cancelled``/``ignored`` or a refusal reason."""
        order = order_from_envelope(env)
        if type(order) is Cancel:
            return CANCELLED if self.cancel(order) else "ignored"
        return self.add(order, now)

    def cancel(self, cancel: Cancel) -> bool:
        """Remove (peer, id) if ``cancel.seq`` >= its seq; True when something was removed."""
        key = (cancel.side, cancel.peer, cancel.id)
        self._tombstones[key] = max(cancel.seq, self._tombstones.get(key, -1))
        self._tombstones.move_to_end(key)
        while len(self._tombstones) > self.max_tombstones:
            self._tombstones.popitem(last=False)
        order = self.get(*key)
        if order is not None and order.seq <= cancel.seq:
            self._remove(order)
            return True
        return False

    def expire(self, now: int) -> int:
        """Drop every order whose expiry is <= now; returns how many."""
        due = []
        secs = self._expiry_secs
        while secs and secs[0] * 1000 <= now:
            sec = secs[0]
            bucket = self._expiry.pop(sec)
            self._last_sec = -1
            later = [o for o in bucket if o.expires > now]
            due += (o for o in bucket if o.expires <= now)
            self._expiry_stale -= len(bucket) - len(later)  # entries gone (`_remove` counts its own)
            if later:  # the second ``now`` falls in: the rest waits
                self._expiry[sec] = later
                break
            heapq.heappop(secs)
        dropped = 0
        for o in due:  # once the buckets are consistent: a removal may compact them
            if self._holds(o):
                self._remove(o)
                dropped += 1
        return dropped

    def remove(self, side: str, peer: str, order_id: str) -> bool:
        order = self.get(side, peer, order_id)
        if order is not None:
            self._remove(order)
            return True
        return False

    def record_trade(self, resource_class: str, price: float, units: float, ts: int,
                     agreement_id: str = "") -> None:
        book = self._classes.get(resource_class)
        if book is None:
            book = self._classes[resource_class] = _ClassBook()
        book.last_trade = Trade(price, units, ts, agreement_id)

    def _holds(self, order: Ask | Bid) -> bool:
        """Is this very order (not a replaced or cancelled copy) in the book?"""
        return self.get(order.side, order.peer, order.id) is order

    def _remove(self, order: Ask | Bid) -> None:
        """Take out an order the book holds."""
        held = self._peers[order.peer]
        book = self._classes[order.resource_class]
        if order.side == "ask":
            del held.asks[order.id]
            side = book.asks
            side.remove(order.price, order)
            shape = _shape(order)
            group = book.shapes[shape]
            group.remove(order.price)
            if not group.count:
                del book.shapes[shape]
        else:
            del held.bids[order.id]
            side = book.bids
            side.remove(-order.max_price, order)
            side.units -= _units(order)
        self._count -= 1
        if not held.asks and not held.bids:
            del self._peers[order.peer]
        self._expiry_stale += 1  # its expiry entry stays until swept or compacted
        if self._expiry_stale > self._count + 1024:
            self._compact_expiry()

    def _make_room(self, order: Ask | Bid, now: int) -> bool:
        if self.expire(now) and self._count < self.max_orders:
            return True
        sides = [(s.count, name, kind, s) for name, b in self._classes.items()
                 for kind, s in (("ask", b.asks), ("bid", b.bids)) if s.count]
        if not sides:
            return False
        _, name, kind, fullest = max(sides, key=lambda t: t[0])
        worst_p, victim = fullest.worst()
        if name == order.resource_class and kind == order.side and (
                (_price_key(order), order.ts) >= (worst_p, victim.ts)):
            return False  # the newcomer would be the one to go (it comes last on equal price and time)
        self._remove(victim)
        self.evicted += 1
        return True

    def _compact_expiry(self) -> None:
        self._expiry, self._last_sec = {}, -1
        for held in self._peers.values():
            for o in chain(held.asks.values(), held.bids.values()):
                self._expiry.setdefault(o.expires // 1000, []).append(o)
        self._expiry_secs = list(self._expiry)
        heapq.heapify(self._expiry_secs)
        self._expiry_stale = 0

    @staticmethod
    def _cheapest(book: _ClassBook, shape: tuple) -> tuple[float, int]:
        """(lowest price, asks at it) among a shape's members: the first of
        them in price order.  Only after the cheapest member left the book."""
        low, n = float("inf"), 0
        for a in book.asks.orders():
            if a.price > low:
                break
            if _shape(a) == shape:
                low, n = a.price, n + 1
        return low, n

    def _expired_asks(self, resource_class: str, now: int) -> Iterator[Ask]:
        """Live asks of a class with expiry <= now that ``expire`` has not swept yet:
        a walk of the heap of seconds that stops at the first later second."""
        secs, todo = self._expiry_secs, [0] if self._expiry_secs else []
        limit = now // 1000
        while todo:
            i = todo.pop()
            if i < len(secs) and secs[i] <= limit:
                todo += (2 * i + 1, 2 * i + 2)
                for o in self._expiry[secs[i]]:
                    if (o.expires <= now and o.side == "ask" and o.resource_class == resource_class
                            and self._holds(o)):
                        yield o

    # --- reads --------------------------------------------------------------

    def classes(self) -> list[str]:
        return sorted(self._classes)

    def get(self, side: str, peer: str, order_id: str) -> Ask | Bid | None:
        held = self._peers.get(peer)
        return None if held is None else (held.asks if side == "ask" else held.bids).get(order_id)

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
        return (0.0, 0.0) if book is None else (book.ask_units(), book.bids.units)

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

    def match(self, bid: Bid, now: int, **kwargs: Any) -> MatchResult:
        """Rank this book's asks for ``bid`` (see `matching.match`).  A bid that
        no ask can serve is answered from the shape index: the same result as
        the full scan, without visiting every ask."""
        own = kwargs["exclude_peers"] = frozenset(kwargs.get("exclude_peers", ()))
        unservable = self._unservable(bid, now, own)
        if unservable is not None:
            return unservable
        return _match(bid, self.asks(bid.resource_class), now=now, presorted=True, **kwargs)

    def _unservable(self, bid: Bid, now: int, own: frozenset[str]) -> MatchResult | None:
        """The scan's result for a bid that nothing passes, or None when some ask
        might pass (then only the scan knows the candidates and their order).

        When nothing passes, the scan charges every ask to its first failed
        constraint and never breaks early, so the counts are all it returns.
        Asks that are expired or owned by ``own`` fail before any static
        constraint: they are counted one by one.  Every other ask is charged
        with its shape: its first static failure, else ``price`` when it costs
        more than the bid's limit.  A bid with a reputation floor depends on
        each owner's reputation: the scan answers it.
        """
        book = self._classes.get(bid.resource_class)
        if book is None or bid.min_reputation > 0 or 256 < len(book.shapes) > book.asks.count // 4:
            return None  # many shapes of few asks each: the scan is as quick
        reasons = {}
        for shape, group in book.shapes.items():
            reason = reasons[shape] = first_failed(group.probe, bid, now, UNKNOWN)
            if reason is None:
                if group.low == _UNKNOWN_LOW:
                    group.low, group.at_low = self._cheapest(book, shape)
                if group.low <= bid.max_price:
                    return None  # some member might pass
                reasons[shape] = "price"
        cls = bid.resource_class
        special = {id(a): a for a in self._expired_asks(cls, now)}
        for peer in own:
            held = self._peers.get(peer)
            if held is not None:
                special.update((id(a), a) for a in held.asks.values() if a.resource_class == cls)
        excluded = dict.fromkeys(CONSTRAINTS, 0)
        for shape, group in book.shapes.items():
            excluded[reasons[shape]] += group.count
        for a in special.values():
            excluded[reasons[_shape(a)]] -= 1
            excluded[first_failed(a, bid, now, UNKNOWN, own)] += 1
        return MatchResult(bid, [], book.asks.count, excluded)

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
