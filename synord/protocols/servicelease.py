"""A service's agreement, renewed and billed per period (sans-IO).

Theory of operation
-------------------
A service (``synord run --service``) has no exit to wait for: it runs until
cancelled or until its agreement ends.  Its agreement (`negotiation.Terms`)
is cut into periods of ``period_ms`` counted from ``terms.created``:

    period k = [created + k*P, min(created + (k+1)*P, expires))

Period 0 is paid by the agreement itself.  While period k runs the consumer
renews period k+1 (a ``{"renew": k+1}`` frame on the task stream, sent once
``RENEW_AT`` of period k has passed and again every tick until the provider
has it: the frame may be lost with a stream); the provider counts it paid.
When a period ends the provider bills it with a receipt of its own: the
agreement narrowed to that window (`period_terms`, its own id `period_aid`),
so the ordinary receipt path signs, resends and countersigns it.  The
consumer expects a period's receipt from the window's start on its own clock
and countersigns no more than it saw (`receipts.check_against`'s observed
bound): a receipt for a window that has not ended yet is refused.

    provider  RUNNING --renewed(k)--> RUNNING        paid = k (k must be paid + 1)
              RUNNING --tick(now)--> RUNNING         Bill(k, start, end) per period over
              RUNNING --tick(now >= paid end)--> STOPPED   Stop("not_renewed" | "agreement_ended")
              RUNNING --stop(reason)--> STOPPED      cancelled, or the task ended
    consumer  due(now) -> the period to renew now, or None; renewed(k) once the
              provider answers (we take "sent on a live stream" as answered)

The partial period at the end (a cancel, a crash) is billed by the
agreement's own receipt, from `billed_until` to the end: every millisecond
of the agreement is billed exactly once.

Peer input: a renewal the machine cannot take returns a reason slug (the
driver counts it, `REFUSALS.count("service", slug)`) and changes nothing.
No sockets, no clocks: every call takes ``now`` (unix ms, as Terms).
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, replace

from .negotiation import Terms

DEFAULT_PERIOD_S = 60.0
MIN_PERIOD_S = 1.0  # shorter is no service, and a receipt per second is noise
RENEW_AT = 0.5  # fraction of a period after which the consumer renews the next one
MAX_PERIODS = 1 << 20  # a renewal number beyond this is nonsense whatever the agreement


class ServiceState(str, enum.Enum):
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Bill:
    """Period ``period`` is over: bill [start, end] (unix ms) with its own receipt."""
    period: int
    start: int
    end: int


@dataclass(frozen=True)
class Stop:
    """The paid time is over: stop the service (``reason``: not_renewed | agreement_ended)."""
    reason: str


def period_aid(aid: bytes, k: int) -> bytes:
    """The receipt id of period ``k`` of agreement ``aid``: 16 bytes, distinct per period,
    derived by both parties alike (the agreement's own id stays for the last, partial one)."""
    return hashlib.sha256(b"synord/period/1\x00" + aid + k.to_bytes(4, "big")).digest()[:16]


def period_window(terms: Terms, period_ms: int, k: int) -> tuple[int, int]:
    start = terms.created + k * period_ms
    return start, min(start + period_ms, terms.expires)


def period_count(terms: Terms, period_ms: int) -> int:
    """How many periods the agreement holds (the last one may be short)."""
    return max(1, math.ceil((terms.expires - terms.created) / period_ms))


def period_terms(terms: Terms, period_ms: int, k: int) -> Terms:
    """The agreement narrowed to period ``k``: what that period's receipt is checked against."""
    start, end = period_window(terms, period_ms, k)
    return replace(terms, aid=period_aid(terms.aid, k), created=start, expires=end,
                   duration_s=max(1, math.ceil((end - start) / 1000)))


def check_period_s(value) -> float:
    """A period length (seconds) as asked for locally; ValueError with the reason."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("period_s must be a number")
    if value < MIN_PERIOD_S:
        raise ValueError(f"period_s must be at least {MIN_PERIOD_S:g} s")
    return float(value)


@dataclass
class ServiceLease:
    """Both roles: the provider's paid/billed bookkeeping, the consumer's renewal schedule."""
    terms: Terms
    period_ms: int
    paid: int = 0  # the last period paid for (period 0 comes with the agreement)
    billed: int = 0  # periods [0, billed) have their own receipt
    state: ServiceState = ServiceState.RUNNING
    stop_reason: str | None = None
    renewals: int = 0

    def __post_init__(self) -> None:
        if self.period_ms < MIN_PERIOD_S * 1000:
            raise ValueError("period too short")
        self.last = period_count(self.terms, self.period_ms) - 1

    # ---- clocks, both roles -----------------------------------------------------------

    def current(self, now: int) -> int:
        """The period ``now`` falls in (clamped to the agreement's)."""
        return min(self.last, max(0, (now - self.terms.created) // self.period_ms))

    def paid_until(self) -> int:
        return period_window(self.terms, self.period_ms, self.paid)[1]

    @property
    def billed_until(self) -> int:
        """Where the agreement's own (final) receipt starts: the end of the last billed period."""
        return self.terms.created + self.billed * self.period_ms

    def next_renewal(self, now: int) -> int | None:
        """When the consumer renews next (unix ms), None when nothing is left to renew."""
        if self.state is not ServiceState.RUNNING or self.paid >= self.last:
            return None
        start, _ = period_window(self.terms, self.period_ms, self.paid)
        return start + int(self.period_ms * RENEW_AT)

    # ---- provider -------------------------------------------------------------------

    def renewed(self, k) -> str | None:
        """The consumer paid period ``k``: None when taken, else the refusal's slug."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= MAX_PERIODS:
            return "bad_renewal"
        if self.state is not ServiceState.RUNNING:
            return "renewal_after_stop"
        if k > self.last:
            return "renewal_past_agreement"
        if k <= self.paid:
            return None  # a resend crossing our acceptance: harmless, nothing changes
        if k > self.paid + 1:
            return "renewal_ahead"  # one period ahead at most: nobody prepays the whole agreement
        self.paid = k
        self.renewals += 1
        return None

    def tick(self, now: int) -> list:
        """What is due at ``now``: bills for periods over, then a stop when the paid time is."""
        out: list = []
        if self.state is not ServiceState.RUNNING:
            return out
        while self.billed <= self.paid:
            start, end = period_window(self.terms, self.period_ms, self.billed)
            if end > now or end >= self.terms.expires:
                break  # the last period is the agreement's own receipt's
            out.append(Bill(self.billed, start, end))
            self.billed += 1
        if now >= self.paid_until():
            reason = "agreement_ended" if self.paid_until() >= self.terms.expires else "not_renewed"
            out.append(Stop(reason))
            self.stop(reason)
        return out

    def next_deadline(self) -> int | None:
        """The next time `tick` has something to do (provider)."""
        if self.state is not ServiceState.RUNNING:
            return None
        end = period_window(self.terms, self.period_ms, self.billed)[1]
        return min(end, self.paid_until())

    def stop(self, reason: str) -> None:
        if self.state is ServiceState.RUNNING:
            self.state, self.stop_reason = ServiceState.STOPPED, reason

    # ---- consumer -------------------------------------------------------------------

    def due(self, now: int) -> int | None:
        """The period the consumer should renew at ``now``, or None."""
        at = self.next_renewal(now)
        return self.paid + 1 if at is not None and now >= at else None

    def view(self, now: int) -> dict:
        """For `synord job ID --json`: the period, what is paid and when it renews."""
        nxt = self.next_renewal(now)
        return {"period": self.current(now), "period_s": self.period_ms / 1000, "paid_periods": self.paid + 1,
                "paid_until": self.paid_until() / 1000, "billed_periods": self.billed,
                "next_renewal": None if nxt is None else nxt / 1000, "lease": str(self.state),
                **({"stopped": self.stop_reason} if self.stop_reason else {})}
