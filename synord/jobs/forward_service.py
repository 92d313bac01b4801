"""`synord forward`, provider side: a TCP connection from the task's consumer
to a port inside the task's sandbox, over `/synord/forward/1`
(synord.protocols.forward), for the task's owner only and only to a port its
signed agreement names.

`ForwardService.handle` (registered by `ProviderJobs.register`) checks the
opening envelope (signed by the stream's authenticated peer), that this peer
is the task's consumer, that the task runs, that the port is in the
agreement's terms and that the task has fewer than ``max_per_job`` forwarded
connections; then `Sandbox.connect_port` connects inside the sandbox's network
namespace (the sandbox gets no network of its own) and `forward_relay.relay`
moves the bytes. Every refusal is answered with a code and counted. The task
ending (cancelled, finished, moved) ends all its connections at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from synord.protocols.envelope import EnvelopeValidator, PeerEnvelopeRefused, peer_envelope
from synord.protocols.forward import ACCEPTER, OPEN_TIMEOUT_S, OPEN_TYPE, ForwardChannel
from synord.protocols.framing import FramedStream
from synord.protocols.refusals import REFUSALS
from synord.runtimes.base import ForwardUnsupported

from .forward_relay import IDLE_S, MAX_PER_JOB, relay

from .owner import OwnerRefused, owners_running_task

if TYPE_CHECKING:
    from .provider import ProviderJobs, ProviderTask

log = logging.getLogger("synord.jobs.forward")


class ForwardRefused(Exception):
    def __init__(self, code: str, message: str, counted: bool = False):
        super().__init__(message)
        self.code = code  # one of synord.protocols.forward.ERROR_CODES
        self.counted = counted  # already counted under a finer reason


class ForwardService:
    def __init__(self, jobs: "ProviderJobs", validator: EnvelopeValidator | None = None,
                 max_per_job: int = MAX_PER_JOB, idle_s: float = IDLE_S):
        self.jobs = jobs
        self.validator = validator or jobs.validator
        self.max_per_job = max_per_job
        self.idle_s = idle_s
        self.open: dict[str, int] = {}  # task key (agreement id) -> forwarded connections now

    def _request(self, first: Any, stream: FramedStream) -> dict:
        try:
            env = peer_envelope(self.validator, first.get("env") if isinstance(first, dict) else None,
                                stream.remote_peer, (OPEN_TYPE,))
        except PeerEnvelopeRefused as exc:
            REFUSALS.count("forward", exc.slug)
            raise ForwardRefused("forbidden" if exc.slug == "wrong_signer" else "bad_request", str(exc),
                                 counted=True) from None
        return env.body

    def _task(self, job_id: str, port: int, peer: str) -> "ProviderTask":
        try:
            task = owners_running_task(self.jobs, peer, job_id, "forward to")
        except OwnerRefused as exc:
            raise ForwardRefused(exc.code, str(exc)) from None
        if port not in task.terms.ports:
            agreed = ", ".join(map(str, task.terms.ports)) or "none"
            raise ForwardRefused("port_not_agreed", f"port {port} is not exposed by job {job_id} "
                                                    f"(its agreement names: {agreed})")
        ex = task.execution
        if why := ex.sandbox.forward_unsupported():
            raise ForwardRefused("unsupported", f"job {job_id}: {why}")
        if self.open.get(task.key, 0) >= self.max_per_job:
            raise ForwardRefused("busy", f"job {job_id} already has {self.max_per_job} forwarded connections")
        return task

    async def _connect(self, task: "ProviderTask", port: int) -> trio.SocketStream:
        try:
            with trio.fail_after(OPEN_TIMEOUT_S):
                return await task.execution.sandbox.connect_port(port)
        except ForwardUnsupported as exc:
            code = "not_running" if "not running" in str(exc) else "unsupported"
            raise ForwardRefused(code, f"job {task.job_id}: {exc}") from None
        except (OSError, trio.TooSlowError) as exc:
            why = getattr(exc, "strerror", None) or type(exc).__name__
            raise ForwardRefused("connection_refused", f"job {task.job_id}: nothing answers on port {port} "
                                                       f"inside the sandbox ({why})") from None

    async def handle(self, stream: FramedStream) -> None:
        peer = stream.remote_peer
        job_id = None
        channel = ForwardChannel(ACCEPTER)
        try:
            with trio.fail_after(OPEN_TIMEOUT_S):
                first = await stream.receive()
            body = self._request(first, stream)
            job_id, port = body["job_id"], body["port"]
            task = self._task(job_id, port, peer)
            if body.get("check"):  # `synord forward` asks before it listens: all but the connection
                channel.accepted()
                await stream.send({"ok": True})
                await stream.close()
                return
            key = task.key
            self.open[key] = self.open.get(key, 0) + 1  # before the await: the limit holds
            try:
                conn = await self._connect(task, port)
                try:
                    channel.accepted()
                    await stream.send({"ok": True})
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await conn.aclose()  # the relay owns it only once it starts
                    raise
                out = await relay(stream, conn, channel, self.idle_s, "forward", task.execution.done)
                log.info("forward ended", extra={"job": job_id, "port": port, "how": out.how,
                                                 "sent": out.sent, "received": out.received})
            finally:
                self.open[key] -= 1
                if not self.open[key]:
                    del self.open[key]
        except ForwardRefused as exc:
            if not exc.counted:
                REFUSALS.count("forward", exc.code)
            log.info("forward refused", extra={"peer": peer[:16], "job": job_id, "reason": str(exc)})
            with trio.move_on_after(2):
                try:
                    await stream.send({"error": str(exc), "code": exc.code})
                    await stream.close()
                except Exception:
                    pass
        except (EOFError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("forward stream ended", extra={"peer": peer[:16], "job": job_id,
                                                    "error": f"{type(exc).__name__}: {exc}"})
