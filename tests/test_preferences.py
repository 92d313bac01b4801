"""Contributor preferences on real daemons: the CPU-time throttle lands in a
running container task's cgroup (cpu.max) and follows live changes; the
provider's owner can see, read and cancel that task; status, limits and the
asks agree on whether the node contributes and why; a preference this
machine cannot evaluate is reported; `run` without a provider says at once
that it waits, and why, and says the reason once."""

from __future__ import annotations

import glob
import json
import re
import time

import pytest

from daemons import DaemonCluster, wait_for
from jobs_helpers import BUSYBOX_DIR, CONSUMER_ONLY, PROBE_WASM, ensure_assets, providers_in_book, start_mesh

from synord.runtimes.cgroups import ROOT, TOP, cgroup_mode


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    ensure_assets()
    with DaemonCluster(tmp_path_factory.mktemp("prefs")) as cluster:
        consumer, (provider,) = start_mesh(cluster, 1)
        yield consumer, provider


def quota_on_disk(task_id: str) -> str:
    """cpu.max of the task's cgroup as the kernel has it (v1: cfs quota and period)."""
    if cgroup_mode() == "v2":
        (path,) = glob.glob(str(ROOT / TOP / f"synord-{task_id}-*" / "cpu.max"))
        return open(path).read().strip()
    (d,) = glob.glob(str(ROOT / "cpu" / TOP / f"synord-{task_id}-*"))
    return f"{open(d + '/cpu.cfs_quota_us').read().strip()} {open(d + '/cpu.cfs_period_us').read().strip()}"


def test_cpu_throttle_reaches_the_running_task_and_the_owner_sees_and_cancels_it(mesh):
    consumer, provider = mesh
    if "container" not in provider.get("/v1/probe")["runtimes"] or \
            not provider.get("/v1/probe")["runtimes"]["container"]["available"]:
        pytest.skip("no container runtime on this machine: " +
                    provider.get("/v1/probe")["runtimes"]["container"]["reason"])
    res = consumer.cli("run", "--detach", "--json", "--runtime", "container", "--cpus", "1",
                       str(BUSYBOX_DIR), "--", "sh", "-c", "echo started; sleep 120")
    job_id = json.loads(res.stdout)["id"]
    task = wait_for(lambda: (t := provider.get(f"/v1/jobs/{job_id}")).get("cpu_max") and t,
                    60, what="the task running on the provider")
    assert task["role"] == "provider" and task["consumer"] == consumer.status()["peer_id"]
    aid = task["agreement"]  # the provider names the task's cgroup by it, not by the peer's job id
    assert task["cpu_max"] == "100000 100000" == quota_on_disk(aid)

    provider.cli("limits", "--set", "cpu_time_percent=25")
    wait_for(lambda: quota_on_disk(aid) == "25000 100000", 10, what="cpu.max lowered to 25 %")
    assert provider.get(f"/v1/jobs/{job_id}")["cpu_max"] == "25000 100000"
    shown = provider.cli("limits").stdout
    assert "container tasks get 25 % of their cores" in shown

    # The provider's owner: a readable summary, the task's output, and cancel.
    summary = provider.cli("job", job_id).stdout
    assert f"runs it for {task['consumer']}" in summary and "cpu.max 25000 100000" in summary
    assert "started\n" in provider.cli("logs", job_id).stdout
    provider.cli("cancel", job_id)
    wait_for(lambda: consumer.get(f"/v1/jobs/{job_id}")["state"] in ("cancelled", "failed"), 30,
             what="the consumer hears the task ended")
    assert not glob.glob(str(ROOT / ("" if cgroup_mode() == "v2" else "cpu") / TOP / f"synord-{job_id}-*"))
    # The consumer still sees only its own jobs: the provider's task is not its job.
    other = consumer.cli("job", "0123456789abcdef", check=False)
    assert other.returncode == 1 and "no job 0123456789abcdef" in other.stderr
    provider.cli("limits", "--set", "cpu_time_percent=")


def metrics(d) -> str:
    conn, resp = d.client._send("GET", "/metrics")
    try:
        return resp.read().decode()
    finally:
        conn.close()


def test_status_limits_and_asks_agree_on_contributing(mesh):
    consumer, provider = mesh
    pid = provider.status()["peer_id"]
    hour = time.localtime().tm_hour
    not_now = f"{(hour + 2) % 24:02d}-{(hour + 3) % 24:02d}"
    provider.cli("limits", "--set", f"allowed_hours={not_now}")
    status = provider.status()
    limits = provider.get("/v1/limits")
    assert status["contributing"] is False and limits["contributing"] is False and limits["allowed"] is False
    assert status["why_not"] == limits["why_not"] and f"outside allowed hours {not_now}" in status["why_not"]
    assert "contributing no: outside allowed hours" in provider.cli("status").stdout
    assert "synord_contributing 0.0" in metrics(provider)
    wait_for(lambda: pid not in providers_in_book(consumer), 20, what="the provider's asks withdrawn")
    assert provider.get("/v1/book")["asks_published"] == 0

    provider.cli("limits", "--set", "allowed_hours=")
    assert provider.status()["contributing"] is True and provider.status()["why_not"] is None
    wait_for(lambda: pid in providers_in_book(consumer), 20, what="the provider's asks back")
    assert "synord_contributing 1.0" in metrics(provider)


