"""A hostile peer for attacking real daemons through the wire, built on our own
protocol modules (`protocols.p2p` host with Noise + yamux, `protocols.identity`,
`protocols.envelope`, `protocols.framing`, the negotiation machine through
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
    ``.peer_id``, ``.mesh`` (the `protocols.mesh.Mesh`) are public.
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
``ask_of(provider, resource_class="cpu", timeout=30) -> protocols.orders.Ask``
    the provider's latest public ask heard on gossip.
``obtain_agreement(provider, ask=None, *, runtime="wasm", cores=0.5, memory=64 MiB,
                   duration_s=600, max_price=None, timeout=20) -> Terms``
    a real agreement: a Propose against ``ask``, the provider's signed
    Agreement checked by the consumer state machine, our Countersign sent;
    heartbeats keep the lease alive while the peer runs. Raises
    `AgreementRefused` with the provider's reason.
``upload(provider, data_or_path, kind="artifact", job_id="", grant=None) -> sha256``
    offer and send a blob on /synord/transfer/1.0.0; raises
    `protocols.transfer.TransferError` with the receiver's refusal.
``task_body(terms, sha256, job_id=None, **fields) -> dict`` *sync*
    a task.start body that matches ``terms``; override any field.
``task_start(provider, body, identity=None) -> (stream, first_reply)``
    open /synord/task/1.0.0 and send a signed task.start (``task_attach``:
    the same for task.attach); the caller reads on or closes the stream.
``read_task(stream, timeout=30) -> TaskResult`` the rest of a task stream:
    output bytes per stream, frames seen, the exit frame (None if none came).
"""

from __future__ import annotations

import os
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import trio

from protocols.envelope import EnvelopeValidator, now_ms, seal as seal_envelope
from protocols.framing import FramedStream
from protocols.identity import Identity, b58decode
from protocols.mesh import MeshConfig, create_mesh, envelope_validator
from protocols.negotiation import Terms
from protocols.orders import Ask, Bid
from protocols.tasks import TASK_PROTOCOL
from protocols.topics import orders as orders_topic
from protocols.transfer import TRANSFER_PROTOCOL, TransferError, send_file
from synord.market.negotiator import NEGOTIATE_PROTOCOL, Consumer, Placement, Send, run_timers


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
        self._out: dict[str, FramedStream] = {}
        self._nursery: trio.Nursery | None = None

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

    async def _to_provider(self, s: Send) -> None:
        frame = {"to": "provider", "env": s.envelope.encode()}
        for _ in (1, 2):
            stream = self._out.get(s.to)
            try:
                if stream is None:
                    stream = self._out[s.to] = await self.open(s.to, NEGOTIATE_PROTOCOL)
                await stream.send(frame)
                return
            except Exception:
                self._out.pop(s.to, None)

    async def _negotiation_in(self, stream: FramedStream) -> None:
        peer = b58decode(stream.remote_peer)
        try:
            while True:
                frame = await stream.receive()
                if isinstance(frame, dict) and isinstance(frame.get("env"), bytes) \
                        and frame.get("to") == "consumer":
                    for s in self.consumer.receive(frame["env"], peer):
                        await self._to_provider(s)
        except Exception:
            pass

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
        from protocols.transfer import sha256_of
        path = Path(data) if isinstance(data, (str, Path)) else None
        tmp = None
        if path is None:
            import tempfile
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
