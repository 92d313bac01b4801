"""A task's stdin blob (a shard of a sharded job) under attack: the provider
feeds only a blob that arrived whole and verified, refuses a start naming one
it does not hold or a malformed digest, and counts each refusal."""

from __future__ import annotations

import pytest
import trio

from adversarial.hostile import HostilePeer, counted, in_thread, refusals
from jobs_helpers import PROBE_WASM, ensure_assets


@pytest.fixture
async def provider(cluster):
    ensure_assets()
    return await in_thread(cluster.start, "provider", config="[contributor]\ncpu_share = 0.5\n")


async def _refused(evil: HostilePeer, pid: str, body: dict) -> str:
    stream, reply = await evil.task_start(pid, body)
    with trio.move_on_after(1):
        await stream.close()
    assert isinstance(reply, dict) and "error" in reply and "started" not in reply, reply
    return reply["error"]


async def test_stdin_blob_is_fed_only_when_held_and_named_well(provider):
    async with HostilePeer.running() as evil:
        pid = await evil.connect((await in_thread(provider.p2p_addrs))[0])
        terms = await evil.obtain_agreement(pid)
        sha = await evil.upload(pid, PROBE_WASM)
        before = await in_thread(refusals, provider)
        missing = "ab" * 32  # never uploaded
        assert "stdin blob not transferred" in await _refused(
            evil, pid, evil.task_body(terms, sha, stdin_sha256=missing))
        for bad in ("../../identity.key", "AB" * 32, 42):
            assert "stdin_sha256" in await _refused(evil, pid, evil.task_body(terms, sha, stdin_sha256=bad))
        assert counted(before, await in_thread(refusals, provider)) == {
            ("task", "no_input"): 1, ("task", "envelope_bad_body"): 3}
        # None of it spent the agreement: with the blob uploaded, the task reads it as stdin.
        shard = b"line one\nline two\n"
        stdin = await evil.upload(pid, shard, kind="input")
        stream, reply = await evil.task_start(pid, evil.task_body(terms, sha, args=["args"], stdin_sha256=stdin))
        assert reply == {"started": True}, reply
        res = await evil.read_task(stream)
        assert res.exit is not None and res.exit["code"] == 0, res.frames[-3:]
        assert bytes(res.out["stdout"]).endswith(b"stdin:" + shard + b"\n")
