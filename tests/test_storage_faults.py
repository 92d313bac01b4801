"""Bad local input and damaged local state: one-line errors or 4xx, never a
traceback or a 500; a corrupt store refused with how to recover; an empty one
said out loud."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from daemons import ROOT, SYNORD, DaemonCluster
from jobs_helpers import PROBE_WASM, ensure_assets, refused


def start_daemon(home: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    """`synord daemon` that is expected to refuse to start."""
    return subprocess.run([*SYNORD, "--home", str(home), "daemon", "--listen", "/ip4/127.0.0.1/tcp/0",
                           "--api", "127.0.0.1:0", "--no-mdns"], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("synord:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.mark.parametrize("config, says", [
    (b"\xff\xfe[node]\nmdns = false\n", "not UTF-8"),
    (b"[jobs]\nheartbeat_interval_s = nan\n", "finite"),
    (b"[storage]\ncache_max_bytes = -1\n", "negative"),
])
def test_bad_config_is_one_line(tmp_path, config, says):
    home = DaemonCluster(tmp_path).init_home("n")
    (home / "config.toml").write_bytes(config)
    assert says in one_line_error(start_daemon(home))


def _corrupt(db: Path) -> None:
    """Overwrite one b-tree page (not the header) with garbage, as a bad sector would."""
    page = 4096
    assert db.stat().st_size >= 4 * page
    with open(db, "r+b") as f:
        f.seek(2 * page)
        f.write(os.urandom(page))


def test_corrupt_store_refused_with_how_to_recover(tmp_path):
    from synord.store import Store
    home = DaemonCluster(tmp_path).init_home("n")
    Store(home / "state.db").close()  # every table created (one page each), then closed cleanly
    _corrupt(home / "state.db")
    line = one_line_error(start_daemon(home))
    assert "corrupt" in line and "mv " in line and "backup" in line
    doc = subprocess.run([*SYNORD, "--home", str(home), "doctor", "--json"], capture_output=True,
                         text=True, cwd=ROOT, timeout=30)
    assert doc.returncode == 1
    checks = {c["name"]: c for c in json.loads(doc.stdout)["checks"]}
    assert checks["state_store"]["ok"] is False and "corrupt" in checks["state_store"]["reason"]
    # Following the advice works.
    (home / "state.db").rename(home / "state.db.corrupt")
    for side in ("-wal", "-shm"):
        (home / f"state.db{side}").unlink(missing_ok=True)
    Store(home / "state.db", check_integrity=True).close()


def test_not_a_database_refused(tmp_path):
    home = DaemonCluster(tmp_path).init_home("n")
    (home / "state.db").write_bytes(b"this is not sqlite" * 300)
    line = one_line_error(start_daemon(home))
    assert "corrupt" in line and "mv " in line


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """One daemon (no peers) whose state.db was an empty file when it started."""
    ensure_assets()
    with DaemonCluster(tmp_path_factory.mktemp("faults")) as cluster:
        home = cluster.init_home("n")
        (home / "state.db").write_bytes(b"")
        yield cluster.start("n")


def test_empty_store_is_said(node):
    notes = node.status()["storage"]["notes"]
    assert any("empty" in n for n in notes), notes
    assert "empty state store" in node.log()
    checks = {c["name"]: c for c in json.loads(node.cli("doctor", "--json", check=False).stdout)["checks"]}
    assert checks["state_store"]["ok"] is False and "empty" in checks["state_store"]["reason"]
    assert checks["storage"]["ok"] is True and checks["storage"]["free_bytes"] > 0


def _post_raw(node, path: str, raw: str):
    """POST a body as written (json.dumps would refuse some of what an attacker can send)."""
    conn = node.client._connection()
    conn.request("POST", path, raw.encode(), {"Authorization": f"Bearer {node.client.token}",
                                              "Host": "127.0.0.1", "Content-Type": "application/json"})
    resp = conn.getresponse()
    try:
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.parametrize("grace", ["NaN", "Infinity", "-Infinity", "1e308", "-1", "\"10\"", "true"])
def test_preempt_grace_must_be_a_sane_number(node, grace):
    before = refused(node, "api", "bad-number")
    status, body = _post_raw(node, "/v1/preempt", '{"grace_s": %s}' % grace)
    assert status == 400 and "grace_s" in body["error"]
    assert refused(node, "api", "bad-number") == before + 1


@pytest.mark.parametrize("field, value", [
    ("cpus", "NaN"), ("cpus", "1e308"), ("memory_bytes", "1e308"), ("memory_bytes", "Infinity"),
    ("timeout_s", "NaN"), ("max_price", "NaN"), ("max_price", "-Infinity")])
def test_submit_numbers_must_be_finite_and_in_range(node, field, value):
    body = '{"artifact": "%s", "%s": %s}' % (PROBE_WASM, field, value)
    status, reply = _post_raw(node, "/v1/jobs", body)
    assert status == 400 and field in reply["error"]


@pytest.mark.parametrize("field, value", [("idle_after_s", "Infinity"), ("cpu_share", "NaN"),
                                          ("min_battery_percent", "1e308")])
def test_limit_numbers_must_be_finite(node, field, value):
    status, reply = _post_raw(node, "/v1/limits", '{"%s": %s}' % (field, value))
    assert status == 400 and field in reply["error"]


def test_artefact_must_be_a_regular_file_of_bounded_size(node, tmp_path):
    fifo = tmp_path / "pipe.wasm"
    os.mkfifo(fifo)
    link = tmp_path / "zero.wasm"
    link.symlink_to("/dev/zero")
    huge = tmp_path / "huge.wasm"
    with open(huge, "wb") as f:  # sparse: no disk used
        f.write(b"\0asm\x01\0\0\0")
        f.truncate(300 << 20)
    for path, says in [(fifo, "FIFO"), (Path("/dev/zero"), "device"), (link, "device"),
                       (huge, "over the limit")]:
        for runtime in (None, "wasm", "container"):
            req = {"artifact": str(path)} | ({"runtime": runtime} if runtime else {})
            status, reply = _post_raw(node, "/v1/jobs", json.dumps(req))
            assert status == 400, (path, runtime, reply)
            assert says in reply["error"] or (runtime == "container" and path == huge), (path, reply)
    assert node.proc.poll() is None


def test_cli_run_of_a_fifo_is_one_line(node, tmp_path):
    fifo = tmp_path / "p.wasm"
    os.mkfifo(fifo)
    res = node.cli("run", "--detach", str(fifo), check=False, timeout=30)
    assert "FIFO" in one_line_error(res)


def test_a_failed_transaction_is_reported_and_leaves_the_store_usable(tmp_path):
    """A write that fails is told to the storage health hook, and the next transaction works."""
    from synord.store import Store
    s = Store(tmp_path / "db")
    failures = []
    s.on_failure = lambda where, exc: failures.append(exc)
    with pytest.raises(sqlite3.IntegrityError):
        with s.tx() as conn:
            conn.execute("INSERT INTO kv(key, value, updated) VALUES ('a', '1', 0)")
            conn.execute("INSERT INTO kv(key, value, updated) VALUES ('a', '2', 0)")
    assert failures and not s.conn.in_transaction
    s.kv_set("b", 2)
    assert s.kv_get("b") == 2 and s.kv_get("a") is None
    s.close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_blob_cache_lru_pins_and_disk_room(tmp_path):
    import hashlib
    import time as _time

    from synord.protocols.transfer import BlobStore
    from synord.blobcache import BlobCache
    blobs = BlobStore(tmp_path / "artifacts")
    shas = []
    for i in range(4):
        src = tmp_path / f"b{i}"
        src.write_bytes(bytes([i]) * 1000)
        shas.append(blobs.add_file(src))
    pinned = {shas[0]}
    cache = BlobCache(blobs, 2500, lambda: pinned)
    for sha in shas:  # use order: 0 oldest ... 3 newest
        cache.touch(sha)
        _time.sleep(0.01)
    assert cache.make_room() is None  # 4000 bytes over a 2500 limit: the oldest unpinned go
    left = {p.name for p in blobs.dir.iterdir()}
    assert left == {shas[0], shas[3]} and cache.evicted == 2
    # A blob that cannot fit even with every unpinned blob gone evicts nothing.
    why = cache.make_room(1500, free_bytes=500, min_free=100)
    assert why is not None and "would not fit on the disk" in why
    assert {p.name for p in blobs.dir.iterdir()} == {shas[0], shas[3]}
    # One that fits once the unpinned blob goes takes its place.
    assert cache.make_room(1000, free_bytes=500, min_free=100) is None
    assert {p.name for p in blobs.dir.iterdir()} == {shas[0]}
    assert "over this node's cache limit" in cache.make_room(3000)
    assert hashlib.sha256(bytes([0]) * 1000).hexdigest() == shas[0]


def test_storage_health_turns_and_recovers(tmp_path):
    import errno

    from synord.storage_health import StorageHealth
    from synord.store import Store
    store = Store(tmp_path / "db")
    changes = []
    h = StorageHealth(tmp_path, 0, probe=lambda: store.kv_set("probe", 1), on_change=changes.append)
    assert h.check() and h.ok and h.free_bytes > 0
    assert h.failed("test", ValueError("a bug, not the disk")) is None and h.ok
    why = h.failed("job output", sqlite3.OperationalError("database or disk is full"))
    assert not h.ok and "disk full" in why and "job output" in why and changes == [False]
    assert h.failed("upload", OSError(errno.ENOSPC, "No space left on device"))
    assert h.check() and h.ok and changes == [False, True]  # room again and the probe committed
    h.min_free_bytes = h.free_bytes * 2
    assert not h.check() and "free on" in h.reason and changes == [False, True, False]
    store.close()
