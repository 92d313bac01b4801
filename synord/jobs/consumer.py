"""Consumer side of jobs: submit → place through the book → ship → watch →
settle, and migrate when the provider is preempted or lost.

This module drives a job's life; its rooms are next to it: the typed job
(spec.py: JobSpec, RunState), its tables (jobstore.py), checking a request
(submit.py), finding a provider and batch re-assignment (placement.py), the
agreement of each leg kept for after a restart (agreements.py), the NDJSON
output the API streams (output.py).

    queued → negotiating → running ⇄ migrating → succeeded | failed | cancelled

Durability: the job row, its history and every output byte received are in
the state store. Output is stored by per-stream byte offset, so a re-attach
(after our restart) or a restore (after a migration) asks the provider for
"everything after offset N" and the user sees each line exactly once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import trio

from synord.protocols.envelope import seal
from synord.protocols.handover import Thresholds
from synord.protocols.identity import Identity
from synord.protocols.negotiation import Terms
from synord.protocols.relayclient import wait_direct
from synord.protocols.transfer import TRANSFER_PROTOCOL, BlobStore, send_file

from .. import humanize as hz
from ..errors import NotFound
from ..market.port import Market, Needs, NoPlacement
from ..store import Store
from . import agreements, gang as gangs, output as ndjson, submit as submission
from .jobstore import JobStore
from .placement import Placement
from .shards import Shards
from .spec import TERMINAL, JobSpec, RunState, SpecView, from_stored, stored
from .task_client import FLUSH_INTERVAL_S, Session, TaskClient, _printable, _short

log = logging.getLogger("synord.jobs.consumer")

FLUSH_RETRY_S = 1.0  # the flusher's period with no output (deferred rows of a full disk)
MAX_EVENTS = 64  # notices kept per job (in memory: they narrate, the history records)


@dataclass
class ConsumerJob:
    id: str
    jobspec: JobSpec  # what the user asked: frozen
    state: str = "queued"
    provider: str | None = None
    exit_code: int | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    history: list[dict] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    cancel_requested: bool = False
    changed: trio.Event = field(default_factory=trio.Event)
    session: "Session | None" = None
    next_terms: Terms | None = None  # agreed with the next provider before a direct hand-over
    pending_output: list[tuple[str, bytes]] = field(default_factory=list)
    progress: dict | None = None  # {phase, done, total}: what the job is doing now
    events: list[dict] = field(default_factory=list)  # notices {t, text, ...}, the last MAX_EVENTS
    runstate: RunState = field(default_factory=RunState)  # what happened to it since: persisted
    service_view: dict | None = None  # a service's live state (synord.jobs.service_client)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    @property
    def runtime(self) -> str:
        return self.jobspec.kind

    @property
    def spec(self) -> SpecView:
        """The spec and run state as one dict-like view (``job.spec["checkpoint"]``);
        only run-state keys can be set. Transitional: new code uses jobspec/runstate."""
        return SpecView(self.jobspec, self.runstate)

    def stored_spec(self) -> dict:
        """The jobs.spec column (synord.jobs.jobstore)."""
        return stored(self.jobspec, self.runstate)

    @property
    def checkpoint(self) -> dict | None:
        return self.runstate.checkpoint

    def to_json(self) -> dict:
        return {"id": self.id, "state": self.state, "runtime": self.runtime,
                "provider": self.provider, "exit_code": self.exit_code, "error": self.error,
                "created": self.created, "history": self.history,
                "artifact": self.jobspec.artifact, "args": list(self.jobspec.args),
                "checkpoint": ({k: self.checkpoint[k] for k in ("sha256", "bytes", "offsets")}
                               if self.checkpoint else None),
                "progress": self.progress, "events": self.events,
                "priority": self.jobspec.priority, "preemptible": self.jobspec.preemptible,
                **({"gang": self.runstate.gang} if self.runstate.gang else {}),
                **({"service": _service_json(self)} if self.jobspec.service else {})}


def _service_json(job: "ConsumerJob") -> dict:
    from .service_client import to_json
    return to_json(job)


class ConsumerJobs(TaskClient):
    storage = None  # synord.storage_health.StorageHealth, set by the node

    def __init__(self, identity: Identity, store: Store, home, mesh, market: Market,
                 lease_timeout_s: float = 5.0, checkpoint_interval_s: float = 10.0,
                 placement_timeout_s: float = 30.0, thresholds: Thresholds = Thresholds()):
        self.identity = identity
        self.store = store
        self.home = home
        self.mesh = mesh
        self.market = market
        self.lease_timeout_s = lease_timeout_s
        self.checkpoint_interval_s = checkpoint_interval_s
        self.placement_timeout_s = placement_timeout_s
        self.thresholds = thresholds
        self.blobs = BlobStore(home.artifacts)
        self.ckpt_dir = Path(home.checkpoints)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, ConsumerJob] = {}
        self.bandwidth: dict[str, float] = {}
        self._nursery: trio.Nursery | None = None
        self.jobstore = JobStore(store, identity.peer_id, full=self._disk_full)
        self.placement = Placement(self)
        self.sharding = Shards(self, ConsumerJob)  # sharded jobs: a parent and one child job per shard
        self._unsaved = self.jobstore.unsaved  # jobs whose row or history a full disk refused
        self._held = 0  # bytes of output not yet committed
        self._output_arrived = trio.Event()  # wakes the flusher: an idle node must not poll

    # ---- lifecycle ------------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._load()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._flusher)
            self._expect_receipts()
            for job in self.jobs.values():
                if job.state not in TERMINAL and not job.runstate.shard:  # a shard: its parent drives it
                    log.info("resuming job after restart", extra={"job": job.id, "state": job.state})
                    nursery.start_soon(self._driver(job), job, True)
            task_status.started()
            await trio.sleep_forever()

    def _load(self) -> None:
        for r, history, offsets in self.jobstore.load():
            spec, run = from_stored(json.loads(r["spec"]))
            job = ConsumerJob(r["id"], spec, r["state"], r["provider"], r["exit_code"], r["error"],
                              r["created"], runstate=run)
            job.history = history
            job.offsets.update(offsets)
            self.jobs[job.id] = job

    def _disk_full(self, what: str, exc: sqlite3.Error) -> str | None:
        return self.storage.failed(what, exc) if self.storage is not None else None

    def _save(self, job: ConsumerJob) -> None:
        self.jobstore.save(job)
        job.notify()

    def _write_job(self, conn: sqlite3.Connection, job: ConsumerJob) -> None:
        self.jobstore.write(conn, job)

    def _set_state(self, job: ConsumerJob, state: str, **fields: Any) -> None:
        job.state = state
        if state in TERMINAL:
            job.progress = None  # the state says it all
        for k, v in fields.items():
            setattr(job, k, v)
        self._save(job)

    def _add_history(self, job: ConsumerJob, entry: dict) -> None:
        job.history.append(entry)
        self.jobstore.add_history(job)

    def _update_history(self, job: ConsumerJob, **fields: Any) -> None:
        if not job.history:
            return
        job.history[-1].update(fields)
        self.jobstore.update_history(job)

    # ---- progress and notices (what `synord run` and the dashboard show) ---------------

    def _progress(self, job: ConsumerJob, phase: str, done: int | None = None,
                  total: int | None = None, note: str | None = None, **extra: Any) -> None:
        """The job's current phase; a new phase (or a new thing uploaded) is also a notice."""
        old = job.progress or {}
        job.progress = {"phase": phase, "done": done, "total": total, **extra}
        if (old.get("phase"), old.get("what")) != (phase, extra.get("what")):
            self._notice(job, note or phase, phase=phase, total=total, **extra)
        job.notify()

    def _notice(self, job: ConsumerJob, text: str, **extra: Any) -> None:
        n = job.events[-1]["n"] + 1 if job.events else 1  # `run` prints each notice once, by n
        job.events.append({"n": n, "t": time.time(), "text": text, **extra})
        del job.events[:-MAX_EVENTS]
        log.info("job notice", extra={"job": job.id, "notice": text})
        job.notify()

    # ---- submission (everything checked before anything is reserved) ------------------

    async def submit(self, req: dict) -> dict:
        nodes = gangs.nodes_of(req)  # a gang (--nodes N): synord.jobs.gang
        # Reading, validating and hashing a big artefact must not stall the daemon.
        spec = await trio.to_thread.run_sync(submission.validate, req, self.home, self.blobs)
        if req.get("shards") is not None or req.get("input") is not None:
            return await self.sharding.submit(req, spec)
        job = ConsumerJob(id=uuid.uuid4().hex[:16], jobspec=spec)
        if nodes:
            job.runstate.gang = {"size": nodes}
        self.jobs[job.id] = job
        self._save(job)
        log.info("job submitted", extra={"job": job.id, "runtime": job.runtime})
        self._nursery.start_soon(self._driver(job), job, False)
        return job.to_json()

    def _needs(self, job: ConsumerJob) -> Needs:
        return job.jobspec.needs()

    # ---- the drive loop -------------------------------------------------------------------

    def _driver(self, job: ConsumerJob):
        """What drives the job: a sharded job's parent follows its shards (synord.jobs.shards),
        a gang's parent its members (synord.jobs.gang)."""
        if job.runstate.shards:
            return self.sharding.drive
        return functools.partial(gangs.drive, self) if gangs.is_parent(job) else self._drive

    @contextlib.contextmanager
    def failing_on_error(self, job: ConsumerJob, what: str):
        """Around a job's driver (``what``: job, gang): no placement, or a bug of ours,
        fails the job with the reason instead of escaping into the daemon's nursery."""
        try:
            yield
        except NoPlacement as exc:
            self._set_state(job, "failed", error=str(exc))
            log.warning(f"{what} failed: no placement", extra={"job": job.id, "reason": str(exc)})
        except Exception as exc:  # trio.Cancelled is a BaseException: it passes
            log.exception(f"{what} failed", extra={"job": job.id})
            self._set_state(job, "failed", error=f"{type(exc).__name__}: {exc}")

    async def _drive(self, job: ConsumerJob, resumed: bool, session: Session | None = None,
                     exclude: tuple[str, ...] = (), preferred: Any = None) -> None:
        """``session``: the task already started (a gang member), watched from here on;
        ``exclude``/``preferred``: providers to avoid / to try first (a re-placed shard)."""
        with self.failing_on_error(job, "job"):
            if resumed and job.state in ("running", "migrating") and job.provider:
                session = await self._attach(job)
                if session is None:
                    await self._lost(job, "provider unreachable after our restart")
            while True:
                if job.cancel_requested:
                    self._set_state(job, "cancelled")
                    return
                if session is None and job.next_terms is not None:
                    session = await self._launch_prearranged(job)
                if session is None:
                    session = await self._place(job, exclude, preferred)
                outcome, detail = await self._watch(job, session)
                if session.terms is not None:  # its receipt may bill no more than we saw
                    self.market.observed_end(session.terms)
                if outcome == "exit":
                    return
                exclude = (session.provider,)
                session = None
                if outcome == "lost":
                    await self._lost(job, detail)
                if job.next_terms is None:
                    preferred = await self._join_replacement(job, exclude)

    async def _lost(self, job: ConsumerJob, reason: str) -> None:
        ck = job.checkpoint
        mode = "restart-from-checkpoint" if ck else "restart"
        self._update_history(job, end=time.time(), ended="lost", reason=reason)
        self._progress(job, "migrating", what="lost", note=f"provider {_short(job.provider or '')} lost "
                       f"({_printable(reason)}): restarting" + (
                           f" from a {hz.size(ck['bytes'])} checkpoint" if ck else " from the start"))
        log.warning("provider lost", extra={"job": job.id, "provider": (job.provider or "")[:16],
                                            "reason": reason, "mode": mode})
        job.spec["restore_mode"] = mode
        self._set_state(job, "migrating")

    # ---- placement (synord.jobs.placement) ----------------------------------------------------

    async def _place(self, job: ConsumerJob, exclude: tuple[str, ...], preferred: Any = None) -> Session:
        return await self.placement.place(job, exclude, preferred)

    async def _preplace(self, job: ConsumerJob, exclude: tuple[str, ...], within_s: float) -> Terms | None:
        return await self.placement.preplace(job, exclude, within_s)

    async def _join_replacement(self, job: ConsumerJob, exclude: tuple[str, ...]) -> Any:
        return await self.placement.join_replacement(job, exclude)

    async def _push(self, peer: str, path: Path, sha: str, kind: str, job: ConsumerJob) -> None:
        size = path.stat().st_size
        offer = seal(self.identity, "blob.offer",
                     {"sha256": sha, "size": size, "kind": kind, "job_id": job.id}).encode()
        await wait_direct(self.mesh, peer, size)  # large blobs never through a limited relay
        stream = await self.mesh.open_stream(peer, TRANSFER_PROTOCOL)
        t0 = time.monotonic()
        self._progress(job, "uploading", 0, size, what=kind,
                       note=f"uploading the {kind} ({hz.size(size)}) to {_short(peer)}")
        try:
            sent = await send_file(stream, offer, path, lambda done, total: self._progress(
                job, "uploading", done, total, what=kind))
        finally:
            with trio.move_on_after(1):
                await stream.close()
        dt = time.monotonic() - t0
        if sent > 1 << 20 and dt > 0:
            self.bandwidth[peer] = sent / dt
        self._notice(job, f"{kind} sent in {hz.duration(dt)}" if sent else f"{kind} already there",
                     phase="uploading", what=kind, total=size, sent=sent)
        log.info("blob shipped", extra={"job": job.id, "kind": kind, "bytes": size, "sent": sent,
                                        "s": round(dt, 3)})


    async def _launch_prearranged(self, job: ConsumerJob) -> "Session | None":
        """Start on the provider agreed before the hand-over (it may already hold the checkpoint)."""
        terms, job.next_terms = job.next_terms, None
        try:
            return await self._launch(job, terms)
        except Exception as exc:
            log.warning("launch on the prearranged provider failed", extra={
                "job": job.id, "provider": terms.provider[:16], "error": f"{type(exc).__name__}: {exc}"})
            await self.market.abandon(terms, f"launch failed: {exc}")
            return None


    def _expect_receipts(self) -> None:
        agreements.expect_receipts(self.store, self.jobs.values(), self.market)

    def _terms_of(self, job: ConsumerJob) -> Terms | None:
        return agreements.terms_of(self.store, job)

    # ---- watching a placement ----------------------------------------------------------------


    async def _flusher(self) -> None:
        """Commit received output in small batches (one fsync per batch, not per line).
        Asleep while nothing arrives (it woke 50 times a second on an idle node); rows a
        full disk refused are retried each FLUSH_RETRY_S."""
        while True:
            with trio.move_on_after(FLUSH_RETRY_S):
                await self._output_arrived.wait()
                self._output_arrived = trio.Event()
                await trio.sleep(FLUSH_INTERVAL_S)  # what arrives meanwhile joins the batch
            self._flush_all()

    def _output(self, job: ConsumerJob, event) -> None:
        super()._output(job, event)
        self._output_arrived.set()

    def _flush_all(self) -> None:
        """Commit held output and deferred job rows; on a full disk keep them for the next try."""
        dirty = [j for j in self.jobs.values() if j.pending_output]
        if not dirty and not self._unsaved:
            return
        try:
            with self.store.tx() as conn:
                for job in dirty:
                    self.jobstore.append_output(conn, job.id, job.pending_output)
                self.jobstore.write_deferred(conn, (self.jobs[i] for i in self._unsaved))
        except sqlite3.Error as exc:
            if self.storage is None or not self.storage.failed("job output", exc):
                raise
            return  # nothing lost: still in memory, and the provider keeps what we did not read
        for job in dirty:
            job.pending_output.clear()
            job.notify()
        self._unsaved.clear()
        self._held = 0


    def _cleanup(self, job: ConsumerJob) -> None:
        ck = job.checkpoint
        if ck and ck.get("path"):
            Path(ck["path"]).unlink(missing_ok=True)
        for v in (job.runstate.volumes or {}).values():  # a service's volumes from a hand-over
            Path(v["path"]).unlink(missing_ok=True)

    # ---- API -------------------------------------------------------------------------------

    def jobs_json(self) -> list[dict]:
        return [self.sharding.describe(j, j.to_json()) for j in self.jobs.values()]

    def job_json(self, job_id: str) -> dict:
        job = self._get(job_id)
        return self.sharding.describe(job, gangs.describe(self, job))

    def placement_json(self, job_id: str) -> dict:
        """Whether the job still waits for a provider, and why (`run` says so at once)."""
        job = self._get(job_id)
        waiting = job.state in ("queued", "negotiating")
        needs = self._needs(job)
        return {"id": job.id, "state": job.state, "waiting": waiting,
                "candidates": len(self.market.candidates(needs)) if waiting else None,
                "why": self.market.explain(needs) if waiting else None,
                "placement_timeout_s": self.placement_timeout_s}

    def _get(self, job_id: str) -> ConsumerJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    async def cancel(self, job_id: str) -> dict:
        job = self._get(job_id)
        if job.state in TERMINAL:
            return job.to_json()
        job.cancel_requested = True
        if job.session is not None:
            with trio.move_on_after(5):
                await job.session.send({"cancel": True})
                job.session.cancel_sent = True
        elif job.state in ("queued", "negotiating"):
            self._set_state(job, "cancelled")
        job.notify()
        with trio.move_on_after(10):
            while job.state not in TERMINAL:
                await job.changed.wait()
        return job.to_json()

    def output(self, job_id: str, follow: bool) -> AsyncIterator[bytes]:
        """NDJSON lines of the job's output (synord.jobs.output); NotFound at once."""
        job = self._get(job_id)
        if gangs.is_parent(job):
            return gangs.output_lines(self, job, follow)
        return ndjson.consumer_lines(job, self.jobstore, follow)


