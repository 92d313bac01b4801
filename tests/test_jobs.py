"""Jobs across the mesh with real daemons: each sandbox end to end, bad
artefacts refused before anything is reserved, cancel, consumer restart,
many jobs at once."""

from __future__ import annotations

import json
import shutil

import pytest

from daemons import wait_for
from jobs_helpers import (BUSYBOX_DIR, BUSYBOX_TAR, COUNTER_WASM, PROBE_WASM, ensure_assets,
                          job, output, reference_run, start_mesh, submit, wait_job)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from daemons import DaemonCluster
    ensure_assets()
    with DaemonCluster(tmp_path_factory.mktemp("jobs")) as cluster:
        consumer, provs = start_mesh(cluster, 2)
        yield consumer, provs


def provider_ids(provs) -> set[str]:
    return {p.status()["peer_id"] for p in provs}


def test_wasm_task_end_to_end_with_receipts(mesh):
    consumer, provs = mesh
    res = consumer.cli("run", str(PROBE_WASM), "--", "hello")
    assert res.stdout == "hello, wasm\n"
    jobs = consumer.get("/v1/jobs")
    j = next(j for j in jobs if j.get("artifact") == str(PROBE_WASM))
    assert j["state"] == "succeeded" and j["exit_code"] == 0
    assert j["provider"] in provider_ids(provs)
    assert len(j["history"]) == 1 and j["history"][0]["mode"] == "initial"
    # Both sides keep the same doubly-signed receipt.
    provider = next(p for p in provs if p.status()["peer_id"] == j["provider"])
    aid = j["history"][0]["agreement"]

    def receipt(d):
        return next((r for r in d.get("/v1/ledger")["receipts"] if r["agreement_id"] == aid), None)
    mine = wait_for(lambda: receipt(consumer), 20, what="consumer receipt")
    theirs = wait_for(lambda: receipt(provider), 20, what="provider receipt")
    assert mine["provider_sig"] == theirs["provider_sig"] and mine["consumer_sig"] == theirs["consumer_sig"]
    assert mine["outcome"] == "completed" and mine["amount"] > 0
    trade = consumer.get("/v1/book")["classes"]["cpu"]["last_trade"]
    assert trade is not None and trade["price"] > 0


