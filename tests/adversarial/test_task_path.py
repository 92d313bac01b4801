"""The task path under attack: peer identifiers never become paths, a peer
touches only its own job rows, and a task starts only under an agreement that
this peer signed with the provider, on the agreed terms.

Each attack goes through the wire from `HostilePeer` to a real provider
daemon; each asserts the refusal, that nothing changed on disk or in the
store, and that the refusal is counted in /metrics.
"""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from pathlib import Path

import pytest
import trio

from adversarial.hostile import HostilePeer
from jobs_helpers import CONSUMER_ONLY, PROBE_WASM, ensure_assets

async def in_thread(fn, *args, **kw):
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


def metrics(d) -> str:
    import http.client
    host, port = d.client.url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {d.client.token}"})
    return conn.getresponse().read().decode()


def refused(d, where: str, reason: str) -> float:
    needle = f'synord_refusals_total{{reason="{reason}",where="{where}"}} '
    for line in metrics(d).splitlines():
        if line.startswith(needle):
            return float(line.split()[-1])
    return 0.0


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
        return conn.execute("SELECT id, role, state, consumer FROM jobs ORDER BY id, role").fetchall()
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
