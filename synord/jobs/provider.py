"""Provider side of jobs: accept artefacts, run tasks under an agreement,
stream them back, checkpoint them, hand them back when preempted.

Every execution lives in this component's nursery, not in the stream
handler's: a consumer that disconnects and re-attaches finds its task still
running, with every byte of output it missed.

Nothing a peer chose becomes a path or a row key here: a task's work
directory and its row in the store are named by the agreement id this
provider generated and signed (16 random bytes, hex); the consumer's job id is
only a label, looked up together with the consumer that chose it.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import trio

from synord.protocols.envelope import EnvelopeValidator, PeerEnvelopeRefused, Rejected, peer_envelope
from synord.protocols.forward import FORWARD_PROTOCOL
from synord.protocols.framing import FramedStream
from synord.protocols.identity import Identity
from synord.protocols.negotiation import Terms
from synord.protocols.shell import SHELL_PROTOCOL
from synord.protocols.tasks import MAX_STDIN_BYTES, TASK_PROTOCOL
from synord.protocols.transfer import TRANSFER_PROTOCOL, BlobStore, TransferError, receive_file
from synord.runtimes.base import Runtime

from ..store import Store
from . import output as ndjson
from .checkpoints import CheckpointError, restore_source
from .exec_service import ShellService
from .executor import TaskExecution
from .services import ProviderServices, ServiceSpecError, VolumeError
from .spec import JobSpec
from .task_server import TaskRefused, TaskServer, _refuse
from .taskstore import TaskStore

log = logging.getLogger("synord.jobs.provider")

RETAIN_S = 600.0  # a finished task's output stays available for a re-attaching consumer


@dataclass
class ProviderTask:
    job_id: str  # the consumer's name for it (a label, unique per consumer only)
    consumer: str
    terms: Terms
    execution: TaskExecution
    checkpointable: bool
    checkpoint_interval_s: float
    workdir: Path
    started_ms: int
    preempt: dict | None = None  # the notice, once the owner wants the machine back
    preempt_sent: bool = False
    attached: trio.CancelScope | None = None
    handed_back: bool = False  # a stop-checkpoint went to the consumer
    settled: bool = False  # the market was told how it ended (receipt sent)
    checkpoints_taken: int = 0
    # Held while a checkpoint is taken and sent: the exit frame must come after a
    # stop-checkpoint's bytes, since the task ends *because* of that checkpoint.
    ckpt_lock: trio.Lock = field(default_factory=trio.Lock)
    exit_sent: trio.Event = field(default_factory=trio.Event)  # the consumer has heard the end
    service: Any = None  # a service's synord.jobs.services.ServiceRun; None for a task
    restarting: bool = False  # a service's sandbox is being replaced (its end is no exit)

    @property
    def key(self) -> str:
        """Its row id in the store and its work directory's name: the agreement id."""
        return self.terms.aid.hex()


