"""The provider's task-stream server: a thin trio driver between one
attached consumer and the task stream machine (synord.protocols.taskstream), which
says which frame may go out when and what a consumer frame means.

`handle_task` checks the opening envelope (synord.protocols.envelope.peer_envelope),
starts the task (`ProviderJobs._start_checked`) or finds the consumer's own
task again (task.attach), and then serves it: output from the consumer's
offsets on, heartbeats, the preemption notice, periodic and stop checkpoints
(pushed straight to the next provider when the consumer granted it), and the
exit frame with the final offsets.  Every execution lives in the component's
nursery, not in this handler's: a consumer that goes away finds its task
still running when it re-attaches.

`TaskServer` is mixed into `ProviderJobs`, whose tasks, store and blob store
it serves; it owns no table.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from synord.protocols import taskstream as ts
from synord.protocols.envelope import PeerEnvelopeRefused, peer_envelope, seal
from synord.protocols.framing import CHUNK, FrameError, FramedStream
from synord.protocols.mesh import MeshError
from synord.protocols.refusals import REFUSALS
from synord.protocols.relayclient import wait_direct
from synord.protocols.transfer import TRANSFER_PROTOCOL, send_file

from .checkpoints import pack

if TYPE_CHECKING:
    from .provider import ProviderTask

log = logging.getLogger("synord.jobs.provider")


class TaskRefused(Exception):
    """A task.start / task.attach refused: ``slug`` is the counted reason (ours, stable)."""

    def __init__(self, slug: str, message: str):
        super().__init__(message)
        self.slug = slug


async def _refuse(stream: FramedStream, where: str, slug: str, message: str) -> None:
    """Count a refusal (``slug`` is ours, never the peer's text), log it, tell the peer."""
    REFUSALS.count(where, slug)
    log.info("refused", extra={"where": where, "peer": stream.remote_peer[:16], "reason": slug,
                               "detail": message})
    with trio.move_on_after(2):
        try:
            await stream.send(ts.Error(message).frame())
        except Exception:  # the peer may be gone already
            pass


# What a consumer that disconnected looks like from here (MeshError: the stream broke).
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, EOFError, ConnectionError, MeshError)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The real errors inside (possibly nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


@dataclass
class Attachment:
    """One attached consumer: its stream and the machine every frame goes through."""
    stream: FramedStream
    machine: ts.TaskStream
    lock: trio.Lock = field(default_factory=trio.Lock)

    async def send(self, event: Any) -> None:
        async with self.lock:
            await self.stream.send(self.machine.send(event))


async def _send_blob(att: Attachment, header: Any, tar: Path, size: int) -> None:
    """A frame announcing a blob (a checkpoint, a volume), its header and its bytes, in one
    piece on the stream; the file is gone afterwards."""
    async with att.lock:
        await att.stream.send(att.machine.send(header))
        await att.stream.send(att.machine.send(ts.Blob(size)))
        with open(tar, "rb") as f:
            while block := f.read(CHUNK):
                await att.stream.raw.write(block)
    tar.unlink(missing_ok=True)


class TaskServer:
    """The task-stream half of `ProviderJobs` (see the module docstring)."""

    async def handle_task(self, stream: FramedStream) -> None:
        try:
            try:
                first = await stream.receive()
            except FrameError as exc:  # our own words about sizes, no peer text
                raise TaskRefused("malformed_frame", f"malformed first frame: {exc}") from None
            try:
                env = peer_envelope(self.validator, first.get("env") if isinstance(first, dict) else None,
                                    stream.remote_peer, ("task.start", "task.attach"))
            except PeerEnvelopeRefused as exc:
                raise TaskRefused(exc.slug, str(exc)) from None
            att = Attachment(stream, ts.TaskStream(ts.PROVIDER))
            if env.type == "task.start":
                task = await self._start_reporting(att, env.body)
                offsets = dict(env.body.get("restore", None) and env.body["restore"].get("offsets")
                               or {"stdout": 0, "stderr": 0})
            else:
                # Only the consumer's own task, found by (its peer id, its job id).
                task = self.task_of(stream.remote_peer, env.body["job_id"])
                if task is None:
                    row = self.row_of(stream.remote_peer, env.body["job_id"])
                    if row is not None:
                        raise TaskRefused("task_gone", f"lost: {row['error']}" if row["error"]
                                          else f"the task ended ({row['state']}) and its output expired")
                    raise TaskRefused("no_task", "no such task here")
                offsets = dict(env.body["offsets"])
            att.machine.have.update(offsets)
            await att.send(ts.Started())
            await self._serve(att, task)
        except TaskRefused as exc:
            await _refuse(stream, "task", exc.slug, str(exc))
        except EOFError as exc:
            log.info("task stream ended", extra={"peer": stream.remote_peer[:16], "error": str(exc)})
        except trio.Cancelled:
            raise
        except Exception as exc:
            leaves = _leaves(exc)
            if all(isinstance(e, _GONE) for e in leaves):
                # The consumer went away (it may re-attach); the task runs on.
                log.info("consumer detached", extra={"peer": stream.remote_peer[:16]})
            else:
                log.warning("task stream failed", extra={
                    "peer": stream.remote_peer[:16],
                    "error": "; ".join(f"{type(e).__name__}: {e}" for e in leaves)})
        finally:
            with trio.move_on_after(1):
                await stream.close()

    async def _start_reporting(self, att: Attachment, body: dict) -> "ProviderTask":
        """`_start_checked`, telling a consumer that asked for it (task.start
        progress: true) each phase of the start as a progress frame."""
        peer = att.stream.remote_peer
        if body.get("progress") is not True:
            return await self._start_checked(peer, body)
        send_ch, recv_ch = trio.open_memory_channel(16)

        def phase(name: str) -> None:
            try:
                send_ch.send_nowait(name)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass  # a notice, not a duty: dropped rather than waited for

        async def pump() -> None:
            async for name in recv_ch:
                with trio.move_on_after(5):
                    try:
                        await att.send(ts.Progress(name))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the start goes on; the consumer hears of it or re-attaches

        refused = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            try:
                task = await self._start_checked(peer, body, phase)
            except TaskRefused as exc:
                refused = exc  # raised below, out of the nursery: not wrapped in an exception group
            finally:
                send_ch.close()  # the pump sends what is queued, then ends: "started" comes after
        if refused is not None:
            raise refused
        return task

    # ---- one attached consumer ------------------------------------------------------

    async def _serve(self, att: Attachment, task: "ProviderTask") -> None:
        if task.attached is not None:
            task.attached.cancel()  # a newer attachment replaces the old one
        with trio.CancelScope() as scope:
            task.attached = scope
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_consumer, att, task)
                await self._write_loop(att, task)
                nursery.cancel_scope.cancel()
        if task.attached is scope:
            task.attached = None

    async def _write_loop(self, att: Attachment, task: "ProviderTask") -> None:
        ex = task.execution
        offsets = att.machine.have
        last_hb = 0.0
        next_ckpt = (trio.current_time() + task.checkpoint_interval_s
                     if task.checkpointable and task.checkpoint_interval_s > 0 else None)
        service_seen = None
        while True:
            ex = task.execution  # a service's restart replaces it (synord.jobs.services.rerun)
            changed = ex.output.changed
            # Read before draining: nothing is appended once the execution is done, so
            # the drain below then sends the very last byte (output that arrived while
            # earlier frames were going out included) before the exit frame.
            ended = ex.done.is_set() and not task.restarting
            for s, off, data in ex.output.since(dict(offsets)):
                for i in range(0, len(data), CHUNK):
                    await att.send(ts.Output(s, off + i, data[i:i + CHUNK]))  # as att.machine.output() cuts
                ex.output.mark_sent(offsets)
            if ended:
                break
            now = trio.current_time()
            if task.preempt and not task.preempt_sent:
                p = task.preempt
                await att.send(ts.Preempt(p["grace_s"], p["deadline_ms"], p["reason"]))
                task.preempt_sent = True
            if now - last_hb >= self.heartbeat_s:
                await att.send(ts.Heartbeat(int(time.time() * 1000)))
                last_hb = now
                if task.service is not None and service_seen != (info := self.services.info(task)):
                    await att.send(ts.ServiceInfo(**info))  # restarts, paid period, volume sizes
                    service_seen = info
            if next_ckpt is not None and now >= next_ckpt and not task.preempt:
                try:
                    await self._send_checkpoint(att, task, stop=False)
                    next_ckpt = trio.current_time() + task.checkpoint_interval_s
                except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
                    raise
                except Exception as exc:  # the task runs on; it just cannot be checkpointed
                    log.info("periodic checkpoints off", extra={"job": task.job_id, "error": str(exc)})
                    next_ckpt = None
            with trio.move_on_after(self.heartbeat_s):
                await changed.wait()
        await self._finish(att, task)

    async def _read_consumer(self, att: Attachment, task: "ProviderTask") -> None:
        while True:
            try:
                frame = await att.stream.receive()
            except (EOFError, Exception):
                return
            event = att.machine.receive(frame)
            if isinstance(event, ts.Refused):
                REFUSALS.count("task", event.slug)  # a consumer speaks only to cancel or ask
            elif isinstance(event, ts.Cancel):
                log.info("task cancelled by its consumer", extra={"job": task.job_id})
                task.restarting = False  # a service being restarted stays down
                await task.execution.cancel()
            elif isinstance(event, ts.Renew):
                self.services.renewed(task, event.period)
            elif isinstance(event, ts.CheckpointRequest):
                try:
                    await self._send_checkpoint(att, task, stop=event.stop, push=event.push_to)
                except Exception as exc:
                    await att.send(ts.CheckpointError(str(exc)))

    async def _send_checkpoint(self, att: Attachment, task: "ProviderTask", stop: bool,
                               push: dict | None = None) -> None:
        async with task.ckpt_lock:
            await self._checkpoint_and_send(att, task, stop, push)

    async def _checkpoint_and_send(self, att: Attachment, task: "ProviderTask", stop: bool,
                                   push: dict | None = None) -> None:
        ex = task.execution
        if not ex.supports_checkpoint:
            raise RuntimeError("this task cannot be checkpointed")
        task.checkpoints_taken += 1
        n = task.checkpoints_taken
        ckdir = task.workdir / f"ckpt-{n}"
        t0 = time.monotonic()
        info, offsets = await ex.checkpoint(ckdir, leave_running=not stop)
        t1 = time.monotonic()
        tar = task.workdir / f"ckpt-{n}.tar"
        if info.archive is not None:  # the runtime wrote and hashed it in one pass
            os.replace(info.archive, tar)
            sha, size = info.sha256, info.bytes
        else:
            sha, size = await trio.to_thread.run_sync(pack, ckdir, tar)
        shutil.rmtree(ckdir, ignore_errors=True)
        log.info("checkpoint taken", extra={"job": task.job_id, "bytes": size, "final": stop,
                                            "snapshot_s": round(t1 - t0, 3),
                                            "pack_s": round(time.monotonic() - t1, 3)})
        if stop:
            task.handed_back = True
        if push is not None and await self._push_direct(task, push, tar, sha, size):
            # The new provider has it: the consumer gets the checkpoint's metadata only.
            await att.send(ts.Checkpoint(sha, size, offsets, stop, push["peer"]))
            tar.unlink(missing_ok=True)
            return
        await _send_blob(att, ts.Checkpoint(sha, size, offsets, stop), tar, size)
        log.info("checkpoint sent", extra={"job": task.job_id, "bytes": size, "final": stop})

    async def _push_direct(self, task: "ProviderTask", push: dict, tar: Path, sha: str, size: int) -> bool:
        """Upload a checkpoint straight to the task's next provider (one hop instead of two)."""
        peer, grant = push.get("peer"), push.get("grant")
        if not isinstance(peer, str) or not isinstance(grant, bytes) or self._mesh is None:
            return False
        try:
            with trio.fail_after(max(5.0, self.preemption_grace_s)):
                await self._mesh.reach(peer, push.get("addrs") or [], per_addr_s=3.0)
                await wait_direct(self._mesh, peer, size)  # never through a limited relay
                out = await self._mesh.open_stream(peer, TRANSFER_PROTOCOL)
                try:
                    offer = seal(self.identity, "blob.offer", {"sha256": sha, "size": size,
                                                               "kind": "checkpoint",
                                                               "job_id": task.job_id, "grant": grant})
                    await send_file(out, offer.encode(), tar)
                finally:
                    with trio.move_on_after(1):
                        await out.close()
        except Exception as exc:
            log.info("direct checkpoint transfer failed; sending it through the consumer",
                     extra={"job": task.job_id, "to": str(peer)[:16], "error": f"{type(exc).__name__}: {exc}"})
            return False
        log.info("checkpoint pushed to the next provider", extra={"job": task.job_id, "to": peer[:16],
                                                                  "bytes": size})
        return True

    async def _send_volumes(self, att: Attachment, task: "ProviderTask") -> None:
        """A service handed back: each named volume as a tar blob, before the exit frame."""
        try:
            packed = await self.services.pack_volumes(task)
        except Exception as exc:  # the service still ends; its next provider starts with empty volumes
            log.warning("volumes not packed", extra={"job": task.job_id, "error": str(exc)})
            return
        for name, tar, sha, size in packed:
            await _send_blob(att, ts.Volume(name, sha, size), tar, size)
            log.info("volume sent", extra={"job": task.job_id, "volume": name, "bytes": size})

    async def _finish(self, att: Attachment, task: "ProviderTask") -> None:
        ex = task.execution
        async with task.ckpt_lock:
            pass  # a stop-checkpoint in flight goes out first
        if task.service is not None and task.preempt is not None and task.service.spec["volumes"]:
            await self._send_volumes(att, task)  # they move with the service
        st = ex.status
        # offsets: where each stream ends, so the consumer knows it has every byte
        await att.send(ts.Exit(st.code, st.reason, st.usage.to_json(), ex.error, task.handed_back,
                               dict(ex.output.offsets)))
        task.exit_sent.set()
