"""`synord exec` / `synord shell`: a command inside a running task's sandbox,
over `/synord/shell/1.0.0` (protocols.shell), for the task's owner only.

Provider side: `ShellService.handle` (registered by `ProviderJobs.register`)
checks that the stream's authenticated peer is the task's consumer and signed
the request, that the task still runs, then runs the command with
`Sandbox.exec` and relays stdin / output / exit code. A consumer that goes
away mid-command aborts it: the command is killed, never left behind.

Consumer side: `open_exec` dials the job's provider and returns an
`ExecClient` (send stdin, iterate output events, close).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

import trio

from protocols.envelope import EnvelopeValidator, Rejected, seal
from protocols.framing import FramedStream
from protocols.identity import Identity
from protocols.shell import EXEC_TYPE, MAX_STDIN_FRAME, SHELL_PROTOCOL, exec_body, terminal_size
from protocols.tasks import TaskSpecError
from runtimes.base import ExecUnsupported, SpecError, TerminalSize

from ..api import ApiError

if TYPE_CHECKING:
    from .provider import ProviderJobs

log = logging.getLogger("synord.jobs.shell")

MAX_SESSIONS_PER_TASK = 8
OPEN_TIMEOUT_S = 15.0


class ShellRefused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# ---- provider side --------------------------------------------------------------------

class ShellService:
    def __init__(self, jobs: "ProviderJobs", validator: EnvelopeValidator | None = None,
                 max_sessions_per_task: int = MAX_SESSIONS_PER_TASK):
        self.jobs = jobs
        self.validator = validator or jobs.validator
        self.max_sessions = max_sessions_per_task
        self.sessions: dict[str, int] = {}  # job id -> exec sessions open now

    def _request(self, first: Any, stream: FramedStream) -> dict:
        data = first.get("env") if isinstance(first, dict) else None
        if not isinstance(data, bytes):
            raise ShellRefused("bad_request", "expected a signed shell.exec envelope")
        env = self.validator.check(data)
        if isinstance(env, Rejected):
            raise ShellRefused("bad_request", f"envelope rejected: {env.reason} {env.detail}".strip())
        if env.type != EXEC_TYPE:
            raise ShellRefused("bad_request", f"unexpected message {env.type}")
        if env.sender_id != stream.remote_peer:
            raise ShellRefused("forbidden", "envelope not signed by the connected peer")
        return env.body

    def _task(self, job_id: str, peer: str):
        task = self.jobs.task_of(peer, job_id) or self.jobs.task_named(job_id)
        if task is None:
            row = self.jobs.row_of(peer, job_id)
            if row is not None:
                raise ShellRefused("not_running", f"job {job_id} is not running ({row['state']})")
            raise ShellRefused("no_task", f"no task {job_id} runs on this provider")
        if task.consumer != peer:
            raise ShellRefused("forbidden", f"permission denied: only the consumer that placed job "
                                            f"{job_id} may exec into it")
        ex = task.execution
        if ex.done.is_set():
            st = ex.status
            how = f"exited with code {st.code}" if st is not None else "ended"
            raise ShellRefused("not_running", f"job {job_id} is not running (it has finished: {how})")
        if ex.sandbox is None:
            raise ShellRefused("not_running", f"job {job_id} has not started yet")
        if not ex.sandbox.supports_exec:
            raise ShellRefused("unsupported", f"exec is not supported for {ex.spec.kind} tasks yet")
        if self.sessions.get(job_id, 0) >= self.max_sessions:
            raise ShellRefused("busy", f"job {job_id} already has {self.max_sessions} exec sessions")
        return task

    async def handle(self, stream: FramedStream) -> None:
        peer = stream.remote_peer
        job_id = None
        try:
            with trio.fail_after(OPEN_TIMEOUT_S):
                first = await stream.receive()
            body = self._request(first, stream)
            job_id = body["job_id"]
            task = self._task(job_id, peer)
            self.sessions[job_id] = self.sessions.get(job_id, 0) + 1
            try:
                await self._run(stream, task, body)
            finally:
                self.sessions[job_id] -= 1
                if not self.sessions[job_id]:
                    del self.sessions[job_id]
        except ShellRefused as exc:
            log.info("exec refused", extra={"peer": peer[:16], "job": job_id, "reason": str(exc)})
            with trio.move_on_after(2):
                await stream.send({"error": str(exc), "code": exc.code})
        except (EOFError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("exec stream ended", extra={"peer": peer[:16], "job": job_id,
                                                 "error": f"{type(exc).__name__}: {exc}"})
        except trio.Cancelled:
            raise
        except Exception as exc:  # a broken peer must never take the daemon down
            log.warning("exec stream failed", extra={"peer": peer[:16], "job": job_id,
                                                     "error": f"{type(exc).__name__}: {exc}"})
        finally:
            with trio.move_on_after(1):
                await stream.close()

    async def _run(self, stream: FramedStream, task, body: dict) -> None:
        sandbox = task.execution.sandbox
        argv = list(body["argv"])
        tty = TerminalSize(body["tty"]["rows"], body["tty"]["cols"]) if "tty" in body else None
        try:
            cm = sandbox.exec(argv, dict(body.get("env") or {}), tty=tty)
            proc = await cm.__aenter__()
        except (ExecUnsupported, SpecError) as exc:
            raise ShellRefused("unsupported" if isinstance(exc, ExecUnsupported) else "bad_request",
                               f"job {task.job_id}: {exc}") from None
        log.info("exec started", extra={"job": task.job_id, "peer": stream.remote_peer[:16],
                                        "command": argv[0][:64]})
        exc_info: tuple = (None, None, None)
        code = None
        try:
            await stream.send({"started": True})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stdin, stream, proc, nursery.cancel_scope)
                drained = trio.Event()

                async def relay() -> None:
                    async for chunk in proc.output:
                        await stream.send({"o": chunk.stream, "d": chunk.data})
                    drained.set()
                nursery.start_soon(relay)
                code = await proc.wait()
                # A background child of the command may hold the pipes open: don't wait for it.
                with trio.move_on_after(1):
                    await drained.wait()
                nursery.cancel_scope.cancel()
            if code is not None:
                await stream.send({"exit": code})
                log.info("exec ended", extra={"job": task.job_id, "code": code})
        except BaseException as exc:
            exc_info = (type(exc), exc, exc.__traceback__)
            raise
        finally:
            await cm.__aexit__(*exc_info)  # kills and reaps the command if it still runs

    async def _stdin(self, stream: FramedStream, proc, scope: trio.CancelScope) -> None:
        """Consumer frames → the command's stdin. The consumer leaving aborts the command."""
        while True:
            try:
                msg = await stream.receive()
            except Exception:
                log.info("exec aborted: the consumer closed the stream")
                scope.cancel()
                return
            if not isinstance(msg, dict):
                continue
            try:
                if isinstance(msg.get("i"), bytes):
                    await proc.send_stdin(msg["i"])
                elif msg.get("eof"):
                    await proc.close_stdin()
                elif "resize" in msg:
                    await proc.resize(TerminalSize(*terminal_size(msg["resize"])))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the command closed its stdin or exited: drop further input
            except TaskSpecError:
                pass  # a malformed size: keep the old one


