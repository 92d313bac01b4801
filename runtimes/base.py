"""The one interface every sandbox implements.

Life of a task in a sandbox:

    rt = get_runtime("wasm")            # a Runtime: knows whether it works here
    rt.available()                      # Availability(available, reason)
    sb = await rt.prepare(spec)         # verify artefact, unpack, build bundle
    await sb.start(nursery)             # background work lives in the caller's nursery
    async for chunk in sb.logs(): ...   # stdout/stderr as it is produced
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

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Any, AsyncContextManager, AsyncIterator, ClassVar, Literal

import trio

Kind = Literal["wasm", "container", "microvm"]
KINDS: tuple[str, ...] = ("wasm", "container", "microvm")


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
    devices: dict | None = None  # CDI container edits of the allocated devices (runtimes.cdi.Edits.to_json)


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
    sha256: str  # digest over the checkpoint files (see checkpoint_digest)


class LogBuffer:
    """A sandbox's output, kept from the start so `logs()` can replay it, and
    followed live until the sandbox closes it."""

    def __init__(self) -> None:
        self.chunks: list[LogChunk] = []
        self.bytes = {"stdout": 0, "stderr": 0}  # per stream, so far
        self.closed = False
        self._changed = trio.Event()

    def extend(self, chunks: list[LogChunk]) -> None:
        self.chunks.extend(chunks)
        for c in chunks:
            self.bytes[c.stream] += len(c.data)
        self._wake()

    def append(self, chunk: LogChunk) -> None:
        self.extend([chunk])

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def follow(self) -> AsyncIterator[LogChunk]:
        i = 0
        while True:
            while i < len(self.chunks):
                yield self.chunks[i]
                i += 1
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
        """Output in order, from the start; the iterator ends when the task exits."""

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


class PipeExecProcess(ExecProcess):
    """A command on host pipes (``<runtime> exec``); ``run_output`` pumps them."""

    def __init__(self, proc: trio.Process):
        self.proc = proc
        self._send, self.output = trio.open_memory_channel[LogChunk](64)
        self._stdin_closed = proc.stdin is None

    async def run_output(self) -> None:
        await pump_exec_output(self.proc, self._send)

    async def send_stdin(self, data: bytes) -> None:
        if self._stdin_closed:
            raise trio.ClosedResourceError("stdin is closed")
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(data)

    async def close_stdin(self) -> None:
        if not self._stdin_closed and self.proc.stdin is not None:
            self._stdin_closed = True
            await self.proc.stdin.aclose()

    async def wait(self) -> int:
        return await self.proc.wait()

    async def aclose(self) -> None:
        self.output.close()


def set_terminal_size(fd: int, size: TerminalSize) -> None:
    import fcntl
    import struct
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))


class PtyExecProcess(ExecProcess):
    """A command on a host pseudo-terminal (``<runtime> exec`` with a console
    socket): ``run_output`` pumps the master into ``output`` until the last
    user of the terminal is gone."""

    def __init__(self, proc: trio.Process, master_fd: int):
        self.proc = proc
        self._master = trio.lowlevel.FdStream(master_fd)
        self._send, self.output = trio.open_memory_channel[LogChunk](64)
        self._eof_sent = False

    async def run_output(self) -> None:
        async with self._send:
            try:
                while data := await self._master.receive_some(65536):
                    await self._send.send(LogChunk("stdout", data))
            except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # EIO: nobody holds the terminal any more

    async def send_stdin(self, data: bytes) -> None:
        await self._master.send_all(data)

    async def close_stdin(self) -> None:
        if not self._eof_sent:  # a terminal has no stdin to close: end of input is ^D
            self._eof_sent = True
            await self._master.send_all(b"\x04")

    async def resize(self, size: TerminalSize) -> None:
        set_terminal_size(self._master.fileno(), size)

    async def wait(self) -> int:
        return await self.proc.wait()

    async def aclose(self) -> None:
        self.output.close()
        await self._master.aclose()


async def receive_console_master(listener, proc: trio.Process, what: str) -> int:
    """The pty master a runtime sends to its ``--console-socket`` (SCM_RIGHTS);
    ExecUnsupported with the runtime's own words if it exits first."""
    import array
    import socket
    master = -1

    async def receive(cancel: trio.CancelScope) -> None:
        nonlocal master
        conn, _ = await listener.accept()
        with conn:
            _, ancdata, _, _ = await conn.recvmsg(4096, socket.CMSG_SPACE(4 * array.array("i").itemsize))
        fds = array.array("i")
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if fds:
            master = fds[0]
            for extra in fds[1:]:
                os.close(extra)
        cancel.cancel()

    async def runtime_exits(cancel: trio.CancelScope) -> None:
        await proc.wait()
        await trio.sleep(0.2)  # it may have sent the terminal just before exiting
        cancel.cancel()

    with trio.move_on_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(receive, n.cancel_scope)
            n.start_soon(runtime_exits, n.cancel_scope)
    if master < 0:
        err = b""
        if proc.stderr is not None:
            with trio.move_on_after(1):
                err = await proc.stderr.receive_some(4096)
        detail = err.decode(errors="replace").strip().splitlines()
        raise ExecUnsupported(f"{what} gave no terminal" + (f": {detail[-1]}" if detail else ""))
    return master


