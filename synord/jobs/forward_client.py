"""`synord forward JOB [LOCAL:]REMOTE`, consumer side: a listener on
127.0.0.1:LOCAL (loopback only) whose every accepted TCP connection goes over
a new `/synord/forward/1` stream (synord.protocols.forward) to the provider
running the job, which connects to REMOTE inside the sandbox.

`open_forward` dials one stream and returns it accepted (or raises
`ForwardError` with the provider's code); `ConsumerForwards` is what the
control API calls: `start` checks the job and the port, asks the provider once
(``check``: refused at once, not at the first connection), listens, and returns
the NDJSON lines of the forward's life. The forward lasts until the API
client goes away (`synord forward` is stopped) or the job ends; either closes
the listener and every connection it made. A job that moves to another
provider keeps its forward: connections made while it runs there go there
(the old provider closed the old ones when the task left it). The provider
side is `synord.jobs.forward_service`.
"""

from __future__ import annotations

import errno
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import trio

from synord.protocols.envelope import seal
from synord.protocols.forward import (FORWARD_PROTOCOL, OPEN_TIMEOUT_S, OPEN_TYPE, OPENER, Accepted,
                                      ForwardChannel, ForwardViolation, open_body)
from synord.protocols.framing import FramedStream
from synord.protocols.identity import Identity
from synord.protocols.refusals import REFUSALS

from ..errors import Busy, Conflict, Forbidden, Invalid, NotFound, Unavailable, Unsupported
from .exec_client import open_provider_stream
from .forward_relay import IDLE_S, MAX_PER_JOB, relay
from .spec import TERMINAL

log = logging.getLogger("synord.jobs.forward")

MAX_EVENTS = 64  # event lines waiting for a slow API client; more are dropped (counted in the next)


class ForwardError(Exception):
    """The provider refused (``code`` as in synord.protocols.forward) or could not be reached."""

    def __init__(self, message: str, code: str = "failed"):
        super().__init__(message)
        self.code = code


async def open_forward(mesh, identity: Identity, provider: str, job_id: str, port: int,
                       check: bool = False, timeout: float = OPEN_TIMEOUT_S) -> tuple[FramedStream, ForwardChannel]:
    """A stream to ``port`` of ``job_id``'s sandbox, accepted by ``provider``."""
    try:
        body = open_body(job_id, port, check)
    except ValueError as exc:
        raise ForwardError(str(exc), "bad_request") from None
    stream = await open_provider_stream(mesh, provider, FORWARD_PROTOCOL, timeout, ForwardError)
    channel = ForwardChannel(OPENER)
    try:
        with trio.fail_after(timeout):
            await stream.send({"env": seal(identity, OPEN_TYPE, body).encode()})
            answer = channel.receive(await stream.receive())
    except BaseException as exc:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            await stream.raw.reset()
        if isinstance(exc, ForwardViolation):
            REFUSALS.count("forward_client", exc.slug)
            raise ForwardError(f"the provider broke the forward protocol: {exc}") from None
        if isinstance(exc, Exception):
            raise ForwardError(f"the provider did not answer the forward request: {type(exc).__name__}: {exc}",
                               "unreachable") from None
        raise
    if not isinstance(answer, Accepted):
        with trio.move_on_after(1):
            await stream.raw.close()
        raise ForwardError(answer.message, answer.code)
    return stream, channel


# The provider's refusal codes (synord.protocols.forward) as domain errors.
_REFUSAL = {"forbidden": Forbidden, "no_task": NotFound, "not_running": Conflict, "unsupported": Unsupported,
            "port_not_agreed": Forbidden, "busy": Busy, "bad_request": Invalid, "unreachable": Unavailable}


