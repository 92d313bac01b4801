"""Sharded jobs: split/gather without sockets (including hostile inputs), and on
real daemons: three shards on three providers, one provider SIGKILLed mid-run,
its shard re-placed, the others not rerun, the output identical to one task
on the whole input."""

from __future__ import annotations

import json
import os

import pytest

from daemons import DaemonCluster, wait_for
from jobs_helpers import BUSYBOX_DIR, ensure_assets, job, output, start_mesh, wait_job
from synord.jobs import shards as sh
from synord.protocols.tasks import TaskSpecError, check_start

INPUT = "".join(f"line {i} of the input, mixed Case {i * 7}\n" for i in range(30)).encode()


# ---- split and gather, pure ----------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 7, 30])
def test_lines_split_into_contiguous_whole_lines_that_concatenate_to_the_input(n):
    parts = sh.split_lines(INPUT, n)
    assert len(parts) == n and b"".join(parts) == INPUT
    assert all(p.endswith(b"\n") for p in parts)
    counts = [p.count(b"\n") for p in parts]
    assert max(counts) - min(counts) <= 1


def test_a_last_line_without_newline_stays_whole():
    assert sh.split_lines(b"a\nb\nc", 2) == [b"a\n", b"b\nc"]


def test_bytes_split_into_ranges_that_concatenate_to_the_input():
    data = bytes(range(256)) * 3 + b"x"
    parts = sh.split_bytes(data, 5)
    assert b"".join(parts) == data and max(map(len, parts)) - min(map(len, parts)) <= 1


def test_files_split_takes_regular_files_in_name_order(tmp_path):
    for name, body in [("b", b"2\n"), ("a", b"1\n"), ("d", b"4\n"), ("c", b"3\n")]:
        (tmp_path / name).write_bytes(body)
    (tmp_path / "sub").mkdir()
    (tmp_path / "z-link").symlink_to(tmp_path / "a")
    parts = sh.split(tmp_path, 2, "files")
    assert parts == [b"1\n2\n", b"3\n4\n"]


@pytest.mark.parametrize("n, how, gather, msg", [
    (0, "lines", "concat", "from 1 to"),
    (10 ** 9, "lines", "concat", "from 1 to"),
    (True, "lines", "concat", "integer"),
    ("3", "lines", "concat", "integer"),
    (2, "words", "concat", "--split must be"),
    (2, "lines", "zip", "--gather must be"),
])
def test_bad_requests_are_one_line_errors(n, how, gather, msg):
    with pytest.raises(sh.ShardError, match=msg) as exc:
        sh.check_request(n, how, gather)
    assert "\n" not in str(exc.value)


def test_hostile_inputs_are_refused_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    three = tmp_path / "three"
    three.write_bytes(b"a\nb\nc\n")
    (tmp_path / "dir").mkdir()
    cases = [(empty, 1, "lines", "empty"), (empty, 2, "bytes", "empty"),
             (three, 4, "lines", "only 3 line"), (three, 7, "bytes", "only 6 byte"),
             (tmp_path / "dir", 1, "files", "only 0 file"), (three, 1, "files", "needs a directory"),
             (tmp_path / "dir", 1, "lines", "needs a file"), (tmp_path / "missing", 1, "bytes", "needs a file")]
    for path, n, how, msg in cases:
        with pytest.raises(sh.ShardError, match=msg) as exc:
            sh.split(path, n, how)
        assert "\n" not in str(exc.value)


def test_a_shard_over_the_stdin_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sh, "MAX_STDIN_BYTES", 10)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 30)
    with pytest.raises(sh.ShardError, match="use more shards"):
        sh.split(big, 2, "bytes")
    assert len(sh.split(big, 3, "bytes")) == 3


def test_concat_gathers_stdout_in_shard_order_then_stderr():
    outputs = [[("stdout", b"a1"), ("stderr", b"e0"), ("stdout", b"a2")], [("stdout", b"b")], []]
    assert sh.gather_concat(outputs) == [("stdout", b"a1"), ("stdout", b"a2"), ("stdout", b"b"),
                                         ("stderr", b"e0")]


