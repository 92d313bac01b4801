"""The one interface every sandbox implements.

Life of a task in a sandbox:

    rt = runtimes.get_runtime("wasm")   # a Runtime (the registry: synord/runtimes/__init__.py)
    rt.available()                      # Availability(available, reason)
    sb = await rt.prepare(spec)         # verify artefact, unpack, build bundle
    await sb.start(nursery)             # background work lives in the caller's nursery
    async for chunk in sb.logs(): ...   # stdout/stderr as produced (a bounded LogBuffer)
    status = await sb.wait()            # ExitStatus(code, usage, reason)
    await sb.kill()                     # idempotent; always reaps everything started
    info = await sb.checkpoint(dir, leave_running=False)   # where supported
    sb2 = await rt.restore(spec, dir)   # prepared; start() resumes from the checkpoint
    async with sb.exec(argv) as proc:   # where supported: a command beside the running task
        ...                             # proc.send_stdin / close_stdin / output / wait

`prepare` raises `SpecError` for a bad spec or artefact before anything is
started, and `Unavailable` if the sandbox kind does not work on this host.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Any, AsyncContextManager, AsyncIterator, ClassVar, Literal

import trio


class RuntimeError_(Exception):
    """Base class of sandbox errors (named to not shadow the builtin)."""


class SpecError(RuntimeError_):
    """The task spec or its artefact is unusable; nothing was started."""


class Unavailable(RuntimeError_):
    """This sandbox kind cannot run on this host (the message says why)."""


class CheckpointUnsupported(RuntimeError_):
    pass


class ExecUnsupported(RuntimeError_):
    """This sandbox cannot run an extra command beside its task (the message says why)."""


class ForwardUnsupported(RuntimeError_):
    """This sandbox cannot take a forwarded TCP connection (the message says why)."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""

    def to_json(self) -> dict:
        return {"available": self.available, "reason": self.reason}


@dataclass(frozen=True)
class Mount:
    host: Path
    guest: str
    writable: bool = False


@dataclass
class Limits:
    cpus: float = 1.0
    memory_bytes: int = 256 * 1024 * 1024
    timeout_s: float | None = None
    pids: int = 64
    fuel: int | None = None  # wasm only: instruction budget


@dataclass
class TaskSpec:
    kind: str
    artifact: Path  # .wasm file, OCI layout dir or oci-archive tarball
    sha256: str | None = None  # expected digest of the artefact file; verified in prepare
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes | None = None
    limits: Limits = field(default_factory=Limits)
    network: bool = False  # never granted by default
    mounts: list[Mount] = field(default_factory=list)
    workdir: Path | None = None  # scratch dir for bundles/rootfs; the runtime makes one if None
    checkpointable: bool = False  # container: run under runsc so it can migrate
    task_id: str = ""
    # The allocated devices: a container's CDI edits (synord.runtimes.cdi.Edits.to_json), a
    # microVM's {"vfio": [{pci_bus_id, iommu_group}]} (synord.runtimes.vfio).
    devices: dict | None = None


@dataclass
class Usage:
    cpu_s: float = 0.0
    peak_memory_bytes: int = 0
    wall_s: float = 0.0

    def to_json(self) -> dict:
        return {"cpu_s": self.cpu_s, "peak_memory_bytes": self.peak_memory_bytes,
                "wall_s": self.wall_s}


@dataclass
class ExitStatus:
    code: int
    usage: Usage
    reason: str | None = None  # None = exited by itself; else timeout, oom, killed, out_of_fuel, trap, pids

    def to_json(self) -> dict:
        return {"code": self.code, "usage": self.usage.to_json(), "reason": self.reason}


@dataclass(frozen=True)
class LogChunk:
    stream: Literal["stdout", "stderr"]
    data: bytes


