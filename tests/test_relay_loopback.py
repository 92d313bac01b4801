"""Circuit relay v2 between real libp2p hosts on loopback (synord.relay): a client reserves on
the relay and advertises its /p2p-circuit address, a third peer reaches it through the relay,
the hole punch never dials a loopback address, and a restarted relay (same identity and port,
reservations forgotten) gets a fresh reservation.  Punching through NATs: tests/test_nat_jobs.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import trio
from libp2p.peer.id import ID

from synord.protocols.identity import Identity
from synord.protocols.mesh import MeshConfig
from synord.protocols.p2p import Libp2pMesh
from synord.relay import RelayService, RelaySettings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mesh(identity: Identity, port: int = 0, bootstrap=()) -> Libp2pMesh:
    return Libp2pMesh(identity, MeshConfig(listen=[f"/ip4/127.0.0.1/tcp/{port}"], bootstrap=list(bootstrap),
                                           mdns=False, peer_exchange=False, backoff_max_s=2.0,
                                           dht="off"))  # a DHT lookup would find b's loopback address


async def _until(predicate, timeout: float, what: str):
    with trio.move_on_after(timeout):
        while not (value := predicate()):
            await trio.sleep(0.05)
        return value
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class _RelayProcess:
    """The relay as a process of its own (tests/natpeer.py), so that it can be killed and
    restarted with the same identity on the same port."""

    def __init__(self, identity: Identity, port: int):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "natpeer.py"), "--listen", f"/ip4/127.0.0.1/tcp/{port}",
             "--hop", "on", "--enabled", "off", "--seed", identity.seed.hex()],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert json.loads(self.proc.stdout.readline())["ev"] == "ready"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def test_reserve_dial_through_the_relay_and_re_reserve_after_a_relay_restart():
    relay_id, port = Identity.generate(), _free_port()
    relays: list[_RelayProcess] = []

    async def main():
        relays.append(_RelayProcess(relay_id, port))
        async with trio.open_nursery() as nursery:
            boot = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{relay_id.peer_id}"]
            a, b = _mesh(Identity.generate(), bootstrap=boot), _mesh(Identity.generate(), bootstrap=boot)
            await nursery.start(a.run)
            await nursery.start(b.run)
            ra, rb = RelayService(a, RelaySettings(enabled="on")), RelayService(b, RelaySettings(enabled="on"))
            await nursery.start(ra.run)
            await nursery.start(rb.run)

            await _until(lambda: rb.machine.held(trio.current_time()) and ra.machine.held(trio.current_time()),
                         20, "a's and b's reservations")
            circuit = rb.own_addrs()
            assert circuit and all(f"/p2p/{relay_id.peer_id}/p2p-circuit/p2p/{b.peer_id}" in c for c in circuit)
            assert set(circuit) <= set(b.listen_addrs())  # advertised (capabilities carry listen_addrs)
            assert b.relays == circuit  # status: reachability.relays

            # a reaches b through the relay (the library's own dial skips /p2p-circuit addresses)
            async def echo(peer_id: str, payload: bytes) -> bytes:
                return payload[::-1]
            b.set_request_handler("/test/echo/1.0.0", echo)
            assert await a.request(b.peer_id, "/test/echo/1.0.0", b"relayed", timeout=20) == b"deyaler"
            assert a.relayed_only(b.peer_id) and ra.punches["started"] == 1
            # the punch dials public addresses only: never b's loopback one (on a real LAN that
            # would be some other machine, or a itself); so on loopback it stays relayed
            await trio.sleep(3)
            assert a.relayed_only(b.peer_id)

            # the relay restarts: same identity and port, no memory of b's reservation
            relays[0].kill()
            await _until(lambda: not rb.machine.held(trio.current_time()), 10, "b to drop the lost reservation")
            relays.append(_RelayProcess(relay_id, port))
            await _until(lambda: rb.machine.held(trio.current_time()), 30, "b's reservation on the new relay")
            # a reaches b through the restarted relay too, once it is back with it
            await _until(lambda: relay_id.peer_id in a.connected_peers(), 20, "a back with the relay")
            b_circuit = f"/p2p/{relay_id.peer_id}/p2p-circuit/p2p/{b.peer_id}"
            ra.dropping(b.peer_id), rb.dropping(a.peer_id)  # a hangs up on purpose: no re-dial
            await a.host.disconnect(ID.from_base58(b.peer_id))
            await _until(lambda: b.peer_id not in a.connected_peers() and a.peer_id not in b.connected_peers(),
                         10, "a and b apart")
            assert await ra.dial(b.peer_id, [b_circuit])
            assert a.relayed_only(b.peer_id)
            nursery.cancel_scope.cancel()
    try:
        trio.run(main)
    finally:
        for r in relays:
            r.kill()


def test_the_hop_follows_reachability_when_auto():
    """hop = "auto": a relay exactly while AutoNAT says public; a client reserves on it."""
    async def main():
        state = {"now": "unknown"}
        async with trio.open_nursery() as nursery:
            r = _mesh(Identity.generate())
            await nursery.start(r.run)
            service = RelayService(r, RelaySettings(hop="auto", enabled="auto"), reachability=lambda: state["now"])
            await nursery.start(service.run)
            assert not service.hop_serving and service.client_active()
            state["now"] = "public"
            service.reachability_changed()
            await _until(lambda: service.hop_serving, 5, "the hop offered")
            assert not service.client_active()  # a public node needs no relay itself

            c = _mesh(Identity.generate(), bootstrap=[r.listen_addrs()[0]])
            await nursery.start(c.run)
            rc = RelayService(c, RelaySettings(), reachability=lambda: "private")
            await nursery.start(rc.run)
            await _until(lambda: rc.machine.held(trio.current_time()) == [r.peer_id], 20, "a reservation on r")

            state["now"] = "private"
            service.reachability_changed()
            await _until(lambda: not service.hop_serving, 5, "the hop withdrawn")
            nursery.cancel_scope.cancel()
    trio.run(main)
