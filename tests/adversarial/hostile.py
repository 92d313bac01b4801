"""A hostile peer for attacking real daemons through the wire, built on our own
protocol modules (`synord.protocols.p2p` host with Noise + yamux, `synord.protocols.identity`,
`synord.protocols.envelope`, `synord.protocols.framing`, the negotiation machine through
`synord.market.negotiator.Consumer`), so that it speaks exactly what an honest
peer speaks, and then breaks whatever rule a test wants broken.

Use it from a pytest-trio test against daemons started with `tests/daemons.py`
(HTTP calls to the daemon go through ``trio.to_thread``: libp2p must keep running):

    async with HostilePeer.running() as evil:
        pid = await evil.connect(provider_multiaddr)        # -> provider peer id
        ask = await evil.ask_of(pid)                        # its public ask, from gossip
        terms = await evil.obtain_agreement(pid, ask)       # propose + countersign
        sha = await evil.upload(pid, b"\\0asm...")           # /synord/transfer, as a consumer
        stream, reply = await evil.task_start(pid, evil.task_body(terms, sha, job_id="x"))

API (all methods are coroutines unless marked *sync*):

``HostilePeer.running(identity=None, classes=("cpu",))``
    async context manager: a libp2p host on 127.0.0.1 (no mDNS, no peer
    exchange, no bootstrap) subscribed to the order topics of ``classes``; it
    answers /synord/negotiate/1.0.0 like a consumer would. ``.identity``,
    ``.peer_id``, ``.mesh`` (the `synord.protocols.mesh.Mesh`) are public.
``connect(multiaddr) -> peer_id``
    dial a daemon (full multiaddr with /p2p/<id>).
``open(peer, protocol) -> FramedStream``
    a raw stream on any protocol id: ``.send(obj)`` one msgpack frame,
    ``.raw.write(bytes)`` anything at all (partial frames, garbage, a length
    prefix and then nothing: a stalled frame), ``.receive()`` the next frame
    (EOFError at a clean end), ``.close()`` / ``.reset()``.
``exchange(peer, protocol, frames, replies=1, timeout=10) -> list``
    open, send each of ``frames`` (objects are framed; ``bytes`` go out raw),
    read up to ``replies`` frames (fewer if the peer closes), close.
``seal(type_, body, identity=None, ttl_ms=..., now=None) -> bytes`` *sync*
    an encoded envelope of any type and any body, signed by us (or by
    ``identity``: impersonation attempts). No body check: the receiver's job.
``ask_of(provider, resource_class="cpu", timeout=30) -> synord.protocols.orders.Ask``
    the provider's latest public ask heard on gossip.
``obtain_agreement(provider, ask=None, *, runtime="wasm", cores=0.5, memory=64 MiB,
                   duration_s=600, max_price=None, timeout=20) -> Terms``
    a real agreement: a Propose against ``ask``, the provider's signed
    Agreement checked by the consumer state machine, our Countersign sent;
    heartbeats keep the lease alive while the peer runs. Raises
    `AgreementRefused` with the provider's reason.
``upload(provider, data_or_path, kind="artifact", job_id="", grant=None) -> sha256``
    offer and send a blob on /synord/transfer/1.0.0; raises
    `synord.protocols.transfer.TransferError` with the receiver's refusal.
``task_body(terms, sha256, job_id=None, **fields) -> dict`` *sync*
    a task.start body that matches ``terms``; override any field.
``task_start(provider, body, identity=None) -> (stream, first_reply)``
    open /synord/task/1.0.0 and send a signed task.start (``task_attach``:
    the same for task.attach); the caller reads on or closes the stream.
``read_task(stream, timeout=30) -> TaskResult`` the rest of a task stream:
    output bytes per stream, frames seen, the exit frame (None if none came).

Checking the victim (plain functions, blocking: call them through ``trio.to_thread``):

``refusals(daemon) -> {(where, reason): count}`` synord_refusals_total from its /metrics;
``refused(daemon, where, reason) -> count``; ``counted(before, after)`` what was
counted in between; ``in_thread(fn, *args)`` (async) runs any of these off trio.

As a provider (a lying one, to attack consumers):

``offer(runtimes=("wasm",), cores=1.0, memory=1 GiB, price=0.001) -> Ask``
    publish an ask on gossip (again every second while the peer runs) and
    answer proposals with `synord.market.negotiator.Provider` (real
    admission, signed agreements); uploads on /synord/transfer are accepted
    into a scratch blob store (``.blobs``).
``serve_tasks(handler)``
    ``await handler(stream, envelope)`` for each /synord/task/1.0.0 stream
    whose first frame is a valid task.start / task.attach envelope (checked
    by our own validator); the handler answers what it likes.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import trio

from synord.protocols.envelope import EnvelopeValidator, now_ms, seal as seal_envelope
from synord.protocols.framing import FramedStream
from synord.protocols.identity import Identity, b58decode
from synord.protocols.mesh import MeshConfig, envelope_validator
from synord.protocols.p2p import create_mesh
from synord.protocols.negotiation import Terms
from synord.protocols.orders import Ask, Bid
from synord.protocols.tasks import TASK_PROTOCOL
from synord.protocols.topics import orders as orders_topic
from synord.protocols.transfer import TRANSFER_PROTOCOL, BlobStore, TransferError, receive_file, send_file
from synord.market.negotiator import NEGOTIATE_PROTOCOL, Consumer, Placement, Provider, Send, run_timers
from synord.market.reservations import CapacityPool


class AgreementRefused(Exception):
    pass


@dataclass
class TaskResult:
    out: dict[str, bytearray] = field(default_factory=lambda: {"stdout": bytearray(), "stderr": bytearray()})
    frames: list[Any] = field(default_factory=list)
    exit: dict | None = None


class HostilePeer:
    def __init__(self, identity: Identity | None = None, classes: tuple[str, ...] = ("cpu",)):
        self.identity = identity or Identity.generate()
        self.peer_id = self.identity.peer_id
        self.classes = classes
        self.mesh = create_mesh(self.identity, MeshConfig(
            listen=["/ip4/127.0.0.1/tcp/0"], mdns=False, peer_exchange=False))
        self.asks: dict[str, Ask] = {}  # provider peer id -> latest ask heard
        self._ask_heard = trio.Event()
        self._placed: dict[str, trio.Event] = {}
        self.consumer = Consumer(self.identity, on_agreement=self._done, on_failed=self._done)
        self.provider: Provider | None = None  # set by offer()
        self.blobs: BlobStore | None = None
        self._out: dict[tuple[str, str], FramedStream] = {}  # (peer, role it is for) -> stream
        self._nursery: trio.Nursery | None = None
        self._scratch: Path | None = None  # a temporary directory while running

    @classmethod
    @asynccontextmanager
    async def running(cls, identity: Identity | None = None,
                      classes: tuple[str, ...] = ("cpu",)) -> AsyncIterator["HostilePeer"]:
        peer = cls(identity, classes)
        async with trio.open_nursery() as nursery:
            peer._nursery = nursery
            await nursery.start(peer.mesh.run)
            peer.mesh.set_handler(NEGOTIATE_PROTOCOL, peer._negotiation_in)
            for c in classes:
                channel = await peer.mesh.subscribe(orders_topic(c), envelope_validator(
                    EnvelopeValidator(), ("ask", "bid", "cancel")))
                nursery.start_soon(peer._hear_orders, channel)
            nursery.start_soon(run_timers, peer.consumer, peer._to_provider, now_ms)
            with tempfile.TemporaryDirectory(prefix="hostile-") as scratch:
                peer._scratch = Path(scratch)
                try:
                    yield peer
                finally:
                    nursery.cancel_scope.cancel()

    # ---- raw access -------------------------------------------------------------------

    async def connect(self, multiaddr: str) -> str:
        with trio.fail_after(15):
            return await self.mesh.dial(multiaddr)

    async def open(self, peer: str, protocol: str) -> FramedStream:
        with trio.fail_after(10):
            return await self.mesh.open_stream(peer, protocol)

    async def exchange(self, peer: str, protocol: str, frames: list[Any], replies: int = 1,
                       timeout: float = 10.0) -> list[Any]:
        stream = await self.open(peer, protocol)
        got: list[Any] = []
        try:
            with trio.fail_after(timeout):
                for f in frames:
                    if isinstance(f, (bytes, bytearray)):
                        await stream.raw.write(bytes(f))
                    else:
                        await stream.send(f)
                for _ in range(replies):
                    try:
                        got.append(await stream.receive())
                    except EOFError:
                        break
        finally:
            with trio.move_on_after(1):
                await stream.close()
        return got

    def seal(self, type_: str, body: Any, identity: Identity | None = None, ttl_ms: int = 60_000,
             now: int | None = None) -> bytes:
        return seal_envelope(identity or self.identity, type_, body, ttl_ms, now=now).encode()

    # ---- the market, as a consumer ----------------------------------------------------------

    async def _hear_orders(self, channel) -> None:
        async for msg in channel:
            env = msg.value
            if env is None or env.type != "ask":
                continue
            try:
                ask = Ask.from_body(env.body, peer=env.sender_id, ts=env.timestamp_ms)
            except Exception:  # a malformed ask is the book's problem, not ours
                continue
            self.asks[ask.peer] = ask
            self._ask_heard.set()
            self._ask_heard = trio.Event()

    async def ask_of(self, provider: str, resource_class: str = "cpu", timeout: float = 30.0) -> Ask:
        with trio.fail_after(timeout):
            while True:
                ask = self.asks.get(provider)
                if ask is not None and ask.resource_class == resource_class and ask.expires > now_ms():
                    return ask
                await self._ask_heard.wait()

    def _done(self, pl: Placement) -> None:
        ev = self._placed.get(pl.bid.id)
        if ev is not None:
            ev.set()

    async def _send(self, s: Send, role: str) -> None:
        frame = {"to": role, "env": s.envelope.encode()}
        for _ in (1, 2):
            stream = self._out.get((s.to, role))
            try:
                if stream is None:
                    stream = self._out[(s.to, role)] = await self.open(s.to, NEGOTIATE_PROTOCOL)
                await stream.send(frame)
                return
            except Exception:
                self._out.pop((s.to, role), None)

    async def _to_provider(self, s: Send) -> None:
        await self._send(s, "provider")

    async def _to_consumer(self, s: Send) -> None:
        await self._send(s, "consumer")

    async def _negotiation_in(self, stream: FramedStream) -> None:
        peer = b58decode(stream.remote_peer)
        try:
            while True:
                frame = await stream.receive()
                if not (isinstance(frame, dict) and isinstance(frame.get("env"), bytes)):
                    continue
                if frame.get("to") == "consumer":
                    for s in self.consumer.receive(frame["env"], peer):
                        await self._to_provider(s)
                elif frame.get("to") == "provider":
                    await self._as_provider(frame["env"], peer)
        except Exception:
            pass

    async def _as_provider(self, data: bytes, peer: bytes) -> None:
        """An envelope for us as a provider (a hostile provider overrides what it answers)."""
        if self.provider is not None:
            for s in self.provider.receive(data, peer):
                await self._to_consumer(s)

    async def obtain_agreement(self, provider: str, ask: Ask | None = None, *, runtime: str = "wasm",
                               cores: float = 0.5, memory: int = 64 << 20, duration_s: int = 600,
                               max_price: float | None = None, timeout: float = 20.0) -> Terms:
        ask = ask or await self.ask_of(provider)
        now = now_ms()
        bid = Bid(id=uuid.uuid4().hex[:16], seq=now, resource_class=ask.resource_class, cores=cores,
                  memory=memory, runtime=runtime,
                  max_price=ask.price if max_price is None else max_price, duration_s=duration_s,
                  deadline=now + 60_000, expires=now + 60_000, peer=self.peer_id, ts=now)
        done = self._placed[bid.id] = trio.Event()
        for s in self.consumer.place(bid, [ask]):
            await self._to_provider(s)
        with trio.move_on_after(timeout):
            await done.wait()
        pl = self.consumer.placements[bid.id]
        terms = pl.negotiation.terms if pl.negotiation is not None else None
        if pl.state != "active" or terms is None:
            raise AgreementRefused(pl.explain())
        return terms

    # ---- transfer and tasks ------------------------------------------------------------------

    async def upload(self, provider: str, data: bytes | Path, kind: str = "artifact", job_id: str = "",
                     grant: bytes | None = None, timeout: float = 30.0) -> str:
        from synord.protocols.transfer import sha256_of
        path = Path(data) if isinstance(data, (str, Path)) else None
        tmp = None
        if path is None:
            fd, name = tempfile.mkstemp(prefix="hostile-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            path = tmp = Path(name)
        try:
            sha = sha256_of(path)
            body = {"sha256": sha, "size": path.stat().st_size, "kind": kind}
            if job_id:
                body["job_id"] = job_id
            if grant is not None:
                body["grant"] = grant
            stream = await self.open(provider, TRANSFER_PROTOCOL)
            try:
                with trio.fail_after(timeout):
                    await send_file(stream, self.seal("blob.offer", body), path)
            except EOFError:
                raise TransferError("the provider closed the stream") from None
            finally:
                with trio.move_on_after(1):
                    await stream.close()
            return sha
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def task_body(self, terms: Terms, sha256: str, job_id: str | None = None, **fields: Any) -> dict:
        body = {"job_id": job_id or uuid.uuid4().hex[:16], "agreement_id": terms.aid.hex(),
                "kind": terms.runtime, "artifact_sha256": sha256, "args": [], "env": {},
                "limits": {"cpus": float(terms.cores), "memory_bytes": int(terms.memory)},
                "checkpointable": False, "checkpoint_interval_s": 0, "restore": None}
        body.update(fields)
        return body

    async def _open_task(self, provider: str, type_: str, body: dict, identity: Identity | None,
                         timeout: float) -> tuple[FramedStream, Any]:
        stream = await self.open(provider, TASK_PROTOCOL)
        await stream.send({"env": self.seal(type_, body, identity=identity)})
        with trio.fail_after(timeout):
            try:
                reply = await stream.receive()
            except EOFError:
                reply = None
        return stream, reply

    async def task_start(self, provider: str, body: dict, identity: Identity | None = None,
                         timeout: float = 60.0) -> tuple[FramedStream, Any]:
        return await self._open_task(provider, "task.start", body, identity, timeout)

    async def task_attach(self, provider: str, job_id: str, offsets: dict | None = None,
                          identity: Identity | None = None, timeout: float = 30.0,
                          **fields: Any) -> tuple[FramedStream, Any]:
        body = {"job_id": job_id, "offsets": offsets or {"stdout": 0, "stderr": 0}, **fields}
        return await self._open_task(provider, "task.attach", body, identity, timeout)

    @staticmethod
    async def read_task(stream: FramedStream, timeout: float = 30.0) -> TaskResult:
        res = TaskResult()
        with trio.fail_after(timeout):
            while res.exit is None:
                try:
                    msg = await stream.receive()
                except EOFError:
                    break
                res.frames.append(msg)
                if isinstance(msg, dict) and "o" in msg and isinstance(msg.get("d"), bytes):
                    buf = res.out.setdefault(str(msg["o"]), bytearray())
                    if msg.get("off") == len(buf):
                        buf += msg["d"]
                elif isinstance(msg, dict) and isinstance(msg.get("exit"), dict):
                    res.exit = msg["exit"]
        return res

    # ---- as a provider -------------------------------------------------------------------------

    async def offer(self, runtimes: tuple[str, ...] = ("wasm",), cores: float = 1.0, memory: int = 1 << 30,
                    price: float = 0.001) -> Ask:
        now = now_ms()
        ask = Ask(id="evil", seq=now, resource_class="cpu", cores=cores, memory=memory, price=price,
                  expires=now + 600_000, runtimes=runtimes)
        if self.provider is None:
            self.provider = Provider(self.identity, CapacityPool(
                {"cpus": cores, "memory_bytes": memory, "gpus": 0}))
            self.blobs = BlobStore(self._scratch / "blobs")
            self.mesh.set_handler(TRANSFER_PROTOCOL, self._accept_blob)
            self._nursery.start_soon(run_timers, self.provider, self._to_consumer, now_ms)
            self._nursery.start_soon(self._announce)
        self.provider.offer(ask)
        return ask

    async def _announce(self) -> None:
        while True:
            for ask in list(self.provider.asks.values()):
                env = seal_envelope(self.identity, "ask", ask.to_body(), 600_000)
                try:
                    await self.mesh.publish(orders_topic(ask.resource_class), env.encode())
                except Exception:  # no peer yet
                    pass
            await trio.sleep(1.0)

    async def _accept_blob(self, stream: FramedStream) -> None:
        async def anyone(peer: str, offer: dict) -> None:
            return None
        validator = EnvelopeValidator()
        try:
            await receive_file(stream, self.blobs, lambda d: validator.check(d), anyone)
        except Exception:
            pass
        finally:
            with trio.move_on_after(1):
                await stream.close()

    def serve_tasks(self, handler) -> None:
        validator = EnvelopeValidator()

        async def serve(stream: FramedStream) -> None:
            try:
                with trio.fail_after(10):
                    first = await stream.receive()
                env = validator.check(first.get("env") if isinstance(first, dict) else b"")
                if hasattr(env, "type") and env.type in ("task.start", "task.attach"):
                    await handler(stream, env)
            finally:
                with trio.move_on_after(1):
                    await stream.close()

        self.mesh.set_handler(TASK_PROTOCOL, serve)


# ---- what the victim counted ---------------------------------------------------------------------

def metrics(d) -> str:
    import http.client
    host, port = d.client.url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {d.client.token}"})
    return conn.getresponse().read().decode()


def refusals(d) -> dict[tuple[str, str], float]:
    """synord_refusals_total from /metrics, by (where, reason)."""
    out = {}
    for line in metrics(d).splitlines():
        if line.startswith("synord_refusals_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            out[(labels["where"], labels["reason"])] = float(line.rsplit(" ", 1)[1])
    return out


def refused(d, where: str, reason: str) -> float:
    """How many refusals ``d`` counted at ``where`` for ``reason``."""
    return refusals(d).get((where, reason), 0.0)


async def in_thread(fn, *args, **kw):
    """A blocking call (HTTP to a daemon, starting one) off the trio thread: libp2p keeps running."""
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


def counted(before: dict, after: dict) -> dict[tuple[str, str], float]:
    """The refusals counted between two readings."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