def test_dir_gathers_one_file_per_shard(tmp_path):
    outputs = [[("stdout", b"zero\n"), ("stderr", b"warn\n")], [("stdout", b"one\n")], []]
    rest = sh.gather_dir(outputs, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["shard-0000", "shard-0001", "shard-0002"]
    assert (tmp_path / "out" / "shard-0001").read_bytes() == b"one\n"
    assert (tmp_path / "out" / "shard-0002").read_bytes() == b""
    assert rest == [("stderr", b"warn\n")]


def test_the_parent_retries_a_failed_shard_then_fails_and_gathers_once_all_succeeded():
    attempts = [["j-0"], ["j-1", "j-1r1"]]
    states = {"j-0": "running", "j-1": "failed", "j-1r1": "succeeded"}
    assert sh.next_step(attempts, states, "j-1", 1) == sh.IGNORE  # an older attempt
    assert sh.next_step(attempts, states, "j-1r1", 1) == sh.WAIT  # shard 0 still runs
    assert sh.next_step(attempts, {**states, "j-0": "succeeded"}, "j-0", 0) == sh.GATHER
    assert sh.next_step(attempts, {**states, "j-0": "failed"}, "j-0", 0) == sh.RETRY
    assert sh.next_step(attempts, {**states, "j-0": "cancelled"}, "j-0", 0, cancelled=True) == sh.FAIL
    out = [["j-0", "j-0r1", "j-0r2"], ["j-1"]]
    assert sh.next_step(out, {"j-0r2": "failed", "j-1": "succeeded"}, "j-0r2", 0) == sh.FAIL
    assert len(out[0]) == sh.MAX_ATTEMPTS


def test_task_start_refuses_a_malformed_stdin_digest():
    body = {"job_id": "j", "agreement_id": "0" * 32, "kind": "wasm", "artifact_sha256": "a" * 64}
    check_start({**body, "stdin_sha256": "b" * 64})
    for bad in ("../etc/passwd", "B" * 64, 7, ["x"]):
        with pytest.raises(TaskSpecError, match="stdin_sha256"):
            check_start({**body, "stdin_sha256": bad})


# ---- real daemons ----------------------------------------------------------------------------

TASK = ["--runtime", "container", "--cpus", "0.25", "--memory", "64M", str(BUSYBOX_DIR), "--",
        "sh", "-c", "sleep 10; tr a-z A-Z"]  # long enough to see all shards running, even on a busy machine
FAST_LEASE = "[jobs]\nlease_timeout_s = 3.0\n"


def _peer(d) -> str:
    return d.status()["peer_id"]


def _submit(consumer, *args: str) -> str:
    return json.loads(consumer.cli("run", "--detach", "--json", *args).stdout)["id"]


def test_a_killed_providers_shard_is_replaced_and_the_output_matches_one_task(tmp_path):
    ensure_assets()
    data = tmp_path / "input.txt"
    data.write_bytes(INPUT)
    with DaemonCluster(tmp_path) as cluster:
        consumer, provs = start_mesh(cluster, 3, jobs_config=FAST_LEASE)
        by_peer = {_peer(p): p for p in provs}
        parent = _submit(consumer, "--shards", "3", "--input", str(data), *TASK)
        j = wait_for(lambda: (j := job(consumer, parent))["shards"] and all(
            s["state"] == "running" for s in j["shards"]) and j, 60, what="three shards running")
        where = [s["provider"] for s in j["shards"]]
        assert len(set(where)) == 3  # assigned together, one per provider
        assert j["shards"][0]["attempts"][0]["assignment"]["method"] == "kuhn-munkres"
        victim = by_peer[where[1]]
        victim.kill()
        final = wait_job(consumer, parent, timeout=150)
        assert final["state"] == "succeeded", final
        assert output(consumer, parent) == INPUT.decode().upper()
        # Shard 1 moved off the killed provider; shards 0 and 2 ran exactly once, where they were.
        moved = final["shards"][1]["attempts"][0]["placements"]
        assert [p["provider"] for p in moved][0] == where[1] and moved[0]["ended"] == "lost"
        assert len(moved) == 2 and moved[1]["provider"] != where[1] and moved[1]["ended"] == "exit"
        for i in (0, 2):
            (only,) = final["shards"][i]["attempts"]
            assert [p["provider"] for p in only["placements"]] == [where[i]]
        # Every placement that ran to its end has its countersigned receipt, shown per shard.
        def receipts(i):
            return [r for a in job(consumer, parent)["shards"][i]["attempts"] for r in a["receipts"]]
        wait_for(lambda: all(len(receipts(i)) == 1 for i in range(3)), 60, what="a receipt per finished leg")
        assert all(receipts(i)[0]["outcome"] == "completed" for i in range(3))
        assert receipts(1)[0]["agreement_id"] == moved[1]["agreement"]
        text = consumer.cli("job", parent).stdout
        assert "shards     3 (split lines, gather concat)" in text and "PAID" in text and " CRD" in text
        # The same input as one task on one provider: byte for byte the same output.
        single = _submit(consumer, "--input", str(data), *TASK)
        assert wait_job(consumer, single, timeout=90)["state"] == "succeeded"
        assert output(consumer, single) == output(consumer, parent)
        assert len(job(consumer, single)["shards"]) == 1


def test_sharded_jobs_survive_a_consumer_restart_fail_once_cancel_whole_and_gather_into_a_dir(tmp_path):
    from jobs_helpers import PROBE_WASM
    ensure_assets()
    data = tmp_path / "input.txt"
    data.write_bytes(INPUT)
    with DaemonCluster(tmp_path) as cluster:
        consumer, provs = start_mesh(cluster, 2)
        parent = _submit(consumer, "--shards", "2", "--input", str(data), *TASK)
        wait_for(lambda: all(s["state"] == "running" for s in job(consumer, parent)["shards"]), 60,
                 what="both shards running")
        consumer.kill()  # SIGKILL: nothing graceful
        consumer = cluster.start("consumer")
        final = wait_job(consumer, parent, timeout=120)
        assert final["state"] == "succeeded" and output(consumer, parent) == INPUT.decode().upper()
        for s in final["shards"]:  # re-attached where they ran: one attempt, one placement each
            (only,) = s["attempts"]
            assert len(only["placements"]) == 1 and only["state"] == "succeeded"
        # A shard whose task always fails runs MAX_ATTEMPTS times, away from where it failed
        # while there is elsewhere; then the job fails, once, naming the shard.
        bad = _submit(consumer, "--shards", "2", "--input", str(data), "--cpus", "0.25", "--memory", "64M",
                      str(PROBE_WASM), "--", "exit", "3")
        failed = wait_job(consumer, bad, timeout=120)
        assert failed["state"] == "failed" and "after 3 attempt(s): exit 3" in failed["error"], failed["error"]
        worst = max(failed["shards"], key=lambda s: len(s["attempts"]))
        assert len(worst["attempts"]) == sh.MAX_ATTEMPTS
        first, second = ({p["provider"] for p in a["placements"]} for a in worst["attempts"][:2])
        assert first and second and not first & second  # the retry went to the other provider
        assert all(job(consumer, s["job"])["state"] in ("failed", "cancelled") for s in failed["shards"])
        # Cancelling the job cancels every shard, and the job ends cancelled, once.
        slow = _submit(consumer, "--shards", "2", "--input", str(data), *TASK[:-1], "sleep 60")
        wait_for(lambda: all(s["state"] == "running" for s in job(consumer, slow)["shards"]), 60,
                 what="both slow shards running")
        consumer.cli("cancel", slow)
        assert wait_job(consumer, slow, timeout=60)["state"] == "cancelled"
        assert all(wait_job(consumer, s["job"], timeout=30)["state"] == "cancelled"
                   for s in job(consumer, slow)["shards"])
        # A directory split by files, gathered one file per shard.
        src = tmp_path / "in"
        src.mkdir()
        for name, body in [("a", b"alpha\n"), ("b", b"beta\n"), ("c", b"gamma\n")]:
            (src / name).write_bytes(body)
        out = tmp_path / "out"
        by_files = _submit(consumer, "--shards", "2", "--input", str(src), "--split", "files", "--gather", "dir",
                           "--output-dir", str(out), *TASK[:-1], "tr a-z A-Z")
        assert wait_job(consumer, by_files, timeout=90)["state"] == "succeeded"
        assert sorted(os.listdir(out)) == ["shard-0000", "shard-0001"]
        assert (out / "shard-0000").read_bytes() == b"ALPHA\n" and (out / "shard-0001").read_bytes() == b"BETA\nGAMMA\n"
        # Bad input is one line from the CLI, and nothing is submitted.
        before = len(consumer.get("/v1/jobs"))
        three = tmp_path / "three"
        three.write_bytes(b"a\nb\nc\n")
        for args, said in [(["--shards", "9", "--input", str(three)], "only 3 line"),
                           (["--shards", "0", "--input", str(three)], "from 1 to 256"),
                           (["--shards", "2"], "--shards needs --input"),
                           (["--shards", "2", "--input", str(tmp_path / "nope")], "needs a file")]:
            res = consumer.cli("run", *args, *TASK, check=False)
            assert res.returncode != 0 and said in res.stderr and res.stderr.count("\n") == 1, res.stderr
        assert len(consumer.get("/v1/jobs")) == before
