"""`synord demo`: a throwaway mesh of real daemons on loopback placing real tasks.

Three daemon processes (a consumer that bootstraps the mesh and two providers,
mDNS off, loopback only) start in a temporary directory. Once the providers'
asks are in the consumer's book, the consumer places three tasks through the
book, one per sandbox kind, with artefacts built here and now:

- wasm: a module assembled from WAT that sums squares in a loop;
- container: a busybox OCI image (built with ``synord.runtimes.oci``) running a script;
- microvm: the same image booted as a real Linux guest.

For each task it prints where it went (provider, agreement, price), its output
and exit code; then the receipts both sides keep. Everything goes through the
daemons' public interfaces (control API and CLI). Exit code 0 only if every
task whose sandbox this host has succeeded; a kind whose sandbox the probe
reports unavailable is skipped, with the reason.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from synord.protocols.kinds import RUNTIME_KINDS as KINDS

from .localmesh import DaemonCluster, DaemonProcess, wait_for

CONSUMER_CONFIG = "[contributor]\nenabled = false\n"
SUM_N = 1000

# A WASI command: n = argv[1] (default 100); prints the sum of squares 1..n.
SUM_WAT = r'''
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; 0: iovec, 8: nwritten, 16: argc, 20: argv buf size, 64: argv[], 1024: argv buf,
  ;; 3072..: constant text, 3600: digit scratch (grows down), 4096: output line
  (data (i32.const 3072) "sum of squares 1..")
  (data (i32.const 3100) " = ")
  (data (i32.const 3110) "  (computed by a WebAssembly loop)\0a")
  (global $out (mut i32) (i32.const 4096))
  (func $put (param $src i32) (param $len i32)
    (memory.copy (global.get $out) (local.get $src) (local.get $len))
    (global.set $out (i32.add (global.get $out) (local.get $len))))
  (func $put_u64 (param $v i64) (local $p i32)
    (local.set $p (i32.const 3600))
    (loop $d
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.wrap_i64 (i64.rem_u (local.get $v) (i64.const 10)))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $d (i64.ne (local.get $v) (i64.const 0))))
    (call $put (local.get $p) (i32.sub (i32.const 3600) (local.get $p))))
  (func $atoi (param $p i32) (result i64) (local $v i64) (local $c i32)
    (block $end
      (loop $l
        (local.set $c (i32.load8_u (local.get $p)))
        (br_if $end (i32.lt_u (local.get $c) (i32.const 48)))
        (br_if $end (i32.gt_u (local.get $c) (i32.const 57)))
        (local.set $v (i64.add (i64.mul (local.get $v) (i64.const 10))
                               (i64.extend_i32_u (i32.sub (local.get $c) (i32.const 48)))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $l)))
    (local.get $v))
  (func (export "_start") (local $n i64) (local $i i64) (local $sum i64)
    (local.set $n (i64.const 100))
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (if (i32.and (i32.ge_u (i32.load (i32.const 16)) (i32.const 2))
                 (i32.and (i32.le_u (i32.load (i32.const 16)) (i32.const 200))
                          (i32.le_u (i32.load (i32.const 20)) (i32.const 2048))))
      (then
        (drop (call $args_get (i32.const 64) (i32.const 1024)))
        (local.set $n (call $atoi (i32.load (i32.const 68))))))
    (local.set $i (i64.const 1))
    (block $done
      (loop $l
        (br_if $done (i64.gt_u (local.get $i) (local.get $n)))
        (local.set $sum (i64.add (local.get $sum) (i64.mul (local.get $i) (local.get $i))))
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (br $l)))
    (call $put (i32.const 3072) (i32.const 18))
    (call $put_u64 (local.get $n))
    (call $put (i32.const 3100) (i32.const 3))
    (call $put_u64 (local.get $sum))
    (call $put (i32.const 3110) (i32.const 35))
    (i32.store (i32.const 0) (i32.const 4096))
    (i32.store (i32.const 4) (i32.sub (global.get $out) (i32.const 4096)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
'''

# Runs in the container and in the microVM guest: what kind of box it is, and some work.
HELLO_SH = r'''#!/bin/sh
echo "hello from a $1 task placed through the order book"
echo "kernel: $(uname -sr)   pid 1: $(cat /proc/1/comm 2>/dev/null || echo '?')   cpus: $(grep -c ^processor /proc/cpuinfo)"
echo "primes below 60: $(awk 'BEGIN { for (n = 2; n < 60; n++) { p = 1; for (d = 2; d * d <= n; d++) if (n % d == 0) p = 0; if (p) printf "%d ", n } }')"
echo "network interfaces: $(ls /sys/class/net 2>/dev/null | tr '\n' ' ')"
'''


@dataclass
class TaskResult:
    kind: str
    title: str
    status: str = "failed"  # succeeded | failed | skipped
    reason: str = ""
    job: dict = field(default_factory=dict)
    receipt: dict | None = None


def _say(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _section(title: str) -> None:
    _say()
    _say(f"== {title} " + "=" * max(0, 68 - len(title)))


def _short(peer: str | None) -> str:
    return f"{peer[:12]}…{peer[-6:]}" if peer else "-"


def _build_artefacts(work: Path) -> tuple[Path | None, Path | None, str]:
    """(sum.wasm, busybox image dir, why the image could not be built)."""
    import wasmtime
    work.mkdir(parents=True, exist_ok=True)
    wasm = work / "sum.wasm"
    wasm.write_bytes(bytes(wasmtime.wat2wasm(SUM_WAT)))
    from synord.runtimes.oci_build import build_busybox_image
    image = work / "hello-image"
    try:
        digest = build_busybox_image(image, files={"/work/hello.sh": HELLO_SH},
                                     entrypoint=["/bin/sh", "/work/hello.sh"], cmd=["an OCI image"])
    except Exception as exc:  # busybox-static missing: no image for container/microvm
        return wasm, None, f"cannot build the busybox image: {exc}"
    _say(f"built {wasm.name} ({wasm.stat().st_size} bytes, from WAT) and an OCI image "
         f"with busybox ({digest[:19]}…)")
    return wasm, image, ""


def _names(daemons: dict[str, DaemonProcess]) -> dict[str, str]:
    return {d.status()["peer_id"]: name for name, d in daemons.items()}


def _show_mesh(daemons: dict[str, DaemonProcess], names: dict[str, str]) -> None:
    _section("Mesh: 3 daemons on loopback")
    for name, d in daemons.items():
        st = d.status()
        role = "contributing" if st["contributing"] else "consumer only"
        _say(f"  {name:<10} {st['peer_id']}  ({role})")
        for a in st["addrs"]:
            _say(f"  {'':<10} {a}")
    consumer = daemons["consumer"]
    peers = consumer.get("/v1/peers")
    _say(f"  the consumer knows {len(peers)} peers: "
         + ", ".join(f"{names.get(p['peer_id'], _short(p['peer_id']))}"
                     + (" (capabilities announced)" if p.get("capabilities") else "")
                     for p in peers))


def _show_book(consumer: DaemonProcess, names: dict[str, str]) -> dict[str, set[str]]:
    """Prints the consumer's share of the book; returns runtime -> providers offering it."""
    _section("Order book (the consumer's share)")
    offered: dict[str, set[str]] = {k: set() for k in KINDS}
    book = consumer.get("/v1/book")
    for cls, side in sorted(book.get("classes", {}).items()):
        asks = side.get("asks", [])
        _say(f"  [{cls}] {len(asks)} asks, {len(side.get('bids', []))} bids, best ask "
             f"{side.get('best_ask')}, last trade {side.get('last_trade')}  (price per unit-hour)")
        for a in sorted(asks, key=lambda a: (a["price"], a["peer"])):
            for rt in a.get("runtimes", []):
                offered.setdefault(rt, set()).add(a["peer"])
            _say(f"    ask from {names.get(a['peer'], _short(a['peer'])):<10} price {a['price']:.6f}  "
                 f"{a.get('units', a.get('cores'))} units  {a.get('cores')} cores  "
                 f"{a.get('memory', 0) / 2**30:.1f} GiB  runtimes {','.join(a.get('runtimes', []))}"
                 + ("  preemptible" if a.get("preemptible") else ""))
    return offered


