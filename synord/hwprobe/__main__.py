"""`python -m synord.hwprobe [--json] [--bench] [--root DIR]`: print this machine's profile."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import probe, resource_classes


def _human(p) -> str:
    lines = [f"{p.host['hostname']}: {p.host['cpu_model']}, {p.host['physical_cores']} cores / "
             f"{p.host['logical_cores']} threads (usable {p.host['effective_cpus']:g}), "
             f"{(p.host['memory_total_bytes'] or 0) / 2**30:.1f} GiB"]
    for d in p.devices:
        tp = d["throughput"]
        peak = f"{tp['fp32_gflops']:g} GFLOPS fp32 ({tp['source']})" if tp["fp32_gflops"] else "fp32 peak unknown"
        meas = f", measured {tp['measured_fp32_gflops']:g}" if tp.get("measured_fp32_gflops") else ""
        mem = f", {d['memory_bytes'] / 2**30:.1f} GiB" if d.get("memory_bytes") else ""
        lines.append(f"  {d['kind']:<11} {d['vendor']} {d['model']}{mem}: {peak}{meas}")
    o = p.offerable
    lines.append(f"offerable: {o['cpus']:g} cpus, {o['memory_bytes'] / 2**30:.1f} GiB, {o['gpus']} gpus"
                 + ("" if o["allowed"] else f" (not now: {o['why_not']})"))
    lines.append(f"resource classes: {', '.join(resource_classes(p))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m synord.hwprobe", description=__doc__)
    ap.add_argument("--json", action="store_true", help="print the profile as JSON")
    ap.add_argument("--bench", action="store_true", help="also measure throughput (a few seconds)")
    ap.add_argument("--root", default="/", help="filesystem root to read /proc and /sys from (tests)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    profile = probe(bench=args.bench, sysfs_root=args.root)
    if args.json:
        json.dump(profile.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_human(profile))
        print(f"(probed in {time.perf_counter() - t0:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