# ---- consumer side --------------------------------------------------------------------

class ExecError(Exception):
    """The provider refused (``code`` as in protocols.shell) or the stream broke."""

    def __init__(self, message: str, code: str = "failed"):
        super().__init__(message)
        self.code = code


@dataclass
class ExecClient:
    stream: FramedStream
    job_id: str
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    exit_code: int | None = None
    stdin_closed: bool = False

    async def send_stdin(self, data: bytes) -> None:
        if self.stdin_closed:
            raise ExecError("stdin is already closed", "bad_request")
        async with self.send_lock:
            for i in range(0, len(data), MAX_STDIN_FRAME):
                await self.stream.send({"i": bytes(data[i:i + MAX_STDIN_FRAME])})

    async def close_stdin(self) -> None:
        if self.stdin_closed:
            return
        self.stdin_closed = True
        async with self.send_lock:
            await self.stream.send({"eof": True})

    async def resize(self, rows: int, cols: int) -> None:
        async with self.send_lock:
            await self.stream.send({"resize": [rows, cols]})

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """("stdout"|"stderr", bytes) ... then ("exit", code); raises ExecError if the stream breaks."""
        while True:
            try:
                msg = await self.stream.receive()
            except EOFError:
                raise ExecError(f"job {self.job_id}: the provider closed the exec stream "
                                "before the command's exit code") from None
            if not isinstance(msg, dict):
                continue
            if msg.get("o") in ("stdout", "stderr") and isinstance(msg.get("d"), bytes):
                yield msg["o"], msg["d"]
            elif "exit" in msg and isinstance(msg["exit"], int):
                self.exit_code = msg["exit"]
                yield "exit", msg["exit"]
                return
            elif "error" in msg:
                raise ExecError(str(msg["error"]), str(msg.get("code") or "failed"))

    async def aclose(self) -> None:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            try:
                await self.stream.close()
            except Exception:
                pass


