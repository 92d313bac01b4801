"""Preemption and migration with real daemons: a paused or killed provider
never loses a task, and its output continues without a repeated or lost line."""

from __future__ import annotations

import pytest

from daemons import DaemonCluster, wait_for
from jobs_helpers import (BUSYBOX_TAR, CONSUMER_ONLY, COUNTER_WASM, ensure_assets, job, output,
                          providers_in_book, reference_run, start_mesh, submit, wait_job)

ENV = ["-e", "COUNT=80", "-e", "WORK=30000000"]
FAST_CHECKPOINTS = "[jobs]\ncheckpoint_interval_s = 0.5\nlease_timeout_s = 3.0\n"


@pytest.fixture(scope="module")
def reference():
    ensure_assets()
    ref = reference_run(*ENV, str(COUNTER_WASM))
    assert ref.stdout.count("\n") == 81
    return ref


def peer(d) -> str:
    return d.status()["peer_id"]


def place_on_first(consumer, provs, *args: str) -> tuple[str, object, list]:
    """Submit with only provs[0] in the book, then let the others back in."""
    for p in provs[1:]:
        p.post("/v1/pause")
    wait_for(lambda: providers_in_book(consumer) == {peer(provs[0])}, 30, what="only the first provider")
    job_id = submit(consumer, *args)
    j = wait_job(consumer, job_id, states=("running",), timeout=60)
    assert j["provider"] == peer(provs[0])
    for p in provs[1:]:
        p.post("/v1/resume")
    wait_for(lambda: providers_in_book(consumer) >= {peer(p) for p in provs}, 30, what="all providers back")
    return job_id, provs[0], provs[1:]


def test_pause_moves_a_running_task_with_its_state(tmp_path, reference):
    with DaemonCluster(tmp_path) as cluster:
        consumer, provs = start_mesh(cluster, 2)
        job_id, first, others = place_on_first(consumer, provs, *ENV, str(COUNTER_WASM))
        wait_for(lambda: "step 10 " in output(consumer, job_id), 60, what="some progress")
        assert first.post("/v1/pause")["tasks_handed_back"] == 1
        j = wait_job(consumer, job_id, timeout=120)
        assert output(consumer, job_id) == reference.stdout  # counter continued, no line twice
        assert j["exit_code"] == reference.returncode
        first_leg, second_leg = j["history"]
        assert first_leg["provider"] == peer(first) and first_leg["ended"] == "preempted"
        assert first_leg["decision"] == "full"
        assert second_leg["provider"] == peer(others[0]) and second_leg["from"] == peer(first)
        assert second_leg["mode"] == "full" and second_leg["checkpoint_bytes"] > 0
        # The old provider sent the checkpoint straight to the new one (one hop).
        assert second_leg["checkpoint_route"] == "direct"
        assert "checkpoint pushed to the next provider" in first.log()


def test_sigkill_of_the_provider_restarts_from_the_last_checkpoint(tmp_path, reference):
    with DaemonCluster(tmp_path) as cluster:
        consumer, provs = start_mesh(cluster, 2, consumer_config=CONSUMER_ONLY + FAST_CHECKPOINTS)
        job_id, first, others = place_on_first(consumer, provs, *ENV, str(COUNTER_WASM))
        wait_for(lambda: (job(consumer, job_id).get("checkpoint") or {}).get("bytes"), 60,
                 what="a periodic checkpoint at the consumer")
        first.kill()
        j = wait_job(consumer, job_id, timeout=120)
        assert output(consumer, job_id) == reference.stdout
        assert j["exit_code"] == reference.returncode
        lost, resumed = j["history"]
        assert lost["ended"] == "lost" and resumed["provider"] == peer(others[0])
        assert resumed["mode"] == "restart-from-checkpoint" and resumed["checkpoint_bytes"] > 0


def test_corrupted_checkpoint_is_refused_and_the_task_restarts_cleanly(tmp_path, reference):
    with DaemonCluster(tmp_path) as cluster:
        consumer, provs = start_mesh(cluster, 2, consumer_config=CONSUMER_ONLY + FAST_CHECKPOINTS)
        job_id, first, others = place_on_first(consumer, provs, *ENV, str(COUNTER_WASM))
        wait_for(lambda: job(consumer, job_id).get("checkpoint"), 60, what="a checkpoint")
        # Corrupt every checkpoint file the consumer holds, then lose the provider.
        first.signal(19)  # SIGSTOP: no new checkpoint can replace the corrupted one
        for f in (consumer.home / "checkpoints").glob(f"{job_id}-*.tar"):
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        j = wait_job(consumer, job_id, timeout=120)
        assert output(consumer, job_id) == reference.stdout  # restarted from scratch, deduplicated
        assert j["exit_code"] == reference.returncode
        assert j["history"][-1]["mode"] == "restart"
        assert "corrupted" in consumer.log()
        first.signal(18)