# A runtime that knows exactly how much output preceded a checkpoint writes it
# here, in the checkpoint directory: {"stdout": bytes, "stderr": bytes} since
# the sandbox started. Restores elsewhere continue the output from there.
OUTPUT_OFFSETS_FILE = "synord-output.json"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path  # a directory holding the checkpoint files
    bytes: int
    sha256: str  # digest over the checkpoint files (see checkpoint_digest), or the archive's
    # Set by a runtime that writes its checkpoint as one tar (wasm): the file
    # that travels as it is (bytes and sha256 are its own), no pack step.
    archive: Path | None = None


# What a sandbox holds of its output, by default: its reader (the provider's
# OutputLog, which spills to disk) takes chunks as they come, so this is only
# the hand-over between the sandbox's pipe and that reader.
LOG_BUFFER_BYTES = 4 << 20


class LogBuffer:
    """A sandbox's output on its way to its reader, in order, bounded.

    Chunks are kept from the start, so `follow()` replays them to a reader that
    comes late, until they pass ``limit_bytes``. Over the limit the oldest
    chunks a reader has already taken are dropped; if there are none, the
    producer's `wait_room()` waits for a reader (back-pressure: the sandbox
    stops reading its pipe, so the task blocks on its next write). Nothing is
    dropped that no reader has had: output the task wrote is never lost, and
    memory stays within the limit plus one chunk.

    One reader is the rule (the provider's execution); a second one that starts
    after chunks were dropped begins at the oldest chunk still held.
    """

    def __init__(self, limit_bytes: int = LOG_BUFFER_BYTES) -> None:
        self.limit_bytes = limit_bytes
        self.chunks: deque[LogChunk] = deque()
        self.bytes = {"stdout": 0, "stderr": 0}  # per stream, so far
        self.held = 0  # bytes in self.chunks
        self.closed = False
        self._first = 0  # sequence number of chunks[0]
        self._taken = 0  # sequence number after the last chunk any reader has taken
        self._changed = trio.Event()

    def extend(self, chunks: list[LogChunk]) -> None:
        self.chunks.extend(chunks)
        for c in chunks:
            self.bytes[c.stream] += len(c.data)
            self.held += len(c.data)
        self._drop_taken()
        self._wake()

    def append(self, chunk: LogChunk) -> None:
        self.extend([chunk])

    def close(self) -> None:
        self.closed = True
        self._wake()

    async def wait_room(self) -> None:
        """The producer's pause: until what no reader has taken fits the limit."""
        while self.held > self.limit_bytes and not self.closed:
            await self._changed.wait()

    def _drop_taken(self) -> bool:
        dropped = False
        while self.held > self.limit_bytes and self._first < self._taken:
            self.held -= len(self.chunks.popleft().data)
            self._first += 1
            dropped = True
        return dropped

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def follow(self) -> AsyncIterator[LogChunk]:
        i = 0
        while True:
            while i < self._first + len(self.chunks):
                i = max(i, self._first)
                chunk = self.chunks[i - self._first]
                i += 1
                if i > self._taken:
                    self._taken = i
                    if self._drop_taken():
                        self._wake()  # room for a producer in wait_room
                yield chunk
            if self.closed:
                return
            await self._changed.wait()


