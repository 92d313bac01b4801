"""A task's output arrives exactly once, to the last byte, whatever its size
and rate: the provider drains it all before the exit frame, whose final
offsets the consumer checks before it calls the job "succeeded".

Through real daemons (a consumer and a provider on loopback) and a real
container; what `synord run` prints and what `synord logs` returns must be
byte-identical to what the task wrote. (Before: 1 MiB + a marker line gave
196 608 of 1 048 587 bytes; 64 KiB + 11 B once lost the last 11.)
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from daemons import ROOT, SYNORD
from jobs_helpers import BUSYBOX_TAR, ensure_assets, start_mesh

needs_oci = pytest.mark.skipif(shutil.which("crun") is None and shutil.which("runc") is None,
                                reason="no OCI runtime (crun/runc) on this machine")

SEQ = 1_500_000  # `seq 1 SEQ` is ~10.9 MB of distinct lines: a gap or a repeat shows


def _seq_bytes() -> bytes:
    return ("\n".join(str(i) for i in range(1, SEQ + 1)) + "\n").encode()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from daemons import DaemonCluster
    ensure_assets()
    with DaemonCluster(tmp_path_factory.mktemp("output")) as cluster:
        consumer, provs = start_mesh(cluster, 1)
        yield consumer


def _synord(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SYNORD, "--home", str(d.home), *args], capture_output=True, cwd=ROOT,
                          timeout=180)


def _run(d, script: str) -> tuple[subprocess.CompletedProcess, dict]:
    res = _synord(d, "run", "--runtime", "container", str(BUSYBOX_TAR), "--", "sh", "-c", script)
    jobs = d.get("/v1/jobs")
    job = max((j for j in jobs if j.get("args", [])[-1:] == [script]), key=lambda j: j["created"])
    return res, job


@needs_oci
@pytest.mark.parametrize("size, marker", [
    (64 << 10, b"0123456789\n"),       # 64 KiB + 11 B
    (1 << 20, b"MARKER-END\n"),         # 1 MiB + a marker line
    (8 << 20, b"MARKER-END\n"),         # 8 MiB
], ids=["64KiB+11B", "1MiB+marker", "8MiB"])
def test_output_arrives_to_the_last_byte(mesh, size, marker):
    consumer = mesh
    expected = _seq_bytes()[:size] + marker
    res, job = _run(consumer, f"seq 1 {SEQ} | head -c {size}; echo {marker.decode().strip()}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(res.stdout) == len(expected) and res.stdout == expected
    assert job["state"] == "succeeded", job
    logs = _synord(consumer, "logs", job["id"])
    assert logs.returncode == 0 and logs.stdout == expected


@needs_oci
def test_a_fast_writer_on_both_streams(mesh):
    """Both streams at full speed, ending together: every byte of each, in order."""
    consumer = mesh
    out = _seq_bytes()[:4 << 20] + b"OUT-END\n"
    err = _seq_bytes()[:2 << 20] + b"ERR-END\n"
    script = (f"(seq 1 {SEQ} | head -c {2 << 20}; echo ERR-END) >&2 & "
              f"seq 1 {SEQ} | head -c {4 << 20}; echo OUT-END; wait")
    res, job = _run(consumer, script)
    assert res.returncode == 0, res.stderr[-2000:]
    note, _, stderr = res.stderr.partition(b"\n")  # `run` says "synord: job <id> submitted" first
    assert note == f"synord: job {job['id']} submitted".encode(), note
    while stderr.startswith(b"synord: "):  # then its start's notices, all before any output
        stderr = stderr.partition(b"\n")[2]
    assert (len(res.stdout), len(stderr)) == (len(out), len(err))
    assert res.stdout == out and stderr == err
    assert job["state"] == "succeeded", job
    logs = _synord(consumer, "logs", job["id"])
    assert logs.stdout == out and logs.stderr == err
    assert job["exit_code"] == 0


# ---- a lying provider: the consumer checks the exit frame's offsets -------------------------

async def _run_against(cluster, handler) -> tuple[dict, bytes, object]:
    """A consumer daemon whose only provider is `handler` on a hostile peer; runs
    the probe wasm there and returns (job, its `synord logs` stdout, the daemon)."""
    import trio
    from adversarial.hostile import HostilePeer
    from jobs_helpers import CONSUMER_ONLY, PROBE_WASM, providers_in_book

    def call(fn, *a):
        return trio.to_thread.run_sync(lambda: fn(*a))

    consumer = await call(lambda: cluster.start("consumer", config=CONSUMER_ONLY))
    async with HostilePeer.running() as liar:
        await liar.offer()
        liar.serve_tasks(handler)
        await liar.connect((await call(consumer.p2p_addrs))[0])
        with trio.fail_after(30):
            while liar.peer_id not in await call(providers_in_book, consumer):
                await trio.sleep(0.2)
        res = await call(_synord, consumer, "run", "--detach", "--json", str(PROBE_WASM))
        job_id = json.loads(res.stdout)["id"]
        with trio.fail_after(60):
            while (job := await call(consumer.get, f"/v1/jobs/{job_id}"))["state"] not in (
                    "succeeded", "failed", "cancelled"):
                await trio.sleep(0.2)
    logs = await call(_synord, consumer, "logs", job_id)
    return job, logs.stdout, consumer


def _exit(total: int) -> dict:
    return {"exit": {"code": 0, "reason": None, "error": None, "handed_back": False,
                     "usage": {"cpu_s": 0.1, "peak_memory_bytes": 1 << 20, "wall_s": 0.1},
                     "offsets": {"stdout": total, "stderr": 0}}}


async def test_output_missing_at_exit_is_fetched_again(cluster):
    """Exit 0 with the last 11 bytes unsent: the consumer re-attaches from its own
    offsets and gets them; the job succeeds with every byte, once."""
    payload = _seq_bytes()[:64 << 10] + b"0123456789\n"
    attaches = []

    async def truncating(stream, env):
        await stream.send({"started": True})
        if env.type == "task.attach":
            attaches.append(env.body["offsets"])
        start = env.body["offsets"]["stdout"] if env.type == "task.attach" else 0
        end = len(payload) if env.type == "task.attach" else len(payload) - 11
        for off in range(start, end, 16 << 10):
            await stream.send({"o": "stdout", "off": off, "d": payload[off:min(off + (16 << 10), end)]})
        await stream.send(_exit(len(payload)))

    job, out, _ = await _run_against(cluster, truncating)
    assert attaches == [{"stdout": len(payload) - 11, "stderr": 0}]
    assert job["state"] == "succeeded", job
    assert out == payload


async def test_output_never_completed_fails_the_job_clearly(cluster):
    """A gap the provider never fills: not "succeeded" but failed, saying what is
    missing; the consumer kept nothing past the gap, and counted it."""
    payload = _seq_bytes()[:3000]

    async def gapped(stream, env):
        if env.type == "task.attach":
            await stream.send({"error": "no such task here"})
            return
        await stream.send({"started": True})
        await stream.send({"o": "stdout", "off": 0, "d": payload[:1000]})
        await stream.send({"o": "stdout", "off": 2000, "d": payload[2000:]})  # 1000 bytes skipped
        await stream.send(_exit(len(payload)))

    job, out, consumer = await _run_against(cluster, gapped)
    assert job["state"] == "failed", job
    assert "output incomplete" in job["error"] and "received 1000 of 3000" in job["error"], job["error"]
    assert out == payload[:1000]
    from adversarial.hostile import refusals
    assert refusals(consumer).get(("task_output", "gap"), 0) >= 1