async def open_exec(mesh, identity: Identity, provider: str, job_id: str, argv: list[str],
                    env: dict[str, str] | None = None, timeout: float = OPEN_TIMEOUT_S,
                    tty: tuple[int, int] | None = None) -> ExecClient:
    """Dial ``provider`` and start ``argv`` in ``job_id``'s sandbox (on a
    pseudo-terminal of ``tty`` = (rows, cols)); raises ExecError if refused."""
    try:
        body = exec_body(job_id, argv, env, tty)
    except ValueError as exc:
        raise ExecError(str(exc), "bad_request") from None
    try:
        with trio.fail_after(timeout):
            stream = await mesh.open_stream(provider, SHELL_PROTOCOL)
    except Exception as exc:
        raise ExecError(f"cannot reach the provider {provider[:16]}…: {type(exc).__name__}: {exc}",
                        "unreachable") from None
    client = ExecClient(stream, job_id)
    try:
        with trio.fail_after(timeout):
            await stream.send({"env": seal(identity, EXEC_TYPE, body).encode()})
            reply = await stream.receive()
    except BaseException as exc:
        await client.aclose()
        if isinstance(exc, Exception):
            raise ExecError(f"the provider did not answer the exec request: {type(exc).__name__}: {exc}",
                            "unreachable") from None
        raise
    if not (isinstance(reply, dict) and reply.get("started")):
        await client.aclose()
        if isinstance(reply, dict) and "error" in reply:
            raise ExecError(str(reply["error"]), str(reply.get("code") or "failed"))
        raise ExecError(f"unexpected answer from the provider: {str(reply)[:200]}")
    return client


# ---- consumer side, for the control API ------------------------------------------------

_HTTP_STATUS = {"forbidden": 403, "no_task": 404, "not_running": 409, "unsupported": 501,
                "busy": 429, "bad_request": 400, "unreachable": 502}


