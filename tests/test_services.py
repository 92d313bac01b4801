"""Long-running services on real daemons (synord run --service): a busybox container
stays up past its periods, each period billed with its own doubly-signed receipt;
cancel stops it and its billing; a failing health check restarts it on the same
provider with its named volume intact."""

from __future__ import annotations

import pytest

from synord.protocols.servicelease import period_aid

from daemons import DaemonCluster, wait_for
from jobs_helpers import BUSYBOX_DIR, ensure_assets, job, start_mesh, submit, wait_job

PERIOD = "2"  # seconds: short, so a test sees several periods
QUOTA = "[storage]\nvolume_quota_bytes = 1000000\n"


def _containers():
    from synord.runtimes.container import ContainerRuntime
    return ContainerRuntime().available()


pytestmark = pytest.mark.skipif(not _containers().available,
                                reason=f"containers unavailable: {_containers().reason}")


@pytest.fixture(scope="module")
def cluster_mesh(tmp_path_factory):
    ensure_assets()
    with DaemonCluster(tmp_path_factory.mktemp("services")) as cluster:
        yield cluster, start_mesh(cluster, 1, provider_config=QUOTA)


@pytest.fixture
def mesh(cluster_mesh):
    return cluster_mesh[1]


def receipts(d, aids) -> list[dict]:
    return [r for r in d.get("/v1/ledger")["receipts"] if r["agreement_id"] in aids]


def test_a_service_stays_up_is_billed_per_period_and_cancel_ends_its_billing(mesh):
    consumer, (prov,) = mesh
    job_id = submit(consumer, "--service", "--period", PERIOD, "--runtime", "container", str(BUSYBOX_DIR),
                    "--", "sh", "-c", "while true; do echo tick; sleep 0.5; done")
    j = wait_job(consumer, job_id, ("running",), 60)
    aid = bytes.fromhex(j["history"][0]["agreement"])
    periods = {period_aid(aid, k).hex(): k for k in range(50)}
    # Past its first period the service still runs, and each period over has its receipt
    # in both ledgers, countersigned.
    wait_for(lambda: len(receipts(consumer, periods)) >= 2, 40, what="two period receipts")
    assert job(consumer, job_id)["state"] == "running"
    mine = receipts(consumer, periods)
    assert all(r["consumer_sig"] and r["provider_sig"] and r["amount"] > 0 for r in mine)
    assert sorted(periods[r["agreement_id"]] for r in mine)[:2] == [0, 1]
    wait_for(lambda: len(receipts(prov, periods)) >= 2, 20, what="the provider's period receipts")
    st = consumer.cli("status", job_id, "--json")
    import json
    svc = json.loads(st.stdout)["service"]
    assert svc["state"] == "running" and svc["period_s"] == 2.0 and svc["period"] >= 1
    assert svc["next_renewal"] is not None and svc["restarts"] == 0
    # Cancel: the service stops, the agreement's own receipt closes the bill, no period follows.
    consumer.cli("cancel", job_id)
    assert wait_job(consumer, job_id, ("cancelled",), 30)["state"] == "cancelled"
    final = wait_for(lambda: receipts(consumer, {aid.hex()}), 30, what="the agreement's final receipt")
    assert final[0]["outcome"] == "cancelled"
    n = len(receipts(consumer, periods))
    import time
    time.sleep(2 * float(PERIOD) + 1)  # two more periods' time: nothing more is billed
    assert len(receipts(consumer, periods)) == n
    assert len(receipts(prov, periods)) == n
    assert not [t for t in prov.get("/v1/jobs") if t.get("role") == "provider" and t.get("state") == "running"]


