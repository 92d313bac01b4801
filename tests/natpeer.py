"""A lightweight NAT-testbed peer: the daemon's libp2p mesh and its relay service, nothing else.

Used by bench/bench_nat.py to run many hole-punch trials quickly (a full daemon
also probes hardware and starts sandboxes).  JSON lines on stdout, commands on stdin:

    info                 -> {"ev":"info","peer_id":..,"addrs":[..],"relays":[..]}
    dial PEER            dial PEER through a relay, then wait (15 s) for the hole punch
                         -> {"ev":"dial","ok":..,"relayed_s":..,"direct_s":..|null}
    send PEER NBYTES     stream NBYTES to PEER on /bench/sink -> {"ev":"send","s":..,"relayed":..}
    drop PEER            disconnect PEER -> {"ev":"dropped"}
    quit

    python tests/natpeer.py --listen /ip4/0.0.0.0/tcp/4001 [--bootstrap ADDR] [--hop on] [--seed HEX]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from synord.protocols.identity import Identity  # noqa: E402
from synord.protocols.mesh import MeshConfig  # noqa: E402

from meshd import emit, stdin_lines  # noqa: E402  (tests/ is on sys.path: this script's own dir)

SINK = "/bench/sink/1.0.0"


async def sink(stream) -> None:
    total = 0
    while True:
        data = await stream.raw.read(256 * 1024)
        if not data:
            break
        total += len(data)
    await stream.raw.write(total.to_bytes(8, "big"))
    await stream.raw.close()


async def commands(mesh, relay, cancel: trio.CancelScope) -> None:
    from libp2p.peer.id import ID
    async with trio.open_nursery() as nursery:
        async for line in stdin_lines():
            cmd = line.split()
            if not cmd:
                continue
            if cmd[0] == "info":
                emit({"ev": "info", "peer_id": mesh.peer_id, "addrs": mesh.listen_addrs(),
                      "relays": relay.relays_json(), "punches": relay.punches})
            elif cmd[0] == "dial":
                nursery.start_soon(dial, mesh, relay, cmd[1])
            elif cmd[0] == "send":
                nursery.start_soon(send, mesh, cmd[1], int(cmd[2]))
            elif cmd[0] == "drop":
                relay.dropping(cmd[1])
                with trio.move_on_after(5):
                    await mesh.host.disconnect(ID.from_base58(cmd[1]))
                emit({"ev": "dropped"})
            elif cmd[0] == "quit":
                break
        cancel.cancel()


async def dial(mesh, relay, peer: str) -> None:
    t0 = time.monotonic()
    ok = await relay.dial(peer, [])
    relayed_s = time.monotonic() - t0
    direct_s = None
    if ok:
        with trio.move_on_after(15):
            while mesh.relayed_only(peer) or peer not in mesh.connected_peers():
                await trio.sleep(0.02)
            direct_s = time.monotonic() - t0
    emit({"ev": "dial", "ok": ok, "relayed_s": relayed_s, "direct_s": direct_s,
          "connected": peer in mesh.connected_peers()})


async def send(mesh, peer: str, nbytes: int) -> None:
    relayed = mesh.relayed_only(peer)
    t0 = time.monotonic()
    try:
        stream = await mesh.open_stream(peer, SINK)
        relayed = mesh.relayed_only(peer)
        t0 = time.monotonic()
        block = b"\0" * (64 * 1024)
        left = nbytes
        while left > 0:
            await stream.raw.write(block[:min(left, len(block))])
            left -= len(block)
        await stream.raw._s.close()  # half-close: the sink answers with what it got
        got = await stream.raw.read(8)
        emit({"ev": "send", "s": time.monotonic() - t0, "relayed": relayed,
              "got": int.from_bytes(got, "big") if len(got) == 8 else None})
    except Exception as exc:
        emit({"ev": "send", "error": f"{type(exc).__name__}: {exc}", "relayed": relayed})


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4001")
    ap.add_argument("--bootstrap", action="append", default=[])
    ap.add_argument("--hop", default="auto")
    ap.add_argument("--enabled", default="on")
    ap.add_argument("--seed", help="hex of a 32-byte identity seed (a restarted peer keeps its id)")
    ap.add_argument("--debug", action="append", default=[], help="a logger to log at debug level, on stderr")
    args = ap.parse_args()
    if args.debug:
        import logging
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        for name in args.debug:
            logging.getLogger(name).setLevel(logging.DEBUG)
            if name.startswith("libp2p"):  # the library's loggers do not propagate to the root
                logging.getLogger(name).addHandler(logging.getLogger().handlers[0])
    from synord.protocols.p2p import Libp2pMesh
    from synord.relay import RelayService, RelaySettings
    identity = Identity.from_seed(bytes.fromhex(args.seed)) if args.seed else Identity.generate()
    mesh = Libp2pMesh(identity, MeshConfig(listen=[args.listen], bootstrap=args.bootstrap,
                                                      mdns=False, peer_exchange=False))
    mesh.set_handler(SINK, sink, idle_deadline=False)
    relay = RelayService(mesh, RelaySettings(hop=args.hop, enabled=args.enabled,
                                             circuit_bytes=1 << 30))
    async with trio.open_nursery() as nursery:
        await nursery.start(mesh.run)
        await nursery.start(relay.run)
        emit({"ev": "ready", "peer_id": mesh.peer_id, "addrs": mesh.listen_addrs()})
        nursery.start_soon(commands, mesh, relay, nursery.cancel_scope)


if __name__ == "__main__":
    trio.run(main)
