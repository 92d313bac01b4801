"""The task path under attack: peer identifiers never become paths, a peer
touches only its own job rows, and a task starts only under an agreement that
this peer signed with the provider, on the agreed terms.

Each attack goes through the wire from `HostilePeer` to a real provider
daemon; each asserts the refusal, that nothing changed on disk or in the
store, and that the refusal is counted in /metrics.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import uuid
from pathlib import Path

import pytest
import trio

from adversarial.hostile import HostilePeer, counted, in_thread, refusals
from jobs_helpers import PROBE_WASM, ensure_assets

def home_snapshot(home: Path) -> dict[str, str]:
    """Every file of a daemon's home but its log and live database files, with its digest."""
    out = {}
    for p in sorted(home.rglob("*")):
        if p.is_file() and p.name not in ("daemon.log",) and not p.name.startswith("state.db"):
            out[str(p.relative_to(home))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def job_rows(home: Path) -> list[tuple]:
    conn = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT id, role, state, consumer, peer_job FROM jobs ORDER BY id, role").fetchall()
    finally:
        conn.close()


@pytest.fixture
async def provider(cluster):
    ensure_assets()
    return await in_thread(cluster.start, "provider", config="[contributor]\ncpu_share = 0.5\n")


async def _agreed(evil: HostilePeer, d, **kw):
    pid = await evil.connect((await in_thread(d.p2p_addrs))[0])
    terms = await evil.obtain_agreement(pid, **kw)
    sha = await evil.upload(pid, PROBE_WASM)
    return pid, terms, sha


async def test_harness_runs_an_honest_task(provider):
    """The harness speaks the protocol well enough to run a real task."""
    async with HostilePeer.running() as evil:
        pid, terms, sha = await _agreed(evil, provider)
        stream, reply = await evil.task_start(pid, evil.task_body(terms, sha, args=["hello"]))
        assert reply == {"started": True}, reply
        res = await evil.read_task(stream)
        assert res.exit is not None and res.exit["code"] == 0, res.frames[-3:]
        assert bytes(res.out["stdout"]) == b"hello, wasm\n"


async def _refused(evil: HostilePeer, pid: str, body: dict, **kw) -> str:
    stream, reply = await evil.task_start(pid, body, **kw)
    with trio.move_on_after(1):
        await stream.close()
    assert isinstance(reply, dict) and "error" in reply and "started" not in reply, reply
    return reply["error"]


async def test_path_job_ids_never_reach_the_disk(provider):
    """`..` used to make the provider rmtree its own home; `.` every other task's work."""
    home = provider.home
    async with HostilePeer.running() as evil:
        pid, terms, sha = await _agreed(evil, provider)
        disk, rows, before = home_snapshot(home), job_rows(home), await in_thread(refusals, provider)
        bad = ["..", ".", "../..", "../identity.key", "/etc", ".hidden", "a/b", "a\n", "", "x" * 65]
        for job_id in bad:
            body = evil.task_body(terms, sha)
            body["job_id"] = job_id
            error = await _refused(evil, pid, body)
            assert "bad_body" in error, (job_id, error)
        assert home_snapshot(home) == disk and job_rows(home) == rows
        assert (home / "identity.key").exists() and (home / "config.toml").exists()
        after = await in_thread(refusals, provider)
        assert counted(before, after) == {("task", "envelope_bad_body"): len(bad)}
        # The refusals spent nothing: the agreement still starts a task, whose work
        # directory is named by the agreement the provider signed, not by the job id.
        stream, reply = await evil.task_start(pid, evil.task_body(terms, sha, job_id="a.b", args=["hello"]))
        assert reply == {"started": True}, reply
        res = await evil.read_task(stream)
        assert res.exit["code"] == 0 and bytes(res.out["stdout"]) == b"hello, wasm\n"
    row = [r for r in job_rows(home) if r[1] == "provider"]
    assert row == [(terms.aid.hex(), "provider", "succeeded", evil.peer_id, "a.b")], row
    assert not (home / "work" / "a.b").exists()


async def test_a_foreign_job_id_touches_nothing_of_its_owner(cluster):
    """Bid ids are job ids and public: a task.start or task.attach naming someone
    else's job must not touch its row, its task or its output."""
    ensure_assets()
    d = await in_thread(cluster.start, "provider",
                        config="[contributor]\ncpu_share = 0.5\n[jobs]\nplacement_timeout_s = 2.0\n")
    # The daemon's own consumer job (nobody else to place it on: it fails, and stays).
    own = (await in_thread(d.cli, "run", "--detach", "--json", str(PROBE_WASM))).stdout
    own_id = json.loads(own)["id"]
    with trio.fail_after(30):
        while (await in_thread(d.get, f"/v1/jobs/{own_id}"))["state"] != "failed":
            await trio.sleep(0.2)
    home = d.home
    own_row = [r for r in job_rows(home) if r[0] == own_id]
    assert own_row and own_row[0][1] == "consumer"
    async with HostilePeer.running() as evil, HostilePeer.running() as other:
        pid, terms, sha = await _agreed(evil, d)
        await other.connect((await in_thread(d.p2p_addrs))[0])
        # A task under the attacker's own agreement, named like the owner's job: it
        # runs (a name is only a label), and the owner's row is untouched.
        stream, reply = await evil.task_start(pid, evil.task_body(terms, sha, job_id=own_id))
        assert reply == {"started": True}, reply
        assert (await evil.read_task(stream)).exit["code"] == 0
        assert [r for r in job_rows(home) if r[0] == own_id] == own_row
        before = await in_thread(refusals, d)
        # Someone else attaching to that job (by its public id) gets nothing.
        stream, reply = await other.task_attach(pid, own_id)
        with trio.move_on_after(1):
            await stream.close()
        assert reply == {"error": "no such task here"}, reply
        assert counted(before, await in_thread(refusals, d)) == {("task", "no_task"): 1}
    rows = job_rows(home)
    assert [r for r in rows if r[0] == own_id] == own_row
    assert [r for r in rows if r[1] == "provider"] == [
        (terms.aid.hex(), "provider", "succeeded", evil.peer_id, own_id)]
    job = await in_thread(d.get, f"/v1/jobs/{own_id}")
    assert job["state"] == "failed" and job["provider"] is None, job


async def test_a_task_starts_only_under_its_consumers_agreement_on_its_terms(provider):
    home = provider.home
    async with HostilePeer.running() as evil, HostilePeer.running() as other:
        pid, terms, sha = await _agreed(evil, provider)
        await other.connect((await in_thread(provider.p2p_addrs))[0])
        disk, rows, before = home_snapshot(home), job_rows(home), await in_thread(refusals, provider)
        # No agreement at all; someone else's; someone else's signed as its owner
        # (over our own connection).
        forged = evil.task_body(terms, sha, agreement_id=uuid.uuid4().hex)
        assert "no active agreement" in await _refused(evil, pid, forged)
        assert "no active agreement" in await _refused(other, pid, other.task_body(terms, sha))
        assert "not signed by the connected peer" in await _refused(
            other, pid, evil.task_body(terms, sha), identity=evil.identity)
        # Terms that are not the agreement's: another runtime, more memory or
        # cores than agreed, a timeout beyond the lease.
        mismatches = [
            {"kind": "container"},
            {"limits": {"cpus": terms.cores, "memory_bytes": terms.memory + (1 << 20)}},
            {"limits": {"cpus": terms.cores * 2, "memory_bytes": terms.memory}},
            {"limits": {"cpus": terms.cores, "memory_bytes": terms.memory,
                        "timeout_s": terms.duration_s + 1}},
        ]
        for fields in mismatches:
            error = await _refused(evil, pid, evil.task_body(terms, sha, **fields))
            assert "agreement" in error or "agreed" in error, (fields, error)
        # An upload from a peer without an agreement is refused as well.
        with pytest.raises(Exception, match="no active agreement"):
            await other.upload(pid, b"not wanted here")
        assert home_snapshot(home) == disk and job_rows(home) == rows
        assert counted(before, await in_thread(refusals, provider)) == {
            ("task", "no_agreement"): 1, ("task", "foreign_agreement"): 1, ("task", "wrong_signer"): 1,
            ("task", "terms_mismatch"): len(mismatches), ("transfer", "unauthorized"): 1}
        # None of it spent the agreement: its consumer starts its task.
        stream, reply = await evil.task_start(pid, evil.task_body(terms, sha))
        assert reply == {"started": True}, reply
        assert (await evil.read_task(stream)).exit["code"] == 0
        # ...once: a second start under the same agreement is refused.
        assert "no active agreement" in await _refused(evil, pid, evil.task_body(terms, sha))


async def test_garbage_on_the_task_stream_is_refused_and_counted(provider):
    from synord.protocols.tasks import TASK_PROTOCOL
    async with HostilePeer.running() as evil:
        pid = await evil.connect((await in_thread(provider.p2p_addrs))[0])
        before = await in_thread(refusals, provider)
        garbage = [
            [b"\x00\x00\x00\x02\xc1\xc1"],        # a frame that is not msgpack
            [b"\xff\xff\xff\xff"],                # a length over the frame limit
            [{"env": 5}], [[1, 2, 3]],               # frames without an envelope
            [{"env": b"\x93not an envelope"}],
        ]
        for frames in garbage:
            replies = await evil.exchange(pid, TASK_PROTOCOL, frames)
            assert replies and "error" in replies[0], (frames, replies)
        assert counted(before, await in_thread(refusals, provider)) == {
            ("task", "malformed_frame"): 2, ("task", "bad_request"): 2, ("task", "envelope_malformed"): 1}
        assert (await in_thread(provider.status))["peer_id"] == pid  # and it is still up


def test_store_migration_rekeys_provider_rows(tmp_path):
    """A store of the previous schema: provider rows move to the agreement id they
    ran under (the consumer's job id kept as peer_job); consumer rows stay."""
    from synord import store as st
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for i, step in enumerate(st.MIGRATIONS[:4]):  # the schema before provider rows moved
        conn.execute("BEGIN")
        if callable(step):
            step(conn)
        else:
            st._exec_script(conn, step)
        conn.execute(f"PRAGMA user_version = {i + 1}")
        conn.execute("COMMIT")
    aid = uuid.uuid4().hex
    rows = [("mine", "consumer", json.dumps({"kind": "wasm"}), "me"),
            ("theirs", "provider", json.dumps({"job_id": "theirs", "agreement_id": aid}), "peer")]
    for id_, role, spec, consumer in rows:
        conn.execute("INSERT INTO jobs(id, role, state, runtime, spec, consumer, created, updated) "
                     "VALUES (?, ?, 'succeeded', 'wasm', ?, ?, 0, 0)", (id_, role, spec, consumer))
    conn.close()
    st.Store(path).close()
    assert job_rows(tmp_path) == [(aid, "provider", "succeeded", "peer", "theirs"),
                                  ("mine", "consumer", "succeeded", "me", None)]
