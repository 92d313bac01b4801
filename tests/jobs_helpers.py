"""Shared set-up for multi-daemon job tests: a small mesh and the test artefacts."""

from __future__ import annotations

import json
import subprocess

from daemons import ROOT, DaemonCluster, wait_for

ASSETS = ROOT / "tests" / "assets" / "build"
PROBE_WASM = ASSETS / "wasm" / "probe.wasm"
COUNTER_WASM = ASSETS / "wasm" / "counter.wasm"
BUSYBOX_DIR = ASSETS / "images" / "busybox"
BUSYBOX_TAR = ASSETS / "images" / "busybox.tar"

CONSUMER_ONLY = "[contributor]\nenabled = false\n"


def ensure_assets() -> None:
    if not (PROBE_WASM.exists() and COUNTER_WASM.exists() and BUSYBOX_TAR.exists()):
        subprocess.run(["bash", str(ROOT / "tests" / "assets" / "build.sh")], check=True)


def asks_at(d, cls: str = "cpu") -> list[dict]:
    return d.get("/v1/book")["classes"].get(cls, {}).get("asks", [])


def providers_in_book(d, cls: str = "cpu") -> set[str]:
    return {a["peer"] for a in asks_at(d, cls)}


def start_mesh(cluster: DaemonCluster, providers: int, consumer_config: str = CONSUMER_ONLY,
               provider_config: str = "", jobs_config: str = ""):
    """A consumer-only daemon plus ``providers`` provider daemons, all bootstrapped off the first."""
    consumer = cluster.start("consumer", config=consumer_config + jobs_config)
    boot = consumer.p2p_addrs()
    provs = [cluster.start(f"p{i}", bootstrap=boot, config=provider_config + jobs_config)
             for i in range(providers)]
    ids = {p.status()["peer_id"] for p in provs}
    wait_for(lambda: providers_in_book(consumer) >= ids, 40, what="every provider's ask in the book")
    return consumer, provs


def job(d, job_id: str) -> dict:
    return d.get(f"/v1/jobs/{job_id}")


def wait_job(d, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 90) -> dict:
    return wait_for(lambda: (j := job(d, job_id))["state"] in states and j, timeout,
                    what=f"job {job_id} in {states}")


def output(d, job_id: str) -> str:
    res = d.cli("logs", job_id)
    return res.stdout


def submit(d, *args: str) -> str:
    res = d.cli("run", "--detach", "--json", *args)
    return json.loads(res.stdout)["id"]


def reference_run(*args: str) -> subprocess.CompletedProcess:
    """The same task run locally (no mesh): what the mesh must reproduce exactly."""
    from daemons import SYNORD
    return subprocess.run([*SYNORD, "sandbox", "run", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def refused(d, where: str, reason: str) -> float:
    """synord_refusals_total{where, reason} from a daemon's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    conn, resp = d.client._send("GET", "/metrics")
    try:
        text = resp.read().decode()
    finally:
        conn.close()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "synord_refusals_total" and s.labels == {"where": where, "reason": reason})
