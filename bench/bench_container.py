"""Start-to-exit of a hello task (busybox echo) through ContainerRuntime vs the
raw OCI runtime on the same prepared bundle, measured in the same run.

Target: ours <= 1.2x raw. Both sides pay the same hybrid-cgroup workaround
(crun in a private mount namespace) when the host needs it.

    .venv/bin/python bench/bench_container.py [-n 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from synord.runtimes import cgroups, oci_build  # noqa: E402
from synord.runtimes.base import TaskSpec, child_env  # noqa: E402
from synord.runtimes.container import ContainerRuntime  # noqa: E402


async def ours(rt: ContainerRuntime, image: Path, work: Path, n: int) -> tuple[list[float], list[float], object]:
    start_exit, full = [], []
    sb = None
    for i in range(n):
        t0 = time.perf_counter()
        sb = await rt.prepare(TaskSpec(kind="container", artifact=image, args=["/bin/echo", "hello"],
                                       workdir=work / f"ours{i}-{time.monotonic_ns()}"))
        t1 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            await sb.start(nursery)
            out = b"".join([c.data async for c in sb.logs()])
            status = await sb.wait()
        t2 = time.perf_counter()
        assert out == b"hello\n" and status.code == 0, (out, status)
        start_exit.append(t2 - t1)
        full.append(t2 - t0)
    return start_exit, full, sb


def raw(sb, work: Path, n: int) -> list[float]:
    bundle = work / "raw"
    bundle.mkdir(exist_ok=True)
    config = dict(sb.config)
    # Same bundle and the same limits as ours, set the plain OCI way (the container's own cgroup).
    lim = sb.spec.limits
    resources = dict(config["linux"]["resources"],
                     memory={"limit": lim.memory_bytes, "swap": lim.memory_bytes},
                     cpu={"quota": int(lim.cpus * 100_000), "period": 100_000},
                     pids={"limit": lim.pids})
    config["linux"] = dict(config["linux"], cgroupsPath="/synord-bench/raw", resources=resources)
    (bundle / "config.json").write_text(json.dumps(config))
    times = []
    for i in range(n):
        argv = sb._cmd("run", "--bundle", str(bundle), f"synord-bench-{i}-{time.monotonic_ns()}")
        t0 = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, env=child_env())
        times.append(time.perf_counter() - t0)
        assert res.stdout == b"hello\n", res
    for h in cgroups._v1_hierarchies() if cgroups.cgroup_mode() != "v2" else [cgroups.ROOT]:
        shutil.rmtree(h / "synord-bench" / "raw", ignore_errors=True)
        try:
            (h / "synord-bench").rmdir()
        except OSError:
            pass
    return times


def ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:7.1f} ms  (min {min(xs) * 1000:6.1f}, max {max(xs) * 1000:6.1f})"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--engine", choices=["crun", "runc"], default=None)
    a = ap.parse_args()
    rt = ContainerRuntime(engine=a.engine)
    av = rt.available()
    if not av.available:
        sys.exit(f"containers unavailable: {av.reason}")
    with tempfile.TemporaryDirectory(prefix="bench-ctr-") as tmp:
        work = Path(tmp)
        image = work / "img"
        oci_build.build_busybox_image(image)
        cached = ContainerRuntime(engine=a.engine, cache_dir=work / "cache")
        (work / "warm").mkdir()
        await ours(cached, image, work / "warm", 2)  # page cache, first-run costs
        # Interleave the two so load from other processes hits both alike.
        start_exit, full_cached, raw_t = [], [], []
        for _ in range(a.n):
            se, fc, sb = await ours(cached, image, work, 1)
            start_exit += se
            full_cached += fc
            raw_t += raw(sb, work, 1)
        (work / "u").mkdir()
        _, full, _ = await ours(rt, image, work / "u", max(3, a.n // 3))
    r = statistics.median(start_exit) / statistics.median(raw_t)
    print(f"hello task, {a.n} runs each, engine {sb.engine_name} ({av.reason})")
    print(f"  raw `{sb.engine_name} run` on a prepared bundle        {ms(raw_t)}")
    print(f"  ContainerRuntime start->exit                    {ms(start_exit)}  ratio {r:.2f}x  target <= 1.2x")
    print(f"  ContainerRuntime prepare+start->exit (cached)   {ms(full_cached)}")
    print(f"  ContainerRuntime prepare+start->exit (unpack)   {ms(full)}")


if __name__ == "__main__":
    trio.run(main)
