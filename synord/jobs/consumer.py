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

import json
import logging
import re
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import trio

from protocols.envelope import seal
from protocols.framing import CHUNK, FramedStream
from protocols.identity import Identity
from protocols.negotiation import Terms
from protocols.refusals import REFUSALS
from protocols.tasks import TASK_PROTOCOL, TaskSpecError, check_progress
from protocols.transfer import MAX_BLOB_BYTES, TRANSFER_PROTOCOL, BlobStore, send_file, sha256_of

from .. import humanize as hz
from ..errors import NotFound
from ..market.port import Market, Needs, NoPlacement, PlacementRejected  # noqa: F401 (re-exported)
from ..metrics import observe_placement
from ..store import Store, json_safe
from . import agreements, output as ndjson, submit as submission
from .jobstore import JobStore
from .migration import Thresholds, decide_mode
from .placement import DEFAULT_BANDWIDTH_BPS, Placement
from .spec import TERMINAL, JobSpec, RunState, SpecView, from_stored, stored

log = logging.getLogger("synord.jobs.consumer")

FLUSH_INTERVAL_S = 0.02
OUTPUT_REFETCHES = 3  # re-attaches to fetch output missing at exit, before failing the job
# Output received while the disk is full is held in memory up to this; past it the
# task streams are not read (the provider keeps the output) until a flush succeeds.
OUTPUT_HOLD_MAX = 32 << 20
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
                "progress": self.progress, "events": self.events}


@dataclass
class Session:
    """One placement of a job: the agreement and the open task stream."""
    provider: str
    terms: Terms
    stream: FramedStream
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    preempt: dict | None = None
    mode: str | None = None
    cancel_sent: bool = False

    async def send(self, obj: Any) -> None:
        async with self.send_lock:
            await self.stream.send(obj)


