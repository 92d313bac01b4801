"""Boot-to-exit of a hello task: MicroVMRuntime vs raw QEMU, same kernel and initramfs.

    .venv/bin/python bench/bench_microvm.py [N]

Ours = sandbox start() until wait() returns (QMP socket, console parsing,
usage sampling included); prepare() (OCI unpack + initramfs) is reported
separately.  Raw = the identical QEMU command line without QMP, run with
subprocess until it exits.  Runs alternate, and which goes first alternates,
so machine load hits both alike; QEMU CPU seconds are printed too (less
sensitive to load than wall time on a shared machine).
Target: ours <= 1.2x raw (medians).  Also prints one checkpoint/restore of
a running guest (save time, checkpoint bytes, restore-to-running time).
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synord.runtimes.base import TaskSpec  # noqa: E402
from synord.runtimes.microvm import MicroVMRuntime  # noqa: E402
from synord.runtimes.oci_build import build_busybox_image  # noqa: E402


async def ours(rt: MicroVMRuntime, image: Path) -> tuple[float, float, bytes]:
    t0 = time.perf_counter()
    sb = await rt.prepare(TaskSpec(kind="microvm", artifact=image, args=["echo hello"]))
    t1 = time.perf_counter()
    out = b""
    async with trio.open_nursery() as n:
        await sb.start(n)
        async for c in sb.logs():
            out += c.data
        status = await sb.wait()
    t2 = time.perf_counter()
    assert status.code == 0 and out == b"hello\n", (status, out)
    return t1 - t0, t2 - t1, status.usage.cpu_s


async def checkpoint_restore(rt: MicroVMRuntime, image: Path, tmp: Path) -> None:
    spec = TaskSpec(kind="microvm", artifact=image, args=["echo up; sleep 600"])
    sb = await rt.prepare(spec)
    async with trio.open_nursery() as n:
        await sb.start(n)
        async for _ in sb.logs():
            break  # the guest is up
        t0 = time.perf_counter()
        info = await sb.checkpoint(tmp / "ckpt")
        t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    sb2 = await rt.restore(spec, info.path)
    async with trio.open_nursery() as n:
        await sb2.start(n)  # returns once the restored guest runs
        t_restore = time.perf_counter() - t0
        await sb2.kill()
    print(f"checkpoint {t_save:.3f} s, {info.bytes / 1e6:.1f} MB (guest {sb.machine.mem_mib} MiB); "
          f"restore to running {t_restore:.3f} s")


def raw(machine, sock_dir: Path, i: int) -> tuple[float, float]:
    # the identical machine, exec channel (second UART) included; a fresh socket per run
    argv = machine.qemu_argv(None, exec_socket=sock_dir / f"raw-exec-{i}.sock")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert b"hello" in r.stdout, r
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dt, cpu


async def main(n: int) -> None:
    rt = MicroVMRuntime()
    a = rt.available()
    if not a.available:
        raise SystemExit(f"microvm unavailable: {a.reason}")
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "img"
        build_busybox_image(image, entrypoint=["/bin/sh", "-c"])
        # a prepared sandbox that is never started keeps its initramfs for the raw runs
        keep = await rt.prepare(TaskSpec(kind="microvm", artifact=image, args=["echo hello"],
                                         workdir=Path(tmp) / "raw"))
        prep, boot, base, cpu_ours, cpu_raw = [], [], [], [], []
        for i in range(n):
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                if which == 0:
                    p, b, c = await ours(rt, image)
                    prep.append(p)
                    boot.append(b)
                    cpu_ours.append(c)
                else:
                    w, c = await trio.to_thread.run_sync(raw, keep.machine, Path(tmp), i)
                    base.append(w)
                    cpu_raw.append(c)
        await checkpoint_restore(rt, image, Path(tmp))
    mo, mr = statistics.median(boot), statistics.median(base)
    print(f"accel: {keep.machine.accel}   runs: {n}")
    print(f"raw qemu boot-to-exit      median {mr:.3f} s  {[round(x, 3) for x in base]}")
    print(f"MicroVMRuntime start->exit median {mo:.3f} s  {[round(x, 3) for x in boot]}")
    print(f"MicroVMRuntime prepare     median {statistics.median(prep):.3f} s")
    print(f"QEMU CPU seconds           median raw {statistics.median(cpu_raw):.2f}"
          f"  ours {statistics.median(cpu_ours):.2f}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"ratio ours/raw {mo / mr:.2f}  (target <= 1.20): {'OK' if mo / mr <= 1.2 else 'MISSED'}")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 5)