class ConsumerExec:
    """`POST /v1/jobs/{id}/exec` and `POST /v1/exec/{session}/stdin`.

    A one-shot exec sends its ``stdin`` text (if any) and closes stdin; an
    ``interactive`` one stays open and its first NDJSON line names the session
    to which further stdin is posted. ``tty: {rows, cols}`` (interactive by
    nature) runs the command on a pseudo-terminal; ``{"resize": {rows, cols}}``
    posted to the session changes its size."""

    def __init__(self, consumer_jobs, mesh, identity: Identity):
        self.consumer_jobs = consumer_jobs
        self.mesh = mesh
        self.identity = identity
        self.sessions: dict[str, ExecClient] = {}

    @staticmethod
    def _check(body: dict) -> tuple[list[str], dict[str, str], str | None, bool, tuple[int, int] | None]:
        argv = body.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
            raise ApiError(400, "argv must be a non-empty list of strings (the command and its arguments)")
        env = body.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ApiError(400, "env must be a map of strings")
        stdin = body.get("stdin")
        if stdin is not None and not isinstance(stdin, str):
            raise ApiError(400, "stdin must be a string")
        interactive = body.get("interactive", False)
        if not isinstance(interactive, bool):
            raise ApiError(400, "interactive must be a bool")
        tty = None if body.get("tty") is None else _api_terminal_size(body["tty"], "tty")
        return argv, env, stdin, interactive or tty is not None, tty

    async def start(self, job_id: str, body: dict) -> AsyncIterator[bytes]:
        """Open the session (errors become ApiError before anything streams); NDJSON lines after."""
        import json
        import uuid
        argv, env, stdin, interactive, tty = self._check(body)
        job = self.consumer_jobs._get(job_id)  # 404 for a job this node did not submit
        if job.state != "running" or not job.provider:
            raise ApiError(409, f"job {job_id} is not running ({job.state})")
        try:
            client = await open_exec(self.mesh, self.identity, job.provider, job_id, argv, env, tty=tty)
        except ExecError as exc:
            raise ApiError(_HTTP_STATUS.get(exc.code, 502), str(exc)) from None
        sid = None
        try:
            if interactive:
                sid = uuid.uuid4().hex
                self.sessions[sid] = client
                if stdin:
                    await client.send_stdin(stdin.encode("utf-8", "surrogateescape"))
            else:
                if stdin:
                    await client.send_stdin(stdin.encode("utf-8", "surrogateescape"))
                await client.close_stdin()
        except BaseException:
            self.sessions.pop(sid, None)
            await client.aclose()
            raise

        def line(obj: dict) -> bytes:
            return (json.dumps(obj) + "\n").encode()

        async def gen() -> AsyncIterator[bytes]:
            try:
                if sid:
                    yield line({"session": sid})
                async for kind, data in client.events():
                    if kind == "exit":
                        yield line({"exit_code": data})
                    else:
                        yield line({"stream": kind, "data": data.decode("utf-8", "surrogateescape")})
            except (ExecError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                yield line({"error": str(exc) or type(exc).__name__})
            finally:
                if sid:
                    self.sessions.pop(sid, None)
                await client.aclose()
        return gen()

    async def stdin(self, sid: str, body: dict) -> dict:
        client = self.sessions.get(sid)
        if client is None:
            raise ApiError(404, f"no exec session {sid} (it has ended)")
        data = body.get("data")
        if data is not None and not isinstance(data, str):
            raise ApiError(400, "data must be a string")
        size = None if body.get("resize") is None else _api_terminal_size(body["resize"], "resize")
        try:
            if size:
                await client.resize(*size)
            if data:
                await client.send_stdin(data.encode("utf-8", "surrogateescape"))
            if body.get("eof"):
                await client.close_stdin()
        except ExecError as exc:
            raise ApiError(400, str(exc)) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ApiError(410, f"exec session {sid} has ended ({type(exc).__name__})") from None
        except Exception as exc:  # the mesh stream broke in its own way
            raise ApiError(410, f"exec session {sid} has ended ({type(exc).__name__}: {exc})") from None
        return {"ok": True}


def _api_terminal_size(value: Any, name: str) -> tuple[int, int]:
    try:
        if not isinstance(value, dict) or set(value) != {"rows", "cols"}:
            raise TaskSpecError("expected {rows, cols}")
        return terminal_size([value["rows"], value["cols"]])
    except TaskSpecError as exc:
        raise ApiError(400, f"{name}: {exc}") from None
