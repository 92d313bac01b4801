"""The job model (synord.jobs.spec): one type from the API to the sandbox, the
stored and wire shapes unchanged, the spec frozen and the run state apart."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import msgpack
import pytest

from synord.protocols.tasks import check_start
from synord.errors import (Busy, Conflict, Forbidden, Gone, InsufficientStorage, Invalid, NotFound, Unavailable,
                           Unsupported)
from synord.jobs.spec import JobSpec, RunState, SpecView, from_stored, stored

SHA = "ab" * 32
AID = "cd" * 16

# A jobs.spec column as synord wrote it before JobSpec (checkpointed, mid-migration).
OLD_ROW = {"kind": "wasm", "artifact": "/data/count.wasm", "sha256": SHA, "args": ["5", "x"],
           "env": {"A": "1", "B": "2"}, "limits": {"cpus": 0.5, "memory_bytes": 64 << 20, "timeout_s": 30.0},
           "max_price": 2.5, "checkpointable": True,
           "checkpoint": {"sha256": SHA, "bytes": 10, "offsets": {"stdout": 3, "stderr": 0},
                          "path": "/ck/x.tar", "at": 1.0},
           "restore_mode": "partial", "provider_addrs": ["/ip4/127.0.0.1/tcp/1"]}


def test_a_stored_row_reads_back_and_writes_the_same_json():
    spec, run = from_stored(json.loads(json.dumps(OLD_ROW)))
    assert spec.cpus == 0.5 and spec.memory_bytes == 64 << 20 and spec.timeout_s == 30.0
    assert run.checkpoint["bytes"] == 10 and run.restore_mode == "partial" and run.assignment is None
    assert json.dumps(stored(spec, run), sort_keys=True) == json.dumps(OLD_ROW, sort_keys=True)


def test_a_fresh_job_stores_its_checkpoint_key_and_no_unset_run_keys():
    spec = JobSpec(kind="wasm", sha256=SHA)
    assert stored(spec, RunState()) == {
        "kind": "wasm", "artifact": None, "sha256": SHA, "args": [], "env": {},
        "limits": {"cpus": 1.0, "memory_bytes": 256 << 20}, "max_price": None,
        "checkpointable": False, "checkpoint": None}


def test_the_task_start_body_is_the_wire_shape_and_reads_back_on_the_provider():
    spec, _ = from_stored(OLD_ROW)
    restore = {"sha256": SHA, "offsets": {"stdout": 3, "stderr": 0}}
    body = spec.task_start("job-1", AID, 10.0, restore)
    # the exact body (and key order: it is msgpack-encoded and signed) consumers sent before
    assert list(body) == ["job_id", "agreement_id", "kind", "artifact_sha256", "args", "env", "limits",
                          "checkpointable", "checkpoint_interval_s", "restore", "progress"]
    assert body == {"job_id": "job-1", "agreement_id": AID, "kind": "wasm", "artifact_sha256": SHA,
                    "args": ["5", "x"], "env": {"A": "1", "B": "2"},
                    "limits": {"cpus": 0.5, "memory_bytes": 64 << 20, "timeout_s": 30.0},
                    "checkpointable": True, "checkpoint_interval_s": 10.0, "restore": restore,
                    "progress": True}
    check_start(msgpack.unpackb(msgpack.packb(body)))  # what synord.protocols.tasks accepts
    theirs = JobSpec.from_task_start(body)
    assert theirs == dataclasses.replace(spec, artifact=None, max_price=None)  # consumer-only fields stay home
    ts = theirs.task_spec(Path("/blobs") / SHA, Path("/work/x/sandbox"), "x")
    assert (ts.kind, ts.sha256, ts.args, ts.env) == ("wasm", SHA, ["5", "x"], {"A": "1", "B": "2"})
    assert (ts.limits.cpus, ts.limits.memory_bytes, ts.limits.timeout_s, ts.limits.pids) == (0.5, 64 << 20, 30.0, 64)
    assert ts.checkpointable and ts.task_id == "x"


def test_not_checkpointable_sends_no_checkpoint_interval():
    spec = JobSpec(kind="container", sha256=SHA)
    assert spec.task_start("j", AID, 10.0, None)["checkpoint_interval_s"] == 0


def test_needs_is_the_markets_word_for_the_same_limits():
    needs = JobSpec(kind="wasm", sha256=SHA, cpus=0.5, memory_bytes=64 << 20, timeout_s=30.0,
                    max_price=2.5).needs()
    assert (needs.runtime, needs.cores, needs.memory, needs.max_price) == ("wasm", 0.5, 64 << 20, 2.5)
    assert needs.duration_s == 90  # a minute past the timeout
    assert JobSpec(kind="wasm", sha256=SHA).needs().duration_s == 3660  # no timeout: an hour and a minute
    assert JobSpec(kind="wasm", sha256=SHA, timeout_s=0.5).needs().duration_s == 60


def test_the_spec_is_frozen_and_the_view_writes_only_run_state():
    spec, run = from_stored(OLD_ROW)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.cpus = 8  # type: ignore[misc]
    view = SpecView(spec, run)
    assert view["limits"]["cpus"] == 0.5 and view["checkpoint"]["bytes"] == 10
    view["assignment"] = {"method": "kuhn-munkres"}
    assert run.assignment == {"method": "kuhn-munkres"}
    assert view.pop("assignment") == {"method": "kuhn-munkres"} and run.assignment is None
    assert view.get("assignment") is None and view.pop("restore_mode", None) == "partial"
    with pytest.raises(TypeError):
        view["sha256"] = "00" * 32


def test_domain_errors_map_to_the_status_codes_the_cli_sees():
    from synord.api import ApiError, http_error
    errors = (Invalid, Forbidden, NotFound, Conflict, Gone, Busy, Unsupported, Unavailable, InsufficientStorage)
    assert [http_error(e("x")).status for e in errors] == [400, 403, 404, 409, 410, 429, 501, 502, 507]
    assert http_error(NotFound("no job 1")).message == "no job 1"
    assert http_error(ApiError(421, "m")).status == 421
    assert http_error(ValueError("bug")) is None


def test_a_pre_jobspec_store_loads_in_the_consumer(tmp_path):
    """A row written before JobSpec is read back by the job store into the typed model."""
    from synord.jobs.jobstore import JobStore
    from synord.store import Store
    store = Store(tmp_path / "state.db")
    with store.tx() as conn:
        conn.execute("INSERT INTO jobs(id, role, state, runtime, spec, provider, consumer, created, updated)"
                     " VALUES ('j1', 'consumer', 'migrating', 'wasm', ?, 'p', 'me', 1, 1)", (json.dumps(OLD_ROW),))
        conn.execute("INSERT INTO job_history(job_id, seq, entry) VALUES ('j1', 1, '{\"provider\": \"p\"}')")
        conn.execute("INSERT INTO job_output(job_id, seq, stream, data) VALUES ('j1', 1, 'stdout', x'616263')")
    (row, history, offsets), = JobStore(store, "me").load()
    spec, run = from_stored(json.loads(row["spec"]))
    assert spec.args == ("5", "x") and run.restore_mode == "partial"
    assert history == [{"provider": "p"}] and offsets == {"stdout": 3}
    assert isinstance(store.conn, sqlite3.Connection)
    store.close()
