"""Progress and notices (issue 19): a job says what it is doing while it is not
yet running (placing, uploading, the provider's unpack/boot) and when it moves;
`synord run` prints it on stderr, each notice once."""

from __future__ import annotations

import re
import subprocess

import pytest

from adversarial.test_storage import padded_wasm
from daemons import ROOT, SYNORD, DaemonCluster, wait_for
from jobs_helpers import (BUSYBOX_TAR, COUNTER_WASM, ensure_assets, job, output, providers_in_book,
                          start_mesh)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    ensure_assets()
    with DaemonCluster(tmp_path_factory.mktemp("progress")) as cluster:
        yield start_mesh(cluster, 1)


def notices(stderr: str) -> list[str]:
    return [line[len("synord: "):] for line in stderr.splitlines() if line.startswith("synord: ")]


def in_order(lines: list[str], expected: list[str]) -> bool:
    """Each expected text starts exactly one line, in this order."""
    at = []
    for text in expected:
        hits = [i for i, line in enumerate(lines) if line.startswith(text)]
        if len(hits) != 1:
            return False
        at.append(hits[0])
    return at == sorted(at)


def run_job(d, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    res = d.cli("run", *args, check=False)
    job_id = re.search(r"job (\w+) submitted", res.stderr).group(1)
    return res, job(d, job_id)


def test_an_upload_and_a_start_are_told_in_the_job_and_on_run_stderr(mesh, tmp_path):
    consumer, (provider,) = mesh
    big = padded_wasm(tmp_path / "big.wasm", 6 << 20, "progress")
    size = big.stat().st_size
    res, j = run_job(consumer, str(big), "--", "hello")
    assert res.returncode == 0, res.stderr
    assert j["state"] == "succeeded" and j["progress"] is None  # terminal: the state says it
    ups = [e for e in j["events"] if e.get("phase") == "uploading"]
    assert [e["what"] for e in ups] == ["artifact", "artifact"]  # begun, then done: once each
    assert all(e["total"] == size for e in ups) and ups[-1]["sent"] == size
    assert [e["n"] for e in j["events"]] == list(range(1, len(j["events"]) + 1))
    who = "…" + provider.status()["peer_id"][-6:]
    # Piped stderr: plain lines, one per notice, no bar, nothing repeated.
    assert "\r" not in res.stderr
    lines = notices(res.stderr)
    assert in_order(lines, [f"uploading the artifact (6.0 MiB) to {who}",
                            "artifact sent in", f"starting on {who}", f"{who}: compiling",
                            f"{who}: starting", f"running on {who}"]), res.stderr
    assert len(lines) == len(set(lines)), res.stderr


@pytest.mark.parametrize("runtime, steps", [("container", ["verifying", "unpacking", "starting"]),
                                            ("microvm", ["verifying", "unpacking", "booting"])])
def test_an_image_start_reports_its_unpacking_and_boot(mesh, runtime, steps):
    consumer, _ = mesh
    res, j = run_job(consumer, "--runtime", runtime, str(BUSYBOX_TAR), "--", "true")
    assert res.returncode == 0, res.stderr
    told = [e["phase"] for e in j["events"] if e["text"].startswith("…")]  # the provider's own
    assert told == steps, j["events"]
    assert [line.rsplit(": ", 1)[1] for line in notices(res.stderr) if line.startswith("…")] == steps


def test_a_migration_is_told_in_the_job_and_on_run_stderr(tmp_path):
    ensure_assets()
    with DaemonCluster(tmp_path) as cluster:
        consumer, (first, second) = start_mesh(cluster, 2)
        ids = [p.status()["peer_id"] for p in (first, second)]
        second.post("/v1/pause")
        wait_for(lambda: providers_in_book(consumer) == {ids[0]}, 30, what="only the first provider")
        run = subprocess.Popen([*SYNORD, "--home", str(consumer.home), "run", "-e", "COUNT=60",
                                "-e", "WORK=30000000", str(COUNTER_WASM)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            job_id = wait_for(lambda: next((j["id"] for j in consumer.get("/v1/jobs")
                                            if j["state"] == "running"), None), 60, what="the job running")
            second.post("/v1/resume")
            wait_for(lambda: providers_in_book(consumer) >= set(ids), 30, what="both providers")
            wait_for(lambda: "step 5 " in output(consumer, job_id), 60, what="some steps")
            assert first.post("/v1/pause")["tasks_handed_back"] == 1
            out, err = run.communicate(timeout=120)
        finally:
            if run.poll() is None:
                run.kill()
        j = job(consumer, job_id)
        assert j["exit_code"] is not None and run.returncode == j["exit_code"], err  # the counter's own code
        assert out.count("\n") == 61, out  # every step once, across the move
        texts = [e["text"] for e in j["events"]]
        preempted = f"provider …{ids[0][-6:]} preempted (paused"
        assert any(t.startswith(preempted) for t in texts), texts
        moving = [t for t in texts if re.fullmatch(r"moving with a [\d.]+ (KiB|MiB|B) checkpoint.*", t)]
        assert moving, texts
        assert f"resumed on …{ids[1][-6:]} from a" in " ".join(texts), texts
        assert in_order(notices(err), [preempted, moving[0], f"resumed on …{ids[1][-6:]}"]), err


async def test_a_hostile_providers_progress_frames_are_checked_and_counted(cluster):
    """Garbage progress frames are refused and counted; the start goes on, the job
    succeeds, and nothing of the garbage reaches the notices."""
    from adversarial.hostile import refusals
    from adversarial.test_output import _exit, _run_against
    asked = []
    garbage = [{"phase": "x" * 10_000}, {"phase": "\x1b[2J"}, "unpacking", [1, 2],
               {"phase": "booting", "done": 5, "total": 1}, {"phase": "booting", "done": -1},
               {"phase": "booting", "total": True}, {"phase": "booting", "extra": 1}]

    async def noisy(stream, env):
        asked.append(env.body.get("progress"))
        for frame in garbage:
            await stream.send({"progress": frame})
        await stream.send({"progress": {"phase": "unpacking", "done": 1, "total": 2}})
        await stream.send({"started": True})
        await stream.send({"o": "stdout", "off": 0, "d": b"fine\n"})
        await stream.send(_exit(5))

    j, out, consumer = await _run_against(cluster, noisy)
    assert asked == [True]  # the consumer asked for progress frames (task.start, WIRE §13)
    assert j["state"] == "succeeded", j
    assert out == b"fine\n"
    assert refusals(consumer).get(("task_output", "bad_progress_frame"), 0) == len(garbage)
    assert [e["phase"] for e in j["events"]].count("unpacking") == 1
    assert not any("\x1b" in e["text"] or "xxxx" in e["text"] for e in j["events"])


def test_a_progress_frame_has_one_shape():
    from synord.protocols.tasks import TaskSpecError, check_progress
    assert check_progress({"phase": "booting"}) == {"phase": "booting", "done": None, "total": None}
    assert check_progress({"phase": "unpacking", "done": 0, "total": 0})["total"] == 0
    for bad in (None, [], {"phase": "Booting"}, {"phase": "booting", "done": 2, "total": 1},
                {"phase": "booting", "done": 1 << 45}, {"phase": "booting", "done": 1.5},
                {"phase": "booting", "why": "x"}):
        with pytest.raises(TaskSpecError):
            check_progress(bad)


def test_run_on_a_terminal_redraws_one_bar_line_and_clears_it_when_the_task_runs():
    import os
    import select
    from synord.run_progress import RunProgress
    master, slave = os.openpty()  # a real terminal: `run` draws a bar only on one
    try:
        tty = os.fdopen(slave, "w")
        view = RunProgress(None, "j", stream=tty)
        up = {"n": 1, "t": 0, "text": "uploading the artifact (8.0 MiB) to …abc"}
        for done in (0, 4 << 20, 4 << 20, 8 << 20):  # a poll with no news draws nothing
            view.show({"state": "negotiating", "events": [up],
                       "progress": {"phase": "uploading", "done": done, "total": 8 << 20}})
        view.show({"state": "running", "events": [up, {"n": 2, "t": 1, "text": "running on …abc"}],
                   "progress": {"phase": "running", "done": None, "total": None}})
        screen = b""
        while select.select([master], [], [], 0.5)[0]:  # all that reached the terminal
            screen += os.read(master, 65536)
        screen = screen.decode()
    finally:
        tty.close()
        os.close(master)
    assert screen.count("synord: uploading the artifact") == 1  # each notice once
    assert screen.count("\r\x1b[Ksynord: uploading [") == 3  # the bar, redrawn in place as it changes
    assert "4.0 MiB / 8.0 MiB" in screen and "[" + "#" * 30 + "]" in screen
    assert screen.endswith("synord: running on …abc\r\n")  # bar cleared before the line, none after