@dataclass(eq=False)  # each forward is itself (held in a set)
class Forward:
    job_id: str
    remote: int
    local: int
    listener: trio.SocketListener
    events: tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel]
    stop: trio.Event = field(default_factory=trio.Event)  # the listener and every connection end
    connections: int = 0  # open now
    opened: int = 0  # ever
    dropped_events: int = 0

    def emit(self, obj: dict) -> None:
        try:
            self.events[0].send_nowait({**obj, **({"dropped": self.dropped_events} if self.dropped_events else {})})
            self.dropped_events = 0
        except trio.WouldBlock:
            self.dropped_events += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class ConsumerForwards:
    """`POST /v1/jobs/{id}/forward` {remote, local?}: NDJSON lines — first
    ``{"listening": "127.0.0.1:PORT", "local", "remote", "job"}``, then one line per
    connection that ends or is refused, then ``{"ended": why}``."""

    def __init__(self, consumer_jobs, mesh, identity: Identity, max_per_job: int = MAX_PER_JOB,
                 idle_s: float = IDLE_S):
        self.consumer_jobs = consumer_jobs
        self.mesh = mesh
        self.identity = identity
        self.max_per_job = max_per_job
        self.idle_s = idle_s
        self.forwards: set[Forward] = set()
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @staticmethod
    def _check(body: Any) -> tuple[int, int]:
        if not isinstance(body, dict) or set(body) - {"remote", "local"}:
            raise Invalid("body must be {remote: PORT, local?: PORT}")
        remote, local = body.get("remote"), body.get("local") or 0
        for name, v, lo in (("remote", remote, 1), ("local", local, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= 65535:
                raise Invalid(f"{name} must be a port number in {lo}..65535")
        return remote, local

    async def start(self, job_id: str, body: Any) -> AsyncIterator[bytes]:
        """Check, ask the provider, listen (errors are raised before anything streams)."""
        remote, local = self._check(body)
        job = self.consumer_jobs._get(job_id)  # 404 for a job this node did not submit
        if job.state != "running" or not job.provider:
            raise Conflict(f"job {job_id} is not running ({job.state})")
        if remote not in job.jobspec.ports:
            exposed = ", ".join(map(str, job.jobspec.ports)) or "none (synord run --port PORT)"
            raise Invalid(f"port {remote} is not exposed by job {job_id} (its ports: {exposed})")
        if self._nursery is None:
            raise Unavailable("the node is starting")
        try:
            stream, _ = await open_forward(self.mesh, self.identity, job.provider, job_id, remote, check=True)
        except ForwardError as exc:
            raise _REFUSAL.get(exc.code, Unavailable)(str(exc)) from None
        with trio.move_on_after(1):
            await stream.raw.close()
        try:
            listeners = await trio.open_tcp_listeners(local, host="127.0.0.1")
        except OSError as exc:
            why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise Conflict(f"cannot listen on 127.0.0.1:{local}: {why}") from None
        listener = listeners[0]
        port = listener.socket.getsockname()[1]
        fwd = Forward(job_id, remote, port, listener, trio.open_memory_channel(MAX_EVENTS))
        self.forwards.add(fwd)
        self._nursery.start_soon(self._serve, fwd, job)
        log.info("forward listening", extra={"job": job_id, "local": port, "remote": remote})

        async def lines() -> AsyncIterator[bytes]:
            try:
                yield _line({"listening": f"127.0.0.1:{port}", "local": port, "remote": remote, "job": job_id})
                async for event in fwd.events[1]:
                    yield _line(event)
            finally:
                fwd.stop.set()  # the API client went away: the forward ends with it
        return lines()

    async def _serve(self, fwd: Forward, job) -> None:
        send_events = fwd.events[0]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_stopped, fwd, job, nursery.cancel_scope)
                while True:
                    conn = await fwd.listener.accept()
                    if fwd.connections >= self.max_per_job:
                        fwd.emit({"error": f"more than {self.max_per_job} connections at once: one refused"})
                        await conn.aclose()
                        continue
                    fwd.connections += 1
                    fwd.opened += 1
                    nursery.start_soon(self._tunnel, fwd, job, conn, fwd.opened)
        finally:
            with trio.CancelScope(shield=True):
                await fwd.listener.aclose()
            self.forwards.discard(fwd)
            await send_events.aclose()

    async def _until_stopped(self, fwd: Forward, job, scope: trio.CancelScope) -> None:
        """Until the job ends, or the forward is stopped."""
        async with trio.open_nursery() as watch:
            async def job_ends() -> None:
                while job.state not in TERMINAL:
                    await job.changed.wait()
                fwd.emit({"ended": f"job {fwd.job_id} is no longer running ({job.state})"})
                watch.cancel_scope.cancel()

            async def stopped() -> None:
                await fwd.stop.wait()
                watch.cancel_scope.cancel()
            watch.start_soon(job_ends)
            watch.start_soon(stopped)
        fwd.stop.set()
        scope.cancel()

    async def _tunnel(self, fwd: Forward, job, conn: trio.SocketStream, n: int) -> None:
        relayed = False  # from then on the relay closes the connection
        try:
            if job.state != "running" or not job.provider:  # between providers, say
                raise ForwardError(f"job {fwd.job_id} is not running now ({job.state})")
            stream, channel = await open_forward(self.mesh, self.identity, job.provider, fwd.job_id, fwd.remote)
            relayed = True
            out = await relay(stream, conn, channel, self.idle_s, "forward_client", fwd.stop)
            fwd.emit({"connection": n, "closed": out.how, "sent": out.sent, "received": out.received})
        except ForwardError as exc:
            fwd.emit({"connection": n, "error": str(exc)})
        finally:
            fwd.connections -= 1
            if not relayed:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await conn.aclose()


def _line(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()