class ProviderJobs(TaskServer):
    storage = None  # synord.storage_health.StorageHealth, set by the node
    cache = None  # synord.blobcache.BlobCache over self.blobs, set by the node
    gpu = None  # synord.gpu_devices.GpuNode, set by the node
    forward_limits: dict = {}  # ForwardService's max_per_job, idle_s (config [forward]), set by the node

    def __init__(self, identity: Identity, store: Store, home, runtimes: dict[str, Runtime],
                 on_finished: Callable[[Terms, str, Any], None],
                 heartbeat_s: float = 1.0, preemption_grace_s: float = 10.0,
                 validator: EnvelopeValidator | None = None):
        self.identity = identity
        self.store = store
        self.taskstore = TaskStore(store, identity.peer_id)
        self.home = home
        self.runtimes = runtimes
        self.on_finished = on_finished
        self.heartbeat_s = heartbeat_s
        self.preemption_grace_s = preemption_grace_s
        self.validator = validator or EnvelopeValidator()
        self.blobs = BlobStore(home.artifacts)
        self.tasks: dict[tuple[str, str], ProviderTask] = {}  # (consumer, job id) -> task
        # Agreements signed but whose task has not started yet (aid -> terms).
        self.pending_terms: dict[bytes, Terms] = {}
        self._nursery: trio.Nursery | None = None
        self._mesh = None  # set by register(); used to push checkpoints onward
        self._received_for: dict[str, str] = {}  # blob sha -> consumer whose task has not started
        from ..volumes import Volumes
        self.services = ProviderServices(Volumes(home.path / "volumes"))

    # ---- lifecycle ----------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        n = self.taskstore.mark_lost_after_restart()
        if n:
            log.warning("tasks lost in a restart", extra={"count": n})
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def register(self, mesh) -> None:
        self._mesh = mesh
        # a task's consumer speaks only to cancel or ask for a checkpoint: no idle deadline
        mesh.set_handler(TASK_PROTOCOL, self.handle_task, idle_deadline=False)
        mesh.set_handler(TRANSFER_PROTOCOL, self.handle_transfer)
        self.shell = ShellService(self)
        mesh.set_handler(SHELL_PROTOCOL, self.shell.handle, idle_deadline=False)  # stdin may pause
        from .forward_service import ForwardService
        self.forward = ForwardService(self, **self.forward_limits)
        # a forwarded connection may idle: the service's own idle timeout governs
        mesh.set_handler(FORWARD_PROTOCOL, self.forward.handle, idle_deadline=False)

    def running(self) -> list[ProviderTask]:
        return [t for t in self.tasks.values() if not t.execution.done.is_set()]

    def task_of(self, consumer: str, job_id: str) -> ProviderTask | None:
        return self.tasks.get((consumer, job_id))

    def task_named(self, job_id: str) -> ProviderTask | None:
        """Any consumer's task of that name (to tell an intruder "not yours")."""
        return next((t for t in self.tasks.values() if t.job_id == job_id), None)

    def row_of(self, consumer: str, job_id: str):
        """The store's latest row of ``consumer``'s job ``job_id`` here, or None."""
        return self.taskstore.latest(consumer, job_id)

    def workdir(self, aid: bytes) -> Path:
        """Where the task under agreement ``aid`` works: named by what we signed."""
        if len(aid) != 16:
            raise ValueError("an agreement id is 16 bytes")
        return self.home.work / aid.hex()

    # ---- artefacts and checkpoints in ------------------------------------------

    def _verify_envelope(self, data: Any, stream: FramedStream, types: tuple[str, ...]):
        try:
            return peer_envelope(self.validator, data, stream.remote_peer, types)
        except PeerEnvelopeRefused as exc:
            raise TransferError(str(exc), exc.slug) from None

    async def handle_transfer(self, stream: FramedStream) -> None:
        async def authorize(peer: str, offer: dict) -> str | None:
            # Only peers holding an agreement with us may fill our disk, or a
            # provider the consumer of such an agreement granted (direct migration).
            if not self._agreements_of(peer):
                if "grant" not in offer:
                    return "no active agreement with this peer"
                why = self._check_grant(peer, offer)
                if why:
                    return why
            self._room_for(offer["size"])
            return None


        try:
            offer, path = await receive_file(
                stream, self.blobs, lambda d: self._verify_envelope(d, stream, ("blob.offer",)),
                authorize)
            log.info("blob received", extra={"sha256": offer["sha256"][:16], "kind": offer["kind"],
                                             "bytes": offer["size"]})
            self._received_for.setdefault(offer["sha256"], stream.remote_peer)
            if self.cache is not None:
                self.cache.touch(offer["sha256"])
        except TransferError as exc:
            if self.storage is not None:
                self.storage.failed("blob upload", exc)  # a full disk says so in status
            await _refuse(stream, "transfer", exc.slug, str(exc))
        except EOFError as exc:
            log.info("transfer ended", extra={"peer": stream.remote_peer[:16], "error": str(exc)})
        except Exception as exc:  # a broken peer must never take the daemon down
            log.warning("transfer failed", extra={"peer": stream.remote_peer[:16],
                                                  "error": f"{type(exc).__name__}: {exc}"})
        finally:
            with trio.move_on_after(1):
                await stream.close()

    def _check_grant(self, peer: str, offer: dict) -> str | None:
        grant = self.validator.check(offer["grant"])
        if isinstance(grant, Rejected) or grant.type != "blob.grant":
            return "invalid transfer grant"
        g = grant.body
        if (g["to"], g["from"], g["job_id"]) != (self.identity.peer_id, peer, offer.get("job_id")) \
                or offer.get("kind") != "checkpoint":
            return "the grant is for another transfer"
        if not self._agreements_of(grant.sender_id):
            return "the granting consumer holds no agreement with us"
        self._received_for[offer["sha256"]] = grant.sender_id  # the cache keeps it for that consumer
        return None

    def _room_for(self, size: int) -> None:
        """Refuse a blob of ``size`` bytes that cannot be taken now (disk full, cache limit);
        least recently used blobs are evicted to make room."""
        if self.storage is None or self.cache is None:
            return
        self.storage.check()
        why = self.cache.make_room(size, self.storage.free_bytes, self.storage.min_free_bytes)
        if why is None and self.storage.failure is not None:
            why = self.storage.reason
        if why is not None:
            raise TransferError(f"provider storage full: {why}", "storage-full")

    def pinned_blobs(self) -> set[str]:
        """Blobs the cache must keep: running tasks' artefacts, and uploads for tasks to come."""
        waiting = {t.consumer for t in self.pending_terms.values()}
        self._received_for = {sha: c for sha, c in self._received_for.items() if c in waiting}
        return {t.execution.spec.sha256 for t in self.running()} | set(self._received_for)

    async def _start_checked(self, consumer: str, body: dict,
                             on_phase: Callable[[str], None] | None = None) -> ProviderTask:
        """`_start`, refused with the reason while this node's storage cannot take a task."""
        why = None
        if self.storage is not None and not self.storage.check():
            why = self.storage.reason
        else:
            try:
                return await self._start(consumer, body, on_phase)
            except (OSError, sqlite3.Error) as exc:
                why = self.storage.failed("task start", exc) if self.storage is not None else None
                if why is None:
                    raise
        raise TaskRefused("storage-full", f"provider storage full: {why}")

    def _agreements_of(self, peer: str) -> list[Terms]:
        return [t for t in self.pending_terms.values() if t.consumer == peer] + \
               [t.terms for t in self.tasks.values() if t.consumer == peer]

    def agreement_made(self, terms: Terms) -> None:
        """The market tells us about a new agreement: its consumer may now upload and start."""
        self.pending_terms[terms.aid] = terms

    # ---- tasks -------------------------------------------------------------------

    def _agreed_terms(self, consumer: str, body: dict) -> Terms:
        """The agreement ``consumer`` signed with us for this task.start, on its terms."""
        # the id was checked as 32 hex digits by synord.protocols.tasks
        terms = self.pending_terms.get(bytes.fromhex(body["agreement_id"]))  # told by the market
        if terms is None:
            raise TaskRefused("no_agreement", "no active agreement for this task")
        if terms.consumer != consumer:
            # someone else's agreement (ids travel in receipts and logs): not a hint more
            raise TaskRefused("foreign_agreement", "no active agreement for this task")
        if terms.expires <= time.time() * 1000:
            raise TaskRefused("agreement_expired", "the agreement's lease has expired")
        spec = JobSpec.from_task_start(body)
        if terms.runtime != spec.kind:
            raise TaskRefused("terms_mismatch", f"the agreement is for {terms.runtime}, not {spec.kind}")
        if spec.memory_bytes > terms.memory or spec.cpus > terms.cores + 1e-9:
            raise TaskRefused("terms_mismatch", "limits exceed the agreed resources")
        if spec.timeout_s is not None and spec.timeout_s > terms.duration_s:
            raise TaskRefused("terms_mismatch", "timeout_s exceeds the agreed duration")
        if spec.ports != terms.ports:
            raise TaskRefused("terms_mismatch", "the exposed ports differ from the agreed ones")
        return terms

    async def _stdin_of(self, body: dict) -> bytes | None:
        """The task's stdin blob (a shard), already verified against its digest on arrival."""
        sha = body.get("stdin_sha256")  # 64 hex digits: checked by synord.protocols.tasks
        if sha is None:
            return None
        if not self.blobs.has(sha):
            raise TaskRefused("no_input", "stdin blob not transferred (send it on /synord/transfer first)")
        path = self.blobs.path(sha)
        if path.stat().st_size > MAX_STDIN_BYTES:
            raise TaskRefused("input_too_large", f"stdin blob over {MAX_STDIN_BYTES} bytes")
        return await trio.to_thread.run_sync(path.read_bytes)

    async def _start(self, consumer: str, body: dict,
                     on_phase: Callable[[str], None] | None = None) -> ProviderTask:
        on_phase = on_phase or (lambda phase: None)
        job_id = body["job_id"]
        terms = self._agreed_terms(consumer, body)
        runtime = self.runtimes.get(body["kind"])
        if runtime is None:
            raise TaskRefused("runtime_unavailable", f"this provider does not offer {body['kind']}")
        sha = body["artifact_sha256"]
        if not self.blobs.has(sha):
            raise TaskRefused("no_artifact", "artefact not transferred (send it on /synord/transfer first)")
        stdin = await self._stdin_of(body)
        if body["kind"] in ("container", "microvm"):  # the consumer's pre-check, again: same function
            from synord.runtimes.base import SpecError
            from synord.runtimes.oci import check_image
            on_phase("verifying")
            try:
                await trio.to_thread.run_sync(check_image, self.blobs.path(sha))
            except SpecError as exc:
                raise TaskRefused("image_refused", f"image refused: {exc}") from None
        # After the last await: another start may have taken the agreement or the name.
        if self.pending_terms.get(terms.aid) is not terms:
            raise TaskRefused("no_agreement", "no active agreement for this task")
        old = self.task_of(consumer, job_id)
        if old is not None and not old.execution.done.is_set():
            raise TaskRefused("duplicate_job", "a task with this job id already runs here")
        csha = body["restore"]["sha256"] if body.get("restore") else None
        if csha is not None and not self.blobs.has(csha):
            raise TaskRefused("no_checkpoint", "checkpoint not transferred")
        workdir = self.workdir(terms.aid)
        shutil.rmtree(workdir, ignore_errors=True)  # only a previous life's leftovers
        workdir.mkdir(parents=True)
        spec = JobSpec.from_task_start(body).task_spec(self.blobs.path(sha), workdir / "sandbox", workdir.name)
        spec.workdir.mkdir()
        spec.stdin = stdin
        if terms.devices:  # the GPUs the agreement names: CDI for a container, VFIO for a microVM
            if self.gpu is None or body["kind"] not in ("container", "microvm"):
                raise TaskRefused("no_devices", "this provider cannot give devices to that sandbox")
            try:
                spec.devices = self.gpu.task_devices(terms.devices, body["kind"])
            except ValueError as exc:
                shutil.rmtree(workdir, ignore_errors=True)
                raise TaskRefused("device_unavailable", f"device injection failed: {exc}") from None
        try:
            service = self.services.prepare(consumer, body, spec, self.blobs)
        except (ServiceSpecError, VolumeError) as exc:
            shutil.rmtree(workdir, ignore_errors=True)
            raise TaskRefused(exc.slug, f"service refused: {exc}") from None
        restore_dir = None
        start_offsets = None
        if csha is not None:
            on_phase("restoring")
            try:
                restore_dir = restore_source(self.blobs.path(csha), workdir / "restore", csha,
                                             runtime.restores_archive)
            except CheckpointError as exc:
                shutil.rmtree(workdir, ignore_errors=True)
                raise TaskRefused("bad_checkpoint", f"corrupted checkpoint: {exc}") from None
            start_offsets = dict(body["restore"].get("offsets", {}))
        execution = TaskExecution(job_id, runtime, spec, restore_from=restore_dir,
                                  start_offsets=start_offsets, on_phase=on_phase)
        now = time.time()
        task = ProviderTask(job_id, consumer, terms, execution, spec.checkpointable,
                            float(body.get("checkpoint_interval_s") or 0), workdir, int(now * 1000))
        self.taskstore.insert(task.key, consumer, job_id, body, now)
        self.tasks[(consumer, job_id)] = task
        self.pending_terms.pop(terms.aid, None)  # one task per agreement (no await since the last check)
        for blob in (sha, csha, body.get("stdin_sha256")):  # pinned by the running task, only while it runs
            self._received_for.pop(blob, None)
        if terms.devices:
            self.gpu.task_started(terms)  # held until the task ends, and metered
        await self._nursery.start(self._run_task, task)
        if service is not None and not execution.done.is_set():
            self.services.start(self._nursery, task, service)
        if execution.done.is_set() and execution.error:
            raise TaskRefused("sandbox_failed", f"the sandbox did not start: {execution.error}")
        log.info("task started", extra={"job": job_id, "kind": body["kind"],
                                        "restored": restore_dir is not None})
        return task

    async def _run_task(self, task: ProviderTask, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            await task.execution.run(task_status=task_status)
            while task.restarting:  # a service's failed health check: a fresh sandbox
                await self.services.rerun(task)
        finally:
            st = task.execution.status
            state = "checkpointed" if task.handed_back else ("succeeded" if st.code == 0 and not st.reason else "failed")
            try:
                self.taskstore.record_end(task.key, state, st.code, task.execution.error or st.reason)
            except sqlite3.Error as exc:  # a full disk: the task still ends and settles
                log.warning("task end not recorded", extra={"job": task.key, "error": str(exc)})
            self._settle(task)
            with trio.CancelScope(shield=True):
                async with task.ckpt_lock:  # a stop-checkpoint is still being packed and sent
                    shutil.rmtree(task.workdir, ignore_errors=True)
            # Keep the output for a consumer that re-attaches late, then forget.
            with trio.CancelScope(shield=False):
                await trio.sleep(RETAIN_S)
            if self.tasks.get((task.consumer, task.job_id)) is task:
                del self.tasks[(task.consumer, task.job_id)]

    def _settle(self, task: ProviderTask) -> None:
        """End the lease and have the market send our signed usage receipt."""
        if task.settled:
            return
        task.settled = True
        st = task.execution.status
        outcome = ("preempted" if task.handed_back or task.preempt else
                   "cancelled" if st.reason == "cancelled" else
                   "completed" if st.code == 0 and not st.reason else "failed")
        self.on_finished(task.terms, outcome, self.services.final_usage(task, st.usage))

    # ---- preemption ----------------------------------------------------------------------

    async def preempt_all(self, reason: str, grace_s: float | None = None) -> int:
        """Notify every consumer with a running task; kill what is left after the grace period."""
        return self._preempt([t for t in self.running() if t.preempt is None], reason, grace_s)

    # A full provider's market hands back preemptible tasks for a higher priority
    # (synord.market.negotiator.Provider.displacer, synord.protocols.admission).
    def _running_under(self, aid: bytes) -> "ProviderTask | None":
        return next((t for t in self.running() if t.terms.aid == aid and t.preempt is None), None)

    def displaceable(self, aid: bytes) -> bool:
        return self._running_under(aid) is not None

    def displace(self, aid: bytes, reason: str) -> None:
        task = self._running_under(aid)
        if task is not None:
            self._preempt([task], reason)

    def _preempt(self, tasks: list["ProviderTask"], reason: str, grace_s: float | None = None) -> int:
        """The preemption notice to each task's consumer (its Handover moves it); killed after the grace."""
        grace = self.preemption_grace_s if grace_s is None else grace_s
        deadline_ms = int((time.time() + grace) * 1000)
        for t in tasks:
            t.preempt = {"grace_s": grace, "deadline_ms": deadline_ms, "reason": reason}
            t.execution.output.changed.set()  # wake the writer so the notice goes out now
        if tasks:
            log.info("preemption notices sent", extra={"tasks": len(tasks), "reason": reason,
                                                       "grace_s": grace})
            self._nursery.start_soon(self._enforce_grace, tasks, grace)
        return len(tasks)

    async def _enforce_grace(self, tasks: list[ProviderTask], grace: float) -> None:
        await trio.sleep(grace)
        for t in tasks:
            if not t.execution.done.is_set():
                log.warning("grace period over: killing task", extra={"job": t.job_id})
                await t.execution.cancel()

    async def wait_handed_back(self, timeout: float) -> None:
        """Until every task has ended and its consumer heard the end (its final
        checkpoint included), so stopping the daemon loses nothing."""
        with trio.move_on_after(timeout):
            while any(not t.execution.done.is_set()
                      or (t.attached is not None and not t.exit_sent.is_set())
                      for t in self.tasks.values()):
                await trio.sleep(0.05)

    # ---- the owner's view: tasks this machine runs for others (job / logs / cancel) ----------

    def _owned_task(self, name: str) -> ProviderTask | None:
        """For the owner (local API): a task by its agreement id, else by a consumer's job
        id (the newest of that name: job ids are only unique per consumer)."""
        named = [t for t in self.tasks.values() if name in (t.key, t.job_id)]
        return max(named, key=lambda t: (t.key == name, t.started_ms), default=None)

    def task_json(self, job_id: str) -> dict | None:
        """A task this node runs (or ran) for a consumer; None if there is none."""
        task = self._owned_task(job_id)
        row = self.taskstore.owned(task.key if task else job_id, job_id)
        if task is None and row is None:
            return None
        out = {"id": job_id, "role": "provider", "provider": self.identity.peer_id}
        if row is not None:
            out.update(state=row[0], runtime=row[1], consumer=row[2], exit_code=row[3], error=row[4],
                       created=row[5], updated=row[6])
        if task is not None:
            ex = task.execution
            t = task.terms
            out.update(consumer=task.consumer, runtime=ex.spec.kind, started=task.started_ms / 1000,
                       cpus=ex.spec.limits.cpus, memory_bytes=ex.spec.limits.memory_bytes,
                       agreement=t.aid.hex(), price=t.price, units=t.units,
                       output_bytes=dict(ex.output.offsets), checkpoints=task.checkpoints_taken,
                       preempt=task.preempt)
            if not ex.done.is_set():
                out["state"] = "running"
            if task.service is not None:  # restarts, the last health check, what is paid
                out["service"] = {**self.services.info(task), "health": task.service.last_health,
                                  **task.service.lease.view(int(time.time() * 1000))}
            cg = getattr(ex.sandbox, "cgroup", None)
            if cg is not None and not ex.done.is_set():
                out["cpu_max"] = cg.cpu_max()
        return out

    async def task_output(self, job_id: str, follow: bool):
        """NDJSON like the consumer's logs: output the task still holds, then its end."""
        task = self._owned_task(job_id)
        seen: dict[str, int] = {}
        while task is not None:
            out = task.execution.output
            changed = out.changed
            for stream, off, data in out.since(seen):
                seen[stream] = off + len(data)
                yield ndjson.data_line(stream, data)
            if task.execution.done.is_set() and not out.since(seen):
                break
            if not follow:
                return
            with trio.move_on_after(1.0):
                await changed.wait()
        end = self.task_json(job_id) or {}
        yield ndjson.end_line(end.get("exit_code"), end.get("state"), end.get("error"))

    async def cancel_task(self, job_id: str) -> dict | None:
        """The owner stops a task on their machine: killed, the consumer hears it was cancelled."""
        task = self._owned_task(job_id)
        if task is not None and not task.execution.done.is_set():
            log.info("task cancelled by the provider's owner", extra={"job": job_id})
            task.restarting = False  # a service being restarted stays down
            await task.execution.cancel()
            with trio.move_on_after(10):
                await task.execution.done.wait()
        return self.task_json(job_id)
