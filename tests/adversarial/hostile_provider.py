"""A hostile *provider*: the shared `HostilePeer` plus what a provider needs to
attack a consumer daemon through the wire.

    async with HostileProvider.running() as evil:
        evil.serve()                                    # transfer + task handlers, provider timers
        await evil.connect(consumer_multiaddr)
        evil.publish([evil.make_ask("z0", price=0.0)])  # gossiped every 0.5 s until stop_publishing()
        evil.answer = "silent"                          # or "overprice" (agreement at evil.overprice) or "honest"

``answer`` decides what proposals get: ``silent`` never answers (the liar of
issue 12 item 5); ``overprice`` signs an agreement at ``overprice`` per
unit-hour whatever its ask said; ``honest`` runs the real `Provider` party
(admission, reservation, signed terms, heartbeats).  Every envelope a consumer
sends it is kept in ``received`` (type, body) so a test can see proposals,
withdrawals, countersigns and receipt acks.  Tasks "run" for ``run_s`` and
exit 0 (the consumer's job succeeds); ``send_receipt`` sends any receipt.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import trio

from synord.protocols.envelope import decode, now_ms, seal as seal_envelope
from synord.protocols.framing import FramedStream
from synord.protocols.negotiation import Agreement, Propose, Terms
from synord.protocols.orders import Ask
from synord.protocols.receipts import SignedReceipt
from synord.protocols.tasks import TASK_PROTOCOL
from synord.protocols.topics import orders as orders_topic
from synord.protocols.transfer import TRANSFER_PROTOCOL, BlobStore, receive_file
from synord.market.negotiator import NEGOTIATE_PROTOCOL, Provider, Send, run_timers
from synord.market.reservations import CapacityPool

from adversarial.hostile import HostilePeer


class HostileProvider(HostilePeer):
    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.answer = "honest"
        self.overprice = 1e6
        self.run_s = 0.1
        self.received: list[tuple[str, Any]] = []
        self.agreed: list[Terms] = []      # terms we signed (honest or not)
        self.exit_at: int | None = None    # when our last task "exited" (unix ms)
        self.exited = trio.Event()
        self.provider = Provider(self.identity, CapacityPool({"cpus": 64.0, "memory_bytes": 64 << 30}),
                                 on_agreement=lambda m: self.agreed.append(m.terms))
        self._to_consumers: dict[str, FramedStream] = {}
        self._publishing: trio.CancelScope | None = None
        self._blobs = BlobStore(Path(tempfile.mkdtemp(prefix="hostile-blobs-")))

    def serve(self) -> None:
        """Take blobs and tasks like a provider; run the provider party's timers."""
        self.mesh.set_handler(TRANSFER_PROTOCOL, self._transfer_in)
        self.mesh.set_handler(TASK_PROTOCOL, self._task_in)
        self._nursery.start_soon(run_timers, self.provider, self._to_consumer, now_ms)

    # ---- asks --------------------------------------------------------------------------------

    def make_ask(self, ask_id: str, price: float, cores: float = 1.0, memory: int = 1 << 30,
                 perf: float | None = 1000.0, ttl_ms: int = 600_000) -> Ask:
        """An ask that ranks first (high announced performance, no load) unless priced out."""
        now = now_ms()
        return Ask(id=ask_id, seq=now, resource_class="cpu", cores=cores, memory=memory, price=price,
                   expires=now + ttl_ms, runtimes=("wasm",), perf=perf, max_duration_s=86_400)

    def publish(self, asks: list[Ask], every_s: float = 0.5) -> None:
        for a in asks:
            self.provider.offer(a)
        envs = [seal_envelope(self.identity, "ask", a.to_body(), 600_000).encode() for a in asks]

        async def loop(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self._publishing = scope
                task_status.started()
                while True:
                    for data in envs:
                        try:
                            await self.mesh.publish(orders_topic("cpu"), data)
                        except Exception:  # no peer on the topic yet
                            pass
                    await trio.sleep(every_s)

        self._nursery.start_soon(loop)

    def stop_publishing(self) -> None:
        if self._publishing is not None:
            self._publishing.cancel()

    def got(self, type_: str) -> list[Any]:
        return [body for t, body in self.received if t == type_]

    # ---- negotiation, as the provider --------------------------------------------------------

    async def _as_provider(self, data: bytes, peer: bytes) -> None:
        env = decode(data)
        self.received.append((env.type, env.body))
        if self.answer == "silent":
            return
        if self.answer == "overprice" and env.type == "propose":
            await self._to_consumer(self._overpriced(env.sender_id, Propose.from_body(env.body)))
            return
        await super()._as_provider(data, peer)

    def _overpriced(self, consumer: str, p: Propose) -> Send:
        now = now_ms()
        t = Terms(aid=os.urandom(16), nid=p.nid, consumer=consumer, provider=self.peer_id, ask_id=p.ask_id,
                  ask_seq=p.ask_seq, bid_id=p.bid_id, bid_seq=p.bid_seq, resource_class=p.resource_class,
                  cores=p.cores, memory=p.memory, gpus=p.gpus, gpu_class=None, runtime=p.runtime,
                  price=self.overprice, units=p.cores, duration_s=p.duration_s, heartbeat_ms=2_000,
                  created=now, expires=now + p.duration_s * 1000)
        self.agreed.append(t)
        return Send(consumer, seal_envelope(self.identity, "agreement", Agreement(t, t.sign(self.identity)).to_body(),
                                            30_000))

    async def _to_consumer(self, s: Send) -> None:
        frame = {"to": "consumer", "env": s.envelope.encode()}
        for _ in (1, 2):
            stream = self._to_consumers.get(s.to)
            try:
                if stream is None:
                    stream = self._to_consumers[s.to] = await self.open(s.to, NEGOTIATE_PROTOCOL)
                await stream.send(frame)
                return
            except Exception:
                self._to_consumers.pop(s.to, None)

    async def send_receipt(self, consumer: str, sr: SignedReceipt) -> None:
        await self._to_consumer(Send(consumer, seal_envelope(self.identity, "receipt", sr.to_body(), 30_000)))

    # ---- blobs and tasks ------------------------------------------------------------------------

    async def _transfer_in(self, stream: FramedStream) -> None:
        async def anyone(peer: str, offer: dict) -> None:
            return None
        try:
            await receive_file(stream, self._blobs, decode, anyone)
        except Exception:
            pass
        finally:
            with trio.move_on_after(1):
                await stream.close()

    async def _task_in(self, stream: FramedStream) -> None:
        try:
            first = await stream.receive()
            self.received.append(("task.start", decode(first["env"]).body))
            await stream.send({"started": True})
            await trio.sleep(self.run_s)
            await stream.send({"o": "stdout", "off": 0, "d": b"hello, wasm\n"})
            self.exit_at = now_ms()
            await stream.send({"exit": {"code": 0, "offsets": {"stdout": 12, "stderr": 0}}})  # all of it
            self.exited.set()
            with trio.move_on_after(30):
                await stream.receive()  # until the consumer closes
        except Exception:
            pass
        finally:
            with trio.move_on_after(1):
                await stream.close()