def test_a_failing_health_check_restarts_the_service_in_place_with_its_volume(mesh):
    consumer, (prov,) = mesh
    # Each start appends a line to the volume; the health check passes while /tmp/ok exists,
    # which the service removes after a few seconds: it fails, and is restarted.
    script = ("echo start >> /data/starts; touch /tmp/ok; echo up; sleep 3; rm /tmp/ok; "
              "while true; do sleep 1; done")
    job_id = submit(consumer, "--service", "--period", "5", "--volume", "data:/data",
                    "--health-cmd", "test -f /tmp/ok", "--health-interval", "0.5", "--health-retries", "2",
                    "--runtime", "container", str(BUSYBOX_DIR), "--", "sh", "-c", script)
    wait_job(consumer, job_id, ("running",), 60)
    j = wait_for(lambda: (j := job(consumer, job_id))["service"]["restarts"] >= 2 and j, 60,
                 what="two restarts after failed health checks")
    assert j["state"] == "running" and len(j["history"]) == 1  # the same placement, the same provider
    assert j["provider"] == prov.status()["peer_id"]
    # The volume outlived the sandboxes: every start left its line there.
    # (exec is refused for the moment a sandbox is being replaced: try again then)
    wait_for(lambda: (r := consumer.cli("exec", job_id, "--", "cat", "/data/starts", check=False)).returncode == 0
             and r.stdout.count("start") >= 3, 30, what="three starts recorded in the volume")
    vols = wait_for(lambda: (v := job(consumer, job_id)["service"]["volumes"]) and v[0]["bytes"] and v, 20,
                    what="the volume's size")
    assert vols[0]["name"] == "data" and vols[0]["path"] == "/data" and vols[0]["bytes"] >= 6
    # The output kept flowing across restarts, one stream.
    assert consumer.cli("logs", job_id).stdout.count("up\n") >= 3
    consumer.cli("cancel", job_id)
    wait_job(consumer, job_id, ("cancelled",), 30)


def test_a_wasm_service_and_a_bad_volume_are_refused_with_one_line(mesh):
    from jobs_helpers import PROBE_WASM
    consumer, _ = mesh
    res = consumer.cli("run", "--service", str(PROBE_WASM), check=False)
    assert res.returncode != 0 and "wasm" in res.stderr and "Traceback" not in res.stderr
    res = consumer.cli("run", "--service", "--volume", "../etc:/data", "--runtime", "container",
                       str(BUSYBOX_DIR), "--", "true", check=False)
    assert res.returncode != 0 and "volume" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_tcp_health_check_connects_inside_the_sandbox_and_restarts_when_the_port_closes(mesh):
    consumer, (prov,) = mesh
    # httpd answers on 8080 inside the sandbox's own network namespace for 4 s, then is gone.
    job_id = submit(consumer, "--service", "--period", "5", "--health-tcp", "8080", "--health-interval", "0.5",
                    "--health-retries", "2", "--runtime", "container", str(BUSYBOX_DIR), "--", "sh", "-c",
                    "httpd -f -p 8080 & sleep 4; kill $!; while true; do sleep 1; done")
    wait_job(consumer, job_id, ("running",), 60)
    wait_for(lambda: (prov.get(f"/v1/jobs/{job_id}").get("service") or {}).get("health") == "ok", 30,
             what="a TCP health check that connected")
    j = wait_for(lambda: (j := job(consumer, job_id))["service"]["restarts"] >= 1 and j, 60,
                 what="a restart once the port closed")
    assert j["provider"] == prov.status()["peer_id"] and len(j["history"]) == 1
    assert "Connection refused" in prov.log()
    consumer.cli("cancel", job_id)
    wait_job(consumer, job_id, ("cancelled",), 30)


def test_a_service_moves_with_its_volume_when_paused_and_is_placed_again_when_its_provider_dies(tmp_path):
    from test_migration import peer, place_on_first
    ensure_assets()
    with DaemonCluster(tmp_path) as cluster:
        consumer, provs = start_mesh(cluster, 3)
        # Each start appends to the volume: after a move the earlier lines are still there.
        job_id, first, _ = place_on_first(
            consumer, provs, "--service", "--period", "5", "--volume", "state:/state", "--runtime", "container",
            str(BUSYBOX_DIR), "--", "sh", "-c", "echo started >> /state/log; while true; do sleep 1; done")

        def log_lines() -> str | None:
            r = consumer.cli("exec", job_id, "--", "cat", "/state/log", check=False)
            return r.stdout if r.returncode == 0 else None
        wait_for(lambda: log_lines() == "started\n", 30, what="the first start in the volume")
        assert first.post("/v1/pause")["tasks_handed_back"] == 1
        j = wait_for(lambda: (j := job(consumer, job_id))["state"] == "running" and len(j["history"]) == 2
                     and j, 90, what="the service running on another provider")
        assert j["provider"] != peer(first) and j["history"][0]["ended"] == "preempted"
        # The volume came along (the hand-over's tar), and the service started again on it.
        assert wait_for(log_lines, 30, what="the volume on the second provider") == "started\nstarted\n"
        assert "volume sent" in first.log()
        # Its provider dies (no hand-over): the lease is lost and the service is placed again,
        # on the volume of the last hand-over.
        second = next(p for p in provs if peer(p) == j["provider"])
        second.kill()
        j = wait_for(lambda: (j := job(consumer, job_id))["state"] == "running" and len(j["history"]) == 3
                     and j, 90, what="the service running on the third provider")
        assert j["history"][1]["ended"] == "lost" and j["provider"] not in (peer(first), j["history"][1]["provider"])
        assert wait_for(log_lines, 30, what="the volume on the third provider") == "started\nstarted\n"
        consumer.cli("cancel", job_id)
        wait_job(consumer, job_id, ("cancelled",), 30)


