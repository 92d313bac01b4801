"""Delivery of signed usage receipts, provider to consumer (sans-IO).

Theory of operation
-------------------
When a task under an agreement ends, its provider signs a receipt
(synord.protocols.receipts) and sends it to the consumer on /synord/negotiate.  The
consumer countersigns it and answers `receipt_ack`.  Messages get lost and
consumers restart, so an unacknowledged receipt goes out again, with
back-off, for a bounded time; then the provider gives up (the ledger keeps
its own half).  One `Delivery` per agreement id:

    Issue(now) --------------------> (none) -> PENDING   send now; next at now + first_ms
    Due (now >= next_at) ----------> PENDING -> PENDING  resend; gap doubles up to max_ms
    Due (now - first_sent > for_ms) PENDING -> GAVE_UP   no more resends
    Ack -----------------------------> PENDING -> ACKED
    Resume(first_sent, now) -------> (none) -> PENDING   issued before our restart:
                                                         resend now, same give-up time

`ReceiptDeliveries.tick(now)` returns what to (re)send and what was given up;
the negotiator seals and sends, and persists (it owns the receipts, not the
schedule).  An ack for an aid we do not track is the caller's refusal to
count; the signature check of an ack is the caller's (synord.protocols.receipts).
No sockets, no clocks.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

# After 2 s, doubling to every 60 s, for an hour.
RECEIPT_RESEND_FIRST_MS = 2_000
RECEIPT_RESEND_MAX_MS = 60_000
RECEIPT_RESEND_FOR_MS = 3_600_000


class State(str, enum.Enum):
    PENDING = "PENDING"
    ACKED = "ACKED"
    GAVE_UP = "GAVE_UP"

    def __str__(self) -> str:
        return self.value


class DeliveryError(Exception):
    def __init__(self, event: str, state: "State | None", reason: str):
        super().__init__(f"receipt delivery cannot {event} in state {state}: {reason}")
        self.event, self.state, self.reason = event, state, reason


@dataclass(frozen=True)
class Issue:
    now: int


@dataclass(frozen=True)
class Resume:
    first_sent: int
    now: int


@dataclass(frozen=True)
class Due:
    now: int


@dataclass(frozen=True)
class Ack:
    pass


S = State
TRANSITIONS: dict[State | None, dict[type, State]] = {
    None: {Issue: S.PENDING, Resume: S.PENDING},
    S.PENDING: {Due: S.PENDING, Ack: S.ACKED, Issue: S.PENDING, Resume: S.PENDING},
}


@dataclass
class Delivery:
    """The resend schedule of one receipt."""
    state: State | None = None
    next_at: int = 0
    gap_ms: int = RECEIPT_RESEND_FIRST_MS
    first_sent: int = 0

    def process(self, event, first_ms: int, max_ms: int, for_ms: int) -> bool:
        """Apply ``event``; for Due, True if the receipt goes out again now."""
        new = TRANSITIONS.get(self.state, {}).get(type(event))
        if new is None:
            raise DeliveryError(type(event).__name__, self.state, "illegal event for this state")
        resend = False
        if isinstance(event, Issue):
            self.first_sent, self.gap_ms, self.next_at = event.now, first_ms, event.now + first_ms
        elif isinstance(event, Resume):
            self.first_sent, self.gap_ms, self.next_at = event.first_sent, first_ms, event.now
        elif isinstance(event, Due):
            if event.now < self.next_at:
                raise DeliveryError("Due", self.state, "not due yet")
            if event.now - self.first_sent > for_ms:
                new = S.GAVE_UP
            else:
                self.gap_ms = min(self.gap_ms * 2, max_ms)
                self.next_at = event.now + self.gap_ms
                resend = True
        self.state = new
        return resend


class ReceiptDeliveries:
    """Every receipt still waiting for its ack, by agreement id (oldest first)."""

    def __init__(self, first_ms: int = RECEIPT_RESEND_FIRST_MS, max_ms: int = RECEIPT_RESEND_MAX_MS,
                 for_ms: int = RECEIPT_RESEND_FOR_MS):
        self.first_ms, self.max_ms, self.for_ms = first_ms, max_ms, for_ms
        self.pending: OrderedDict[bytes, Delivery] = OrderedDict()

    def __len__(self) -> int:
        return len(self.pending)

    def __contains__(self, aid: bytes) -> bool:
        return aid in self.pending

    def _apply(self, aid: bytes, event) -> bool:
        d = self.pending.get(aid) or Delivery()
        resend = d.process(event, self.first_ms, self.max_ms, self.for_ms)
        if d.state is S.PENDING:
            self.pending[aid] = d
        else:
            self.pending.pop(aid, None)
        return resend

    def issue(self, aid: bytes, now: int) -> None:
        """The receipt goes out now (the caller sends it); resends are scheduled."""
        self._apply(aid, Issue(now))

    def resume(self, aid: bytes, first_sent: int, now: int) -> None:
        """Issued before our restart and not acknowledged: due now, same give-up time."""
        self._apply(aid, Resume(first_sent, now))

    def ack(self, aid: bytes) -> bool:
        """The consumer acknowledged (the caller verified the countersignature)."""
        if aid not in self.pending:
            return False
        self._apply(aid, Ack())
        return True

    def forget(self, aid: bytes) -> None:
        """Dropped by the caller (e.g. too many pending): no more resends."""
        self.pending.pop(aid, None)

    def next_deadline(self) -> int | None:
        return min((d.next_at for d in self.pending.values()), default=None)

    def tick(self, now: int) -> tuple[list[bytes], list[bytes]]:
        """(receipts to resend now, receipts given up on now)."""
        resend, gave_up = [], []
        for aid, d in list(self.pending.items()):
            if d.next_at > now:
                continue
            (resend if self._apply(aid, Due(now)) else gave_up).append(aid)
        return resend, gave_up