def _job_id(stderr: str) -> str | None:
    for line in stderr.splitlines():
        if line.startswith("synord: job ") and line.endswith(" submitted"):
            return line.split()[2]
    return None


def _run_task(consumer: DaemonProcess, names: dict[str, str], res: TaskResult,
              cli_args: list[str], timeout: float) -> None:
    _say("  $ synord run " + " ".join(cli_args))
    t0 = time.monotonic()
    try:
        proc = consumer.cli("run", *cli_args, check=False, timeout=timeout)
    except Exception as exc:  # subprocess.TimeoutExpired
        res.reason = f"synord run did not finish: {exc}"
        _say(f"  FAILED: {res.reason}")
        return
    wall = time.monotonic() - t0
    job_id = _job_id(proc.stderr)
    job = consumer.get(f"/v1/jobs/{job_id}") if job_id else {}
    res.job = job
    for h in job.get("history", []):
        _say(f"  placed on {names.get(h['provider'], '?')} ({_short(h['provider'])}), agreement "
             f"{h.get('agreement', '-')[:16]}…, price {h.get('price')} per unit-hour, mode {h.get('mode')}")
    _say("  output:")
    for line in proc.stdout.splitlines() or ["(no output)"]:
        _say(f"    | {line}")
    for line in proc.stderr.splitlines():
        if not (line.startswith("synord: job ") and line.endswith(" submitted")):
            _say(f"    ! {line}")
    usage = (job.get("history") or [{}])[-1].get("usage") or {}
    _say(f"  exit code {proc.returncode}, job {job_id or '?'} {job.get('state', '?')}, "
         f"{wall:.2f} s end to end"
         + (f", {usage['cpu_s']:.3f} s CPU on the provider" if "cpu_s" in usage else ""))
    if proc.returncode == 0 and job.get("state") == "succeeded" and proc.stdout.strip():
        res.status = "succeeded"
    else:
        res.reason = job.get("error") or f"exit code {proc.returncode}"


