"""WASM sandbox on wasmtime: WASI command modules and checkpointable step modules.

Theory of operation
- A module runs in one worker thread (`trio.lowlevel.start_thread_soon`, the
  cheapest hand-over trio has: a long-lived worker fed by a queue measured
  the same); everything else (logs, wait, kill, checkpoint requests, the
  time-limit timer) is trio. One watcher task per start (`_main`) stands in
  the caller's nursery, so that a cancelled caller stops the guest.
- Output: the guest's stdout/stderr are pipes. A guest that ends within
  LIVE_AFTER_S (most starts) has them read by its worker once the store is
  gone, and the worker's callback (`_complete`, in the trio thread) finishes
  the task: no pump task, no wake-up of the watcher before the result. One
  that runs longer, or is checkpointed, gets them pumped live. Either way into
  a bounded `LogBuffer`: a reader far behind makes the pumps, then the guest,
  wait. `_lock` decides who owns a read end: a pump, or the worker.
- Interruption: engines are built with epoch interruption; each store has a
  deadline one epoch ahead and a deadline callback (run in the worker thread)
  that decides from *its own* sandbox's flags whether to go on, or to trap for
  a kill or a timeout. kill() bumps the epoch once; a task with a time limit
  has a trio timer that bumps it every ~10 ms once the limit is reached. No
  ticks otherwise: an untimed start pays for no timer task. Ticks from other
  sandboxes sharing the engine are harmless: the callback decides from flags
  and wall-clock time.
- Limits: fuel (an engine of its own, since fuel metering changes the compiled
  code), memory via `Store.set_limits` (memory.grow then fails in the guest).
- Compiled modules are cached in memory and on disk, keyed by the module's
  sha256 and a fingerprint of the engine config and wasmtime version. Only
  files this code wrote are ever deserialized, and each carries a digest. In
  memory a module comes with its shape checked and its imports resolved
  (`InstancePre`), and a module file read before is known by its identity
  (device, inode, size, mtime, ctime), so a start neither re-reads nor
  re-hashes it.
- Step modules (ABI v1, see WASM_ABI.md and wasm_abi.py) are driven step by
  step; a checkpoint request is honoured between two steps.

Exit codes when the module did not exit by itself: trap 134, timeout 124,
killed / out_of_fuel / oom 137, checkpointed 0 (the reason says which).
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import termios
import hashlib
import json
import logging
import os
import platform
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import AsyncIterator, ClassVar, NamedTuple

import trio

from .base import (LOG_BUFFER_BYTES, Availability, CheckpointInfo, CheckpointUnsupported, ExitStatus,
                   LogBuffer, LogChunk, Runtime, RuntimeError_, Sandbox, SpecError, TaskSpec, Unavailable, Usage,
                   OUTPUT_OFFSETS_FILE)
from .artifacts import MAX_WASM_BYTES, open_regular
from .digests import expect_digest
from . import wasm_abi as abi

log = logging.getLogger(__name__)

TICK_S = 0.01
# A guest still running after this long gets its output pumped live; one that
# ends sooner (most starts) has its pipes read once, after it ended.
LIVE_AFTER_S = 0.005
CODE_TRAP, CODE_TIMEOUT, CODE_KILLED = 134, 124, 137
_WASM_MAGIC = b"\0asm\x01\0\0\0"
_MEMORY_CACHE_MAX = 64
_INLINE_READ_MAX = 1 << 20

try:
    import wasmtime
    from wasmtime import _ffi as _wffi
    _IMPORT_ERROR: str | None = None
except Exception as e:  # ImportError, or a broken native library
    wasmtime = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def _wasmtime_version() -> str:
    global _VERSION
    if _VERSION is None:
        from importlib.metadata import PackageNotFoundError, version
        try:
            _VERSION = version("wasmtime")
        except PackageNotFoundError:
            _VERSION = "unknown"
    return _VERSION


_VERSION: str | None = None

# --- engines: one per config, shared by the whole process ---

_engines: dict[bool, tuple["wasmtime.Engine", str, "wasmtime.Linker"]] = {}
_engines_lock = threading.Lock()


def _engine(fuel: bool) -> tuple["wasmtime.Engine", str, "wasmtime.Linker"]:
    """(engine, config fingerprint, WASI linker) for fuel metering on or off."""
    with _engines_lock:
        if fuel not in _engines:
            cfg = wasmtime.Config()
            cfg.epoch_interruption = True
            cfg.consume_fuel = fuel
            engine = wasmtime.Engine(cfg)
            desc = {"wasmtime": _wasmtime_version(), "fuel": fuel, "epoch": True,
                    "machine": platform.machine()}
            fp = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
            linker = wasmtime.Linker(engine)
            linker.define_wasi()
            _engines[fuel] = (engine, fp, linker)
        return _engines[fuel]


if wasmtime is not None:
    _DeadlineCB = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.POINTER(_wffi.wasmtime_context_t),
                                   ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                                   ctypes.POINTER(ctypes.c_uint8))
    _Finalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    _NO_FINALIZER = _Finalizer(lambda _data: None)
    try:  # wasmtime-py internals for _command_exports / _call_start; the public API without them
        from wasmtime._func import enter_wasm as _enter_wasm
        from wasmtime._extern import wrap_extern as _wrap_extern
        _DIRECT = all(hasattr(_wffi, n) for n in (
            "wasmtime_instance_export_get", "wasmtime_func_call", "WASMTIME_EXTERN_MEMORY")) \
            and hasattr(wasmtime.Store, "_context") and hasattr(wasmtime.WasmtimeError, "_from_ptr")
    except ImportError:
        _DIRECT = False


def _command_exports(store, instance) -> tuple:
    """(_start, memory or None) of a WASI command instance. Looked up by name:
    `instance.exports()` wraps every export, ~20 us a start."""
    if not _DIRECT:
        exports = instance.exports(store)
        mem = _get(exports, "memory")
        return exports["_start"], (mem if isinstance(mem, wasmtime.Memory) else None)
    found = []
    for name in (b"_start", b"memory"):
        item = _wffi.wasmtime_extern_t()
        ok = _wffi.wasmtime_instance_export_get(store._context(), ctypes.byref(instance._instance),
                                                name, len(name), ctypes.byref(item))
        found.append(item if ok else None)
    start, mem = found
    memory = _wrap_extern(mem) if mem is not None and mem.kind == _wffi.WASMTIME_EXTERN_MEMORY.value else None
    return start, memory


def _call_start(store, start) -> None:
    """Call `_start`: `Func.__call__` builds the function's type and argument
    arrays at every call, a third of a hello start's time in wasm."""
    if not _DIRECT:
        start(store)
        return
    with _enter_wasm(store) as trap:  # raises the guest's trap, as Func.__call__ does
        err = _wffi.wasmtime_func_call(store._context(), ctypes.byref(start.of.func), None, 0, None, 0, trap)
        if err:
            raise wasmtime.WasmtimeError._from_ptr(err)  # an ExitTrap for proc_exit


