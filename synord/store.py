"""The daemon's one state store: SQLite in WAL mode, owned by the daemon.

Durability rule: a write is acknowledged (API answer, protocol message) only
after its transaction committed; with WAL + synchronous=FULL a committed
transaction survives kill -9 and power loss.

Schema changes are append-only migrations: `MIGRATIONS[i]` moves the database
from ``user_version == i`` to ``i + 1``. Components that own tables add a
migration here (or a callable that gets the connection) — never edit an old one.

Calls are synchronous: each is a short local transaction (well under a
millisecond on this disk), cheaper than a thread hop.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

Migration = str | Callable[[sqlite3.Connection], None]


def _market_schema(conn: sqlite3.Connection) -> None:
    from .market.ledger import SCHEMA  # the ledger owns its tables' definitions
    _exec_script(conn, SCHEMA)


def _history_schema(conn: sqlite3.Connection) -> None:
    from .history import SCHEMA  # the dashboard's samples over time (synord.history)
    _exec_script(conn, SCHEMA)


def _gpu_schema(conn: sqlite3.Connection) -> None:
    from .gpu_devices import SCHEMA  # the GPU allocator owns its table
    _exec_script(conn, SCHEMA)


MIGRATIONS: list[Migration] = [
    # 1: generic durable settings (pause state, counters...)
    """
    CREATE TABLE kv (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated REAL NOT NULL
    );
    """,
    # 2: jobs this node submitted (consumer side) or runs (provider side)
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        role TEXT NOT NULL CHECK (role IN ('consumer', 'provider')),
        state TEXT NOT NULL,
        runtime TEXT NOT NULL,
        spec TEXT NOT NULL,
        provider TEXT,
        consumer TEXT,
        exit_code INTEGER,
        error TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX jobs_state ON jobs(state);
    CREATE TABLE job_history (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        seq INTEGER NOT NULL,
        entry TEXT NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE job_output (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        seq INTEGER NOT NULL,
        stream TEXT NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    """,
    # 3: market ledger (receipts, outcomes for reputation)
    _market_schema,
    # 4: one sample of utilisation and earnings per minute, for the dashboard's charts
    _history_schema,
    # 5: provider rows keyed by the agreement id the provider signed, not by the
    # consumer's job id (public, and chosen by a peer: a foreign task.start with it
    # replaced our own rows); the consumer's job id moves to peer_job.
    """
    ALTER TABLE jobs ADD COLUMN peer_job TEXT;
    UPDATE jobs SET peer_job = id WHERE role = 'provider';
    UPDATE jobs SET id = json_extract(spec, '$.agreement_id')
        WHERE role = 'provider' AND json_extract(spec, '$.agreement_id') IS NOT NULL
        AND NOT EXISTS (SELECT 1 FROM jobs AS o WHERE o.id = json_extract(jobs.spec, '$.agreement_id'));
    CREATE INDEX jobs_provider_peer_job ON jobs(consumer, peer_job) WHERE role = 'provider';
    """,
    # 6: which GPU unit is held by which agreement (synord.gpu_devices)
    _gpu_schema,
]


class StoreCorrupt(RuntimeError):
    """The state file is not a sound SQLite database: we refuse to use it (``Store(path, check_integrity=True)``)."""


class Store:
    # Called with (where, exc) when a write fails: the node's storage health listens.
    on_failure: Callable[[str, BaseException], None] | None = None

    def __init__(self, path: Path, check_integrity: bool = False):
        self.path = Path(path)
        # A zero-byte state.db is not a first start (that has no file): its data is gone.
        wal = self.path.with_name(self.path.name + "-wal")
        self.was_empty = (self.path.exists() and self.path.stat().st_size == 0
                          and not (wal.exists() and wal.stat().st_size > 0))
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA busy_timeout=5000")
            if check_integrity:
                self.check_integrity()
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            if getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
                raise StoreCorrupt(corrupt_message(self.path, str(exc))) from None
            raise
        self.migrate()

    def check_integrity(self) -> None:
        """Refuse a store SQLite itself calls damaged: a silently half-read ledger or job
        table is worse than a clear stop (the operator decides: backup or a fresh store)."""
        problem = _integrity(self.conn)
        if problem:
            raise StoreCorrupt(corrupt_message(self.path, problem))

    def migrate(self) -> int:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(f"{self.path}: schema version {version} is newer than this synord "
                               f"({len(MIGRATIONS)}); upgrade synord")
        for i in range(version, len(MIGRATIONS)):
            with self.tx() as conn:
                step = MIGRATIONS[i]
                if callable(step):
                    step(conn)
                else:
                    _exec_script(conn, step)
                conn.execute(f"PRAGMA user_version = {i + 1}")
        return len(MIGRATIONS)

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: commits on success, rolls back on error."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full) may leave the transaction open, or SQLite may
                # have rolled it back already: either way the next BEGIN must work.
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if self.on_failure is not None:
                self.on_failure("state store", exc)
            raise

    def kv_get(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def kv_delete(self, key: str) -> None:
        with self.tx() as conn:
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))

    def kv_items(self, prefix: str) -> list[tuple[str, Any]]:
        rows = self.conn.execute("SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                                 (prefix, prefix + "\uffff")).fetchall()
        return [(k, json.loads(v)) for k, v in rows]

    def kv_set(self, key: str, value: Any) -> None:
        with self.tx() as conn:
            conn.execute(
                "INSERT INTO kv(key, value, updated) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated = excluded.updated",
                (key, json.dumps(value), time.time()))

    def close(self) -> None:
        self.conn.close()


def _integrity(conn: sqlite3.Connection) -> str | None:
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check(3)").fetchall()]
    return None if rows == ["ok"] else "; ".join(rows)


def corrupt_message(path: Path, detail: str) -> str:
    return (f"state store {path} is corrupt ({detail}); restore a backup of it, or move it "
            f"aside to start with an empty store (mv {path} {path}.corrupt; "
            f"the jobs and the ledger in it are then gone)")


def check_file(path: Path) -> str | None:
    """Read-only integrity check of a state file (`doctor` without the daemon): the problem or None."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            problem = _integrity(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        problem = str(exc)
    return corrupt_message(path, problem) if problem else None


def _exec_script(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT our open transaction; run statement by statement instead.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def json_safe(obj: Any) -> Any:
    """JSON-safe form of a msgpack body (bytes → {"$b": hex})."""
    if isinstance(obj, bytes):
        return {"$b": obj.hex()}
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def from_json_safe(obj: Any) -> Any:
    """The inverse of `json_safe`."""
    if isinstance(obj, dict):
        if set(obj) == {"$b"}:
            return bytes.fromhex(obj["$b"])
        return {k: from_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json_safe(v) for v in obj]
    return obj
