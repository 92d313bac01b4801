"""`synord exec` / `synord shell`, provider side: a command inside a running
task's sandbox, over `/synord/shell/1.0.0` (synord.protocols.shell), for the task's
owner only.

`ShellService.handle` (registered by `ProviderJobs.register`) checks that the
stream's authenticated peer is the task's consumer and signed the request,
that the task still runs, then runs the command with `Sandbox.exec` and
relays stdin / output / exit code. A consumer that goes away mid-command
aborts it: the command is killed, never left behind.  The consumer side is
`synord.jobs.exec_client`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from synord.protocols.envelope import EnvelopeValidator, PeerEnvelopeRefused, peer_envelope
from synord.protocols.framing import FramedStream
from synord.protocols.refusals import REFUSALS
from synord.protocols.shell import EXEC_TYPE, OPEN_TIMEOUT_S, terminal_size
from synord.protocols.tasks import TaskSpecError
from synord.runtimes.base import ExecUnsupported, SpecError, TerminalSize

from .owner import OwnerRefused, owners_running_task

if TYPE_CHECKING:
    from .provider import ProviderJobs

log = logging.getLogger("synord.jobs.shell")

MAX_SESSIONS_PER_TASK = 8


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
        try:
            env = peer_envelope(self.validator, first.get("env") if isinstance(first, dict) else None,
                                stream.remote_peer, (EXEC_TYPE,))
        except PeerEnvelopeRefused as exc:
            REFUSALS.count("shell", exc.slug)
            # the wire's error codes (synord.protocols.shell.ERROR_CODES): someone else's signature is "forbidden"
            raise ShellRefused("forbidden" if exc.slug == "wrong_signer" else "bad_request", str(exc)) from None
        return env.body

    def _task(self, job_id: str, peer: str):
        try:
            task = owners_running_task(self.jobs, peer, job_id, "exec into")
        except OwnerRefused as exc:
            raise ShellRefused(exc.code, str(exc)) from None
        ex = task.execution
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
