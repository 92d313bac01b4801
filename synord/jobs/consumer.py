"""Consumer side of jobs: submit → place through the book → ship → watch →
settle, and migrate when the provider is preempted or lost.

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
import shutil
import tempfile
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

import trio

from protocols.envelope import seal
from protocols.framing import CHUNK, FramedStream
from protocols.identity import Identity
from protocols.negotiation import Terms
from protocols.refusals import REFUSALS
from protocols.tasks import TASK_PROTOCOL, TaskSpecError, check_args_env, check_limits, check_progress
from protocols.transfer import MAX_BLOB_BYTES, TRANSFER_PROTOCOL, BlobStore, send_file, sha256_of
from runtimes.base import KINDS, SpecError, infer_kind

from .. import humanize as hz
from ..api import ApiError
from ..metrics import observe_placement
from ..gpu_request import gpu_request
from ..store import Store, from_json_safe, json_safe
from .migration import Displaced, Slot, Thresholds, assign_optimal, decide_mode

log = logging.getLogger("synord.jobs.consumer")

TERMINAL = ("succeeded", "failed", "cancelled")
FLUSH_INTERVAL_S = 0.02
DEFAULT_BANDWIDTH_BPS = 100 * 1024 * 1024
OUTPUT_REFETCHES = 3  # re-attaches to fetch output missing at exit, before failing the job
BATCH_WINDOW_S = 0.25
# Output received while the disk is full is held in memory up to this; past it the
# task streams are not read (the provider keeps the output) until a flush succeeds.
OUTPUT_HOLD_MAX = 32 << 20
MAX_EVENTS = 64  # notices kept per job (in memory: they narrate, the history records)


class NoPlacement(Exception):
    pass


class PlacementRejected(Exception):
    """A candidate said no (the market raises this from negotiate)."""


@dataclass(frozen=True)
class Needs:
    runtime: str
    cores: float
    memory: int
    max_price: float | None
    duration_s: int
    gpus: int = 0
    gpu_class: str | None = None
    resource_class: str = "cpu"
    gpu_memory: int | None = None  # bytes on each GPU
    cuda: str | None = None  # least CUDA compute capability


class Market(Protocol):
    """What jobs need from the market component (synord.market.service)."""

    def candidates(self, needs: Needs, exclude: tuple[str, ...] = ()) -> list[Any]: ...
    def explain(self, needs: Needs) -> str: ...
    async def negotiate(self, candidate: Any, needs: Needs) -> Terms: ...
    async def negotiate_any(self, candidates: list[Any], needs: Needs, within_s: float | None = None) -> Terms: ...
    def observed_end(self, terms: Terms, at_ms: int | None = None) -> None: ...
    async def announce_bid(self, needs: Needs, bid_id: str) -> None: ...
    async def abandon(self, terms: Terms, reason: str) -> None: ...
    def lease_done(self, terms: Terms) -> None: ...


@dataclass
class ConsumerJob:
    id: str
    runtime: str
    spec: dict
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

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    @property
    def checkpoint(self) -> dict | None:
        return self.spec.get("checkpoint")

    def to_json(self) -> dict:
        return {"id": self.id, "state": self.state, "runtime": self.runtime,
                "provider": self.provider, "exit_code": self.exit_code, "error": self.error,
                "created": self.created, "history": self.history,
                "artifact": self.spec.get("artifact"), "args": self.spec.get("args", []),
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


@dataclass
class _Displacement:
    job: ConsumerJob
    exclude: tuple[str, ...]
    done: trio.Event = field(default_factory=trio.Event)
    candidate: Any = None


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
        self._displaced: list[_Displacement] = []
        self._batch_open = False
        self._unsaved: set[str] = set()  # jobs whose row or history a full disk refused
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
        rows = self.store.conn.execute("SELECT * FROM jobs WHERE role = 'consumer' ORDER BY created").fetchall()
        for r in rows:
            job = ConsumerJob(r["id"], r["runtime"], json.loads(r["spec"]), r["state"], r["provider"],
                              r["exit_code"], r["error"], r["created"])
            job.history = [json.loads(h[0]) for h in self.store.conn.execute(
                "SELECT entry FROM job_history WHERE job_id = ? ORDER BY seq", (job.id,))]
            for stream, n in self.store.conn.execute(
                    "SELECT stream, SUM(LENGTH(data)) FROM job_output WHERE job_id = ? GROUP BY stream",
                    (job.id,)):
                job.offsets[stream] = int(n)
            self.jobs[job.id] = job

    def _save(self, job: ConsumerJob) -> None:
        try:
            with self.store.tx() as conn:
                self._write_job(conn, job)
        except sqlite3.Error as exc:
            self._defer(job, "job state", exc)
        job.notify()

    def _write_job(self, conn: sqlite3.Connection, job: ConsumerJob) -> None:
        conn.execute(
            "INSERT INTO jobs(id, role, state, runtime, spec, provider, consumer, exit_code, error, created, updated)"
            " VALUES (?, 'consumer', ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET"
            " state = excluded.state, spec = excluded.spec, provider = excluded.provider,"
            " exit_code = excluded.exit_code, error = excluded.error, updated = excluded.updated",
            (job.id, job.state, job.runtime, json.dumps(job.spec), job.provider,
             self.identity.peer_id, job.exit_code, job.error, job.created, time.time()))

    def _defer(self, job: ConsumerJob, what: str, exc: sqlite3.Error) -> None:
        """A full disk refused this write: keep the job in memory, write it when space is back."""
        if self.storage is None or not self.storage.failed(what, exc):
            raise exc
        self._unsaved.add(job.id)

    def _set_state(self, job: ConsumerJob, state: str, **fields: Any) -> None:
        job.state = state
        if state in TERMINAL:
            job.progress = None  # the state says it all
        for k, v in fields.items():
            setattr(job, k, v)
        self._save(job)

    def _add_history(self, job: ConsumerJob, entry: dict) -> None:
        job.history.append(entry)
        try:
            with self.store.tx() as conn:
                conn.execute("INSERT INTO job_history(job_id, seq, entry) VALUES (?, ?, ?)",
                             (job.id, len(job.history), json.dumps(entry)))
        except sqlite3.Error as exc:
            self._defer(job, "job history", exc)

    def _update_history(self, job: ConsumerJob, **fields: Any) -> None:
        if not job.history:
            return
        job.history[-1].update(fields)
        try:
            with self.store.tx() as conn:
                conn.execute("UPDATE job_history SET entry = ? WHERE job_id = ? AND seq = ?",
                             (json.dumps(job.history[-1]), job.id, len(job.history)))
        except sqlite3.Error as exc:
            self._defer(job, "job history", exc)

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
        try:
            # Reading, validating and hashing a big artefact must not stall the daemon.
            spec = await trio.to_thread.run_sync(self._validate, req)
        except (SpecError, TaskSpecError, ValueError) as exc:
            raise ApiError(400, f"bad task: {exc}") from None
        job = ConsumerJob(id=uuid.uuid4().hex[:16], runtime=spec["kind"], spec=spec)
        self.jobs[job.id] = job
        self._save(job)
        log.info("job submitted", extra={"job": job.id, "runtime": job.runtime})
        self._nursery.start_soon(self._drive, job, False)
        return job.to_json()

    def _validate(self, req: dict) -> dict:
        from runtimes.artifacts import check_artifact, ship_form
        path = Path(str(req.get("artifact", "")))
        if not path.is_absolute():
            raise ValueError("artifact must be an absolute path on this node")
        kind = req.get("runtime") or infer_kind(path)
        if kind not in KINDS:
            raise ValueError(f"unknown runtime {kind!r}")
        if kind == "wasm" and path.is_dir():
            raise SpecError("a wasm task needs a .wasm module, not a directory")
        exported = self._export_image(kind, path, req.get("image_ref"))
        try:
            return self._validated(req, kind, path, exported or path)
        finally:
            if exported is not None:
                shutil.rmtree(exported, ignore_errors=True)

    def _export_image(self, kind: str, path: Path, ref) -> Path | None:
        """A picked tag/digest or a docker-archive travels as a one-image OCI layout."""
        from runtimes import oci
        if kind not in ("container", "microvm"):
            return None
        if ref is not None and not isinstance(ref, str):
            raise ValueError("image_ref must be a tag or a sha256:… digest")
        if not oci.needs_export(path, ref):
            return None
        self.home.artifacts.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix=".image-", dir=self.home.artifacts))
        try:
            oci.export_image(path, ref, dest)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return dest

    def _validated(self, req: dict, kind: str, path: Path, image: Path) -> dict:
        from runtimes.artifacts import check_artifact, ship_form
        check_artifact(kind, image)  # not wasm / refused image (runtimes.oci.check_image): refused here
        args = [str(a) for a in req.get("args") or []]
        env = {str(k): str(v) for k, v in (req.get("env") or {}).items()}
        check_args_env(args, env)
        memory = int(req.get("memory_bytes") or 256 << 20)
        limits = {"cpus": float(req.get("cpus") or 1.0), "memory_bytes": memory}
        if req.get("timeout_s"):
            limits["timeout_s"] = float(req["timeout_s"])
        check_limits(limits)
        gpu = gpu_request(req, kind)  # a GPU on a sandbox that cannot take one: refused here
        max_price = req.get("max_price")
        if max_price is not None and (not isinstance(max_price, (int, float)) or max_price < 0):
            raise ValueError("max_price must be a non-negative number")
        # One file on the wire: an image layout directory travels as its oci-archive.
        shipped = ship_form(kind, image, self.home.artifacts)
        sha = self.blobs.add_file(shipped)
        if shipped != image:
            shipped.unlink(missing_ok=True)
        checkpointable = bool(req.get("checkpointable")) or kind in ("wasm", "microvm")
        return {"kind": kind, "artifact": str(path), "sha256": sha, "args": args, "env": env,
                "limits": limits, "max_price": max_price, "checkpointable": checkpointable,
                "checkpoint": None, "gpu": gpu}

    def _needs(self, job: ConsumerJob) -> Needs:
        lim = job.spec["limits"]
        duration = int(lim.get("timeout_s") or 3600)
        gpu = job.spec.get("gpu") or {}
        return Needs(runtime=job.runtime, cores=lim["cpus"], memory=lim["memory_bytes"],
                     max_price=job.spec.get("max_price"), duration_s=max(60, duration + 60),
                     gpus=gpu.get("gpus", 0), gpu_class=gpu.get("gpu_class"),
                     resource_class="gpu" if gpu else "cpu", gpu_memory=gpu.get("gpu_memory"),
                     cuda=gpu.get("cuda"))

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

    # ---- placement --------------------------------------------------------------------------

    async def _place(self, job: ConsumerJob, exclude: tuple[str, ...],
                     preferred: Any = None) -> Session:
        """Propose to the ranked candidates (the market hedges: a silent one does not
        hold up the next, and is backed off); fail with every answer after
        ``placement_timeout_s``."""
        needs = self._needs(job)
        if job.state == "migrating":
            self._progress(job, "placing", note="finding another provider")
        else:  # a first placement is quick, or `run` says it waits and why (placement_json)
            job.progress = {"phase": "placing", "done": None, "total": None}
            job.notify()
        if job.state != "migrating":
            self._set_state(job, "negotiating")
            await self.market.announce_bid(needs, job.id)
        deadline = trio.current_time() + self.placement_timeout_s
        reasons: list[str] = []
        while True:
            if job.cancel_requested:
                raise NoPlacement("cancelled")
            cands = self.market.candidates(needs, exclude)
            if preferred is not None:
                cands = [preferred] + [c for c in cands if c.ask.peer != preferred.ask.peer]
                preferred = None
            if cands:
                try:
                    terms = await self.market.negotiate_any(
                        cands, needs, within_s=max(1.0, deadline - trio.current_time()))
                except PlacementRejected as exc:
                    reasons.append(str(exc))
                    log.info("no candidate agreed", extra={"job": job.id, "reason": str(exc)})
                else:
                    try:
                        return await self._launch(job, terms)
                    except Exception as exc:
                        if "corrupted checkpoint" in str(exc) and job.checkpoint:
                            # The provider could not restore it: fall back to a clean restart.
                            log.warning("checkpoint refused by the provider: restarting from scratch",
                                        extra={"job": job.id, "error": str(exc)})
                            job.spec["checkpoint"] = None
                            job.spec["restore_mode"] = "restart"
                            self._save(job)
                        reasons.append(f"{terms.provider[:12]}: {exc}")
                        await self.market.abandon(terms, f"launch failed: {exc}")
                        log.warning("launch failed", extra={"job": job.id, "provider": terms.provider[:16],
                                                            "error": f"{type(exc).__name__}: {exc}"})
            if trio.current_time() >= deadline:
                why = "; ".join(reasons[-3:]) or self.market.explain(needs)
                raise NoPlacement(f"no provider took the task within {self.placement_timeout_s:g} s: {why}")
            await trio.sleep(0.5)

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
        if terms.devices:
            entry["devices"] = list(terms.devices)  # the GPUs the provider agreed to give
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

    async def _preplace(self, job: ConsumerJob, exclude: tuple[str, ...], within_s: float) -> Terms | None:
        """Agree with the next provider while the task still runs, so the old one can
        send the checkpoint straight there."""
        needs = self._needs(job)
        with trio.move_on_after(within_s):
            preferred = await self._join_replacement(job, exclude)
            cands = self.market.candidates(needs, exclude)
            if preferred is not None:
                cands = [preferred] + [c for c in cands if c.ask.peer != preferred.ask.peer]
            for cand in cands:
                try:
                    return await self.market.negotiate(cand, needs)
                except PlacementRejected:
                    continue
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
        """Receipts still to come for agreements made before a restart: those of
        legs still open, or ended within the hour the provider resends receipts
        for. Let the market countersign them."""
        from ..market.negotiator import RECEIPT_RESEND_FOR_MS
        since = time.time() - RECEIPT_RESEND_FOR_MS / 1000
        for job in self.jobs.values():
            for leg in job.history:
                if not leg.get("agreement") or (leg.get("end") is not None and leg["end"] < since):
                    continue
                row = self.store.kv_get(f"terms:{leg['agreement']}")
                if row:
                    end = leg.get("end")
                    self.market.expect_receipt(Terms.from_body(from_json_safe(row)),
                                               None if end is None else int(end * 1000))

    def _terms_of(self, job: ConsumerJob) -> Terms | None:
        aid = job.history[-1].get("agreement") if job.history else None
        if not aid:
            return None
        row = self.store.kv_get(f"terms:{aid}")
        return Terms.from_body(from_json_safe(row)) if row else None

    # ---- re-placement of displaced jobs, all at once --------------------------------------

    async def _join_replacement(self, job: ConsumerJob, exclude: tuple[str, ...]) -> Any:
        """Wait for the batch of jobs displaced at about the same time to be assigned
        together; returns this job's candidate (None: place it on its own)."""
        entry = _Displacement(job, exclude)
        self._displaced.append(entry)
        if not self._batch_open:
            self._batch_open = True
            self._nursery.start_soon(self._assign_batch)
        await entry.done.wait()
        return entry.candidate

    async def _assign_batch(self) -> None:
        await trio.sleep(BATCH_WINDOW_S)  # notices from one provider arrive together
        batch, self._displaced, self._batch_open = self._displaced, [], False
        try:
            self._assign(batch)
        finally:
            for entry in batch:
                entry.done.set()

    def _assign(self, batch: list["_Displacement"]) -> None:
        tasks, asks = [], {}
        for e in batch:
            needs = self._needs(e.job)
            ck = e.job.checkpoint if e.job.spec.get("restore_mode") not in (None, "restart") else None
            tasks.append(Displaced(e.job.id, needs.cores, needs.memory, needs.runtime,
                                   ck["bytes"] if ck else 0, needs.max_price, e.exclude))
            for cand in self.market.candidates(needs, e.exclude):
                asks.setdefault((cand.ask.peer, cand.ask.id), cand)
        slots: list[Slot] = []
        owners: list[Any] = []
        smallest = min(batch, key=lambda e: e.job.spec["limits"]["cpus"]).job.spec["limits"]
        for cand in asks.values():
            a = cand.ask
            # How many tasks of this batch the ask can hold; each slot gets an equal share.
            n = int(min(a.cores / max(smallest["cpus"], 1e-9), a.memory / max(smallest["memory_bytes"], 1)))
            n = max(0, min(n, len(batch)))
            for _ in range(n):
                slots.append(Slot(a.peer, a.cores / n, a.memory // n, a.price,
                                  self.bandwidth.get(a.peer, DEFAULT_BANDWIDTH_BPS), tuple(a.runtimes)))
                owners.append(cand)
        t0 = time.perf_counter()
        result = assign_optimal(tasks, slots)
        solve_ms = (time.perf_counter() - t0) * 1000
        for e in batch:
            j = result.get(e.job.id)
            e.candidate = owners[j] if j is not None else None
            e.job.spec["assignment"] = {"method": "kuhn-munkres", "batch": len(batch),
                                        "slots": len(slots), "solve_ms": round(solve_ms, 3),
                                        "provider": owners[j].ask.peer if j is not None else None}
        if len(batch) > 1:
            log.info("displaced jobs assigned together", extra={"jobs": len(batch), "slots": len(slots),
                                                                "solve_ms": round(solve_ms, 3)})

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
            raise ApiError(404, f"no job {job_id}")
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

    async def output(self, job_id: str, follow: bool) -> AsyncIterator[bytes]:
        job = self._get(job_id)
        last_seq = 0
        while True:
            changed = job.changed
            rows = self.store.conn.execute(
                "SELECT seq, stream, data FROM job_output WHERE job_id = ? AND seq > ? ORDER BY seq",
                (job.id, last_seq)).fetchall()
            for seq, s, data in rows:
                last_seq = seq
                yield (json.dumps({"stream": s, "data": data.decode("utf-8", "surrogateescape")}) + "\n").encode()
            if job.state in TERMINAL and not job.pending_output:
                if not rows:
                    end = {"exit_code": job.exit_code, "state": job.state}
                    if job.error:
                        end["error"] = job.error
                    yield (json.dumps(end) + "\n").encode()
                    return
                continue
            if not follow:
                return
            with trio.move_on_after(1.0):
                await changed.wait()


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
