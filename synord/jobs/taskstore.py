"""The provider's task rows and all their SQL: `jobs` rows with role 'provider'.

A row is keyed by the agreement id this provider signed (never by a name a
peer chose); the consumer's job id is kept as ``peer_job``, a label looked up
together with the consumer. The rows outlive the tasks: the owner's `job` and
`logs` read them after a task has gone from memory.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite3

    from ..store import Store

# Migration 5: provider rows keyed by the agreement id the provider signed, not by the
# consumer's job id (public, and chosen by a peer: a foreign task.start with it
# replaced our own rows); the consumer's job id moves to peer_job.
REKEY_BY_AGREEMENT = """
    ALTER TABLE jobs ADD COLUMN peer_job TEXT;
    UPDATE jobs SET peer_job = id WHERE role = 'provider';
    UPDATE jobs SET id = json_extract(spec, '$.agreement_id')
        WHERE role = 'provider' AND json_extract(spec, '$.agreement_id') IS NOT NULL
        AND NOT EXISTS (SELECT 1 FROM jobs AS o WHERE o.id = json_extract(jobs.spec, '$.agreement_id'));
    CREATE INDEX jobs_provider_peer_job ON jobs(consumer, peer_job) WHERE role = 'provider';
    """


class TaskStore:
    def __init__(self, store: "Store", peer_id: str):
        self.store = store
        self.peer_id = peer_id

    def mark_lost_after_restart(self) -> int:
        """Tasks of a previous life of this daemon are gone with their sandboxes: say so."""
        with self.store.tx() as conn:
            return conn.execute("UPDATE jobs SET state = 'lost', error = 'provider restarted', "
                                "updated = ? WHERE role = 'provider' AND state IN ('running', 'queued')",
                                (time.time(),)).rowcount

    def insert(self, key: str, consumer: str, job_id: str, body: dict, at: float) -> None:
        """A task that starts now (its task.start body is kept, without its env: it may hold secrets).
        A plain INSERT: a row is never replaced, and its key is ours."""
        with self.store.tx() as conn:
            conn.execute(
                "INSERT INTO jobs(id, role, state, runtime, spec, provider, consumer, peer_job, created, updated)"
                " VALUES (?, 'provider', 'running', ?, ?, ?, ?, ?, ?, ?)",
                (key, body["kind"], json.dumps({k: v for k, v in body.items() if k != "env"}),
                 self.peer_id, consumer, job_id, at, at))

    def record_end(self, key: str, state: str, exit_code: int | None, error: str | None) -> None:
        with self.store.tx() as conn:
            conn.execute("UPDATE jobs SET state = ?, exit_code = ?, error = ?, updated = ? WHERE id = ? "
                         "AND role = 'provider'", (state, exit_code, error, time.time(), key))

    def latest(self, consumer: str, job_id: str) -> "sqlite3.Row | None":
        """The latest row of ``consumer``'s job ``job_id`` here: (state, error), or None."""
        return self.store.conn.execute(
            "SELECT state, error FROM jobs WHERE role = 'provider' AND consumer = ? AND peer_job = ? "
            "ORDER BY created DESC LIMIT 1", (consumer, job_id)).fetchone()

    def owned(self, key: str, name: str) -> "sqlite3.Row | None":
        """For the owner: the row of agreement ``key``, else the newest whose consumer named it ``name``."""
        return self.store.conn.execute(
            "SELECT state, runtime, consumer, exit_code, error, created, updated FROM jobs "
            "WHERE role = 'provider' AND (id = ? OR peer_job = ?) ORDER BY id = ? DESC, created DESC "
            "LIMIT 1", (key, name, key)).fetchone()
