"""Receipts, balance and reputation, persisted in the daemon's SQLite store.

`SCHEMA` is the store's migration 3 (synord.schema).  Only receipts
with both valid signatures are stored (`record`).  Outcomes without a
receipt — a provider that vanished (``abandoned``), an agreement never
honoured — are observed locally (`record_outcome`).

Balance: amounts earned as provider minus amounts paid as consumer.
A proposal the provider never answered is recorded (``no_answer``, keyed by
the negotiation id) and counts as a failure.
Reputation of a provider: (completed + 1) / (completed + failed + 2) over its
outcomes (Laplace prior: an unknown peer is 0.5, one success is 0.67, and a
long record dominates the prior).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from synord.protocols.receipts import ReceiptError, SignedReceipt, verify_receipt

SCHEMA = """
CREATE TABLE IF NOT EXISTS market_receipts (
    aid BLOB PRIMARY KEY,
    provider TEXT NOT NULL,
    consumer TEXT NOT NULL,
    cpu_s REAL NOT NULL,
    peak_memory INTEGER NOT NULL,
    wall_s REAL NOT NULL,
    price REAL NOT NULL,
    units REAL NOT NULL,
    amount REAL NOT NULL,
    outcome TEXT NOT NULL,
    started INTEGER NOT NULL,
    ended INTEGER NOT NULL,
    psig BLOB NOT NULL,
    csig BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS market_receipts_provider ON market_receipts(provider);
CREATE INDEX IF NOT EXISTS market_receipts_consumer ON market_receipts(consumer);
CREATE TABLE IF NOT EXISTS market_outcomes (
    aid BLOB PRIMARY KEY,
    provider TEXT NOT NULL,
    outcome TEXT NOT NULL,
    source TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS market_outcomes_provider ON market_outcomes(provider);
"""

GOOD = ("completed",)
BAD = ("failed", "abandoned", "no_answer")  # cancelled / preempted with notice count for nobody


# A receipt's GPU metering (JSON), part of what both parties signed (store migration 7).
GPU_COLUMN = "ALTER TABLE market_receipts ADD COLUMN gpu TEXT"


def init_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(SCHEMA)
    if "gpu" not in {r[1] for r in conn.execute("PRAGMA table_info(market_receipts)")}:
        conn.execute(GPU_COLUMN)  # a ledger made without the store's migrations (tests)


class Ledger:
    def __init__(self, conn: sqlite3.Connection, peer_id: str):
        self.conn = conn
        self.peer_id = peer_id
        init_schema(conn)

    def record(self, sr: SignedReceipt) -> bool:
        """Store a doubly-signed receipt; False if already stored.  Raises
        ReceiptError for a receipt that does not verify or is not ours."""
        if not verify_receipt(sr):
            raise ReceiptError("receipt signatures do not verify")
        r = sr.receipt
        if self.peer_id not in (r.provider, r.consumer):
            raise ReceiptError("receipt names neither party as this node")
        with self.conn:
            cur = self.conn.execute(
                "INSERT OR IGNORE INTO market_receipts(aid, provider, consumer, cpu_s, peak_memory, wall_s, price, "
                "units, amount, outcome, started, ended, psig, csig) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (r.aid, r.provider, r.consumer, r.cpu_s, r.peak_memory, r.wall_s, r.price, r.units,
                 r.amount, r.outcome, r.started, r.ended, sr.psig, sr.csig))
            if cur.rowcount and r.gpu_s is not None:
                self.conn.execute("UPDATE market_receipts SET gpu = ? WHERE aid = ?", (json.dumps(
                    {"gpu_s": r.gpu_s, "gpu_peak_memory": r.gpu_peak_memory, "gpu_energy_j": r.gpu_energy_j}), r.aid))
            if cur.rowcount:
                # A signed receipt supersedes a local observation of the same agreement.
                self.conn.execute("INSERT OR REPLACE INTO market_outcomes VALUES (?,?,?,?,?)",
                                  (r.aid, r.provider, r.outcome, "receipt", r.ended))
        return bool(cur.rowcount)

    def has_receipt(self, aid: bytes) -> bool:
        return self.conn.execute("SELECT 1 FROM market_receipts WHERE aid = ?", (aid,)).fetchone() is not None

    def record_outcome(self, aid: bytes, provider: str, outcome: str, ts: int) -> None:
        """A locally observed outcome (e.g. ``abandoned`` on missed heartbeats).
        Never overrides a signed receipt."""
        with self.conn:
            self.conn.execute(
                "INSERT INTO market_outcomes VALUES (?,?,?,?,?) ON CONFLICT(aid) DO UPDATE SET "
                "outcome=excluded.outcome, ts=excluded.ts WHERE market_outcomes.source = 'local'",
                (aid, provider, outcome, "local", ts))

    def balance(self) -> float:
        earned, paid = self.totals()
        return earned - paid

    def totals(self) -> tuple[float, float]:
        """(earned as provider, paid as consumer), all receipts."""
        (earned,) = self.conn.execute("SELECT COALESCE(SUM(amount), 0) FROM market_receipts WHERE provider = ?",
                                      (self.peer_id,)).fetchone()
        (paid,) = self.conn.execute("SELECT COALESCE(SUM(amount), 0) FROM market_receipts WHERE consumer = ?",
                                    (self.peer_id,)).fetchone()
        return float(earned), float(paid)

    def paid_since(self, since: int) -> list[tuple[bytes, int, float]]:
        """(aid, ended, amount) of the receipts we paid that ended after ``since`` (unix ms)."""
        return [(bytes(a), int(e), float(x)) for a, e, x in self.conn.execute(
            "SELECT aid, ended, amount FROM market_receipts WHERE consumer = ? AND ended > ?",
            (self.peer_id, since))]

    def counts(self, provider: str) -> tuple[int, int]:
        good, bad = self.conn.execute(
            f"SELECT COALESCE(SUM(outcome IN ({','.join('?' * len(GOOD))})), 0), "
            f"COALESCE(SUM(outcome IN ({','.join('?' * len(BAD))})), 0) FROM market_outcomes WHERE provider = ?",
            (*GOOD, *BAD, provider)).fetchone()
        return int(good), int(bad)

    def reputation(self, provider: str) -> float:
        good, bad = self.counts(provider)
        return (good + 1.0) / (good + bad + 2.0)

    def receipts(self, limit: int = 1000) -> list[dict[str, Any]]:
        return self._receipts("ORDER BY ended DESC LIMIT ?", (limit,))

    def receipt(self, aid: bytes) -> dict[str, Any] | None:
        """One agreement's receipt (as `receipts` shows it), or None while it has not arrived."""
        found = self._receipts("WHERE aid = ?", (aid,))
        return found[0] if found else None

    def _receipts(self, tail: str, params: tuple) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT aid, provider, consumer, cpu_s, peak_memory, wall_s, price, units, amount, outcome, "
            "started, ended, psig, csig, gpu FROM market_receipts " + tail, params).fetchall()
        keys = ("agreement_id", "provider", "consumer", "cpu_s", "peak_memory", "wall_s", "price", "units",
                "amount", "outcome", "started", "ended", "provider_sig", "consumer_sig", "gpu")
        out = []
        for row in rows:
            d = dict(zip(keys, row))
            for k in ("agreement_id", "provider_sig", "consumer_sig"):
                d[k] = bytes(d[k]).hex()
            d["role"] = "provider" if d["provider"] == self.peer_id else "consumer"
            d["gpu"] = json.loads(d["gpu"]) if d["gpu"] else None
            out.append(d)
        return out

    def to_json(self, limit: int = 1000) -> dict[str, Any]:
        """The ``synord ledger --json`` document."""
        return {"peer_id": self.peer_id, "balance": self.balance(), "receipts": self.receipts(limit)}
