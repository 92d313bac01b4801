"""The consumer's task-stream client: a thin trio driver between one open
task stream and the machines that decide (synord.protocols.taskstream: which frame
is legal and what it means; synord.protocols.lease: is the provider still there;
synord.protocols.handover: how a preempted task moves).

It starts a task on an agreed provider (`_launch`), re-attaches after our
restart (`_attach`), reads the stream until the task exits or moves
(`_watch`), and stores output and checkpoints.  Everything it persists goes
through `ConsumerJobs` (`_set_state`, `_add_history`, `_save`, ...): this
module owns no table.

`TaskClient` is mixed into `ConsumerJobs`: the driver needs the job's store
and placement methods on ``self``, and the class keeps one public surface.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from synord.protocols import handover as ho
from synord.protocols import taskstream as ts
from synord.protocols.envelope import now_ms, seal
from synord.protocols.framing import CHUNK, FramedStream
from synord.protocols.lease import TASK, Lease
from synord.protocols.negotiation import Terms
from synord.protocols.refusals import REFUSALS
from synord.protocols.tasks import TASK_PROTOCOL
from synord.protocols.transfer import sha256_of

from .. import humanize as hz
from ..metrics import observe_placement
from . import agreements
from .placement import DEFAULT_BANDWIDTH_BPS

if TYPE_CHECKING:
    from .consumer import ConsumerJob

log = logging.getLogger("synord.jobs.consumer")

FLUSH_INTERVAL_S = 0.02
OUTPUT_REFETCHES = 3  # re-attaches to fetch output missing at exit, before failing the job
# Output received while the disk is full is held in memory up to this; past it the
# task streams are not read (the provider keeps the output) until a flush succeeds.
OUTPUT_HOLD_MAX = 32 << 20


class LaunchRefused(RuntimeError):
    """The provider answered the task.start with an error (its text, bounded)."""


@dataclass
class Session:
    """One placement of a job: the agreement, the open task stream, its machines."""
    provider: str
    terms: Terms | None
    stream: FramedStream
    machine: ts.TaskStream
    lease: Lease
    handover: ho.Handover
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    cancel_sent: bool = False

    @property
    def preempt(self) -> dict | None:
        p = self.machine.preempt
        return p.notice() if p is not None else None

    @property
    def mode(self) -> str | None:
        return self.handover.mode

    async def send(self, obj: Any) -> None:
        """A consumer frame (an event, or its dict form), through the machine."""
        event = ts.parse(ts.CONSUMER, obj) if isinstance(obj, dict) else obj
        if isinstance(event, ts.Refused):
            raise ValueError(f"not a consumer task frame: {event.detail}")
        async with self.send_lock:
            frame = self.machine.send(event)
            await self.stream.send(frame)


def _short(peer: str) -> str:
    return f"…{peer[-6:]}" if peer else "?"


def _printable(text: Any, limit: int = 80) -> str:
    """Peer text for a notice a terminal prints: one line, no control characters, bounded."""
    text = "".join(c if c.isprintable() else "?" for c in str(text or "no reason given")[:limit])
    return text or "no reason given"


def _refused(r: ts.Refused, job_id: str) -> None:
    REFUSALS.count(ts.WHERE, r.slug)
    log.info("task frame refused", extra={"job": job_id, "reason": r.slug, "detail": r.detail})


class TaskClient:
    """The task-stream half of `ConsumerJobs` (see the module docstring)."""

    def _session(self, job: "ConsumerJob", peer: str, terms: Terms | None, stream: FramedStream,
                 machine: ts.TaskStream) -> Session:
        """The lease: the negotiation's own for this agreement while the market holds it
        (its heartbeats and our task frames feed one lease), else one of our own."""
        lease = self.market.lease(terms) if terms is not None else None
        if lease is None:
            lease = Lease(int(self.lease_timeout_s * 1000), now_ms())
        lease.limit(int(self.lease_timeout_s * 1000))
        lease.heard(TASK, now_ms())  # the provider just answered
        handover = ho.Handover(ho.CONSUMER, bool(job.spec["checkpointable"]), job.checkpoint is not None)
        return Session(peer, terms, stream, machine, lease, handover)

    async def _open(self, stream: FramedStream, job: "ConsumerJob", peer: str, kind: str,
                    body: dict) -> ts.TaskStream:
        """Send the opening envelope and read until started (progress frames first); the machine."""
        machine = ts.TaskStream(ts.CONSUMER, job.offsets)
        await stream.send(machine.send(ts.Open(seal(self.identity, kind, body).encode())))
        while True:
            event = machine.receive(await stream.receive())
            if isinstance(event, ts.Refused):
                _refused(event, job.id)
                if event.slug != "bad_progress_frame":  # a bad progress frame is only a lost notice
                    raise LaunchRefused(event.detail)
            elif isinstance(event, ts.Progress):
                # already checked by the machine (protocols.tasks.check_progress)
                self._progress(job, event.phase, event.done, event.total, note=f"{_short(peer)}: {event.phase}")
            elif isinstance(event, ts.Error):
                raise LaunchRefused(event.text)
            elif isinstance(event, ts.Started):
                return machine

    async def _launch(self, job: "ConsumerJob", terms: Terms) -> Session:
        peer = terms.provider
        await self._push(peer, self.blobs.path(job.spec["sha256"]), job.spec["sha256"], "artifact", job)
        mode = job.spec.get("restore_mode") if job.state == "migrating" else None
        ck = job.checkpoint
        intact = bool(ck and ck.get("path") and ck.get("at_provider") != peer
                      and mode in ho.RESTORING_MODES and await self._checkpoint_intact(job, ck))
        plan = ho.restore_plan(mode, ck, peer, intact)
        if plan.push:
            await self._push(peer, Path(ck["path"]), ck["sha256"], "checkpoint", job)
        # progress: we read progress frames before the reply
        body = job.jobspec.task_start(job.id, terms.aid.hex(), self.checkpoint_interval_s, plan.restore)
        stream = await self.mesh.open_stream(peer, TASK_PROTOCOL)
        self._progress(job, "starting", note=f"starting on {_short(peer)}")
        try:
            with trio.fail_after(120):  # unpacking a big image or a checkpoint takes a while
                machine = await self._open(stream, job, peer, "task.start", body)
        except BaseException:
            with trio.move_on_after(1) as cs:
                cs.shield = True
                await stream.close()
            raise
        entry = {"provider": peer, "start": time.time(), "end": None,
                 "mode": plan.mode, "checkpoint_bytes": ck["bytes"] if plan.restore else 0,
                 "agreement": terms.aid.hex(), "price": terms.price}
        if terms.devices:
            entry["devices"] = list(terms.devices)  # the GPUs the provider agreed to give
        if plan.route:
            entry["checkpoint_route"] = plan.route
        if job.state == "migrating":
            entry["from"] = job.provider
            if job.spec.get("assignment"):
                entry["assignment"] = job.spec.pop("assignment")
        resumed = job.state == "migrating"
        job.spec.pop("restore_mode", None)
        # Where to find the provider again if we restart mid-job.
        job.spec["provider_addrs"] = self.mesh.dialable_addrs(peer)
        agreements.remember(self.store, terms)  # for re-attach
        self._add_history(job, entry)
        self._set_state(job, "running", provider=peer)
        observe_placement(job.created, entry["mode"])
        self._progress(job, "running", note=(f"resumed on {_short(peer)}" + (
            f" from a {hz.size(ck['bytes'])} checkpoint" if plan.restore else " from the start")) if resumed
            else f"running on {_short(peer)}")
        log.info("job placed", extra={"job": job.id, "provider": peer[:16], "mode": entry["mode"]})
        job.session = self._session(job, peer, terms, stream, machine)
        return job.session

    async def _checkpoint_intact(self, job: "ConsumerJob", ck: dict) -> bool:
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

    async def _attach(self, job: "ConsumerJob", within_s: float = 30.0) -> Session | None:
        """Re-open the task stream after our restart; the provider may need a moment
        to reconnect to us, so keep trying for ``within_s``."""
        deadline = trio.current_time() + within_s
        while True:
            await self.mesh.reach(job.provider, job.spec.get("provider_addrs", []))
            try:
                with trio.fail_after(10):
                    stream = await self.mesh.open_stream(job.provider, TASK_PROTOCOL)
                    try:
                        machine = await self._open(stream, job, job.provider, "task.attach",
                                                   {"job_id": job.id, "offsets": dict(job.offsets)})
                    except LaunchRefused as exc:
                        log.info("re-attach refused", extra={"job": job.id, "reply": str(exc)[:200]})
                        with trio.move_on_after(1):
                            await stream.close()
                        return None
                break
            except Exception as exc:
                if trio.current_time() >= deadline:
                    log.info("re-attach failed", extra={"job": job.id, "error": f"{type(exc).__name__}: {exc}"})
                    return None
                await trio.sleep(0.5)
        terms = self._terms_of(job)
        job.session = self._session(job, job.provider, terms, stream, machine)
        self._progress(job, "running", note=f"re-attached to {_short(job.provider)}")
        self._set_state(job, "running")
        return job.session

    # ---- watching a placement ----------------------------------------------------------------

    async def _watch(self, job: "ConsumerJob", session: Session) -> tuple[str, str]:
        """Read the task stream until the task exits (→ "exit") or moves (→ "moved"/"lost")."""
        stream = session.stream
        refetches = 0
        try:
            while True:
                if job.cancel_requested and not session.cancel_sent:
                    await session.send(ts.Cancel())
                    session.cancel_sent = True
                frame = None
                with trio.move_on_after(session.lease.remaining_ms(now_ms()) / 1000):
                    frame = await stream.receive()
                if frame is None:
                    if session.lease.expire(now_ms()):
                        return "lost", f"no heartbeat for {session.lease.timeout_ms / 1000:g} s"
                    continue  # the negotiation heard the provider meanwhile: the lease holds
                session.lease.heard(TASK, now_ms())
                event = session.machine.receive(frame)
                if isinstance(event, ts.Refused):
                    _refused(event, job.id)
                    if event.fatal:
                        return "lost", f"the provider broke the task protocol ({event.slug})"
                elif isinstance(event, ts.Output):
                    self._output(job, event)
                    while self._held > OUTPUT_HOLD_MAX:  # the disk is full: let the provider hold it
                        await trio.sleep(FLUSH_INTERVAL_S * 5)
                elif isinstance(event, ts.Checkpoint):
                    if event.final and session.handover.state is ho.State.STOPPING:
                        session.handover.receive(ho.FinalCheckpoint(event.pushed_to))
                    await self._receive_checkpoint(job, session, event)
                elif isinstance(event, ts.CheckpointError):
                    log.warning("provider could not checkpoint", extra={"job": job.id, "error": event.text})
                    if session.handover.checkpoint_failed():
                        await session.send(ts.Cancel())
                elif isinstance(event, ts.Preempt):
                    await self._preempted(job, session, event)
                elif isinstance(event, ts.Exit):
                    gap = session.machine.gap()
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
                            again.handover = session.handover  # the hand-over continues
                            session, stream = again, again.stream
                            continue
                    ex = event.as_dict()
                    if gap is not None and not (session.handover.preempted or event.handed_back):
                        ex = {**ex, "reason": "output_incomplete", "error": f"output incomplete: {gap}"}
                    return await self._exited(job, session, {"exit": ex})
                elif isinstance(event, ts.Error):
                    return "lost", event.text
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

    def _output(self, job: "ConsumerJob", event: ts.Output) -> None:
        """New output bytes (the machine dropped replays and gaps and advanced job.offsets)."""
        job.pending_output.append((event.stream, event.data))
        self._held += len(event.data)
        job.notify()

    async def _receive_checkpoint(self, job: "ConsumerJob", session: Session, info: ts.Checkpoint) -> None:
        sha, size = info.sha256, info.size
        if info.pushed_to:
            # Sent straight to the next provider; we keep what it is, not its bytes.
            old = job.checkpoint
            job.spec["checkpoint"] = {"sha256": sha, "bytes": size, "offsets": info.offsets,
                                      "path": None, "at_provider": info.pushed_to, "at": time.time()}
            self._flush_all()
            self._save(job)
            if old and old.get("path"):
                Path(old["path"]).unlink(missing_ok=True)
            if info.final:
                self._notice(job, f"moving with a {hz.size(size)} checkpoint, sent straight to "
                             f"{_short(info.pushed_to)}", phase="migrating", checkpoint_bytes=size)
            log.info("checkpoint went straight to the next provider",
                     extra={"job": job.id, "bytes": size, "to": info.pushed_to[:16]})
            return
        head = session.machine.receive(await session.stream.receive())
        if isinstance(head, ts.Refused):
            _refused(head, job.id)
        if not isinstance(head, ts.Blob):
            raise RuntimeError("checkpoint header without its blob")
        tmp = self.ckpt_dir / f"{job.id}.part"
        t0 = time.monotonic()
        left = size
        full = None
        with open(tmp, "wb", buffering=0) as f:  # unbuffered: a full disk fails the write, not close()
            while left:
                block = await session.stream.read_raw(min(left, CHUNK))
                session.lease.heard(TASK, now_ms())
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
            REFUSALS.count(ts.WHERE, "checkpoint_digest")
            log.warning("corrupted checkpoint refused", extra={"job": job.id})
            return
        dest = self.ckpt_dir / f"{job.id}-{sha[:16]}.tar"
        tmp.replace(dest)
        old = job.checkpoint
        self._flush_all()
        job.spec["checkpoint"] = {"sha256": sha, "bytes": size, "offsets": info.offsets,
                                  "path": str(dest), "at": time.time()}
        session.handover.have_checkpoint = True
        self._save(job)
        if old and old.get("path") and old["path"] != str(dest):
            Path(old["path"]).unlink(missing_ok=True)
        if info.final or session.handover.preempted:
            self._notice(job, f"moving with a {hz.size(size)} checkpoint", phase="migrating",
                         checkpoint_bytes=size)
        log.info("checkpoint stored", extra={"job": job.id, "bytes": size, "final": info.final})

    async def _preempted(self, job: "ConsumerJob", session: Session, notice: ts.Preempt) -> None:
        if session.handover.preempted:
            REFUSALS.count(ts.WHERE, "repeated_preempt")
            return  # one notice per placement: the hand-over is under way
        ck = job.checkpoint
        size = ck["bytes"] if ck else 0
        bw = self.bandwidth.get(session.provider, DEFAULT_BANDWIDTH_BPS)
        grace = max(0.0, notice.deadline_ms / 1000 - time.time())
        session.handover.have_checkpoint = ck is not None
        mode = session.handover.notice(grace, notice.reason, bw, size, self.thresholds)
        ratio = session.handover.ratio
        self._update_history(job, preempt_reason=notice.reason or None, decision=mode,
                             ratio=round(ratio, 3), grace_s=round(grace, 3))
        log.info("preemption notice", extra={"job": job.id, "mode": mode, "ratio": round(ratio, 3)})
        how = {"full": "moving with a final checkpoint",
               "partial": f"moving with the last checkpoint ({hz.size(size)})" if ck else "restarting elsewhere"}
        self._progress(job, "migrating", what="preempted", decision=mode, note=(
            f"provider {_short(session.provider)} preempted ({_printable(notice.reason)}, "
            f"grace {hz.duration(grace)}): {how.get(mode, 'restarting elsewhere')}"))
        if mode == "full":
            if job.next_terms is None:
                job.next_terms = await self._preplace(job, (session.provider,), min(5.0, grace / 2))
            nxt = job.next_terms
            push_to = None
            if nxt is not None:
                grant = seal(self.identity, "blob.grant", {"job_id": job.id, "from": session.provider,
                                                           "to": nxt.provider}, ttl_ms=120_000)
                push_to = {"peer": nxt.provider, "grant": grant.encode(),
                           "addrs": self.mesh.addrs_to_tell(nxt.provider, to=session.provider)}
            session.handover.send(ho.RequestStop(nxt.provider if nxt is not None else None))
            await session.send(ts.CheckpointRequest(True, push_to))
        else:
            session.handover.send(ho.Cancel())
            await session.send(ts.Cancel())

    async def _exited(self, job: "ConsumerJob", session: Session, msg: dict) -> tuple[str, str]:
        ex = msg["exit"]
        self._flush_all()
        if session.terms is not None:
            self.market.lease_done(session.terms)
        now = time.time()
        moved = session.handover.exited(bool(ex.get("handed_back")))
        if moved is not None:
            self._update_history(job, end=now, ended="preempted")
            job.spec["restore_mode"] = moved if job.checkpoint else "restart"
            self._set_state(job, "migrating")
            return "moved", moved
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
