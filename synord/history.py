"""What the machine did over time, for the dashboard's charts.

One row per ``history.interval_s`` (a minute by default) in the store's
``history`` table: host CPU use, what we offered, tasks running, whether we
were contributing, and the ledger's running earned/spent totals. Rows older
than ``history.keep_days`` are dropped as new ones come, so the table stays
small (a month of minutes is ~43k rows).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .daemon import Node
    from .store import Store

# The store's migration runs this (append-only: a later change is a new migration).
SCHEMA = """
CREATE TABLE history (
    ts REAL PRIMARY KEY,
    cpu_percent REAL NOT NULL,
    offered_cpus REAL NOT NULL,
    tasks INTEGER NOT NULL,
    contributing INTEGER NOT NULL,
    earned REAL NOT NULL,
    spent REAL NOT NULL
);
"""

log = logging.getLogger("synord.history")

COLUMNS = ("ts", "cpu_percent", "offered_cpus", "tasks", "contributing", "earned", "spent")
MAX_ROWS = 1440  # one answer: a day of minutes, what the dashboard charts (~190 KB of JSON)


def record(store: "Store", sample: dict[str, Any], keep_s: float) -> None:
    with store.tx() as conn:
        conn.execute(f"INSERT OR REPLACE INTO history({', '.join(COLUMNS)}) VALUES "
                     f"({', '.join('?' * len(COLUMNS))})", tuple(sample[c] for c in COLUMNS))
        conn.execute("DELETE FROM history WHERE ts < ?", (sample["ts"] - keep_s,))


def read(store: "Store", since: float = 0.0, limit: int = MAX_ROWS) -> list[dict[str, Any]]:
    """Samples newer than ``since``, oldest first (the newest ``limit`` of them)."""
    rows = store.conn.execute(f"SELECT {', '.join(COLUMNS)} FROM history WHERE ts > ? "
                              "ORDER BY ts DESC LIMIT ?", (since, limit)).fetchall()
    return [dict(zip(COLUMNS, row)) for row in reversed(rows)]


def history_json(store: "Store", interval_s: float, since: float = 0.0) -> dict:
    """The API's answer: the sampling interval and the samples newer than ``since``."""
    return {"interval_s": interval_s, "samples": read(store, since)}


def sample(node: "Node") -> dict[str, Any]:
    import psutil
    earned, spent = node.market.ledger.totals()
    return {
        "ts": time.time(),
        "cpu_percent": psutil.cpu_percent(interval=None),  # since the previous call
        "offered_cpus": float(node.contributor.market_offer().get("cpus") or 0.0),
        "tasks": len(node.provider_jobs.running()),
        "contributing": int(node.contributor.contributing),
        "earned": earned,
        "spent": spent,
    }


async def run_sampler(node: "Node") -> None:
    """A daemon task: one sample per interval until cancelled."""
    import psutil
    psutil.cpu_percent(interval=None)  # the first call only starts the measurement
    interval = node.config["history.interval_s"]
    keep_s = node.config["history.keep_days"] * 86400.0
    while True:
        await trio.sleep(interval)
        try:
            record(node.store, sample(node), keep_s)
        except sqlite3.Error as exc:  # a missed sample is a gap in a chart, not a reason to stop the node
            log.warning("history sample not stored", extra={"error": str(exc)})