class ConsumerJobs:
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
        self._unsaved = self.jobstore.unsaved  # jobs whose row or history a full disk refused
        self._held = 0  # bytes of output not yet committed

    # ---- lifecycle ------------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._load()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._flusher)
            self._expect_receipts()
            for job in self.jobs.values():
                if job.state not in TERMINAL:
                    log.info("resuming job after restart", extra={"job": job.id, "state": job.state})
                    nursery.start_soon(self._drive, job, True)
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

    def _provider_progress(self, job: ConsumerJob, peer: str, frame: Any) -> None:
        """A progress frame from the provider starting our task: peer input, checked;
        garbage is counted and ignored (the start goes on)."""
        try:
            p = check_progress(frame)
        except TaskSpecError:
            REFUSALS.count("task_output", "bad_progress_frame")
            return
        self._progress(job, p["phase"], p["done"], p["total"], note=f"{_short(peer)}: {p['phase']}")

    # ---- submission (everything checked before anything is reserved) ------------------

    async def submit(self, req: dict) -> dict:
        # Reading, validating and hashing a big artefact must not stall the daemon.
        spec = await trio.to_thread.run_sync(submission.validate, req, self.home, self.blobs)
        job = ConsumerJob(id=uuid.uuid4().hex[:16], jobspec=spec)
        self.jobs[job.id] = job
        self._save(job)
        log.info("job submitted", extra={"job": job.id, "runtime": job.runtime})
        self._nursery.start_soon(self._drive, job, False)
        return job.to_json()

    def _needs(self, job: ConsumerJob) -> Needs:
        return job.jobspec.needs()

    # ---- the drive loop -------------------------------------------------------------------

    async def _drive(self, job: ConsumerJob, resumed: bool) -> None:
        exclude: tuple[str, ...] = ()
        try:
            session = None
            if resumed and job.state in ("running", "migrating") and job.provider:
                session = await self._attach(job)
                if session is None:
                    await self._lost(job, "provider unreachable after our restart")
            preferred = None
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
        except NoPlacement as exc:
            self._set_state(job, "failed", error=str(exc))
            log.warning("job failed: no placement", extra={"job": job.id, "reason": str(exc)})
        except trio.Cancelled:
            raise
        except Exception as exc:
            log.exception("job failed", extra={"job": job.id})
            self._set_state(job, "failed", error=f"{type(exc).__name__}: {exc}")

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

    async def _launch(self, job: ConsumerJob, terms: Terms) -> Session:
        peer = terms.provider
        await self._push(peer, self.blobs.path(job.spec["sha256"]), job.spec["sha256"], "artifact", job)
        restore = None
        mode = job.spec.get("restore_mode") if job.state == "migrating" else None
        ck = job.checkpoint
        route = None
        if mode in ("full", "partial", "restart-from-checkpoint") and ck:
            if ck.get("at_provider") == peer:
                route = "direct"  # the old provider uploaded it here
                restore = {"sha256": ck["sha256"], "offsets": ck["offsets"]}
            elif not ck.get("path") or not await self._checkpoint_intact(job, ck):
                ck, mode = None, "restart"
            else:
                await self._push(peer, Path(ck["path"]), ck["sha256"], "checkpoint", job)
                restore = {"sha256": ck["sha256"], "offsets": ck["offsets"]}
                route = "via-consumer"
        body = {"job_id": job.id, "agreement_id": terms.aid.hex(), "kind": job.runtime,
                "artifact_sha256": job.spec["sha256"], "args": job.spec["args"],
                "env": job.spec["env"], "limits": job.spec["limits"],
                "checkpointable": job.spec["checkpointable"],
                "checkpoint_interval_s": self.checkpoint_interval_s if job.spec["checkpointable"] else 0,
                "restore": restore}
        body["progress"] = True  # we read progress frames before the reply
        stream = await self.mesh.open_stream(peer, TASK_PROTOCOL)
        await stream.send({"env": seal(self.identity, "task.start", body).encode()})
        self._progress(job, "starting", note=f"starting on {_short(peer)}")
        with trio.fail_after(120):  # unpacking a big image or a checkpoint takes a while
            reply = await stream.receive()
            while isinstance(reply, dict) and "progress" in reply:
                self._provider_progress(job, peer, reply["progress"])
                reply = await stream.receive()
        if not (isinstance(reply, dict) and reply.get("started")):
            with trio.move_on_after(1):
                await stream.close()
            raise RuntimeError(str(reply.get("error") if isinstance(reply, dict) else reply))
        entry = {"provider": peer, "start": time.time(), "end": None,
                 "mode": mode or "initial", "checkpoint_bytes": ck["bytes"] if restore else 0,
                 "agreement": terms.aid.hex(), "price": terms.price}
        if route:
            entry["checkpoint_route"] = route
        if job.state == "migrating":
            entry["from"] = job.provider
            if job.spec.get("assignment"):
                entry["assignment"] = job.spec.pop("assignment")
        resumed = job.state == "migrating"
        job.spec.pop("restore_mode", None)
        # Where to find the provider again if we restart mid-job.
        job.spec["provider_addrs"] = self.mesh.dialable_addrs(peer)
        self.store.kv_set(f"terms:{terms.aid.hex()}", json_safe(terms.to_body()))  # for re-attach
        self._add_history(job, entry)
        self._set_state(job, "running", provider=peer)
        observe_placement(job.created, entry["mode"])
        self._progress(job, "running", note=(f"resumed on {_short(peer)}" + (
            f" from a {hz.size(ck['bytes'])} checkpoint" if restore else " from the start")) if resumed
            else f"running on {_short(peer)}")
        log.info("job placed", extra={"job": job.id, "provider": peer[:16], "mode": entry["mode"]})
        job.session = Session(peer, terms, stream)
        return job.session

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

    async def _checkpoint_intact(self, job: ConsumerJob, ck: dict) -> bool:
        """A checkpoint that no longer matches its digest is dropped: the task restarts."""
        path = Path(ck["path"])
        ok = path.exists() and await trio.to_thread.run_sync(sha256_of, path) == ck["sha256"]
        if not ok:
            log.warning("checkpoint corrupted or missing: restarting from scratch",
                        extra={"job": job.id, "sha256": ck["sha256"][:16]})
            path.unlink(missing_ok=True)
            job.spec["checkpoint"] = None
            self._save(job)
        return ok

    async def _attach(self, job: ConsumerJob, within_s: float = 30.0) -> Session | None:
        """Re-open the task stream after our restart; the provider may need a moment
        to reconnect to us, so keep trying for ``within_s``."""
        deadline = trio.current_time() + within_s
        while True:
            await self.mesh.reach(job.provider, job.spec.get("provider_addrs", []))
            try:
                with trio.fail_after(10):
                    stream = await self.mesh.open_stream(job.provider, TASK_PROTOCOL)
                    await stream.send({"env": seal(self.identity, "task.attach",
                                                   {"job_id": job.id, "offsets": dict(job.offsets)}).encode()})
                    reply = await stream.receive()
                break
            except Exception as exc:
                if trio.current_time() >= deadline:
                    log.info("re-attach failed", extra={"job": job.id, "error": f"{type(exc).__name__}: {exc}"})
                    return None
                await trio.sleep(0.5)
        if not (isinstance(reply, dict) and reply.get("started")):
            log.info("re-attach refused", extra={"job": job.id, "reply": str(reply)[:200]})
            return None
        terms = self._terms_of(job)
        job.session = Session(job.provider, terms, stream)
        self._progress(job, "running", note=f"re-attached to {_short(job.provider)}")
        self._set_state(job, "running")
        return job.session

    def _expect_receipts(self) -> None:
        agreements.expect_receipts(self.store, self.jobs.values(), self.market)

    def _terms_of(self, job: ConsumerJob) -> Terms | None:
        return agreements.terms_of(self.store, job)

    # ---- watching a placement ----------------------------------------------------------------

    async def _watch(self, job: ConsumerJob, session: Session) -> tuple[str, str]:
        """Read the task stream until the task exits (→ "exit") or moves (→ "moved"/"lost")."""
        stream = session.stream
        refetches = 0
        try:
            while True:
                if job.cancel_requested and not session.cancel_sent:
                    await session.send({"cancel": True})
                    session.cancel_sent = True
                with trio.move_on_after(self.lease_timeout_s) as idle:
                    msg = await stream.receive()
                if idle.cancelled_caught:
                    return "lost", f"no heartbeat for {self.lease_timeout_s:g} s"
                if not isinstance(msg, dict):
                    continue
                if "o" in msg:
                    self._output(job, msg)
                    while self._held > OUTPUT_HOLD_MAX:  # the disk is full: let the provider hold it
                        await trio.sleep(FLUSH_INTERVAL_S * 5)
                elif "ckpt" in msg:
                    if not _checkpoint_frame_ok(msg["ckpt"]):
                        # its digest names a file here and its size drives a read loop
                        REFUSALS.count("task_output", "bad_checkpoint_frame")
                        return "lost", "the provider sent a malformed checkpoint frame"
                    await self._receive_checkpoint(job, session, msg["ckpt"])
                elif "ckpt_error" in msg:
                    log.warning("provider could not checkpoint", extra={"job": job.id,
                                                                      "error": msg["ckpt_error"]})
                    if session.mode == "full":
                        session.mode = "partial" if job.checkpoint else "restart"
                        await session.send({"cancel": True})
                elif "preempt" in msg:
                    await self._preempted(job, session, msg["preempt"])
                elif "exit" in msg:
                    gap = _output_gap(job.offsets, msg["exit"])
                    if gap is not None and refetches < OUTPUT_REFETCHES:
                        # The provider keeps a finished task's output a while: fetch the rest.
                        refetches += 1
                        log.warning("output incomplete at exit: re-attaching",
                                    extra={"job": job.id, "missing": gap})
                        with trio.move_on_after(1) as cs:
                            cs.shield = True
                            await stream.close()
                        again = await self._attach(job, within_s=10)
                        if again is not None:
                            session, stream = again, again.stream
                            continue
                    if gap is not None and not (session.preempt or msg["exit"].get("handed_back")):
                        msg = {"exit": {**msg["exit"], "reason": "output_incomplete",
                                        "error": f"output incomplete: {gap}"}}
                    return await self._exited(job, session, msg)
                elif "error" in msg:
                    return "lost", str(msg["error"])
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return "lost", f"stream closed: {exc or type(exc).__name__}"
        except Exception as exc:
            if job.cancel_requested:
                self._set_state(job, "cancelled")
                return "exit", "cancelled"
            return "lost", f"{type(exc).__name__}: {exc}"
        finally:
            job.session = None
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await stream.close()

    def _output(self, job: ConsumerJob, msg: dict) -> None:
        s, off, data = msg.get("o"), msg.get("off"), msg.get("d")
        if s not in ("stdout", "stderr") or not isinstance(off, int) or not isinstance(data, bytes):
            return
        have = job.offsets[s]
        if off + len(data) <= have:
            return  # already delivered (replayed after a restore)
        if off > have:
            # A gap: keep nothing past it (offsets stay true); the exit frame's
            # final offsets then show what is missing, and it is fetched again.
            REFUSALS.count("task_output", "gap")
            return
        if off < have:
            data = data[have - off:]
        job.offsets[s] = have + len(data)
        job.pending_output.append((s, data))
        self._held += len(data)
        job.notify()

    async def _flusher(self) -> None:
        """Commit received output in small batches (one fsync per batch, not per line)."""
        while True:
            await trio.sleep(FLUSH_INTERVAL_S)
            self._flush_all()

    def _flush_all(self) -> None:
        """Commit held output and deferred job rows; on a full disk keep them for the next try."""
        dirty = [j for j in self.jobs.values() if j.pending_output]
        if not dirty and not self._unsaved:
            return
        try:
            with self.store.tx() as conn:
                for job in dirty:
                    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM job_output WHERE job_id = ?",
                                       (job.id,)).fetchone()[0]
                    for s, data in job.pending_output:
                        seq += 1
                        conn.execute("INSERT INTO job_output(job_id, seq, stream, data) VALUES (?, ?, ?, ?)",
                                     (job.id, seq, s, data))
                for job in (self.jobs[i] for i in self._unsaved):
                    self._write_job(conn, job)
                    conn.executemany("INSERT OR REPLACE INTO job_history(job_id, seq, entry) VALUES (?, ?, ?)",
                                     [(job.id, n, json.dumps(e)) for n, e in enumerate(job.history, 1)])
        except sqlite3.Error as exc:
            if self.storage is None or not self.storage.failed("job output", exc):
                raise
            return  # nothing lost: still in memory, and the provider keeps what we did not read
        for job in dirty:
            job.pending_output.clear()
            job.notify()
        self._unsaved.clear()
        self._held = 0

    async def _receive_checkpoint(self, job: ConsumerJob, session: Session, info: dict) -> None:
        sha, size = info.get("sha256"), info.get("bytes")
        if info.get("pushed_to"):
            # Sent straight to the next provider; we keep what it is, not its bytes.
            old = job.checkpoint
            job.spec["checkpoint"] = {"sha256": sha, "bytes": size, "offsets": info.get("offsets") or {},
                                      "path": None, "at_provider": info["pushed_to"], "at": time.time()}
            self._flush_all()
            self._save(job)
            if old and old.get("path"):
                Path(old["path"]).unlink(missing_ok=True)
            if info.get("final"):
                self._notice(job, f"moving with a {hz.size(size)} checkpoint, sent straight to "
                             f"{_short(info['pushed_to'])}", phase="migrating", checkpoint_bytes=size)
            log.info("checkpoint went straight to the next provider",
                     extra={"job": job.id, "bytes": size, "to": info["pushed_to"][:16]})
            return
        head = await session.stream.receive()
        if not isinstance(head, dict) or head.get("blob") != size:
            raise RuntimeError("checkpoint header without its blob")
        tmp = self.ckpt_dir / f"{job.id}.part"
        t0 = time.monotonic()
        left = size
        full = None
        with open(tmp, "wb", buffering=0) as f:  # unbuffered: a full disk fails the write, not close()
            while left:
                block = await session.stream.read_raw(min(left, CHUNK))
                left -= len(block)
                if full is None:
                    try:
                        f.write(block)
                    except OSError as exc:  # the disk is full: read the rest, keep the last checkpoint
                        full = self.storage.failed("checkpoint", exc) if self.storage else None
                        if full is None:
                            raise
        if full is not None:
            tmp.unlink(missing_ok=True)
            log.warning("checkpoint dropped: no room for it", extra={"job": job.id, "reason": full})
            return
        dt = time.monotonic() - t0
        if size > (1 << 20) and dt > 0:
            self.bandwidth[session.provider] = size / dt
        actual = sha256_of(tmp)
        if actual != sha:
            tmp.unlink(missing_ok=True)
            log.warning("corrupted checkpoint refused", extra={"job": job.id})
            return
        dest = self.ckpt_dir / f"{job.id}-{sha[:16]}.tar"
        tmp.replace(dest)
        old = job.checkpoint
        self._flush_all()
        job.spec["checkpoint"] = {"sha256": sha, "bytes": size, "offsets": info.get("offsets") or {},
                                  "path": str(dest), "at": time.time()}
        self._save(job)
        if old and old.get("path") and old["path"] != str(dest):
            Path(old["path"]).unlink(missing_ok=True)
        if info.get("final") or session.preempt is not None:
            self._notice(job, f"moving with a {hz.size(size)} checkpoint", phase="migrating",
                         checkpoint_bytes=size)
        log.info("checkpoint stored", extra={"job": job.id, "bytes": size, "final": bool(info.get("final"))})

    async def _preempted(self, job: ConsumerJob, session: Session, notice: dict) -> None:
        session.preempt = notice
        ck = job.checkpoint
        size = ck["bytes"] if ck else 0
        bw = self.bandwidth.get(session.provider, DEFAULT_BANDWIDTH_BPS)
        grace = max(0.0, notice.get("deadline_ms", 0) / 1000 - time.time())
        mode, ratio = decide_mode(bw, grace, size or 1, job.spec["checkpointable"], ck is not None,
                                  self.thresholds)
        session.mode = mode
        self._update_history(job, preempt_reason=notice.get("reason"), decision=mode,
                             ratio=round(ratio, 3), grace_s=round(grace, 3))
        log.info("preemption notice", extra={"job": job.id, "mode": mode, "ratio": round(ratio, 3)})
        how = {"full": "moving with a final checkpoint",
               "partial": f"moving with the last checkpoint ({hz.size(size)})" if ck else "restarting elsewhere"}
        self._progress(job, "migrating", what="preempted", decision=mode, note=(
            f"provider {_short(session.provider)} preempted ({_printable(notice.get('reason'))}, "
            f"grace {hz.duration(grace)}): {how.get(mode, 'restarting elsewhere')}"))
        if mode == "full":
            request: dict[str, Any] = {"stop": True}
            if job.next_terms is None:
                job.next_terms = await self._preplace(job, (session.provider,), min(5.0, grace / 2))
            nxt = job.next_terms
            if nxt is not None:
                grant = seal(self.identity, "blob.grant", {"job_id": job.id, "from": session.provider,
                                                           "to": nxt.provider}, ttl_ms=120_000)
                request["push_to"] = {"peer": nxt.provider, "grant": grant.encode(),
                                      "addrs": self.mesh.dialable_addrs(nxt.provider)}
            await session.send({"checkpoint": request})
        else:
            await session.send({"cancel": True})

    async def _exited(self, job: ConsumerJob, session: Session, msg: dict) -> tuple[str, str]:
        ex = msg["exit"]
        self._flush_all()
        if session.terms is not None:
            self.market.lease_done(session.terms)
        now = time.time()
        if session.preempt is not None or ex.get("handed_back"):
            mode = session.mode or "restart"
            self._update_history(job, end=now, ended="preempted")
            job.spec["restore_mode"] = mode if job.checkpoint else "restart"
            self._set_state(job, "migrating")
            return "moved", mode
        self._update_history(job, end=now, ended="exit", exit_code=ex.get("code"),
                             usage=ex.get("usage"))
        if job.cancel_requested or ex.get("reason") == "cancelled":
            self._set_state(job, "cancelled", exit_code=ex.get("code"))
        elif ex.get("code") == 0 and not ex.get("reason"):
            self._set_state(job, "succeeded", exit_code=0)
        else:
            err = ex.get("error") or ex.get("reason")
            self._set_state(job, "failed", exit_code=ex.get("code"), error=err)
        self._cleanup(job)
        log.info("job ended", extra={"job": job.id, "state": job.state, "exit_code": job.exit_code})
        return "exit", job.state

    def _cleanup(self, job: ConsumerJob) -> None:
        ck = job.checkpoint
        if ck and ck.get("path"):
            Path(ck["path"]).unlink(missing_ok=True)

    # ---- API -------------------------------------------------------------------------------

    def jobs_json(self) -> list[dict]:
        return [j.to_json() for j in self.jobs.values()]

    def job_json(self, job_id: str) -> dict:
        return self._get(job_id).to_json()

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
        return ndjson.consumer_lines(self._get(job_id), self.jobstore, follow)


def _short(peer: str) -> str:
    return f"…{peer[-6:]}" if peer else "?"


def _printable(text: Any, limit: int = 80) -> str:
    """Peer text for a notice a terminal prints: one line, no control characters, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in str(text or "no reason given")[:limit])
    return text or "no reason given"


def _checkpoint_frame_ok(info: Any) -> bool:
    if not isinstance(info, dict):
        return False
    sha, size = info.get("sha256"), info.get("bytes")
    return (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) is not None
            and isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_BLOB_BYTES)


def _output_gap(have: dict[str, int], ex: dict) -> str | None:
    """What is missing of a task's output, given the exit frame's final offsets; None if nothing."""
    final = ex.get("offsets")
    if not isinstance(final, dict) or not all(
            isinstance(final.get(s), int) and not isinstance(final.get(s), bool) for s in ("stdout", "stderr")):
        return "the provider did not say where the output ends"
    short = [f"{s}: received {have[s]} of {final[s]} bytes" for s in ("stdout", "stderr") if have[s] != final[s]]
    return "; ".join(short) or None