def test_every_preference_is_listed_typed_and_evaluability_is_reported(mesh):
    from synord import hwprobe
    from synord.hwprobe.policy import PREFERENCES
    _, provider = mesh
    doc = provider.get("/v1/limits")
    keys = {k["key"]: k for k in doc["keys"]}
    assert set(keys) == set(PREFERENCES)
    for k in keys.values():
        assert k["type"] and k["help"] and isinstance(k["evaluable"], bool)
    has_idle = hwprobe.read_signals().user_idle_s is not None
    if has_idle:
        assert keys["idle_only"]["evaluable"] is True
    else:
        # Headless here: idle_only cannot be evaluated; it is said, and it holds work back.
        assert keys["idle_only"]["evaluable"] is False and "no idle signal" in keys["idle_only"]["note"]
        res = json.loads(provider.cli("limits", "--json", "--set", "idle_only=true").stdout)
        assert res["contributing"] is False and "idle_only: cannot evaluate: no idle signal" in res["why_not"]
        assert "idle_only: cannot evaluate" in provider.status()["why_not"]
        text = provider.cli("limits").stdout
        assert "idle_only" in text and "cannot evaluate: no idle signal" in text
        # The desktop session (the tray) reports idleness: now it can be evaluated.
        assert provider.post("/v1/idle", {"idle_s": 600})["source"] == "session"
        doc = provider.get("/v1/limits")
        assert doc["contributing"] is True
        assert next(k for k in doc["keys"] if k["key"] == "idle_only")["evaluable"] is True
        provider.post("/v1/idle", {"idle_s": 5})
        assert re.search(r"user active \d+s ago \(idle_only", provider.status()["why_not"])
        from synord.client import ClientError
        with pytest.raises(ClientError, match="idle_s must be a number"):
            provider.post("/v1/idle", {"idle_s": "soon"})
        provider.post("/v1/idle", {"idle_s": 600})
        provider.cli("limits", "--set", "idle_only=")
    bad = provider.cli("limits", "--set", "daily_transfer_bytes=lots", check=False)
    assert bad.returncode == 1 and "not a size" in bad.stderr and "Traceback" not in bad.stderr
    res = json.loads(provider.cli("limits", "--json", "--set", "daily_transfer_bytes=2G",
                                  "--set", "network_hours=01-02").stdout)
    assert res["limits"]["daily_transfer_bytes"] == 2 << 30
    assert not res["contributing"] or time.localtime().tm_hour == 1
    assert res["hand_back"] is False  # network hours stop new work only
    assert "2.0 GiB" in provider.cli("limits").stdout
    provider.cli("limits", "--set", "daily_transfer_bytes=", "--set", "network_hours=")
    assert provider.status()["contributing"] is True


def test_bandwidth_cap_holds_the_provider_s_transfers_back(mesh, tmp_path):
    import os
    consumer, provider = mesh
    # A module no provider has cached: the probe plus a custom section with fresh bytes.
    fresh = tmp_path / "fresh.wasm"
    fresh.write_bytes(PROBE_WASM.read_bytes() + bytes([0, 13, 4]) + b"nonc" + os.urandom(8))

    def paced() -> float:
        return float(re.search(r"^synord_transfer_paced_seconds_total (\S+)$", metrics(provider), re.M)[1])
    before = paced()
    provider.cli("limits", "--set", "bandwidth_bytes_per_s=32K")
    try:
        res = consumer.cli("run", str(fresh), "--", "hello")
        assert res.stdout == "hello, wasm\n"
    finally:
        provider.cli("limits", "--set", "bandwidth_bytes_per_s=")
    # Without a cap the pacer never waits (exactly 0); with one, ~117 KiB at 32 KiB/s is held
    # back for whatever the transfer did not already take (how long depends on the machine).
    assert paced() > before


def test_run_without_a_provider_says_it_waits_and_why_once(tmp_path):
    ensure_assets()
    with DaemonCluster(tmp_path) as cluster:
        alone = cluster.start("alone", config=CONSUMER_ONLY + "[jobs]\nplacement_timeout_s = 3.0\n")
        res = alone.cli("run", str(PROBE_WASM), "--", "hello", check=False)
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert lines[0].startswith("synord: job ") and lines[0].endswith(" submitted")
    assert lines[1] == "synord: waiting for a provider (up to 3.0s): no ask of class 'cpu' in the book"
    assert res.stderr.count("no ask of class 'cpu' in the book") == 1
    assert "see above" in lines[-1] and len(lines) == 3