@pytest.mark.slow
def test_ten_tasks_of_a_paused_provider_are_reassigned_together(tmp_path):
    ensure_assets()
    env = ["-e", "COUNT=40", "-e", "WORK=60000000"]
    ref = reference_run(*env, str(COUNTER_WASM))
    small = "[contributor]\ncpu_share = 0.2\n"  # 0.4 cores: four 0.1-core tasks each
    with DaemonCluster(tmp_path) as cluster:
        consumer = cluster.start("consumer", config=CONSUMER_ONLY)
        boot = consumer.p2p_addrs()
        big = cluster.start("big", bootstrap=boot)
        smalls = [cluster.start(f"s{i}", bootstrap=boot, config=small) for i in range(3)]
        for s in smalls:
            s.post("/v1/pause")
        wait_for(lambda: providers_in_book(consumer) == {peer(big)}, 40, what="only the big provider")
        ids = [submit(consumer, "--cpus", "0.1", "--memory", "64M", *env, str(COUNTER_WASM))
               for _ in range(10)]
        for i in ids:
            assert wait_job(consumer, i, states=("running",), timeout=60)["provider"] == peer(big)
        for s in smalls:
            s.post("/v1/resume")
        wait_for(lambda: providers_in_book(consumer) >= {peer(s) for s in smalls}, 40,
                 what="the small providers' asks")
        assert big.post("/v1/pause")["tasks_handed_back"] == 10
        finals = [wait_job(consumer, i, timeout=300) for i in ids]
        assert all(output(consumer, i) == ref.stdout for i in ids)
        assert all(f["exit_code"] == ref.returncode for f in finals)
        new_homes = [f["history"][-1]["provider"] for f in finals]
        assert set(new_homes) == {peer(s) for s in smalls}  # no small one can hold more than four
        assert max(new_homes.count(peer(s)) for s in smalls) <= 4
        legs = [f["history"][-1] for f in finals]
        assert all(leg["assignment"]["method"] == "kuhn-munkres" for leg in legs)
        assert max(leg["assignment"]["batch"] for leg in legs) >= 2


SEQUENCE = "i=0; while [ $i -lt 120 ]; do echo $i; i=$((i+1)); sleep 0.05; done"


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["container", "microvm"])
def test_pause_migrates_runsc_containers_and_microvms(tmp_path, runtime):
    """runsc (gVisor) and QEMU checkpoints carry a running shell loop to another provider."""
    ensure_assets()
    with DaemonCluster(tmp_path) as cluster:
        consumer, provs = start_mesh(cluster, 2)
        job_id, first, others = place_on_first(
            consumer, provs, "--runtime", runtime, "--checkpointable", "--memory", "128M",
            str(BUSYBOX_TAR), "--", "sh", "-c", SEQUENCE)
        wait_for(lambda: "\n10\n" in output(consumer, job_id), 120, what="the loop under way")
        assert first.post("/v1/pause")["tasks_handed_back"] == 1
        j = wait_job(consumer, job_id, timeout=180)
        assert j["state"] == "succeeded", j
        assert output(consumer, job_id) == "".join(f"{i}\n" for i in range(120))
        first_leg, second_leg = j["history"]
        assert first_leg["ended"] == "preempted" and second_leg["mode"] == "full"
        assert second_leg["provider"] == peer(others[0]) and second_leg["checkpoint_bytes"] > 0


@pytest.mark.parametrize("source", ["sigterm", "notice_file", "notice_api"])
def test_other_preemption_sources_hand_the_task_back(tmp_path, reference, source):
    """Daemon shutdown and an external (spot-style) notice move the task like a pause does."""
    import json
    import signal
    with DaemonCluster(tmp_path) as cluster:
        consumer, provs = start_mesh(cluster, 2)
        job_id, first, others = place_on_first(consumer, provs, *ENV, str(COUNTER_WASM))
        wait_for(lambda: "step 10 " in output(consumer, job_id), 60, what="some progress")
        if source == "sigterm":
            first.signal(signal.SIGTERM)
        elif source == "notice_file":
            (first.home / "preempt-notice").write_text(json.dumps({"grace_s": 20, "reason": "spot"}))
        else:
            assert first.post("/v1/preempt", {"grace_s": 20, "reason": "spot"})["tasks_notified"] == 1
        j = wait_job(consumer, job_id, timeout=120)
        assert output(consumer, job_id) == reference.stdout
        first_leg, second_leg = j["history"]
        assert first_leg["ended"] == "preempted" and second_leg["mode"] == "full"
        assert second_leg["provider"] == peer(others[0])
        if source == "sigterm":
            assert first.proc.wait(30) == 0  # a graceful stop, after handing the task back
        else:
            assert first_leg["preempt_reason"] == "spot"


def test_contributor_limits_turning_false_hand_the_task_back(tmp_path, reference):
    """The owner narrows the allowed hours live (dashboard, tray, `synord limits --set`):
    work outside them is handed back, and the change survives a restart."""
    import json
    import time as _time
    hour = _time.localtime().tm_hour
    not_now = f"{(hour + 1) % 24:02d}-{(hour + 2) % 24:02d}"
    with DaemonCluster(tmp_path) as cluster:
        consumer, provs = start_mesh(cluster, 2)
        job_id, first, others = place_on_first(consumer, provs, *ENV, str(COUNTER_WASM))
        wait_for(lambda: "step 10 " in output(consumer, job_id), 60, what="some progress")
        bad = first.cli("limits", "--set", "cpu_shar=0.5", check=False)
        assert bad.returncode == 1 and "unknown limit" in bad.stderr
        res = json.loads(first.cli("limits", "--json", "--set", f"allowed_hours={not_now}").stdout)
        assert res["allowed"] is False and "outside allowed hours" in res["why_not"]
        j = wait_job(consumer, job_id, timeout=120)
        assert output(consumer, job_id) == reference.stdout
        first_leg, second_leg = j["history"]
        assert "outside allowed hours" in first_leg["preempt_reason"]
        assert second_leg["provider"] == peer(others[0]) and second_leg["mode"] == "full"
        assert peer(first) not in providers_in_book(consumer)  # no asks while not allowed
        first.stop()
        first = cluster.start("p0")
        assert json.loads(first.cli("limits", "--json").stdout)["limits"]["allowed_hours"] == not_now
