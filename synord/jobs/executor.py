"""Provider side: one task running in one sandbox, owned by a nursery.

The execution keeps every output chunk it produced, numbered from the task's
very first byte (offsets survive a restore: the checkpoint carries them), so
a consumer that reconnects asks "from offset N" and gets exactly what it
missed — never a duplicate, never a gap.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio

from runtimes.base import (OUTPUT_OFFSETS_FILE, CheckpointInfo, ExitStatus, Runtime, Sandbox,
                           TaskSpec, Usage)

from ..metrics import observe_sandbox_start

log = logging.getLogger("synord.jobs.executor")

OUTPUT_STALL_S = 60.0  # how long a full log waits for its reader before dropping unsent output


@dataclass
class OutputLog:
    """Ordered output with per-stream byte offsets; bounded in memory.

    Over the limit, only output already sent to the consumer is dropped; the
    task's output pump then waits (`wait_room`) for the reader to catch up, and
    drops unsent output only after ``OUTPUT_STALL_S`` with no reader progress
    (the consumer then sees a gap and fails the job saying what is missing),
    and from then on without waiting, until the reader moves again.
    """

    limit_bytes: int = 64 << 20
    chunks: list[tuple[str, int, bytes]] = field(default_factory=list)  # (stream, offset, data)
    offsets: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    sent: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    _size: int = 0
    changed: trio.Event = field(default_factory=trio.Event)
    _progress: trio.Event = field(default_factory=trio.Event)
    _stalled: bool = False  # the reader made no progress for stall_s: drop, don't wait

    def append(self, stream: str, data: bytes) -> None:
        self.chunks.append((stream, self.offsets[stream], data))
        self.offsets[stream] += len(data)
        self._size += len(data)
        self._evict(force=False)
        self.changed.set()
        self.changed = trio.Event()

    def _evict(self, force: bool) -> None:
        while self._size > self.limit_bytes and len(self.chunks) > 1:
            stream, off, data = self.chunks[0]
            if not force and off + len(data) > self.sent[stream]:
                return  # its reader has not had it yet
            self._size -= len(data)
            self.chunks.pop(0)

    def mark_sent(self, offsets: dict[str, int]) -> None:
        """A reader sent everything below ``offsets``: that much may be dropped."""
        for stream, off in offsets.items():
            self.sent[stream] = max(self.sent.get(stream, 0), off)
        self._stalled = False
        self._evict(force=False)
        self._progress.set()
        self._progress = trio.Event()

    async def wait_room(self, stall_s: float = OUTPUT_STALL_S) -> None:
        """Until the log is within its limit; drops the oldest unsent output if its
        reader makes no progress for ``stall_s``."""
        while self._size > self.limit_bytes and not self._stalled:
            with trio.move_on_after(stall_s) as waited:
                await self._progress.wait()
            self._stalled = waited.cancelled_caught
        if self._stalled:
            self._evict(force=True)

    def since(self, offsets: dict[str, int]) -> list[tuple[str, int, bytes]]:
        """Chunks (or their tails) the reader has not seen, given its per-stream offsets."""
        out = []
        for stream, off, data in self.chunks:
            seen = offsets.get(stream, 0)
            end = off + len(data)
            if end > seen:
                out.append((stream, max(off, seen), data[max(0, seen - off):]))
        return out


class TaskExecution:
    """Prepare (or restore) → start → pump output → wait; cancel and checkpoint on request."""

    def __init__(self, job_id: str, runtime: Runtime, spec: TaskSpec,
                 restore_from: Path | None = None, start_offsets: dict[str, int] | None = None,
                 on_phase: Callable[[str], None] | None = None):
        self.job_id = job_id
        self.on_phase = on_phase or (lambda phase: None)  # told before each slow step of a start
        self.runtime = runtime
        self.spec = spec
        self.restore_from = restore_from
        self.output = OutputLog()
        # Offsets count from the task's first byte, across restores.
        self.base_offsets = {"stdout": 0, "stderr": 0, **(start_offsets or {})}
        self.output.offsets.update(self.base_offsets)
        self.sandbox: Sandbox | None = None
        self.status: ExitStatus | None = None
        self.error: str | None = None
        self.done = trio.Event()
        self.started_at = time.time()
        self._cancelled = False
        self._checkpoint_lock = trio.Lock()

    @property
    def supports_checkpoint(self) -> bool:
        return bool(self.sandbox is not None and self.sandbox.supports_checkpoint)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Runs until the task ends; ``started`` once the sandbox runs (or failed to start)."""
        started = False
        try:
            if self.restore_from is not None:
                self.on_phase("restoring")
                self.sandbox = await self.runtime.restore(self.spec, self.restore_from)
            else:
                self.on_phase("compiling" if self.spec.kind == "wasm" else "unpacking")
                self.sandbox = await self.runtime.prepare(self.spec)
            async with trio.open_nursery() as nursery:
                self.on_phase("booting" if self.spec.kind == "microvm" else "starting")
                await self.sandbox.start(nursery)
                observe_sandbox_start(self.spec.kind, time.time() - self.started_at)
                task_status.started()
                started = True
                async for chunk in self.sandbox.logs():
                    self.output.append(chunk.stream, chunk.data)
                    await self.output.wait_room()  # a reader behind by the whole limit: wait for it
                self.status = await self.sandbox.wait()
        except Exception as exc:
            log.warning("task failed", extra={"job": self.job_id, "error": str(exc)})
            self.error = str(exc) or type(exc).__name__
            self.status = ExitStatus(code=-1, usage=Usage(), reason="error")
        finally:
            if self.sandbox is not None:
                with trio.CancelScope(shield=True):
                    await self.sandbox.kill()
            if self.status is None:
                self.status = ExitStatus(code=137, usage=Usage(), reason="killed")
            if self._cancelled:
                self.status.reason = "cancelled"
            self.done.set()
            self.output.changed.set()
            if not started:
                task_status.started()

    async def cancel(self) -> None:
        self._cancelled = True
        if self.sandbox is not None:
            await self.sandbox.kill()

    async def checkpoint(self, dest: Path, leave_running: bool) -> tuple[CheckpointInfo, dict[str, int]]:
        """Checkpoint into ``dest``; returns (info, output offsets at the checkpoint)."""
        async with self._checkpoint_lock:
            if self.sandbox is None or self.done.is_set():
                raise RuntimeError("the task is not running")
            dest.mkdir(parents=True, exist_ok=True)
            info = await self.sandbox.checkpoint(dest, leave_running=leave_running)
            # A runtime that knows how much output precedes the checkpoint writes
            # it (wasm does, at a step boundary, counted from this sandbox's start);
            # otherwise what we have read so far is the best estimate.
            offsets_path = Path(info.path) / OUTPUT_OFFSETS_FILE
            if offsets_path.exists():
                rel = json.loads(offsets_path.read_text())
                offsets = {s: self.base_offsets[s] + int(rel.get(s, 0)) for s in ("stdout", "stderr")}
            else:
                if not leave_running:
                    # Stopped: once its output is drained, everything we read precedes
                    # the checkpoint, exactly.
                    with trio.move_on_after(10):
                        await self.done.wait()
                offsets = dict(self.output.offsets)
            return info, offsets
