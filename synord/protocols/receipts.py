"""Usage receipts: what a placement used and cost, signed by both parties.

The provider meters the run, builds a `Receipt`, signs it (``psig``) and
sends a ``receipt`` message; the consumer checks it against the agreement it
countersigned (`check_against`), countersigns (``csig``) and answers with
``receipt_ack``.  Both store the doubly-signed receipt in their ledgers.

Signing input: ``RECEIPT_DOMAIN || canonical(receipt body)`` for both
signatures (see `negotiation.canonical`, docs/WIRE.md).

    amount = price * units * wall_s / 3600     (price per unit-hour)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from .envelope import message_type
from .identity import Identity, verify
from .negotiation import NID_LEN, OUTCOMES, BodyError, Terms, canonical

RECEIPT_DOMAIN = b"synord/receipt/1\x00"
AMOUNT_TOLERANCE = 1e-6  # relative; float rounding across implementations
# What the consumer observed of the lease (countersign -> end seen on the task
# stream) bounds the billed wall time: relative slack for clock rates, plus
# absolute slack for the messages in flight at both ends.
TIME_TOLERANCE = 0.01
TIME_SLACK_MS = 2_000


class ReceiptError(ValueError):
    def __init__(self, message: str, slug: str = "invalid"):
        super().__init__(message)
        self.slug = slug  # stable reason for the refusal counter (never peer text)


GPU_FIELDS = ("gpu_s", "gpu_peak_memory", "gpu_energy_j")


def amount_for(price: float, units: float, wall_s: float) -> float:
    return price * units * wall_s / 3600.0


@dataclass(frozen=True)
class Receipt:
    aid: bytes
    provider: str
    consumer: str
    cpu_s: float
    peak_memory: int  # bytes
    wall_s: float
    price: float      # per unit-hour, from the agreement
    units: float
    amount: float
    outcome: str      # completed | failed | abandoned | cancelled | preempted
    started: int      # unix ms
    ended: int        # unix ms
    # GPU metering (NVML), present only for agreements with GPUs; absent fields keep
    # the body (and so the signing input) of a CPU receipt unchanged.
    gpu_s: float | None = None            # busy device-seconds: sum of utilisation x time
    gpu_peak_memory: int | None = None    # bytes, the most the task's devices held at once
    gpu_energy_j: float | None = None     # joules drawn by the task's devices

    def to_body(self) -> dict:
        b = {"aid": self.aid, "provider": self.provider, "consumer": self.consumer,
             "cpu_s": float(self.cpu_s), "peak_memory": self.peak_memory, "wall_s": float(self.wall_s),
             "price": float(self.price), "units": float(self.units), "amount": float(self.amount),
             "outcome": self.outcome, "started": self.started, "ended": self.ended}
        for k in GPU_FIELDS:
            v = getattr(self, k)
            if v is not None:
                b[k] = v if k == "gpu_peak_memory" else float(v)
        return b

    @classmethod
    def from_body(cls, body: Any) -> "Receipt":
        if not isinstance(body, dict) or len(body) > 32:
            raise BodyError("receipt must be a map of at most 32 fields")
        try:
            r = cls(**{k: body[w] for k, w in (
                ("aid", "aid"), ("provider", "provider"), ("consumer", "consumer"), ("cpu_s", "cpu_s"),
                ("peak_memory", "peak_memory"), ("wall_s", "wall_s"), ("price", "price"), ("units", "units"),
                ("amount", "amount"), ("outcome", "outcome"), ("started", "started"), ("ended", "ended"))})
        except KeyError as exc:
            raise BodyError(f"missing field {exc.args[0]!r}") from None
        r = replace(r, **{k: body[k] for k in GPU_FIELDS if body.get(k) is not None})
        r.validate()
        return r

    def validate(self) -> None:
        if not isinstance(self.aid, bytes) or len(self.aid) != NID_LEN:
            raise BodyError("aid must be 16 bytes")
        for k in ("provider", "consumer"):
            v = getattr(self, k)
            if not isinstance(v, str) or not 0 < len(v) <= 64:
                raise BodyError(f"{k} must be a peer id")
        for k in ("cpu_s", "wall_s", "price", "units", "amount"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise BodyError(f"{k} must be a finite number >= 0")
        for k in ("peak_memory", "started", "ended"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise BodyError(f"{k} must be an integer >= 0")
        for k in GPU_FIELDS:
            v = getattr(self, k)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                    or (k == "gpu_peak_memory" and not isinstance(v, int)):
                raise BodyError(f"{k} must be a finite number >= 0")
        if self.outcome not in OUTCOMES:
            raise BodyError(f"outcome must be one of {', '.join(OUTCOMES)}")
        if self.ended < self.started:
            raise BodyError("ended before started")

    def signing_input(self) -> bytes:
        return RECEIPT_DOMAIN + canonical(self.to_body())


@dataclass(frozen=True)
class SignedReceipt:
    receipt: Receipt
    psig: bytes
    csig: bytes | None = None

    def to_body(self) -> dict:
        d = {"receipt": self.receipt.to_body(), "psig": self.psig}
        if self.csig is not None:
            d["csig"] = self.csig
        return d

    @classmethod
    def from_body(cls, body: Any) -> "SignedReceipt":
        if not isinstance(body, dict):
            raise BodyError("body must be a map")
        psig, csig = body.get("psig"), body.get("csig")
        if not isinstance(psig, bytes) or len(psig) != 64:
            raise BodyError("psig must be 64 bytes")
        if csig is not None and (not isinstance(csig, bytes) or len(csig) != 64):
            raise BodyError("csig must be 64 bytes")
        return cls(Receipt.from_body(body.get("receipt")), psig, csig)


def issue(identity: Identity, terms: Terms, *, cpu_s: float, peak_memory: int, started: int,
          ended: int, outcome: str = "completed", gpu: dict | None = None) -> SignedReceipt:
    """Provider: meter -> receipt signed with the provider key."""
    if identity.peer_id != terms.provider:
        raise ReceiptError("only the agreement's provider issues its receipt")
    wall_s = max(0, ended - started) / 1000.0
    r = Receipt(terms.aid, terms.provider, terms.consumer, float(cpu_s), int(peak_memory), wall_s,
                terms.price, terms.units, amount_for(terms.price, terms.units, wall_s), outcome, started, ended)
    if gpu and terms.gpus:  # ``gpu``: synord.gpu_meter's totals, keyed like GPU_FIELDS
        r = replace(r, gpu_s=round(min(float(gpu.get("gpu_s", 0.0)), wall_s * terms.gpus), 3),
                    gpu_peak_memory=int(gpu.get("gpu_peak_memory", 0)),
                    gpu_energy_j=round(float(gpu.get("gpu_energy_j", 0.0)), 3))
    r.validate()
    return SignedReceipt(r, identity.sign(r.signing_input()))


def verify_provider(sr: SignedReceipt) -> bool:
    return verify(sr.receipt.provider, sr.receipt.signing_input(), sr.psig)


def verify_receipt(sr: SignedReceipt) -> bool:
    """Both signatures present and valid."""
    return (sr.csig is not None and verify_provider(sr)
            and verify(sr.receipt.consumer, sr.receipt.signing_input(), sr.csig))


@dataclass(frozen=True)
class Observed:
    """The lease as the consumer saw it (its own clock, unix ms): from the
    agreement it countersigned to the end it saw (task exit, lease end, or
    "still running" = the time the receipt arrived)."""
    started: int
    ended: int

    @property
    def wall_ms(self) -> int:
        return max(0, self.ended - self.started)


def check_against(sr: SignedReceipt, terms: Terms, observed: Observed | None = None) -> None:
    """Consumer-side checks before countersigning; raises ReceiptError with the reason."""
    r = sr.receipt
    if not verify_provider(sr):
        raise ReceiptError("bad provider signature", "bad_signature")
    if (r.aid, r.provider, r.consumer) != (terms.aid, terms.provider, terms.consumer):
        raise ReceiptError("receipt is for another agreement or other parties", "mismatch")
    if r.price != terms.price or r.units != terms.units:
        raise ReceiptError("price or units differ from the agreement", "price")
    expected = amount_for(r.price, r.units, r.wall_s)
    # Relative, whatever the size: x10 on a tiny receipt is as wrong as on a big one.
    if abs(r.amount - expected) > AMOUNT_TOLERANCE * expected + 1e-12:
        raise ReceiptError(f"amount {r.amount} != price*units*wall/3600 = {expected}", "amount")
    if abs(r.wall_s * 1000 - (r.ended - r.started)) > 1:
        raise ReceiptError("wall_s differs from ended - started", "wall_time")
    # Cannot bill more than the agreed duration (+ one heartbeat of slack).
    if r.wall_s > terms.duration_s + terms.heartbeat_ms / 1000.0:
        raise ReceiptError("wall time longer than the agreed duration", "duration")
    if not terms.gpus and any(getattr(r, k) is not None for k in GPU_FIELDS):
        raise ReceiptError("GPU usage on an agreement without GPUs", "gpu")
    if r.gpu_s is not None and r.gpu_s > r.wall_s * terms.gpus * (1 + TIME_TOLERANCE) + 1e-9:
        raise ReceiptError("more busy GPU-seconds than devices x wall time", "gpu")
    if observed is not None:
        bound = observed.wall_ms * (1 + TIME_TOLERANCE) + max(TIME_SLACK_MS, terms.heartbeat_ms)
        if r.wall_s * 1000 > bound:
            raise ReceiptError(f"wall time {r.wall_s:g}s longer than the {observed.wall_ms / 1000:g}s "
                               "the consumer observed", "over_observed")


def countersign(identity: Identity, sr: SignedReceipt, terms: Terms,
                observed: Observed | None = None) -> SignedReceipt:
    """Consumer: check, then add the consumer signature."""
    if identity.peer_id != sr.receipt.consumer:
        raise ReceiptError("only the agreement's consumer countersigns its receipt")
    check_against(sr, terms, observed)
    return replace(sr, csig=identity.sign(sr.receipt.signing_input()))


@dataclass(frozen=True)
class ReceiptAck:
    aid: bytes
    csig: bytes

    def to_body(self) -> dict:
        return {"aid": self.aid, "csig": self.csig}

    @classmethod
    def from_body(cls, body: Any) -> "ReceiptAck":
        if not isinstance(body, dict):
            raise BodyError("body must be a map")
        aid, csig = body.get("aid"), body.get("csig")
        if not isinstance(aid, bytes) or len(aid) != NID_LEN:
            raise BodyError("aid must be 16 bytes")
        if not isinstance(csig, bytes) or len(csig) != 64:
            raise BodyError("csig must be 64 bytes")
        return cls(aid, csig)


message_type("receipt", SignedReceipt.from_body)
message_type("receipt_ack", ReceiptAck.from_body)