def _receipts(daemons: dict[str, DaemonProcess], names: dict[str, str],
              results: list[TaskResult]) -> None:
    _section("Receipts (signed by the provider, countersigned by the consumer)")
    consumer = daemons["consumer"]
    by_id = {d.status()["peer_id"]: d for d in daemons.values()}
    for res in results:
        if res.status != "succeeded":
            continue
        hist = (res.job.get("history") or [{}])[-1]
        aid, provider = hist.get("agreement"), hist.get("provider")

        def find(d: DaemonProcess) -> dict | None:
            for r in d.get("/v1/ledger").get("receipts", []):
                if r["agreement_id"] == aid and r.get("provider_sig") and r.get("consumer_sig"):
                    return r
            return None
        try:
            mine = wait_for(lambda: find(consumer), 20, what=f"the consumer's receipt for {aid}")
            theirs = wait_for(lambda: find(by_id[provider]), 20, what=f"the provider's receipt for {aid}")
        except (AssertionError, KeyError) as exc:
            res.status, res.reason = "failed", f"no countersigned receipt: {exc}"
            _say(f"  {res.kind:<9} NO RECEIPT: {exc}")
            continue
        same = (mine["provider_sig"] == theirs["provider_sig"]
                and mine["consumer_sig"] == theirs["consumer_sig"])
        res.receipt = mine
        _say(f"  {res.kind:<9} agreement {aid[:16]}…  {names.get(provider, '?')} → consumer  "
             f"outcome {mine['outcome']}  wall {mine['wall_s']:.3f} s  cpu {mine['cpu_s']:.3f} s  "
             f"amount {mine['amount']:.3g}")
        _say(f"  {'':<9} provider_sig {mine['provider_sig'][:24]}…  consumer_sig "
             f"{mine['consumer_sig'][:24]}…  "
             + ("(identical in both ledgers)" if same else "(LEDGERS DISAGREE)"))
        if not same:
            res.status, res.reason = "failed", "the two ledgers hold different signatures"
    for name, d in daemons.items():
        led = d.get("/v1/ledger")
        _say(f"  ledger of {name:<10} {len(led.get('receipts', []))} receipts, balance "
             f"{led.get('balance', 0):+.3g}")