def _read(path: Path) -> bytes:
    with open_regular(path, MAX_WASM_BYTES) as f:  # no FIFO, device or oversized file
        return f.read()


def _check_shape(module: "wasmtime.Module", wasm: bytes) -> str | None:
    """What the module is: a WASI command (None) or a step-ABI module (its memory
    export); SpecError for anything else. Run once per compiled module."""
    exports = {e.name: e.type for e in module.exports}
    step = exports.get(abi.STEP_EXPORT)
    if step is None:
        if not isinstance(exports.get("_start"), wasmtime.FuncType):
            raise SpecError(f"module exports neither _start (WASI command) nor {abi.STEP_EXPORT} (step ABI v1)")
        return None
    if not isinstance(step, wasmtime.FuncType) or step.params or [str(t) for t in step.results] != ["i32"]:
        raise SpecError(f"{abi.STEP_EXPORT} must be a function () -> i32")
    imported = [i.type for i in module.imports]
    return abi.check_step_module(wasm, sum(isinstance(t, wasmtime.GlobalType) for t in imported),
                                 sum(isinstance(t, wasmtime.MemoryType) for t in imported))


def default_cache_dir() -> Path:
    root = os.environ.get("SYNORD_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "synord") / "wasm"


class Compiled(NamedTuple):
    """A module ready to start: compiled, its shape checked once, its imports
    resolved once against the WASI linker (`InstancePre`), so a start only
    creates a store and instantiates."""
    module: "wasmtime.Module"
    pre: "wasmtime.InstancePre"
    memory_export: str | None  # step-ABI modules only


class ModuleCache:
    """Compiled modules by (module sha256, engine fingerprint), in memory and on disk."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._mem: OrderedDict[tuple[str, str], Compiled] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = {"memory_hits": 0, "disk_hits": 0, "compiles": 0}

    def lookup(self, sha: str, fp: str) -> Compiled | None:
        with self._lock:
            mod = self._mem.get((sha, fp))
            if mod is not None:
                self._mem.move_to_end((sha, fp))
                self.stats["memory_hits"] += 1
            return mod

    def _remember(self, key: tuple[str, str], mod: Compiled) -> None:
        with self._lock:
            self._mem[key] = mod
            while len(self._mem) > _MEMORY_CACHE_MAX:
                self._mem.popitem(last=False)

    def load_or_compile(self, engine: "wasmtime.Engine", linker: "wasmtime.Linker", sha: str, fp: str,
                        wasm: bytes) -> Compiled:
        """Blocking (compiles): call from a worker thread. Raises SpecError for a
        module that is not a runnable command or step module."""
        path = self.dir / f"{sha}-{fp}.cwasm"
        mod = self._load_disk(engine, path)
        if mod is not None:
            self.stats["disk_hits"] += 1
        else:
            try:
                mod = wasmtime.Module(engine, wasm)
            except wasmtime.WasmtimeError as e:
                raise SpecError(f"invalid WebAssembly module: {str(e).splitlines()[0]}") from None
            self.stats["compiles"] += 1
            self._store_disk(path, bytes(mod.serialize()))
        memory_export = _check_shape(mod, wasm)
        try:
            pre = linker.instantiate_pre(mod)
        except wasmtime.WasmtimeError as e:  # an import WASI does not provide
            raise SpecError(f"module cannot be linked: {str(e).splitlines()[0]}") from None
        compiled = Compiled(mod, pre, memory_export)
        self._remember((sha, fp), compiled)
        return compiled

    def _load_disk(self, engine, path: Path):
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        # Layout: 32-byte sha256 of the payload, then the serialized module.
        digest, payload = blob[:32], blob[32:]
        if hashlib.sha256(payload).digest() != digest:
            log.warning("wasm cache entry %s is corrupted; recompiling", path.name)
            return None
        try:
            return wasmtime.Module.deserialize(engine, payload)
        except wasmtime.WasmtimeError as e:  # e.g. written by another wasmtime build
            log.info("wasm cache entry %s unusable (%s); recompiling", path.name, str(e).splitlines()[0])
            return None

    def _store_disk(self, path: Path, payload: bytes) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(hashlib.sha256(payload).digest() + payload)
            os.replace(tmp, path)
        except OSError as e:  # a read-only or full cache only costs speed
            log.warning("cannot write wasm cache %s: %s", path, e)


class WasmRuntime(Runtime):
    kind: ClassVar[str] = "wasm"
    supports_checkpoint: ClassVar[bool] = True
    restores_archive: ClassVar[bool] = True

    def __init__(self, cache_dir: Path | str | None = None, log_limit_bytes: int = LOG_BUFFER_BYTES):
        self.cache = ModuleCache(Path(cache_dir) if cache_dir else default_cache_dir())
        self.log_limit_bytes = log_limit_bytes  # output held between the guest and its reader
        # (path, file identity) -> sha256 of a module file read and checked before;
        # a file rewritten since has a new identity (ctime cannot be set back).
        self._digests: OrderedDict[tuple, str] = OrderedDict()

    def available(self) -> Availability:
        if wasmtime is None:
            return Availability(False, f"wasmtime is not importable ({_IMPORT_ERROR}); pip install wasmtime")
        return Availability(True, f"wasmtime {_wasmtime_version()}")

    async def prepare(self, spec: TaskSpec) -> "WasmSandbox":
        if wasmtime is None:
            raise Unavailable(self.available().reason)
        if spec.kind != "wasm":
            raise SpecError(f"spec kind is {spec.kind!r}, not 'wasm'")
        if spec.network:
            raise SpecError("the wasm sandbox has no network access; run this task in a container or microvm")
        artifact = os.fspath(spec.artifact)  # a str: no Path parsing on every start
        try:
            st = os.stat(artifact)
        except FileNotFoundError:
            raise SpecError(f"artefact {artifact} does not exist") from None
        except OSError as e:
            raise SpecError(f"cannot read {artifact}: {e.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise SpecError(f"not a WebAssembly module: {artifact} is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(f"artefact {artifact} is not a regular file")
        ident = (artifact, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        sha = self._digests.get(ident)
        wasm = None
        name = os.path.basename(artifact)
        if sha is None:
            # Typical modules are read in microseconds; only big ones are worth a thread hop.
            small = st.st_size <= _INLINE_READ_MAX
            wasm = _read(Path(artifact)) if small else await trio.to_thread.run_sync(_read, Path(artifact))
            sha = hashlib.sha256(wasm).hexdigest()  # read once, hashed once: what runs is what was checked
        if spec.sha256 is not None:
            expect_digest(name, sha, spec.sha256)
        if wasm is not None:
            if wasm[:4] != b"\0asm":
                raise SpecError(f"not a WebAssembly module: {name} does not start with \\0asm")
            if wasm[:8] != _WASM_MAGIC:
                raise SpecError(f"not a WebAssembly core module: {name} (components are not supported)")
        lim = spec.limits
        if lim.memory_bytes <= 0:
            raise SpecError("limits.memory_bytes must be positive")
        if lim.fuel is not None and lim.fuel < 0:
            raise SpecError("limits.fuel must be >= 0")
        if lim.timeout_s is not None and lim.timeout_s <= 0:
            raise SpecError("limits.timeout_s must be positive")
        for m in spec.mounts:
            if not Path(m.host).is_dir():
                raise SpecError(f"mount {m.host}: not a directory on this host")
            if not m.guest:
                raise SpecError(f"mount {m.host}: empty guest path")

        engine, fp, linker = _engine(lim.fuel is not None)
        compiled = self.cache.lookup(sha, fp)
        if compiled is None:
            if wasm is None:  # known file, module evicted from memory: read it again
                self._digests.pop(ident, None)
                return await self.prepare(spec)
            compiled = await trio.to_thread.run_sync(self.cache.load_or_compile, engine, linker, sha, fp, wasm)
        self._digests[ident] = sha
        self._digests.move_to_end(ident)
        while len(self._digests) > _MEMORY_CACHE_MAX:
            self._digests.popitem(last=False)
        return WasmSandbox(spec, engine, compiled, sha, self.log_limit_bytes)

    async def restore(self, spec: TaskSpec, checkpoint: Path) -> "WasmSandbox":
        sb = await self.prepare(spec)
        if sb.memory_export is None:
            raise CheckpointUnsupported(f"{Path(spec.artifact).name} does not implement the step ABI")
        snap = await trio.to_thread.run_sync(abi.read_checkpoint, Path(checkpoint), sb.module_sha256)
        if snap.memory_export != sb.memory_export:
            raise SpecError(f"checkpoint {checkpoint}: memory export {snap.memory_export!r} "
                            f"is not the module's ({sb.memory_export!r})")
        if snap.memory_bytes > spec.limits.memory_bytes:
            raise SpecError(f"checkpoint {checkpoint}: needs {snap.memory_bytes} bytes of memory, "
                            f"the limit is {spec.limits.memory_bytes}")
        exported = {e.name: e.type for e in sb.module.exports}
        for name, typ, _ in snap.globals:
            t = exported.get(name)
            if not isinstance(t, wasmtime.GlobalType) or not t.mutable or str(t.content) != typ:
                raise SpecError(f"checkpoint {checkpoint}: global {name!r} ({typ}) does not match the module")
        sb.restore_from = snap
        return sb


class _CheckpointRequest:
    def __init__(self, dest: Path, leave_running: bool):
        self.dest, self.leave_running = dest, leave_running
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.output_bytes: dict[str, int] | None = None  # emitted per stream at the checkpoint
        self.archive: tuple[int, str] | None = None  # (bytes, sha256) of the archive written
        self.claimed = False  # set by the worker, under the sandbox lock


class WasmSandbox(Sandbox):
    @property
    def supports_checkpoint(self) -> bool:  # type: ignore[override]
        return self.memory_export is not None  # only step-ABI modules can be checkpointed

    def __init__(self, spec: TaskSpec, engine, compiled: Compiled, module_sha256: str, log_limit: int):
        self.spec = spec
        self.engine, self.module, self._pre = engine, compiled.module, compiled.pre
        self.module_sha256 = module_sha256
        self.memory_export = compiled.memory_export  # set for step-ABI modules only
        self.restore_from: abi.Snapshot | None = None
        self._output = LogBuffer(log_limit)  # its .bytes: read from the guest so far, per stream
        self._read_fds: list[int] = []
        self._token: trio.lowlevel.TrioToken | None = None
        self._started = False
        self._finished = trio.Event()
        self._status: ExitStatus | None = None
        # Shared with the worker thread:
        self._lock = threading.Lock()
        self._stop_reason: str | None = None  # "killed" / "timeout", read by the deadline callback
        self._deadline: float | None = None
        self._ckpt: _CheckpointRequest | None = None
        self._worker_done = False
        self._steps = 0
        self._cpu_start = 0.0
        self._write_ends: list[int] = []
        self._pipes: dict[str, int] = {}  # output pipes no pump reads yet (read ends)
        # Trio side:
        self._drained: dict[str, trio.Event] = {}  # per pumped stream: its pipe reached EOF
        self._nursery: trio.Nursery | None = None
        self._helpers: list[trio.CancelScope] = []  # pumps and the timer, cancelled at the end
        self._done = trio.Event()  # the worker's outcome is in:
        self._result: tuple[ExitStatus, str | None] | None = None
        self._error: BaseException | None = None
        self._run_scope: trio.CancelScope | None = None  # _main's wait; kill() cancels it
        self._kill_gave_up = False  # kill() stopped waiting for a guest that ignored it
        self.stop_grace_s = 2.0  # how long kill/cancel wait for the guest to leave wasm

    # --- trio side ---

    async def start(self, nursery: trio.Nursery) -> None:
        if self._started:
            raise RuntimeError_("sandbox already started")
        self._started = True
        self._token = trio.lowlevel.current_trio_token()
        self._nursery = nursery  # the pumps and the timer run here too (rarely needed)
        if self.spec.limits.timeout_s is not None:
            self._deadline = time.monotonic() + self.spec.limits.timeout_s
        # Output goes through pipes rather than wasmtime's Python output
        # callbacks: those are called from wasmtime's own threads and abort the
        # process when one fires during interpreter shutdown. Non-blocking read
        # ends: whoever reads them after the guest ended stops at "empty".
        out_r, out_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._read_fds = [out_r, err_r]
        self._pipes = {"stdout": out_r, "stderr": err_r}
        self._write_ends = [out_w, err_w]  # handed to the worker, see _take_write_ends
        try:
            nursery.start_soon(self._main)
        except BaseException:
            self._finish(ExitStatus(CODE_KILLED, Usage(), "killed"), None)
            raise
        if self._deadline is not None:
            self._spawn_helper(self._timer)
        # trio.lowlevel.start_thread_soon, not to_thread: half the hand-over
        # cost, and a wait that can stop without abandoning the result. The
        # result comes back through _complete, in the trio thread.
        trio.lowlevel.start_thread_soon(self._work, self._deliver)

    async def _main(self) -> None:
        # Watches the guest for the caller's nursery (a cancelled caller stops
        # it) and streams the output of a guest that runs past LIVE_AFTER_S.
        # A guest that ends sooner is finished by _complete, not here.
        try:
            try:
                # One cancel scope per wait (each costs): the first one's
                # deadline is when output starts streaming live.
                with trio.CancelScope(deadline=trio.current_time() + LIVE_AFTER_S) as self._run_scope:
                    await self._done.wait()
                if not self._done.is_set() and not self._kill_gave_up:
                    self._follow_pipes()  # still running: stream its output live
                    with trio.CancelScope() as self._run_scope:
                        await self._done.wait()
            finally:
                if not self._done.is_set():  # our caller or kill() gave up on the thread
                    await self._stop_abandoned_worker()
            if not self._done.is_set():
                self._finish(ExitStatus(CODE_KILLED, Usage(), "killed"),
                             "the guest did not stop when killed (blocked in a host call); abandoned")
            elif self._error is not None:  # our bug: raise it in the caller's nursery
                raise self._error
            elif not self._finished.is_set():
                # The pipes hit EOF once the store is gone; bounded in case a
                # wasmtime background task holds them a little longer.
                self._follow_pipes()
                with trio.move_on_after(2):
                    for ev in self._drained.values():
                        await ev.wait()
                self._finish(*self._result)
        finally:  # cancelled, or our bug: nothing above finished the task
            self._finish(ExitStatus(CODE_KILLED, Usage(), "killed"), None)

    def _deliver(self, outcome) -> None:  # worker thread: the last thing it does
        self._notify_from_thread(lambda: self._complete(outcome))

    def _complete(self, outcome) -> None:
        """Trio thread: the worker is done. Finishes the task at once unless
        output is still being pumped or the worker failed (then _main does)."""
        self._done.set()
        if self._finished.is_set():  # abandoned: the result comes too late
            self._close_pipes()  # any the worker could not read to EOF
            return
        try:
            (status, detail), chunks = outcome.unwrap()
        except BaseException as e:
            self._error = e  # _main raises it in the caller's nursery
            return
        self._result = (status, detail)
        if chunks:
            self._output.extend(chunks)
        if not self._pipes and not self._drained:
            self._finish(status, detail)

    def _finish(self, status: ExitStatus, detail: str | None) -> None:
        if self._finished.is_set():
            return
        if detail:
            self._emit("stderr", f"[synord] {detail}\n".encode())
        self._status = status
        self._close_pipes()
        for scope in self._helpers:  # a pump some wasmtime thread keeps open, the timer
            scope.cancel()
        self._finished.set()
        self._output.close()

    def _close_pipes(self) -> None:
        with self._lock:  # the worker may hand back a read end it could not read to EOF
            fds, self._pipes = list(self._pipes.values()), {}
        for fd in fds + self._take_write_ends():
            _close_quietly(fd)

    def _spawn_helper(self, fn, *args) -> None:
        scope = trio.CancelScope()
        self._helpers.append(scope)

        async def helper() -> None:
            with scope:
                await fn(*args)
        self._nursery.start_soon(helper)

    def _follow_pipes(self) -> None:
        """Pump the output pipes from now on (idempotent): the guest runs past
        LIVE_AFTER_S, or a checkpoint needs its output counted."""
        with self._lock:  # the worker reads what no pump took, once the guest ended
            pipes, self._pipes = self._pipes, {}
        for stream, fd in pipes.items():
            self._spawn_helper(self._pump, stream, fd, self._drained.setdefault(stream, trio.Event()))

    async def _pump(self, stream: str, fd: int, drained: trio.Event) -> None:
        async with trio.lowlevel.FdStream(fd) as pipe:
            while data := await pipe.receive_some(1 << 16):
                self._emit(stream, data)
                await self._output.wait_room()  # a reader far behind: the guest waits on its pipe
        drained.set()

    async def _timer(self) -> None:
        # Ticks are only needed to stop a guest at its time limit (kill() bumps
        # the epoch itself): none before the deadline, then one per TICK_S
        # until the guest notices (it may sit in a host call meanwhile).
        assert self._deadline is not None
        await trio.sleep(max(0.0, self._deadline - time.monotonic()))
        while True:
            self.engine.increment_epoch()
            await trio.sleep(TICK_S)

    async def _stop_abandoned_worker(self) -> None:
        # Our caller was cancelled: the worker is still in wasm. Make it trap and
        # give it a bounded time to leave (a guest blocked in a host call such as
        # a long WASI sleep only notices when the call returns).
        self._stop_reason = self._stop_reason or "killed"
        wait = 0 if self._kill_gave_up else self.stop_grace_s  # kill() already waited
        with trio.CancelScope(shield=True), trio.move_on_after(wait):
            while not self._done.is_set():
                self.engine.increment_epoch()
                with trio.move_on_after(TICK_S):
                    await self._done.wait()
        if not self._done.is_set():
            log.warning("wasm task %s did not stop within %.1f s; its thread is abandoned",
                        self.spec.task_id, self.stop_grace_s)

    def _notify_from_thread(self, fn) -> None:
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    async def wait(self) -> ExitStatus:
        await self._finished.wait()
        return self._status

    async def logs(self) -> AsyncIterator[LogChunk]:
        async for chunk in self._output.follow():
            yield chunk

    async def kill(self) -> None:
        if not self._started:
            self._started = True
            self._status = ExitStatus(CODE_KILLED, Usage(), "killed")
            self._finished.set()
            self._output.close()
            return
        if self._finished.is_set():
            return
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = "killed"
        self.engine.increment_epoch()
        with trio.move_on_after(self.stop_grace_s):
            await self._finished.wait()
            return
        # The guest sits in a host call: stop waiting for it. The epoch is
        # already past its deadline, so it traps as soon as it is back in wasm.
        self._kill_gave_up = True
        if self._run_scope is not None:
            self._run_scope.cancel()
        await self._finished.wait()

    async def checkpoint(self, dest: Path, leave_running: bool = False) -> CheckpointInfo:
        if self.memory_export is None:
            raise CheckpointUnsupported(
                f"{Path(self.spec.artifact).name} does not implement the step ABI "
                f"(export {abi.STEP_EXPORT}); see synord/runtimes/WASM_ABI.md")
        if not self._started:
            raise RuntimeError_("sandbox not started")
        req = _CheckpointRequest(Path(dest), leave_running)
        if not self._done.is_set():
            self._follow_pipes()  # the worker counts output the pumps have read
        with self._lock:
            if self._worker_done or self._finished.is_set():
                raise RuntimeError_("task already ended; nothing to checkpoint")
            if self._ckpt is not None:
                raise RuntimeError_("a checkpoint is already in progress")
            self._ckpt = req
        try:
            await req.done.wait()
        except trio.Cancelled:
            # Withdraw the request unless the worker already took it (then the
            # checkpoint completes, and with leave_running=False the task stops).
            with self._lock:
                if self._ckpt is req and not req.claimed:
                    self._ckpt = None
            raise
        if req.error is not None:
            raise req.error
        if req.output_bytes is not None:
            # Exact output position of the checkpoint, so a restore elsewhere
            # continues the output stream without repeating or losing a byte.
            # (Also inside the archive; this copy is for the caller, see CheckpointInfo.)
            (Path(req.dest) / OUTPUT_OFFSETS_FILE).write_text(json.dumps(req.output_bytes))
        nbytes, digest = req.archive  # hashed as the worker wrote it: nothing is read back
        return CheckpointInfo(req.dest, nbytes, digest, archive=req.dest / abi.ARCHIVE_FILE)

    def _emit(self, stream: str, data: bytes) -> None:
        self._output.append(LogChunk(stream, data))

    # --- worker thread ---

    def _on_deadline(self, _ctx, _data, delta, kind) -> int:
        reason = self._stop_reason
        if reason is None and self._deadline is not None and time.monotonic() >= self._deadline:
            reason = self._stop_reason = "timeout"
        if reason is not None:
            err = _wffi.wasmtime_error_new(f"synord: {reason}".encode())
            return ctypes.cast(err, ctypes.c_void_p).value
        delta[0] = 1
        kind[0] = 0  # continue
        return 0

    def _take_write_ends(self) -> list[int]:
        # Whoever takes them closes them: the worker once wasmtime has opened
        # its own copies, or _main if the worker never got that far.
        with self._lock:
            fds, self._write_ends = self._write_ends, []
        return fds

    def _work(self) -> tuple[tuple[ExitStatus, str | None], list[LogChunk]]:
        """The worker thread's job: run the guest, then read what it left in
        the pipes no pump took (most starts: the whole output, read once)."""
        result = self._run()
        with self._lock:
            pipes, self._pipes = self._pipes, {}
        chunks, left = [], {}
        for stream, fd in pipes.items():
            try:
                while data := os.read(fd, 1 << 16):
                    chunks.append(LogChunk(stream, data))
            except BlockingIOError:  # not at EOF: some wasmtime thread still holds it; _main pumps it
                left[stream] = fd
                continue
            except OSError:
                pass
            _close_quietly(fd)
        if left:
            with self._lock:
                self._pipes.update(left)
        return result, chunks

    def _write_stdin(self) -> str:
        base = self.spec.workdir
        if base is not None:
            Path(base).mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="synord-stdin-", dir=base)
        with os.fdopen(fd, "wb") as f:
            f.write(self.spec.stdin or b"")
        return path

    def _run(self) -> tuple[ExitStatus, str | None]:
        t_wall = time.monotonic()
        # CPU time continues across checkpoint/restore, so usage covers the whole task.
        self._cpu_start = time.thread_time() - (self.restore_from.cpu_s if self.restore_from else 0.0)
        spec = self.spec
        store = wasmtime.Store(self.engine)
        store.set_limits(memory_size=spec.limits.memory_bytes)
        if spec.limits.fuel is not None:
            store.set_fuel(spec.limits.fuel)
        wasi = wasmtime.WasiConfig()
        wasi.argv = [os.path.basename(spec.artifact), *spec.args]
        if spec.env:
            wasi.env = list(spec.env.items())
        if spec.stdin is not None:
            stdin_path = self._write_stdin()
            try:
                wasi.stdin_file = stdin_path  # opened here: the name can go at once
            finally:
                os.unlink(stdin_path)
        fds = self._take_write_ends()
        if len(fds) != 2:
            return ExitStatus(CODE_KILLED, Usage(), "killed"), None
        try:
            # wasmtime opens its own descriptors on the pipes; ours must go so
            # that the reader sees EOF when the store is dropped.
            wasi.stdout_file = f"/dev/fd/{fds[0]}"
            wasi.stderr_file = f"/dev/fd/{fds[1]}"
        finally:
            for fd in fds:
                _close_quietly(fd)
        for m in spec.mounts:
            wasi.preopen_dir(str(m.host), m.guest, m.writable)
        store.set_wasi(wasi)
        callback = _DeadlineCB(self._on_deadline)  # keep alive for the store's lifetime
        _wffi.wasmtime_store_epoch_deadline_callback(store.ptr(), callback, None, _NO_FINALIZER)
        store.set_epoch_deadline(1)

        code, reason, detail = 0, None, None
        memory = instance = exports = start = None
        try:
            if self._stop_reason is not None:
                # kill() came before the deadline above: its epoch bump was too early
                # to count, and nothing else ticks an engine without a time limit.
                raise wasmtime.WasmtimeError(f"synord: {self._stop_reason}")
            instance = self._pre.instantiate(store)
            if self.memory_export is not None:
                exports = instance.exports(store)
                memory = exports[self.memory_export]
                code, reason = self._step_loop(store, exports, memory)
            else:
                start, memory = _command_exports(store, instance)
                _call_start(store, start)
        except wasmtime.ExitTrap as e:
            code = e.code
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            code, reason, detail = self._classify(e, store, memory)
        except Exception as e:  # our own bug: report it, do not kill the caller's nursery
            log.exception("wasm task %s failed in the host", spec.task_id)
            code, reason, detail = CODE_TRAP, "trap", f"host error: {type(e).__name__}: {e}"
        finally:
            with self._lock:
                self._worker_done = True
                pending, self._ckpt = self._ckpt, None
            if pending is not None:
                pending.error = RuntimeError_("task ended before it reached a step boundary")
                self._notify_from_thread(pending.done.set)
        peak = self._memory_size(store, memory)
        # Drop the store here, in this thread: wasmtime's WASI streams call back
        # into Python when freed, and if that happens from one of its own
        # threads during interpreter shutdown the process aborts.
        memory = instance = exports = start = None
        store.close()
        usage = Usage(cpu_s=time.thread_time() - self._cpu_start,
                      peak_memory_bytes=peak, wall_s=time.monotonic() - t_wall)
        return ExitStatus(code, usage, reason), detail

    @staticmethod
    def _memory_size(store, memory) -> int:
        try:
            return memory.data_len(store) if memory is not None else 0
        except Exception:
            return 0

    def _classify(self, e: Exception, store, memory) -> tuple[int, str, str]:
        msg = str(e)
        first = next((ln.strip() for ln in reversed(msg.splitlines()) if ln.strip()), msg)
        if self._stop_reason == "timeout" or "synord: timeout" in msg:
            return CODE_TIMEOUT, "timeout", f"time limit of {self.spec.limits.timeout_s} s reached"
        if self._stop_reason == "killed" or "synord: killed" in msg:
            return CODE_KILLED, "killed", None
        if getattr(e, "trap_code", None) == wasmtime.TrapCode.OUT_OF_FUEL or "all fuel consumed" in msg:
            return CODE_KILLED, "out_of_fuel", f"fuel limit of {self.spec.limits.fuel} exhausted"
        limit = self.spec.limits.memory_bytes
        size = self._memory_size(store, memory)
        # memory.grow fails quietly at the limit and the guest usually aborts
        # (a trap) soon after; so a trap with memory within one allocation's
        # reach of the limit is an OOM. Instantiating over the limit fails too.
        if size > limit - max(1 << 20, limit // 16) or "memory minimum size" in msg \
                or "exceeds memory limits" in msg:
            return CODE_KILLED, "oom", f"memory limit of {limit} bytes reached ({first})"
        return CODE_TRAP, "trap", f"trap: {first}"

    def _step_loop(self, store, exports, memory) -> tuple[int, str | None]:
        step = exports[abi.STEP_EXPORT]
        snap = self.restore_from
        if snap is None:
            init = _get(exports, abi.INIT_EXPORT)
            if isinstance(init, wasmtime.Func):
                init(store)
        else:
            self._steps = snap.steps
            have = memory.data_len(store)
            if snap.memory_bytes > have:
                memory.grow(store, (snap.memory_bytes - have) // abi.PAGE)
            abi.load_memory(snap, _guest_memory(store, memory))  # read from disk straight into the guest
            for name, _typ, value in snap.globals:
                exports[name].set_value(store, value)
        while True:
            if self._stop_reason is not None:  # a kill between steps needs no epoch tick
                raise wasmtime.WasmtimeError(f"synord: {self._stop_reason}")
            if self._ckpt is not None:
                with self._lock:
                    req = self._ckpt
                    if req is not None:
                        req.claimed = True
                if req is not None:
                    self._take_checkpoint(req, store, exports, memory)
                    if req.error is None and not req.leave_running:
                        return 0, "checkpointed"
            r = step(store)
            self._steps += 1
            if r == 1:
                break
            if r != 0:
                raise wasmtime.WasmtimeError(f"{abi.STEP_EXPORT} returned {r} (expected 0 or 1)")
        code_fn = _get(exports, abi.EXIT_CODE_EXPORT)
        return (code_fn(store) if isinstance(code_fn, wasmtime.Func) else 0), None

    def _drain_output(self) -> dict[str, int]:
        """Worker thread, guest paused: bytes emitted per stream up to this instant.

        Waits (bounded) until the pumps have read everything the guest wrote,
        then for one pass of the trio loop, so what was read is also emitted.
        """
        for _ in range(200):
            if not any(_pipe_pending(fd) for fd in self._read_fds):
                break
            time.sleep(0.01)
        trio.from_thread.run_sync(lambda: None, trio_token=self._token)
        return dict(self._output.bytes)

    def _take_checkpoint(self, req: _CheckpointRequest, store, exports, memory) -> None:
        try:
            globs = []
            for exp in self.module.exports:
                t = exp.type
                if isinstance(t, wasmtime.GlobalType) and t.mutable:
                    globs.append((exp.name, abi.scalar_type_name(t.content), exports[exp.name].value(store)))
            req.output_bytes = self._drain_output()
            # Written straight from the guest's memory (paused: this thread runs it).
            req.archive = abi.write_checkpoint(req.dest, abi.Snapshot(
                self.module_sha256, self._steps, self.memory_export, _guest_memory(store, memory), globs,
                cpu_s=time.thread_time() - self._cpu_start),
                extra={OUTPUT_OFFSETS_FILE: json.dumps(req.output_bytes).encode()})
        except BaseException as e:
            req.error = e if isinstance(e, RuntimeError_) else RuntimeError_(f"checkpoint failed: {e}")
        with self._lock:
            self._ckpt = None
        self._notify_from_thread(req.done.set)


def _guest_memory(store, memory) -> memoryview:
    """The guest's linear memory as a writable buffer, no copy (valid until it grows)."""
    n = memory.data_len(store)
    return memoryview((ctypes.c_ubyte * n).from_address(ctypes.addressof(memory.data_ptr(store).contents))).cast("B")


def _pipe_pending(fd: int) -> int:
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _get(exports, name: str):
    try:
        return exports[name]
    except KeyError:
        return None