def test_exit_code_and_stderr_pass_through(mesh):
    consumer, _ = mesh
    res = consumer.cli("run", "--runtime", "container", str(BUSYBOX_DIR), "--",
                       "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert res.returncode == 3
    assert res.stdout == "out\n"
    assert "err\n" in res.stderr


def test_container_task_has_no_network(mesh):
    consumer, _ = mesh
    res = consumer.cli("run", "--runtime", "container", str(BUSYBOX_TAR), "--",
                       "sh", "-c", "ls /sys/class/net", check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["lo"]


@pytest.mark.slow
def test_microvm_task_end_to_end(mesh):
    consumer, _ = mesh
    res = consumer.cli("run", "--runtime", "microvm", str(BUSYBOX_TAR), "--",
                       "sh", "-c", "echo from the vm; uname -s", check=False, timeout=180)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["from the vm", "Linux"]


@pytest.mark.parametrize("kind", ["not_wasm", "hash_mismatch", "broken_image"])
def test_bad_artefact_refused_before_anything_is_reserved(mesh, tmp_path, kind):
    consumer, provs = mesh
    agreements = [p.get("/v1/book")["agreements"] for p in provs]
    jobs_before = len(consumer.get("/v1/jobs"))
    if kind == "not_wasm":
        art = tmp_path / "fake.wasm"
        art.write_bytes(b"#!/bin/sh\necho not wasm\n")
        args, expected = [str(art)], "not a WebAssembly module"
    elif kind == "hash_mismatch":
        img = tmp_path / "img"
        shutil.copytree(BUSYBOX_DIR, img)
        blob = max((img / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF  # a layer whose bytes no longer match its digest
        blob.write_bytes(bytes(data))
        args, expected = ["--runtime", "container", str(img)], "does not match its digest"
    else:
        img = tmp_path / "img"
        shutil.copytree(BUSYBOX_DIR, img)
        (img / "index.json").write_text("{not json")
        args, expected = ["--runtime", "container", str(img)], "index.json"
    res = consumer.cli("run", *args, check=False)
    assert res.returncode != 0
    assert "bad task" in res.stderr and expected in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert len(consumer.get("/v1/jobs")) == jobs_before
    assert [p.get("/v1/book")["agreements"] for p in provs] == agreements


def test_cancel_stops_the_task_on_the_provider(mesh):
    consumer, provs = mesh
    job_id = submit(consumer, "-e", "COUNT=100000", "-e", "WORK=200000", str(COUNTER_WASM))
    j = wait_job(consumer, job_id, states=("running",), timeout=60)
    provider = next(p for p in provs if p.status()["peer_id"] == j["provider"])
    wait_for(lambda: "step 3 " in output(consumer, job_id), 60, what="some output")
    res = consumer.cli("cancel", job_id, "--json")
    assert json.loads(res.stdout)["state"] == "cancelled"

    def provider_task():
        return next(t for t in provider.get("/v1/jobs") if t["id"] == job_id and t.get("role") == "provider")
    wait_for(lambda: provider_task()["state"] == "ended", 20, what="the provider's task to end")


def test_consumer_restart_mid_job_picks_it_up(tmp_path):
    from daemons import DaemonCluster
    ensure_assets()
    env = ["-e", "COUNT=60", "-e", "WORK=6000000"]
    ref = reference_run(*env, str(COUNTER_WASM))
    with DaemonCluster(tmp_path) as cluster:
        consumer, provs = start_mesh(cluster, 1)
        job_id = submit(consumer, *env, str(COUNTER_WASM))
        wait_for(lambda: "step 5 " in output(consumer, job_id), 60, what="some output")
        consumer.kill()  # SIGKILL: nothing graceful
        consumer = cluster.start("consumer")
        j = wait_job(consumer, job_id, timeout=180)
        assert j["exit_code"] == ref.returncode, (j, consumer.log()[-3000:])
        assert output(consumer, job_id) == ref.stdout  # every line exactly once
        assert len(j["history"]) == 1  # re-attached, not re-placed
        # The agreement was made before the restart; its receipt is still countersigned.
        aid = j["history"][0]["agreement"]

        def settled(node) -> bool:
            return any(r["agreement_id"] == aid for r in node.get("/v1/ledger")["receipts"])
        wait_for(lambda: settled(consumer) and settled(provs[0]), 60, what="the receipt in both ledgers")


@pytest.mark.slow
def test_a_receipt_outlives_both_daemons_restarting(tmp_path):
    """The consumer is down when the task ends, then the provider restarts too:
    the provider kept the unacknowledged receipt in its store and resends it;
    the restarted consumer countersigns it from the terms in its own store."""
    from daemons import DaemonCluster
    ensure_assets()
    with DaemonCluster(tmp_path) as cluster:
        consumer, (prov,) = start_mesh(cluster, 1)
        job_id = submit(consumer, "-e", "COUNT=60", "-e", "WORK=6000000", str(COUNTER_WASM))
        wait_for(lambda: "step 2 " in output(consumer, job_id), 60, what="some output")
        aid = job(consumer, job_id)["history"][0]["agreement"]
        consumer.kill()

        def ended() -> bool:
            return any(j["id"] == job_id and j["state"] == "ended" for j in prov.get("/v1/jobs"))
        wait_for(ended, 90, what="the task to end on the provider")

        def settled(node) -> bool:
            return any(r["agreement_id"] == aid for r in node.get("/v1/ledger")["receipts"])
        assert not settled(prov)  # nobody to countersign it
        assert prov.stop() == 0
        consumer = cluster.start("consumer")
        prov = cluster.start("p0", bootstrap=consumer.p2p_addrs())
        wait_for(lambda: settled(consumer) and settled(prov), 90, what="the receipt in both ledgers")


def test_twenty_jobs_at_once_across_two_providers(mesh):
    consumer, provs = mesh
    ids = [submit(consumer, str(PROBE_WASM), "--", "hello") for _ in range(20)]
    finals = [wait_job(consumer, i, timeout=180) for i in ids]
    assert [f["state"] for f in finals] == ["succeeded"] * 20
    assert all(output(consumer, i) == "hello, wasm\n" for i in ids)
    assert {f["provider"] for f in finals} <= provider_ids(provs)