def main(args) -> int:
    keep = bool(getattr(args, "keep", False))
    base = Path(tempfile.mkdtemp(prefix="synord-demo-"))
    cluster = DaemonCluster(base)
    results = [TaskResult("wasm", "WebAssembly (wasmtime)"),
               TaskResult("container", "OCI container (crun/runc)"),
               TaskResult("microvm", "microVM (QEMU/Firecracker, real guest kernel)")]
    t_start = time.monotonic()
    try:
        _say(f"synord demo: a throwaway mesh of 3 real daemons on 127.0.0.1, homes in {base}")
        wasm, image, image_err = _build_artefacts(base / "artefacts")
        consumer = cluster.start("consumer", config=CONSUMER_CONFIG)
        boot = consumer.p2p_addrs()
        providers = [cluster.start(n, bootstrap=boot) for n in ("provider1", "provider2")]
        daemons = {"consumer": consumer, **{p.name: p for p in providers}}
        names = _names(daemons)
        prov_ids = {pid for pid, n in names.items() if n != "consumer"}
        wait_for(lambda: {a["peer"] for a in consumer.get("/v1/book")["classes"]
                          .get("cpu", {}).get("asks", [])} >= prov_ids,
                 40, what="both providers' asks in the consumer's book")
        _show_mesh(daemons, names)
        offered = _show_book(consumer, names)
        probe = providers[0].get("/v1/probe").get("runtimes", {})

        plans = {
            "wasm": (["--runtime", "wasm", str(wasm), "--", str(SUM_N)], 60, ""),
            "container": (["--runtime", "container", str(image), "--", "container"], 90, image_err),
            "microvm": (["--runtime", "microvm", str(image), "--", "microVM"], 240, image_err),
        }
        for i, res in enumerate(results, 1):
            _section(f"Task {i}/3: {res.kind} — {res.title}")
            cli_args, timeout, blocker = plans[res.kind]
            rt = probe.get(res.kind) or {}
            if not rt.get("available", False):
                res.status, res.reason = "skipped", f"sandbox unavailable on this host: {rt.get('reason', 'not probed')}"
            elif blocker:
                res.status, res.reason = "skipped", blocker
            if res.status == "skipped":
                _say(f"  SKIPPED: {res.reason}")
                continue
            if not offered.get(res.kind):  # the probe says yes: the asks must say so too
                res.reason = "the probe reports this sandbox available but no ask in the book offers it"
                _say(f"  FAILED: {res.reason}")
                continue
            _run_task(consumer, names, res, cli_args, timeout)
        _receipts(daemons, names, results)
    except Exception as exc:
        _say(f"\nsynord demo: aborted: {type(exc).__name__}: {exc}")
        for d in cluster.daemons:
            tail = d.log()[-1500:]
            if tail:
                _say(f"--- last lines of {d.name}'s log ---\n{tail}")
        for r in results:
            if r.status == "failed" and not r.reason:
                r.reason = f"not run: demo aborted ({type(exc).__name__})"
    finally:
        cluster.stop_all()
        if keep:
            _say(f"\n(--keep: daemon homes and logs left in {base})")
        else:
            shutil.rmtree(base, ignore_errors=True)

    _section("Summary")
    for r in results:
        line = f"  {r.kind:<9} {r.status.upper()}"
        if r.status == "succeeded" and r.receipt:
            line += f"  (receipt {r.receipt['agreement_id'][:16]}…, both signatures present)"
        elif r.reason:
            line += f"  ({r.reason})"
        _say(line)
    ok = all(r.status in ("succeeded", "skipped") for r in results) and any(
        r.status == "succeeded" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    verdict = ("all tasks succeeded" if not skipped else
               f"all tasks this host can run succeeded ({skipped} skipped)") if ok else "demo FAILED"
    _say(f"  {verdict} in {time.monotonic() - t_start:.1f} s; "
         f"{'kept' if keep else 'removed'} {base}")
    return 0 if ok else 1
