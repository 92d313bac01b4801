"""A task's output is held once and bounded, and nothing the task wrote is lost.

Two holders on the way: the sandbox's LogBuffer (pipe -> the provider's reader;
back-pressure when its reader is far behind) and the provider's OutputLog
(memory for the newest output, a spill file for the rest, so a consumer that
re-attaches from any offset it committed gets exactly what it lacks). Bytes
held are counted, never timed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from synord.runtimes.base import LogBuffer, LogChunk, TaskSpec
from synord.jobs.executor import OutputLog, TaskExecution

MODULE = Path(__file__).parent / "assets" / "build" / "wasm" / "probe.wasm"


def _streams(chunks) -> dict[str, bytes]:
    """Each stream's bytes from (stream, offset, data) chunks, checking they are contiguous."""
    out = {"stdout": b"", "stderr": b""}
    for stream, off, data in chunks:
        assert off == len(out[stream]), f"{stream}: chunk at {off}, expected {len(out[stream])}"
        out[stream] += data
    return out


async def test_output_log_spills_past_its_limit_and_loses_nothing(tmp_path):
    log = OutputLog(limit_bytes=1000, spill_dir=tmp_path)
    wrote = {"stdout": b"", "stderr": b""}
    most_held = 0
    for i in range(60):  # 12 000 bytes, nobody reading
        stream = "stdout" if i % 3 else "stderr"
        data = bytes([65 + i % 26]) * 200
        log.append(stream, data)
        wrote[stream] += data
        await log.wait_room()
        most_held = max(most_held, log.held)
    assert most_held <= 1000  # memory: the limit, never more, after each append's wait_room
    assert log.spilled_bytes + log.held == 12000 and log.spilled_bytes > 0
    assert log.offsets == {s: len(b) for s, b in wrote.items()}
    # A reader from the very start gets every byte, in order, from disk then memory.
    assert _streams(log.since({})) == wrote
    # A re-attach from mid-stream offsets gets exactly the tails.
    seen = {"stdout": 3333, "stderr": 1001}
    tails = {"stdout": b"", "stderr": b""}
    for stream, off, data in log.since(seen):
        assert off == seen[stream] + len(tails[stream])
        tails[stream] += data
    assert tails == {s: wrote[s][seen[s]:] for s in wrote}
    assert not log.since(log.offsets) and log.since({"stdout": 0})


async def test_past_its_spill_limit_the_log_waits_for_its_reader_and_drops_nothing_unsent(tmp_path):
    log = OutputLog(limit_bytes=1000, spill_dir=tmp_path, spill_limit_bytes=2000)
    wrote = b""
    blocked_at = None

    async def pump():  # the execution's loop: append, then wait_room
        nonlocal wrote, blocked_at
        for i in range(40):
            data = bytes([65 + i % 26]) * 200
            log.append("stdout", data)
            wrote += data
            blocked_at = len(wrote)
            await log.wait_room()

    got = b""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump)
        await trio.testing.wait_all_tasks_blocked()
        # 2000 bytes on disk, the memory limit held, and the task waits for its reader.
        assert log.spilled_bytes <= 2000 and log.held > 1000 and blocked_at < 8000
        while len(got) < 8000:
            for stream, off, data in log.since({"stdout": len(got)}):
                assert off == len(got)
                got += data
            log.mark_sent({"stdout": len(got)})
            await trio.testing.wait_all_tasks_blocked()
            assert log.held <= 1200
    assert got == wrote and len(got) == 8000


async def test_a_reader_keeps_its_place_while_output_moves_to_disk(tmp_path):
    """The provider's writer iterates `since` across awaits; meanwhile the run loop
    appends and spills what the reader is about to read."""
    log = OutputLog(limit_bytes=800, spill_dir=tmp_path)
    for i in range(4):
        log.append("stdout", bytes([48 + i]) * 200)
    got = []
    for chunk in log.since({}):
        got.append(chunk)
        for j in range(3):  # each step of the reader: more output, more of it spilled
            log.append("stdout", bytes([97 + (len(got) * 3 + j) % 26]) * 200)
            await log.wait_room()
        if len(got) > 40:
            break
    assert log.spilled_bytes > 0
    got += list(log.since({"stdout": got[-1][1] + len(got[-1][2])}))
    assert _streams(got)["stdout"] == _streams(log.since({}))["stdout"]
    assert len(_streams(got)["stdout"]) == log.offsets["stdout"]


async def test_log_buffer_holds_its_limit_and_makes_the_producer_wait():
    buf = LogBuffer(limit_bytes=1000)
    produced = []

    async def producer():
        for i in range(50):
            data = bytes([i]) * 100
            buf.append(LogChunk("stdout", data))
            produced.append(data)
            await buf.wait_room()
        buf.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        # No reader yet: the producer stopped just past the limit, nothing dropped.
        assert len(produced) == 11 and buf.held == 1100
        got = b""
        most_held = 0
        async for chunk in buf.follow():
            got += chunk.data
            most_held = max(most_held, buf.held)
            await trio.testing.wait_all_tasks_blocked()  # let the producer run ahead
    assert got == b"".join(produced) and len(got) == 5000
    assert most_held <= 1100  # the limit plus the chunk that crossed it


async def test_log_buffer_replays_what_fits_to_a_late_reader():
    buf = LogBuffer(limit_bytes=1000)
    buf.extend([LogChunk("stdout", b"a" * 300), LogChunk("stderr", b"b" * 300)])
    buf.close()
    first = [c async for c in buf.follow()]
    again = [c async for c in buf.follow()]
    assert first == again and [c.stream for c in first] == ["stdout", "stderr"]


@pytest.mark.skipif(not MODULE.exists(), reason="wasm test modules not built (tests/assets/build.sh needs clang)")
async def test_a_real_task_printing_past_both_bounds_loses_nothing(tmp_path):
    pytest.importorskip("wasmtime")
    from synord.runtimes.wasm import WasmRuntime
    stdin = bytes((i * 7) % 256 for i in range(256)) * 4096  # 1 MiB, echoed back by probe.wasm
    spec = TaskSpec("wasm", MODULE, args=["args"], stdin=stdin, workdir=tmp_path / "sandbox")
    ex = TaskExecution("job", WasmRuntime(cache_dir=tmp_path / "cache", log_limit_bytes=32 << 10), spec)
    ex.output.limit_bytes = 64 << 10
    most_held = 0

    async def watch():  # counts bytes held by both holders at every change
        nonlocal most_held
        while not ex.done.is_set():
            changed = ex.output.changed
            held = ex.output.held + (ex.sandbox._output.held if ex.sandbox is not None else 0)
            most_held = max(most_held, held)
            await changed.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(ex.run)
        nursery.start_soon(watch)
        await ex.done.wait()
    assert ex.status.code == 0, (ex.status, ex.error)
    expected = b"argv[0]=probe.wasm\nargv[1]=args\nGREETING=(unset)\n" + b"".join(
        b"stdin:" + stdin[i:i + 256] + b"\n" for i in range(0, len(stdin), 256))
    out = _streams(ex.output.since({}))
    assert out["stdout"] == expected
    assert ex.output.spilled_bytes > len(expected) // 2
    # memory: each holder's limit, plus a pipe's worth in flight, never the whole output
    assert most_held <= (64 << 10) + (32 << 10) + (128 << 10) < len(expected) // 4
