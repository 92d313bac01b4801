"""The agreement of each placement of a consumer's job ("leg"), kept for after a restart.

Each leg's history entry names its agreement id; the double-signed terms are
kept in the store's kv under ``terms:<aid>`` when the task starts. After our
restart they serve twice: to re-attach to the running leg (`terms_of`), and to
countersign the receipts still to come (`expect_receipts`): those of legs still
open, or ended within the window the provider resends receipts for.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterable

from synord.protocols.negotiation import Terms

from synord.protocols.receipt_delivery import RECEIPT_RESEND_FOR_MS
from ..store import from_json_safe, json_safe

if TYPE_CHECKING:
    from ..market.port import Market
    from ..store import Store


def key(aid_hex: str) -> str:
    return f"terms:{aid_hex}"


def remember(store: "Store", terms: Terms) -> None:
    store.kv_set(key(terms.aid.hex()), json_safe(terms.to_body()))


def load(store: "Store", aid_hex: str) -> Terms | None:
    row = store.kv_get(key(aid_hex))
    return Terms.from_body(from_json_safe(row)) if row else None


def terms_of(store: "Store", job: Any) -> Terms | None:
    """The terms of the job's latest leg (None before its first placement)."""
    aid = job.history[-1].get("agreement") if job.history else None
    return load(store, aid) if aid else None


def expect_receipts(store: "Store", jobs: Iterable[Any], market: "Market") -> None:
    """Let the market countersign the receipts still to come for legs agreed before a restart."""
    since = time.time() - RECEIPT_RESEND_FOR_MS / 1000
    for job in jobs:
        for leg in job.history:
            if not leg.get("agreement") or (leg.get("end") is not None and leg["end"] < since):
                continue
            terms = load(store, leg["agreement"])
            if terms is not None:
                end = leg.get("end")
                market.expect_receipt(terms, None if end is None else int(end * 1000))