@asynccontextmanager
async def _unsupported_exec(reason: str):
    raise ExecUnsupported(reason)
    yield  # pragma: no cover


async def pump_exec_output(proc: trio.Process, send: "trio.MemorySendChannel[LogChunk]") -> None:
    """Feed a process's stdout and stderr, as they come, into ``send``; close it at EOF of both."""
    async def pump(stream, name: str, ch) -> None:
        async with ch:
            try:
                while data := await stream.receive_some(65536):
                    await ch.send(LogChunk(name, data))
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    async with send, trio.open_nursery() as n:
        n.start_soon(pump, proc.stdout, "stdout", send.clone())
        n.start_soon(pump, proc.stderr, "stderr", send.clone())


class Runtime(ABC):
    kind: ClassVar[str]
    supports_checkpoint: ClassVar[bool] = False

    @abstractmethod
    def available(self) -> Availability: ...

    @abstractmethod
    async def prepare(self, spec: TaskSpec) -> Sandbox: ...

    async def restore(self, spec: TaskSpec, checkpoint: Path) -> Sandbox:
        raise CheckpointUnsupported(f"{self.kind} cannot restore")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_artifact(path: Path, expected: str | None) -> None:
    """Raise SpecError unless the artefact exists and matches its digest."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"artefact {path} does not exist")
    if expected is None or path.is_dir():
        return
    actual = sha256_file(path)
    if actual != expected.removeprefix("sha256:"):
        raise SpecError(f"artefact {path.name}: sha256 mismatch (expected {expected}, got {actual})")


def checkpoint_digest(directory: Path) -> tuple[int, str]:
    """(total bytes, sha256) over every file of a checkpoint directory, by sorted name."""
    h = hashlib.sha256()
    total = 0
    for p in sorted(Path(directory).rglob("*")):
        if p.is_file():
            rel = p.relative_to(directory).as_posix().encode()
            h.update(len(rel).to_bytes(4, "big") + rel)
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
                    total += len(block)
    return total, h.hexdigest()


def get_runtime(kind: str) -> Runtime:
    """The Runtime for ``kind``; imports lazily so the CLI stays fast."""
    if kind == "wasm":
        from .wasm import WasmRuntime
        return WasmRuntime()
    if kind == "container":
        from .container import ContainerRuntime
        return ContainerRuntime()
    if kind == "microvm":
        from .microvm import MicroVMRuntime
        return MicroVMRuntime()
    raise SpecError(f"unknown runtime {kind!r} (expected one of {', '.join(KINDS)})")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for helper processes: never leak systemd's notify/watchdog/socket vars."""
    env = {k: v for k, v in os.environ.items()
           if not (k == "NOTIFY_SOCKET" or k.startswith("WATCHDOG_") or k.startswith("LISTEN_"))}
    if extra:
        env.update(extra)
    return env


def infer_kind(artifact: Path) -> str:
    """The sandbox kind an artefact asks for: .wasm (or wasm magic) -> wasm, OCI image -> container."""
    artifact = Path(artifact)
    if artifact.is_dir():
        if (artifact / "oci-layout").exists():
            return "container"
        raise SpecError(f"{artifact}: a directory but not an OCI image layout (no oci-layout file)")
    from .artifacts import open_regular  # no FIFO or device: they would hang or never end
    with open_regular(artifact) as f:
        head = f.read(512)
    if head.startswith(b"\0asm") or artifact.suffix == ".wasm":
        return "wasm"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "container"  # an oci-archive tarball
    raise SpecError(f"{artifact}: neither a WebAssembly module nor an OCI image "
                    "(layout directory or oci-archive tarball)")
