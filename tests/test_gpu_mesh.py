"""A GPU job across real daemons: the provider's NVML is the stub (two H100s,
tests/nvml_stub, loaded through LD_LIBRARY_PATH), its CDI spec names stand-in
device nodes (tests/test_gpu_cdi.py), the task runs in real crun.

bid -> agreement naming device UUIDs -> task that sees exactly those devices ->
receipt with GPU fields; two concurrent GPU tasks never share a device; a third
is told "capacity"; devices come back after kill -9 of the provider + restart."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from daemons import DaemonCluster, wait_for
from jobs_helpers import BUSYBOX_DIR, CONSUMER_ONLY, ensure_assets, job, output, submit, wait_job
from test_gpu_cdi import GPU0, GPU1, stand_ins, write_spec

STUB_SRC = Path(__file__).parent / "nvml_stub" / "nvml_stub.c"


def _needs():
    from synord.runtimes.container import ContainerRuntime
    av = ContainerRuntime().available()
    if not av.available:
        pytest.skip(f"containers unavailable: {av.reason}")
    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler to build the NVML stub")


@pytest.fixture(scope="module")
def gpu_mesh(tmp_path_factory):
    _needs()
    ensure_assets()
    base = tmp_path_factory.mktemp("gpumesh")
    lib = base / "nvml"
    lib.mkdir()
    subprocess.run([shutil.which("gcc") or "cc", "-shared", "-fPIC", "-O1", "-o", str(lib / "libnvidia-ml.so.1"),
                    str(STUB_SRC)], check=True)
    dev = stand_ins(base / "dev")
    write_spec(base / "cdi", dev, base / "libs")
    env = {"LD_LIBRARY_PATH": str(lib), "NVML_STUB_MODE": "two", "NVML_STUB_MEM_USED_MB": "1500",
           "NVML_STUB_UTIL": "40"}
    prov_conf = (f"[gpu]\ncdi_dirs = [\"{base / 'cdi'}\"]\ndev_root = \"{base / 'nodev'}\"\n"
                 "meter_interval_s = 0.2\n[contributor]\ncpu_share = 1.0\n")
    with DaemonCluster(base / "homes") as cluster:
        # Placement gives up soon: a refusal ("capacity") or no match shows in the job's error.
        # An H100 hour costs more than the default max price (1.0 per unit-hour), more so as
        # our own bids raise demand: this consumer pays up to 20.
        consumer = cluster.start("consumer", config=CONSUMER_ONLY + "[jobs]\nplacement_timeout_s = 8.0\n"
                                 "[market]\nmax_price = 20.0\n")
        prov = cluster.start("gpu", bootstrap=consumer.p2p_addrs(), config=prov_conf, env=env)

        def gpu_asks():
            return [a for a in consumer.get("/v1/book")["classes"].get("gpu", {}).get("asks", [])
                    if a.get("gpu_class") == "h100"]
        wait_for(gpu_asks, 60, what="the provider's H100 ask in the consumer's book")
        yield cluster, consumer, prov, env, prov_conf, gpu_asks


SCRIPT = "ls /dev | grep nvidia | tr '\\n' ' '; echo; echo vis=$NVIDIA_VISIBLE_DEVICES; sleep {s}"


def test_gpu_job_travels_the_mesh_and_is_metered(gpu_mesh):
    _, consumer, prov, _, _, gpu_asks = gpu_mesh
    (ask,) = gpu_asks()
    assert ask["gpus"] == 2 and ask["cuda"] == "9.0" and ask["gpu_memory"] == 85520809984
    job_id = submit(consumer, "--runtime", "container", "--gpus", "1", "--gpu-class", "h100",
                    "--gpu-memory", "40G", "--cuda-capability", "8.0", str(BUSYBOX_DIR), "--",
                    "sh", "-c", SCRIPT.format(s=1))
    j = wait_job(consumer, job_id)
    assert j["state"] == "succeeded", (j["error"], j["events"])
    lines = output(consumer, job_id).splitlines()
    (visible,) = [l.split("=", 1)[1] for l in lines if l.startswith("vis=")]
    assert visible in (GPU0, GPU1)
    assert lines[0].split() == [("nvidia0" if visible == GPU0 else "nvidia1"), "nvidiactl"]
    aid = j["history"][0]["agreement"]
    assert j["history"][0]["devices"] == [visible]  # the agreement named exactly the device the task saw

    def receipt(d):
        return next((r for r in d.get("/v1/ledger")["receipts"] if r["agreement_id"] == aid), None)
    r = wait_for(lambda: receipt(consumer), 30, what="the countersigned receipt")
    assert r["gpu"] is not None and r["gpu"]["gpu_peak_memory"] == 1500 << 20
    assert 0 < r["gpu"]["gpu_s"] <= r["wall_s"] * 0.4 + 1e-6
    assert r["gpu"]["gpu_energy_j"] > 0
    assert receipt(prov)["gpu"] == r["gpu"]
    # Released once settled.
    wait_for(lambda: not any(u["held_by"] for u in prov.get("/v1/gpu")["units"]), 20, what="devices released")


def test_concurrent_gpu_tasks_never_share_and_a_third_is_told_capacity(gpu_mesh):
    _, consumer, prov, _, _, _ = gpu_mesh
    a = submit(consumer, "--runtime", "container", "--gpus", "1", str(BUSYBOX_DIR), "--",
               "sh", "-c", SCRIPT.format(s=20))
    b = submit(consumer, "--runtime", "container", "--gpus", "1", str(BUSYBOX_DIR), "--",
               "sh", "-c", SCRIPT.format(s=20))
    for x in (a, b):
        wait_for(lambda: "vis=" in output(consumer, x), 60, what=f"job {x} running")
    held = {u["id"]: u["held_by"] for u in prov.get("/v1/gpu")["units"]}
    assert set(held) == {GPU0, GPU1} and all(held.values()) and len(set(held.values())) == 2
    seen = {[l for l in output(consumer, x).splitlines() if l.startswith("vis=")][0] for x in (a, b)}
    assert seen == {f"vis={GPU0}", f"vis={GPU1}"}
    # Both devices are taken: a third GPU job is refused by the provider for capacity.
    c = submit(consumer, "--runtime", "container", "--gpus", "1", str(BUSYBOX_DIR), "--", "true")
    j = wait_job(consumer, c, timeout=60)
    assert j["state"] == "failed" and "capacity" in j["error"], j
    for x in (a, b):
        assert wait_job(consumer, x)["state"] == "succeeded"
    wait_for(lambda: not any(u["held_by"] for u in prov.get("/v1/gpu")["units"]), 20, what="devices released")


def test_wasm_gpu_task_is_refused_at_submission(gpu_mesh, tmp_path):
    from jobs_helpers import PROBE_WASM
    _, consumer, _, _, _, _ = gpu_mesh
    res = consumer.cli("run", "--gpus", "1", str(PROBE_WASM), check=False)
    assert res.returncode != 0 and "WASM sandbox cannot be given devices" in res.stderr
    assert "Traceback" not in res.stderr
    before = len(consumer.get("/v1/jobs"))
    res = consumer.cli("run", "--runtime", "container", "--gpus", "1", "--cuda-capability", "nine",
                       str(BUSYBOX_DIR), check=False)
    assert res.returncode != 0 and "cuda_capability" in res.stderr
    assert len(consumer.get("/v1/jobs")) == before  # nothing submitted, nothing reserved


def test_why_no_match_names_the_gpu_constraint(gpu_mesh):
    _, consumer, _, _, _, _ = gpu_mesh
    job_id = submit(consumer, "--runtime", "container", "--gpus", "1", "--gpu-memory", "200G",
                    str(BUSYBOX_DIR), "--", "true")
    j = wait_job(consumer, job_id, timeout=60)
    assert j["state"] == "failed" and "gpu_memory excluded 1 (need 214748364800 bytes on each GPU)" in j["error"], j
    job_id = submit(consumer, "--runtime", "container", "--gpus", "1", "--cuda-capability", "10.0",
                    str(BUSYBOX_DIR), "--", "true")
    j = wait_job(consumer, job_id, timeout=60)
    assert "cuda excluded 1 (need CUDA compute capability >= 10.0)" in j["error"], j


def test_devices_come_back_after_kill_9_and_restart(gpu_mesh):
    cluster, consumer, prov, env, conf, gpu_asks = gpu_mesh
    job_id = submit(consumer, "--runtime", "container", "--gpus", "2", str(BUSYBOX_DIR), "--",
                    "sh", "-c", SCRIPT.format(s=120))
    wait_for(lambda: "vis=" in output(consumer, job_id), 60, what="the two-GPU job running")
    assert all(u["held_by"] for u in prov.get("/v1/gpu")["units"])
    prov.signal(signal.SIGKILL)
    prov.proc.wait(10)
    prov = cluster.start("gpu", bootstrap=consumer.p2p_addrs(), config=conf, env=env)
    units = prov.get("/v1/gpu")["units"]
    assert {u["id"] for u in units} == {GPU0, GPU1} and not any(u["held_by"] for u in units)
    consumer.post(f"/v1/jobs/{job_id}/cancel")


def test_preempted_gpu_task_moves_and_its_devices_come_back(gpu_mesh):
    """Migration is an exit path too: the first provider's devices are free again once
    the task has moved, and the new leg names its own devices."""
    cluster, consumer, _, env, conf, gpu_asks = gpu_mesh
    second = cluster.start("gpu2", bootstrap=consumer.p2p_addrs(), config=conf, env=env)
    try:
        wait_for(lambda: len({a["peer"] for a in gpu_asks()}) == 2, 60, what="both GPU providers' asks")
        job_id = submit(consumer, "--runtime", "container", "--gpus", "1", str(BUSYBOX_DIR), "--",
                        "sh", "-c", SCRIPT.format(s=10))
        wait_for(lambda: "vis=" in output(consumer, job_id), 60, what="the GPU job running")
        first_peer = job(consumer, job_id)["provider"]
        live = [d for d in cluster.daemons if d.proc.poll() is None and d.name.startswith("gpu")]
        first = next(d for d in live if d.status()["peer_id"] == first_peer)
        assert first.post("/v1/preempt", {"grace_s": 3, "reason": "owner is back"})["tasks_notified"] == 1
        j = wait_job(consumer, job_id, timeout=120)
        assert j["state"] == "succeeded", (j["error"], j["events"])
        legs = j["history"]
        assert len(legs) >= 2 and legs[0]["provider"] == first_peer and legs[0]["ended"] == "preempted", legs
        assert all(len(leg["devices"]) == 1 for leg in legs)
        wait_for(lambda: not any(u["held_by"] for u in first.get("/v1/gpu")["units"]), 20,
                 what="the first provider's devices released")
    finally:
        second.stop()