class Sandbox(ABC):
    supports_checkpoint: ClassVar[bool] = False

    @abstractmethod
    async def start(self, nursery: trio.Nursery) -> None: ...

    @abstractmethod
    async def wait(self) -> ExitStatus: ...

    @abstractmethod
    def logs(self) -> AsyncIterator[LogChunk]:
        """Output in order, from the start (a late reader: from the oldest chunk
        still held, see LogBuffer); the iterator ends when the task exits."""

    @abstractmethod
    async def kill(self) -> None: ...

    async def checkpoint(self, dest: Path, leave_running: bool = False) -> CheckpointInfo:
        raise CheckpointUnsupported(f"{type(self).__name__} cannot checkpoint")

    supports_exec: ClassVar[bool] = False

    def exec(self, argv: list[str], env: dict[str, str] | None = None,
             tty: TerminalSize | None = None) -> "AsyncContextManager[ExecProcess]":
        """Run ``argv`` inside the running sandbox, beside its task (``synord exec``),
        on pipes, or with ``tty`` on a new pseudo-terminal that becomes its
        controlling terminal (all output then comes as "stdout").

        Use as ``async with sb.exec(argv) as proc:`` — ``proc.send_stdin(b)``,
        ``proc.close_stdin()``, ``async for chunk in proc.output`` (LogChunks,
        ends when both streams close), ``await proc.wait()`` (the exit code).
        Leaving the block kills and reaps the command if it still runs. Raises
        ``ExecUnsupported`` (on entering) where the sandbox cannot do it or the
        task is not running.
        """
        kind = getattr(getattr(self, "spec", None), "kind", None) or type(self).__name__
        return _unsupported_exec(f"exec is not supported for {kind} tasks yet")

    def forward_unsupported(self) -> str | None:
        """Why this sandbox cannot take forwarded TCP connections (None: it can)."""
        kind = getattr(getattr(self, "spec", None), "kind", None) or type(self).__name__
        return f"forward to {kind} tasks is not supported yet"

    async def connect_port(self, port: int) -> "trio.SocketStream":
        """A TCP connection to ``port`` on the sandbox's own loopback (``synord
        forward``), made without giving the sandbox any network. Raises
        ``ForwardUnsupported`` where the sandbox cannot, or no longer runs."""
        raise ForwardUnsupported(self.forward_unsupported() or "forward is not supported here")


class SupervisedSandbox(Sandbox):
    """A sandbox whose supervisor appends to ``_output``, then sets ``_status``
    and ``_done``: ``wait`` and ``logs`` follow from those."""

    _output: LogBuffer
    _done: trio.Event
    _status: ExitStatus | None

    def _has_started(self) -> bool:
        raise NotImplementedError

    async def wait(self) -> ExitStatus:
        if not self._has_started():
            raise RuntimeError_("sandbox not started")
        await self._done.wait()
        assert self._status is not None
        return self._status

    async def logs(self) -> AsyncIterator[LogChunk]:
        async for chunk in self._output.follow():
            yield chunk


@dataclass(frozen=True)
class TerminalSize:
    """A pseudo-terminal for an exec session (``synord shell`` on a terminal)."""
    rows: int
    cols: int

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1000:
                raise SpecError(f"terminal {name} must be an integer from 1 to 1000")


class ExecProcess:
    """A command running inside a sandbox beside its task.

    ``output``: async-iterable of LogChunks, ends when both streams close."""

    output: Any

    async def send_stdin(self, data: bytes) -> None:
        raise NotImplementedError

    async def close_stdin(self) -> None:
        raise NotImplementedError

    async def wait(self) -> int:
        raise NotImplementedError

    async def resize(self, size: TerminalSize) -> None:
        """A terminal session's new window size (nothing to do on pipes)."""


@asynccontextmanager
async def _unsupported_exec(reason: str):
    raise ExecUnsupported(reason)
    yield  # pragma: no cover


class Runtime(ABC):
    kind: ClassVar[str]
    supports_checkpoint: ClassVar[bool] = False
    # restore() takes the checkpoint archive itself (CheckpointInfo.archive), not unpacked files
    restores_archive: ClassVar[bool] = False

    @abstractmethod
    def available(self) -> Availability: ...

    @abstractmethod
    async def prepare(self, spec: TaskSpec) -> Sandbox: ...

    async def restore(self, spec: TaskSpec, checkpoint: Path) -> Sandbox:
        raise CheckpointUnsupported(f"{self.kind} cannot restore")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for helper processes: never leak systemd's notify/watchdog/socket vars."""
    env = {k: v for k, v in os.environ.items()
           if not (k == "NOTIFY_SOCKET" or k.startswith("WATCHDOG_") or k.startswith("LISTEN_"))}
    if extra:
        env.update(extra)
    return env
