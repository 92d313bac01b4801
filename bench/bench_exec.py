"""`synord exec` at the sandbox level: a command beside a running task.

    .venv/bin/python bench/bench_exec.py [--rounds 10]

Container (crun): exec `true` start-to-exit, against raw `crun exec` of the
same container (the baseline, same run). MicroVM (QEMU, the guest's exec
channel on its second UART): exec `true` start-to-exit; 1 MiB of command
output, against the task's own console (first UART) writing 1 MiB in the same
guest (the baseline); 256 KiB of stdin. No targets: these are for people
deciding whether an interactive shell is comfortable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from synord.runtimes.base import TaskSpec  # noqa: E402
from synord.runtimes.container import ContainerRuntime  # noqa: E402
from synord.runtimes.microvm import MicroVMRuntime  # noqa: E402

MiB = 1 << 20


async def _drain(proc) -> int:
    n = 0
    async for chunk in proc.output:
        n += len(chunk.data)
    return n


async def _exec_true(sb, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        async with sb.exec(["true"]) as proc:
            await _drain(proc)
            assert await proc.wait() == 0
        times.append(time.perf_counter() - t0)
    return times


async def bench_container(image: Path, rounds: int) -> None:
    rt = ContainerRuntime()
    sb = await rt.prepare(TaskSpec(kind="container", artifact=image, args=["sleep", "600"]))
    async with trio.open_nursery() as n:
        await sb.start(n)
        try:
            await sb._wait_created()
            ours = await _exec_true(sb, rounds)
            raw = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                await trio.run_process(sb._cmd("exec", sb.id, "true"), capture_stdout=True,
                                       capture_stderr=True)
                raw.append(time.perf_counter() - t0)
        finally:
            await sb.kill()
    print(f"container ({sb.engine_name}) exec `true`: median {statistics.median(ours) * 1000:.1f} ms, "
          f"raw `{sb.engine_name} exec` {statistics.median(raw) * 1000:.1f} ms (baseline)")


async def bench_microvm(image: Path, rounds: int) -> None:
    rt = MicroVMRuntime()
    # The task writes 1 MiB to its console once asked (a file appearing), then sleeps.
    task = ("while [ ! -e /tmp/go ]; do sleep 0.05; done; head -c 1048576 /dev/zero | tr '\\0' a; "
            "sleep 600")
    sb = await rt.prepare(TaskSpec(kind="microvm", artifact=image, args=["sh", "-c", task]))
    async with trio.open_nursery() as n:
        await sb.start(n)
        try:
            await _exec_true(sb, 1)  # waits for the guest to boot
            ours = await _exec_true(sb, rounds)
            t0 = time.perf_counter()
            async with sb.exec(["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' a"]) as proc:
                got = await _drain(proc)
            out_s = time.perf_counter() - t0
            assert got == MiB, got
            console = 0
            t0 = time.perf_counter()
            async with sb.exec(["touch", "/tmp/go"]) as proc:
                await proc.wait()
            async for chunk in sb.logs():
                console += len(chunk.data)
                if console >= MiB:
                    break
            console_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            async with sb.exec(["wc", "-c"]) as proc:
                async def feed() -> None:
                    for _ in range(16):
                        await proc.send_stdin(b"x" * 16384)
                    await proc.close_stdin()
                n.start_soon(feed)
                counted = b""
                async for chunk in proc.output:
                    counted += chunk.data
            in_s = time.perf_counter() - t0
            assert counted.strip() == b"262144", counted
        finally:
            await sb.kill()
    print(f"microVM ({sb.machine.accel}) exec `true`: median {statistics.median(ours) * 1000:.1f} ms")
    print(f"microVM exec output: 1 MiB in {out_s:.2f} s = {MiB / out_s / 1024:.0f} KiB/s; "
          f"the task's own console 1 MiB in {console_s:.2f} s = {MiB / console_s / 1024:.0f} KiB/s (baseline)")
    print(f"microVM exec stdin: 256 KiB in {in_s:.2f} s = {256 / in_s:.0f} KiB/s")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    from jobs_helpers import BUSYBOX_DIR, ensure_assets
    ensure_assets()
    if ContainerRuntime().available().available:
        await bench_container(BUSYBOX_DIR, a.rounds)
    if MicroVMRuntime().available().available:
        await bench_microvm(BUSYBOX_DIR, a.rounds)


if __name__ == "__main__":
    trio.run(main)
