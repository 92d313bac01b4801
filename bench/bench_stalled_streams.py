"""Memory a hostile peer can pin with stalled streams: daemon RSS while one peer
holds N streams, each stopped one byte short of a 4 MiB frame, and after it
ends them.

Starts one real daemon (default `[streams]` limits) and the shared hostile peer
(tests/adversarial/hostile.py); the peer opens N /synord/transfer/1.0.0 streams
on one connection, writes a 4 MiB frame header and all but one byte of its
body on each, waits a second, reads the daemon's RSS, resets its streams and
reads the RSS again.  Before the stream limits (issue #12): 128 streams held
+522 MiB, +493 MiB after they ended.

    .venv/bin/python bench/bench_stalled_streams.py [--streams 128]
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
from pathlib import Path

import psutil
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from adversarial.hostile import HostilePeer  # noqa: E402
from synord.protocols.framing import MAX_FRAME  # noqa: E402
from synord.protocols.mesh import MeshError  # noqa: E402
from synord.localmesh import DaemonCluster  # noqa: E402

MIB = 1024 * 1024


async def attack(d, n: int) -> dict:
    addr = await trio.to_thread.run_sync(lambda: d.p2p_addrs()[0])
    await trio.sleep(2)  # start-up allocations settle
    proc = psutil.Process(d.pid)
    base = proc.memory_info().rss
    async with HostilePeer.running() as evil:
        target = await evil.connect(addr)
        streams = []
        for _ in range(n):
            try:
                streams.append((await evil.open(target, "/synord/transfer/1.0.0")).raw)
            except MeshError:
                pass  # refused at once by the stream cap

        async def push(raw):
            with trio.move_on_after(20):
                try:
                    await raw.write(struct.pack(">I", MAX_FRAME) + b"\xa5" * (MAX_FRAME - 1))
                except MeshError:
                    pass  # reset by the daemon mid-write
        async with trio.open_nursery() as nursery:
            for raw in streams:
                nursery.start_soon(push, raw)
        await trio.sleep(1)
        held = proc.memory_info().rss
        for raw in streams:
            await raw.reset()
    await trio.sleep(3)
    after = proc.memory_info().rss
    return {"streams": n, "opened": len(streams), "baseline_mib": base / MIB,
            "held_mib": (held - base) / MIB, "after_end_mib": (after - base) / MIB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp, DaemonCluster(Path(tmp)) as cluster:
        d = cluster.start("victim")
        r = trio.run(attack, d, args.streams)
    print(f"{r['streams']} streams stalled one byte short of a 4 MiB frame ({r['opened']} opened): "
          f"RSS {r['baseline_mib']:.0f} MiB + {r['held_mib']:.0f} MiB held, "
          f"+ {r['after_end_mib']:.0f} MiB after they ended")


if __name__ == "__main__":
    main()
