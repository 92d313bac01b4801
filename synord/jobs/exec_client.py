"""`synord exec` / `synord shell`, consumer side: `open_exec` dials the job's
provider over `/synord/shell/1.0.0` (synord.protocols.shell) and returns an
`ExecClient` (send stdin, iterate output events, close); `ConsumerExec` is
what the control API calls.  The provider side is `synord.jobs.exec_service`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import trio

from synord.protocols.envelope import seal
from synord.protocols.framing import FramedStream
from synord.protocols.identity import Identity
from synord.protocols.shell import EXEC_TYPE, MAX_STDIN_FRAME, OPEN_TIMEOUT_S, SHELL_PROTOCOL, exec_body, terminal_size
from synord.protocols.tasks import TaskSpecError

from ..errors import Busy, Conflict, Forbidden, Gone, Invalid, NotFound, Unavailable, Unsupported


class ExecError(Exception):
    """The provider refused (``code`` as in synord.protocols.shell) or the stream broke."""

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


async def open_provider_stream(mesh, provider: str, protocol: str, timeout: float, error: type) -> FramedStream:
    """A stream to ``provider`` for an exec or a forward; ``error(message, "unreachable")``
    when it cannot be opened within ``timeout``."""
    try:
        with trio.fail_after(timeout):
            return await mesh.open_stream(provider, protocol)
    except Exception as exc:
        raise error(f"cannot reach the provider {provider[:16]}…: {type(exc).__name__}: {exc}",
                    "unreachable") from None


async def open_exec(mesh, identity: Identity, provider: str, job_id: str, argv: list[str],
                    env: dict[str, str] | None = None, timeout: float = OPEN_TIMEOUT_S,
                    tty: tuple[int, int] | None = None) -> ExecClient:
    """Dial ``provider`` and start ``argv`` in ``job_id``'s sandbox (on a
    pseudo-terminal of ``tty`` = (rows, cols)); raises ExecError if refused."""
    try:
        body = exec_body(job_id, argv, env, tty)
    except ValueError as exc:
        raise ExecError(str(exc), "bad_request") from None
    stream = await open_provider_stream(mesh, provider, SHELL_PROTOCOL, timeout, ExecError)
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

# The provider's refusal codes (synord.protocols.shell) as domain errors.
_REFUSAL = {"forbidden": Forbidden, "no_task": NotFound, "not_running": Conflict, "unsupported": Unsupported,
            "busy": Busy, "bad_request": Invalid, "unreachable": Unavailable}


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
            raise Invalid("argv must be a non-empty list of strings (the command and its arguments)")
        env = body.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise Invalid("env must be a map of strings")
        stdin = body.get("stdin")
        if stdin is not None and not isinstance(stdin, str):
            raise Invalid("stdin must be a string")
        interactive = body.get("interactive", False)
        if not isinstance(interactive, bool):
            raise Invalid("interactive must be a bool")
        tty = None if body.get("tty") is None else _api_terminal_size(body["tty"], "tty")
        return argv, env, stdin, interactive or tty is not None, tty

    async def start(self, job_id: str, body: dict) -> AsyncIterator[bytes]:
        """Open the session (errors are raised before anything streams); NDJSON lines after."""
        import json
        import uuid
        argv, env, stdin, interactive, tty = self._check(body)
        job = self.consumer_jobs._get(job_id)  # 404 for a job this node did not submit
        if job.state != "running" or not job.provider:
            raise Conflict(f"job {job_id} is not running ({job.state})")
        try:
            client = await open_exec(self.mesh, self.identity, job.provider, job_id, argv, env, tty=tty)
        except ExecError as exc:
            raise _REFUSAL.get(exc.code, Unavailable)(str(exc)) from None
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
            raise NotFound(f"no exec session {sid} (it has ended)")
        data = body.get("data")
        if data is not None and not isinstance(data, str):
            raise Invalid("data must be a string")
        size = None if body.get("resize") is None else _api_terminal_size(body["resize"], "resize")
        try:
            if size:
                await client.resize(*size)
            if data:
                await client.send_stdin(data.encode("utf-8", "surrogateescape"))
            if body.get("eof"):
                await client.close_stdin()
        except ExecError as exc:
            raise Invalid(str(exc)) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise Gone(f"exec session {sid} has ended ({type(exc).__name__})") from None
        except Exception as exc:  # the mesh stream broke in its own way
            raise Gone(f"exec session {sid} has ended ({type(exc).__name__}: {exc})") from None
        return {"ok": True}


def _api_terminal_size(value: Any, name: str) -> tuple[int, int]:
    try:
        if not isinstance(value, dict) or set(value) != {"rows", "cols"}:
            raise TaskSpecError("expected {rows, cols}")
        return terminal_size([value["rows"], value["cols"]])
    except TaskSpecError as exc:
        raise Invalid(f"{name}: {exc}") from None
