"""The consumer's job tables and all their SQL: `jobs` (role 'consumer'), `job_history`, `job_output`.

One row per job (its spec, run state and outcome), one history entry per
placement ("leg"), and every output byte received, in order, by stream. The
consumer (synord.jobs.consumer) keeps jobs in memory and writes through this.

A full disk must not lose a job: a write the disk refuses is *deferred* (the
job stays in memory, its id in `unsaved`) and `write_deferred` writes it again
once space is back. Any other SQLite error is a bug and is raised.

`SCHEMA` is the migration that created these tables (synord.schema puts it in
order); it is never edited: a change is a new migration.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:
    from ..store import Store

# Migration 2: jobs this node submitted (consumer side) or runs (provider side: synord.jobs.taskstore).
SCHEMA = """
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
    """


class JobStore:
    def __init__(self, store: "Store", peer_id: str,
                 full: Callable[[str, sqlite3.Error], str | None] = lambda what, exc: None):
        """``full(what, exc)``: the reason when ``exc`` is the disk being full (the write is
        then deferred), None when it is not (then it is raised)."""
        self.store = store
        self.peer_id = peer_id
        self.full = full
        self.unsaved: set[str] = set()  # jobs whose row or history a full disk refused

    # ---- reading, at start -------------------------------------------------------------

    def load(self) -> Iterator[tuple[sqlite3.Row, list[dict], dict[str, int]]]:
        """Every consumer job, oldest first: its row, its history and its output offsets."""
        conn = self.store.conn
        for r in conn.execute("SELECT * FROM jobs WHERE role = 'consumer' ORDER BY created").fetchall():
            history = [json.loads(h[0]) for h in conn.execute(
                "SELECT entry FROM job_history WHERE job_id = ? ORDER BY seq", (r["id"],))]
            offsets = {stream: int(n) for stream, n in conn.execute(
                "SELECT stream, SUM(LENGTH(data)) FROM job_output WHERE job_id = ? GROUP BY stream",
                (r["id"],))}
            yield r, history, offsets

    # ---- the job row and its history -------------------------------------------------------

    def save(self, job: Any) -> None:
        try:
            with self.store.tx() as conn:
                self.write(conn, job)
        except sqlite3.Error as exc:
            self._defer(job, "job state", exc)

    def write(self, conn: sqlite3.Connection, job: Any) -> None:
        conn.execute(
            "INSERT INTO jobs(id, role, state, runtime, spec, provider, consumer, exit_code, error, created, updated)"
            " VALUES (?, 'consumer', ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
            " state = excluded.state, spec = excluded.spec, provider = excluded.provider,"
            " exit_code = excluded.exit_code, error = excluded.error, updated = excluded.updated",
            (job.id, job.state, job.runtime, json.dumps(job.stored_spec()), job.provider,
             self.peer_id, job.exit_code, job.error, job.created, time.time()))

    def add_history(self, job: Any) -> None:
        """Persist the job's newest history entry (already appended in memory)."""
        try:
            with self.store.tx() as conn:
                conn.execute("INSERT INTO job_history(job_id, seq, entry) VALUES (?, ?, ?)",
                             (job.id, len(job.history), json.dumps(job.history[-1])))
        except sqlite3.Error as exc:
            self._defer(job, "job history", exc)

    def update_history(self, job: Any) -> None:
        """Persist a change to the job's newest history entry."""
        try:
            with self.store.tx() as conn:
                conn.execute("UPDATE job_history SET entry = ? WHERE job_id = ? AND seq = ?",
                             (json.dumps(job.history[-1]), job.id, len(job.history)))
        except sqlite3.Error as exc:
            self._defer(job, "job history", exc)

    def _defer(self, job: Any, what: str, exc: sqlite3.Error) -> None:
        """A full disk refused this write: keep the job in memory, write it when space is back."""
        if self.full(what, exc) is None:
            raise exc
        self.unsaved.add(job.id)

    def write_deferred(self, conn: sqlite3.Connection, jobs: Iterable[Any]) -> None:
        """Write again, whole, the rows and histories a full disk refused (in ``conn``'s transaction)."""
        for job in jobs:
            self.write(conn, job)
            conn.executemany("INSERT OR REPLACE INTO job_history(job_id, seq, entry) VALUES (?, ?, ?)",
                             [(job.id, n, json.dumps(e)) for n, e in enumerate(job.history, 1)])

    # ---- output ------------------------------------------------------------------------------

    def append_output(self, conn: sqlite3.Connection, job_id: str, chunks: Iterable[tuple[str, bytes]]) -> None:
        """Append received output (in ``conn``'s transaction), after what is stored."""
        seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM job_output WHERE job_id = ?",
                           (job_id,)).fetchone()[0]
        for s, data in chunks:
            seq += 1
            conn.execute("INSERT INTO job_output(job_id, seq, stream, data) VALUES (?, ?, ?, ?)",
                         (job_id, seq, s, data))

    def output_after(self, job_id: str, seq: int) -> list[tuple[int, str, bytes]]:
        """Stored output chunks of ``job_id`` after ``seq``: (seq, stream, data), in order."""
        return [tuple(r) for r in self.store.conn.execute(
            "SELECT seq, stream, data FROM job_output WHERE job_id = ? AND seq > ? ORDER BY seq",
            (job_id, seq)).fetchall()]
