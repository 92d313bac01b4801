"""Priorities on real daemons: a full provider running a preemptible batch task
takes a high-priority job; the batch task is handed back through the normal
migration path, moves to another provider, and both complete with their whole
output."""

from __future__ import annotations

from daemons import DaemonCluster, wait_for
from jobs_helpers import (COUNTER_WASM, asks_at, ensure_assets, job, output, providers_in_book, reference_run,
                          start_mesh, submit, wait_job)

ENV = ["-e", "COUNT=120", "-e", "WORK=30000000"]  # ~6 s of CPU: still running when the high job comes


def _peer(d) -> str:
    return d.status()["peer_id"]


def test_a_high_priority_job_displaces_a_preemptible_batch_task_which_migrates(tmp_path):
    ensure_assets()
    ref = reference_run(*ENV, str(COUNTER_WASM))
    with DaemonCluster(tmp_path) as cluster:
        consumer, (busy, spare) = start_mesh(cluster, 2, jobs_config="[jobs]\nplacement_timeout_s = 60\n")
        spare.post("/v1/pause")
        wait_for(lambda: providers_in_book(consumer) == {_peer(busy)}, 30, what="only the busy provider")
        # One task takes the whole ask: the provider is full while it runs.
        cores = next(a["cores"] for a in asks_at(consumer) if a["peer"] == _peer(busy))
        size = ["--cpus", str(cores), "--memory", "64M"]
        batch = submit(consumer, "--priority", "batch", "--preemptible", *size, *ENV, str(COUNTER_WASM))
        assert wait_job(consumer, batch, states=("running",), timeout=60)["provider"] == _peer(busy)
        wait_for(lambda: "step 3 " in output(consumer, batch), 60, what="the batch task under way")
        high = submit(consumer, "--priority", "high", *size, *ENV, str(COUNTER_WASM))
        j = wait_job(consumer, high, states=("running", "succeeded"), timeout=60)
        assert j["provider"] == _peer(busy) and j["priority"] == "high"
        first = wait_for(lambda: (h := job(consumer, batch)["history"][0]).get("end") and h, 60,
                         what="the batch task handed back")
        assert first["ended"] == "preempted" and "high-priority" in first["preempt_reason"]
        spare.post("/v1/resume")
        done_batch = wait_job(consumer, batch, timeout=180)
        done_high = wait_job(consumer, high, timeout=180)
        assert done_batch["exit_code"] == done_high["exit_code"] == ref.returncode  # ran to their end
        assert len(done_high["history"]) == 1  # the high-priority job was never moved
        assert done_batch["history"][-1]["provider"] == _peer(spare)
        assert output(consumer, batch) == ref.stdout == output(consumer, high)  # nothing lost, nothing twice
