"""The state store's migrations, in order: each owner's tables, where its SQL lives.

`synord.store` runs these (append-only: `MIGRATIONS[i]` moves a database from
``user_version == i`` to ``i + 1``; never edit one, add the next). Each step
is the owner's: the job tables (synord.jobs.jobstore), the market ledger
(synord.market.ledger), the dashboard history (synord.history), the
provider's rows (synord.jobs.taskstore), the GPU allocations (synord.gpu_devices). The store imports this list; the
owners never import the store, so the dependency points one way.
"""

from __future__ import annotations

import sqlite3
from typing import Callable

from .gpu_devices import SCHEMA as GPU_SCHEMA
from .history import SCHEMA as HISTORY_SCHEMA
from .jobs.jobstore import SCHEMA as JOBS_SCHEMA
from .jobs.taskstore import REKEY_BY_AGREEMENT
from .market.ledger import GPU_COLUMN as LEDGER_GPU_COLUMN, SCHEMA as LEDGER_SCHEMA

Migration = str | Callable[[sqlite3.Connection], None]

MIGRATIONS: list[Migration] = [
    # 1: generic durable settings (pause state, counters...): synord.store's kv
    """
    CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated REAL NOT NULL
    );
    """,
    # 2: jobs this node submitted (consumer side) or runs (provider side)
    JOBS_SCHEMA,
    # 3: market ledger (receipts, outcomes for reputation)
    LEDGER_SCHEMA,
    # 4: one sample of utilisation and earnings per minute, for the dashboard's charts
    HISTORY_SCHEMA,
    # 5: provider rows keyed by the agreement id the provider signed
    REKEY_BY_AGREEMENT,
    # 6: which GPU unit is held by which agreement (synord.gpu_devices)
    GPU_SCHEMA,
    # 7: a receipt's GPU metering
    LEDGER_GPU_COLUMN,
]
