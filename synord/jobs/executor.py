"""Provider side: one task running in one sandbox, owned by a nursery.

The execution keeps every output chunk it produced, numbered from the task's
very first byte (offsets survive a restore: the checkpoint carries them), so
a consumer that reconnects asks "from offset N" and gets exactly what it
missed — never a duplicate, never a gap.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import trio

from synord.runtimes.base import (OUTPUT_OFFSETS_FILE, CheckpointInfo, ExitStatus, Runtime, Sandbox,
                           TaskSpec, Usage)

from ..metrics import observe_sandbox_start

log = logging.getLogger("synord.jobs.executor")

OUTPUT_MEMORY_BYTES = 4 << 20  # output a task's log holds in memory; older output is on disk
OUTPUT_SPILL_BYTES = 1 << 30  # and at most this much on disk: a chatty task must not fill the provider's
_STREAMS = ("stdout", "stderr")
_RECORD = struct.Struct(">BQI")  # spill record header: stream index, offset, length
_INDEX_EVERY = 1 << 20  # one index entry per this many bytes of spill file


class OutputLog:
    """A task's output, ordered, with per-stream byte offsets from the task's
    first byte: held once, memory bounded, nothing dropped.

    The newest output is in memory (``limit_bytes``); older output is spilled,
    in order, to an unnamed file in the task's workdir. A reader asks `since`
    its per-stream offsets and gets everything after them, from the file and
    then from memory, whatever has moved in between. So a consumer that
    re-attaches from the offsets it committed gets exactly what it is missing,
    however far behind it is and whatever the provider already sent on a
    stream that broke: the provider never learns what arrived, so it keeps all
    of it (until the task is forgotten, `RETAIN_S` after it ended). A task
    never waits for a slow or absent consumer; memory stays within the limit
    plus what one `wait_room` call spills.

    Past ``spill_limit_bytes`` on disk, or if the file cannot be written (a
    full disk), the log falls back to holding output in memory until its reader
    has sent it (`mark_sent`), and the task's output pump waits for the reader
    (back-pressure: the task blocks on its next write). Output the task wrote
    is still never dropped unsent; a re-attach from below what was dropped
    after sending sees a gap, which the consumer reports.
    """

    def __init__(self, limit_bytes: int = OUTPUT_MEMORY_BYTES, spill_dir: Path | None = None,
                 spill_limit_bytes: int = OUTPUT_SPILL_BYTES):
        self.limit_bytes = limit_bytes
        self.spill_dir = spill_dir
        self.spill_limit_bytes = spill_limit_bytes
        self.chunks: deque[tuple[str, int, bytes]] = deque()  # in memory: (stream, offset, data)
        self.offsets = {"stdout": 0, "stderr": 0}  # end of the output so far, per stream
        self.sent = {"stdout": 0, "stderr": 0}
        self.held = 0  # bytes of output in memory
        self.spilled_bytes = 0  # bytes of output in the spill file
        self.changed = trio.Event()
        self._progress = trio.Event()
        self._file = None  # the spill file, created on first use
        self._spill_off = False  # the spill file is full or failed: the fallback above
        self._spilled = 0  # records no longer in memory; chunks[0] has sequence number _spilled
        self._on_disk = 0  # of those, the first _on_disk are in the file (the rest: full-disk drops)
        self._file_size = 0
        self._spill_end: dict[str, int] | None = None  # per stream, end of the spilled output
        self._index: list[tuple[int, int, int, int]] = []  # (seq, file pos, stdout off, stderr off)

    def append(self, stream: str, data: bytes) -> None:
        if self._spill_end is None:
            self._spill_end = dict(self.offsets)  # where this log starts (past a restore)
        self.chunks.append((stream, self.offsets[stream], data))
        self.offsets[stream] += len(data)
        self.held += len(data)
        self.changed.set()
        self.changed = trio.Event()

    def mark_sent(self, offsets: dict[str, int]) -> None:
        """A reader sent everything below ``offsets`` (only the full-disk fallback uses it)."""
        for stream, off in offsets.items():
            self.sent[stream] = max(self.sent.get(stream, 0), off)
        self._progress.set()
        self._progress = trio.Event()

    async def wait_room(self) -> None:
        """After an append: spill the oldest output until memory is within its limit."""
        while self.held > self.limit_bytes:
            batch = self._oldest(self.held - self.limit_bytes // 2)  # half the limit: fewer, larger writes
            batch_bytes = sum(len(d) for *_, d in batch)
            if not self._spill_off and self.spilled_bytes + batch_bytes > self.spill_limit_bytes:
                log.warning("task output over its spill limit; holding it until sent",
                            extra={"limit": self.spill_limit_bytes})
                self._spill_off = True
            if not self._spill_off:
                try:
                    await trio.to_thread.run_sync(self._write, batch)
                except OSError as exc:
                    log.warning("task output cannot spill to disk; holding it until sent",
                                extra={"error": str(exc)})
                    self._spill_off = True
                    continue
                self._spilled_out(batch)
            elif not self._drop_sent():
                await self._progress.wait()

    def _oldest(self, nbytes: int) -> list[tuple[str, int, bytes]]:
        batch, total = [], 0
        for chunk in self.chunks:
            if total >= nbytes:
                break
            batch.append(chunk)
            total += len(chunk[2])
        return batch

    def _write(self, batch: list[tuple[str, int, bytes]]) -> None:
        """Worker thread: append records; the file grows only past what readers use."""
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.spill_dir)  # unnamed: gone when closed
        os.pwrite(self._file.fileno(), b"".join(_RECORD.pack(_STREAMS.index(s), off, len(d)) + d
                                                for s, off, d in batch), self._file_size)

    def _spilled_out(self, batch: list[tuple[str, int, bytes]]) -> None:
        assert self._spill_end is not None
        for s, off, d in batch:
            if not self._index or self._file_size >= self._index[-1][1] + _INDEX_EVERY:
                self._index.append((self._spilled, self._file_size,
                                    self._spill_end["stdout"], self._spill_end["stderr"]))
            self.chunks.popleft()
            self.held -= len(d)
            self.spilled_bytes += len(d)
            self._spilled += 1
            self._on_disk += 1
            self._file_size += _RECORD.size + len(d)
            self._spill_end[s] = off + len(d)

    def _drop_sent(self) -> bool:
        dropped = False
        while self.held > self.limit_bytes and self.chunks:
            stream, off, data = self.chunks[0]
            if off + len(data) > self.sent[stream]:
                break
            self.chunks.popleft()
            self.held -= len(data)
            self._spilled += 1  # gone: a reader starting below it sees a gap
            dropped = True
        return dropped

    def since(self, offsets: dict[str, int]) -> "_Since":
        """Chunks (or their tails) the reader has not seen, given its per-stream
        offsets: iterable (lazily, across awaits) and true when not empty."""
        return _Since(self, {s: offsets.get(s, 0) for s in _STREAMS})

    def _start(self, seen: dict[str, int]) -> tuple[int, int]:
        """(sequence number, file position) to read from for a reader at ``seen``."""
        end = self._spill_end
        if not self._index or end is None or all(seen[s] >= end[s] for s in _STREAMS):
            return self._spilled, self._file_size  # nothing it lacks is on disk
        # The last index entry the reader is past on both streams (entries only grow).
        lo, hi = 0, len(self._index)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            _, _, o, e = self._index[mid]
            lo, hi = (mid, hi) if o <= seen["stdout"] and e <= seen["stderr"] else (lo, mid)
        seq, pos, _, _ = self._index[lo]
        return seq, pos

    def _position(self, seq: int) -> int:
        """File position of spilled record ``seq`` (from the index, then record by record)."""
        i = max(k for k, entry in enumerate(self._index) if entry[0] <= seq)
        at, pos = self._index[i][0], self._index[i][1]
        while at < seq:
            _, _, n = _RECORD.unpack(os.pread(self._file.fileno(), _RECORD.size, pos))
            pos += _RECORD.size + n
            at += 1
        return pos

    def _iter_since(self, seen: dict[str, int]) -> Iterator[tuple[str, int, bytes]]:
        cur = dict(seen)
        seq, pos = self._start(cur)
        on_disk = seq < self._on_disk
        while True:
            if seq < self._on_disk:
                if not on_disk:  # it moved to the file while the reader was away
                    pos, on_disk = self._position(seq), True
                stream_i, off, n = _RECORD.unpack(os.pread(self._file.fileno(), _RECORD.size, pos))
                stream, data = _STREAMS[stream_i], os.pread(self._file.fileno(), n, pos + _RECORD.size)
                pos += _RECORD.size + n
            else:
                seq = max(seq, self._spilled)  # past output dropped in the full-disk fallback: a gap
                if seq - self._spilled >= len(self.chunks):
                    return
                stream, off, data = self.chunks[seq - self._spilled]
                on_disk = False
            seq += 1
            if off + len(data) > cur[stream]:
                cut = max(0, cur[stream] - off)
                yield stream, off + cut, data[cut:]
                cur[stream] = off + len(data)


class _Since:
    """What `OutputLog.since` returns: iterate it for the chunks; truthy if any."""

    def __init__(self, log: OutputLog, seen: dict[str, int]):
        self._log, self._seen = log, seen

    def __bool__(self) -> bool:
        return any(self._log.offsets[s] > self._seen[s] for s in _STREAMS)

    def __iter__(self) -> Iterator[tuple[str, int, bytes]]:
        return self._log._iter_since(self._seen)


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
        self.output = OutputLog(spill_dir=spec.workdir)
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
                    await self.output.wait_room()  # over its memory limit: spill the oldest
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
