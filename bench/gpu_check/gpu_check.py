"""Driver of bench/gpu_check.sh (runs in its offline venv): probe, then CUDA in a
crun container with the GPU injected through synord's CDI path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio


def say(*a) -> None:
    print(*a, flush=True)


def probe() -> dict:
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "synord.cli", "probe", "--json"], capture_output=True, text=True,
                       timeout=120)
    if p.returncode != 0:
        say("synord probe failed:", p.stderr.strip()[-2000:])
        sys.exit(2)
    prof = json.loads(p.stdout)
    say(f"== synord probe --json ({time.monotonic() - t:.1f} s)")
    for d in prof["devices"]:
        if d.get("kind") == "gpu":
            say(f"  gpu {d.get('vendor')} {d.get('model')}: uuid {d.get('uuid')}, "
                f"{(d.get('memory_bytes') or 0) / 2**30:.1f} GiB, cc {d.get('compute_capability')}, "
                f"driver {d.get('driver_version')}, class {d.get('slug')}, MIG {d.get('mig_mode')}, "
                f"util {d.get('utilization_percent')} %, power {d.get('power_w')} W")
    for kind, rt in sorted(prof.get("runtimes", {}).items()):
        say(f"  runtime {kind}: {'yes' if rt.get('available') else 'no'} ({rt.get('reason')})"
            + (f"; GPU passthrough: {rt['gpu']}" if "gpu" in rt else ""))
    say("  notes:", json.dumps(prof["host"].get("probe_notes")))
    return prof


async def run_container(image: Path, devices: dict | None, env: dict) -> tuple[int, str]:
    from synord.runtimes.base import Limits, TaskSpec
    from synord.runtimes.container import ContainerRuntime
    rt = ContainerRuntime(engine="crun")
    av = rt.available()
    if not av.available:
        say("containers unavailable:", av.reason)
        sys.exit(2)
    wd = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        spec = TaskSpec(kind="container", artifact=image, args=[], env=env, devices=devices, workdir=wd / "wd",
                        limits=Limits(cpus=2.0, memory_bytes=4 << 30, pids=512, timeout_s=180))
        sb = await rt.prepare(spec)
        out = bytearray()
        async with trio.open_nursery() as n:
            await sb.start(n)
            async for c in sb.logs():
                out += c.data
            st = await sb.wait()
        return st.code, out.decode(errors="replace")
    finally:
        shutil.rmtree(wd, ignore_errors=True)


def main() -> int:
    carry = Path(sys.argv[1])
    image = carry / "image"
    t0 = time.monotonic()
    prof = probe()
    from synord.hwprobe.gpu_units import gpu_units
    units = [u for u in gpu_units(prof["devices"]) if u["vendor"] == "nvidia"]
    if not units:
        say("== the container path without a GPU (crun from the carry, the check program):")
        code, out = trio.run(run_container, image, None, {})
        say("  " + out.strip().replace("\n", "\n  ") + f"\n  (exit {code})")
        reason = (prof["host"].get("probe_notes") or {}).get("nvidia") or "no NVIDIA GPU"
        say(f"no NVIDIA driver: {reason}")
        return 1
    if shutil.which("nvidia-modprobe") and not Path("/dev/nvidia-uvm").exists():
        subprocess.run(["nvidia-modprobe", "-u", "-c=0"], check=False)  # CUDA needs the UVM node
    import os
    from synord.runtimes import cdi
    from synord.gpu_devices import CDIDevices
    unit = units[0]
    # GPU_CHECK_CDI_DIRS: more spec directories (a dry run with stand-in devices)
    dirs = list(cdi.DEFAULT_DIRS) + [d for d in os.environ.get("GPU_CHECK_CDI_DIRS", "").split(":") if d]
    devs = CDIDevices(dirs, lambda: units)
    reg = devs.registry()
    files = [s.source for ss in reg.specs.values() for s in ss]
    say(f"== CDI: {unit['cdi']} from {', '.join(sorted(set(files))) or 'nothing'}")
    for err in reg.errors:
        say(f"  spec ignored: {err}")
    try:
        edits = devs.edits((unit["id"],))
    except cdi.CDIError as exc:
        say(f"the GPU cannot be injected: {exc} (no CDI spec names it, and no /dev/nvidiactl to generate one)")
        return 3
    say(f"  device nodes: {[n['path'] for n in edits['deviceNodes']]}")
    say(f"  read-only mounts: {len(edits['mounts'])} (e.g. {[m['containerPath'] for m in edits['mounts'][:3]]})")
    say(f"  env: {[e for e in edits['env'] if 'VISIBLE' in e]}")
    libdirs = sorted({str(Path(m["containerPath"]).parent) for m in edits["mounts"] if ".so" in m["containerPath"]})
    code, out = trio.run(run_container, image, edits, {"LD_LIBRARY_PATH": ":".join(libdirs)})
    say("== cuda_check in the container:\n  " + out.strip().replace("\n", "\n  ") + f"\n  (exit {code})")
    seen = [l.split("=", 1)[1] for l in out.splitlines() if l.startswith("uuid=")]
    ok = code == 0 and "CUDA OK" in out
    if ok and not unit["id"].startswith("MIG-") and seen != [unit["id"]]:
        say(f"the container saw {seen}, not the allocated {unit['id']}")
        ok = False
    say(f"== {'PASS' if ok else 'FAIL'} in {time.monotonic() - t0:.1f} s")
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