def test_a_consumer_that_stops_renewing_has_its_service_stopped_at_the_end_of_the_paid_period(mesh):
    consumer, (prov,) = mesh
    job_id = submit(consumer, "--service", "--period", "2", "--runtime", "container", str(BUSYBOX_DIR),
                    "--", "sh", "-c", "while true; do sleep 1; done")
    wait_job(consumer, job_id, ("running",), 60)
    paid = prov.get(f"/v1/jobs/{job_id}")["service"]
    consumer.signal(19)  # SIGSTOP: the consumer renews nothing more
    try:
        t = wait_for(lambda: (t := prov.get(f"/v1/jobs/{job_id}"))["state"] != "running" and t, 30,
                     what="the provider stopping the unpaid service")
    finally:
        consumer.signal(18)
    assert "service stopped" in prov.log() and "not_renewed" in prov.log()
    assert t["service"]["stopped"] == "not_renewed" and t["service"]["paid_periods"] <= paid["paid_periods"] + 1
    # Woken, the consumer hears the end (or finds its lease lost and places it again): clean up.
    consumer.cli("cancel", job_id, check=False)
    wait_job(consumer, job_id, ("cancelled", "failed"), 60)


def test_a_service_over_its_volume_quota_is_stopped_and_says_why(mesh):
    consumer, (prov,) = mesh
    job_id = submit(consumer, "--service", "--volume", "big:/big", "--runtime", "container", str(BUSYBOX_DIR),
                    "--", "sh", "-c", "dd if=/dev/zero of=/big/fill bs=1024 count=2000; while true; do sleep 1; done")
    j = wait_job(consumer, job_id, ("cancelled", "failed"), 60)
    assert "volume quota exceeded" in (j["error"] or "")
    assert prov.get(f"/v1/jobs/{job_id}")["service"]["stopped"] == "volume_quota"


@pytest.mark.slow
def test_a_microvm_service_is_billed_per_period_and_restarted_by_its_health_command(mesh):
    from jobs_helpers import BUSYBOX_TAR
    consumer, (prov,) = mesh
    job_id = submit(consumer, "--service", "--period", "3", "--health-cmd", "test -f /tmp/ok",
                    "--health-interval", "1", "--health-retries", "2", "--runtime", "microvm", str(BUSYBOX_TAR),
                    "--", "sh", "-c", "touch /tmp/ok; sleep 8; rm /tmp/ok; while true; do sleep 1; done")
    j = wait_job(consumer, job_id, ("running",), 120)
    aid = bytes.fromhex(j["history"][0]["agreement"])
    periods = {period_aid(aid, k).hex() for k in range(50)}
    wait_for(lambda: receipts(consumer, periods), 60, what="a period receipt of the microVM service")
    j = wait_for(lambda: (j := job(consumer, job_id))["service"]["restarts"] >= 1 and j, 120,
                 what="a restart of the microVM after its health command failed")
    assert j["state"] == "running" and len(j["history"]) == 1
    consumer.cli("cancel", job_id)
    wait_job(consumer, job_id, ("cancelled",), 60)


def test_a_consumer_back_from_a_restart_goes_on_renewing_its_service(cluster_mesh):
    # (last in the module: the consumer daemon is replaced)
    cluster, (consumer, (prov,)) = cluster_mesh
    job_id = submit(consumer, "--service", "--period", "6", "--runtime", "container", str(BUSYBOX_DIR),
                    "--", "sh", "-c", "while true; do sleep 1; done")
    wait_job(consumer, job_id, ("running",), 60)

    def paid() -> int:
        return prov.get(f"/v1/jobs/{job_id}")["service"]["paid_periods"]
    first = paid()
    wait_for(lambda: paid() > first, 30, what="a renewal")  # just renewed: 1.5 periods paid ahead
    consumer.kill()  # SIGKILL: nothing graceful
    consumer = cluster.start("consumer")
    before = paid()
    j = wait_for(lambda: paid() > before and job(consumer, job_id), 60, what="a renewal after the restart")
    assert j["state"] == "running" and len(j["history"]) == 1  # re-attached, not re-placed
    assert prov.get(f"/v1/jobs/{job_id}")["state"] == "running"
    consumer.cli("cancel", job_id)
    wait_job(consumer, job_id, ("cancelled",), 30)
