"""A lightweight mesh peer process: the daemon's MeshService and nothing else.

Used by bench/bench_gossip.py to run tens of peers on one machine. Talks JSON
lines: one per event on stdout; commands, one per line, on stdin:

    announce          publish a caps announcement now  -> {"ev":"sent","seq":..,"t":..}
    peers             -> {"ev":"peers","n":..,"with_caps":..,"connected":..}
    rss               -> {"ev":"rss","rss":bytes}
    quit

and for every caps announcement accepted from another peer:
    {"ev":"recv","from":peer_id,"seq":..,"t":unix_s}

    python tests/meshd.py --listen /ip4/127.0.0.1/tcp/0 [--bootstrap ADDR]...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402

from synord.protocols.identity import Identity  # noqa: E402
from synord.mesh_service import MeshService  # noqa: E402


def emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def profile() -> dict:
    import psutil
    return {"host": {"cpus": os.cpu_count(), "memory": psutil.virtual_memory().total},
            "devices": [{"kind": "cpu", "count": os.cpu_count()}], "runtimes": {},
            "offerable": {"cpu": 1}}


async def stdin_lines():
    """Command lines from stdin, stripped, until it ends (tests/natpeer.py reads them too)."""
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buf = b""
    while True:
        chunk = await stdin.receive_some(4096)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode().strip()


async def commands(svc: MeshService, cancel: trio.CancelScope) -> None:
    import psutil
    async for cmd in stdin_lines():
        if cmd == "announce":
            t = time.time()
            seq = await svc.announce()
            emit({"ev": "sent", "seq": seq, "t": t})
        elif cmd == "peers":
            table = svc.peers_json()
            emit({"ev": "peers", "n": len(table), "with_caps": sum(1 for p in table if p["capabilities"]),
                  "connected": len(svc.mesh.connected_peers())})
        elif cmd == "rss":
            emit({"ev": "rss", "rss": psutil.Process().memory_info().rss})
        elif cmd == "quit":
            break
    cancel.cancel()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    ap.add_argument("--bootstrap", action="append", default=[])
    ap.add_argument("--announce-interval", type=float, default=30.0)  # the daemon default
    args = ap.parse_args()
    svc = MeshService(Identity.generate(), [args.listen], args.bootstrap, mdns=False,
                      profile_provider=profile, announce_interval_s=args.announce_interval)
    svc.on_caps = lambda origin, env: emit({"ev": "recv", "from": origin, "seq": env.body["seq"],
                                            "t": time.time()})
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        emit({"ev": "ready", "peer_id": svc.identity.peer_id, "addrs": svc.listen_addrs()})
        nursery.start_soon(commands, svc, nursery.cancel_scope)


if __name__ == "__main__":
    trio.run(main)
