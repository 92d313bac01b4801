"""The gossip baseline: a bare py-libp2p host (Noise, yamux, GossipSub v1.1 on one
topic, the library's defaults but our mesh degree), none of synord's code.

Speaks tests/meshd.py's JSON-lines protocol so bench/bench_gossip.py can drive
it the same way: ``announce`` publishes one 1 KiB message, every message from
another peer is reported as ``{"ev":"recv","from":..,"seq":..,"t":..}``.
Without peer exchange it dials every ``--bootstrap`` address it is given (the
bench passes all earlier peers: a full mesh of connections, as synord reaches
at N=10).

    python bench/bare_gossip_peer.py [--bootstrap ADDR]...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

TOPIC = "bench/gossip/1"
MESSAGE_BYTES = 1024


def emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", action="append", default=[])
    args = ap.parse_args()
    host = new_host(key_pair=create_new_key_pair())
    router = GossipSub(protocols=[PROTOCOL_ID_V11], degree=4, degree_low=3, degree_high=8,
                       heartbeat_interval=1)
    pubsub = Pubsub(host, router)
    me = host.get_id().to_base58()
    async with background_trio_service(pubsub), background_trio_service(router):
        async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]), trio.open_nursery() as nursery:
            sub = await pubsub.subscribe(TOPIC)
            for addr in args.bootstrap:
                await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
            emit({"ev": "ready", "peer_id": me, "addrs": [f"{a}/p2p/{me}" if "/p2p/" not in str(a) else str(a)
                                                           for a in host.get_addrs()]})

            async def receive() -> None:
                while True:
                    msg = await sub.get()
                    origin, seq = msg.data.split(b"\n", 1)[0].decode().split()
                    if origin != me:
                        emit({"ev": "recv", "from": origin, "seq": int(seq), "t": time.time()})

            nursery.start_soon(receive)
            stdin = trio.lowlevel.FdStream(os.dup(0))
            buf, seq = b"", 0
            while True:
                chunk = await stdin.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = line.decode().strip()
                    if cmd == "announce":
                        seq += 1
                        t = time.time()
                        head = f"{me} {seq}\n".encode()
                        await pubsub.publish(TOPIC, head + b"\0" * (MESSAGE_BYTES - len(head)))
                        emit({"ev": "sent", "seq": seq, "t": t})
                    elif cmd == "peers":
                        n = len(pubsub.peer_topics.get(TOPIC, ()))
                        emit({"ev": "peers", "n": n, "with_caps": n,
                              "connected": len(host.get_network().connections)})
                    elif cmd == "rss":
                        import psutil
                        emit({"ev": "rss", "rss": psutil.Process().memory_info().rss})
                    elif cmd == "quit":
                        nursery.cancel_scope.cancel()
                        return
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
