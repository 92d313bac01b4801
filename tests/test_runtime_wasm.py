"""The WASM sandbox against real wasmtime and real test modules (tests/assets/wasm)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import msgpack
import pytest
import trio

from synord.runtimes.base import CheckpointUnsupported, Limits, Mount, SpecError, TaskSpec, child_env
from synord.runtimes.digests import sha256_file

wasmtime = pytest.importorskip("wasmtime")
from synord.runtimes.wasm import WasmRuntime  # noqa: E402
from sandbox_helpers import run_to_end  # noqa: E402

ASSETS = Path(__file__).parent / "assets"
BUILD = ASSETS / "build" / "wasm"
GUARD_S = 60  # a hang guard, not a timing assertion


@pytest.fixture(scope="session")
def wasm_modules() -> Path:
    """Build the test modules on demand (build.sh is idempotent)."""
    if shutil.which("clang") is None and not (BUILD / "counter.wasm").exists():
        pytest.skip("clang (wasm32-wasi) is not installed: cannot build the test modules")
    res = subprocess.run(["bash", str(ASSETS / "build.sh"), "wasm"], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot build wasm test modules (needs clang lld wasi-libc "
                    f"libclang-rt-14-dev-wasm32): {res.stderr.strip()[-300:]}")
    if not all((BUILD / m).exists() for m in ("probe.wasm", "counter.wasm")):
        pytest.skip(f"wasm test modules were not built: {res.stderr.strip()[-300:]}")
    return BUILD


@pytest.fixture
def rt(tmp_path) -> WasmRuntime:
    return WasmRuntime(cache_dir=tmp_path / "cache")


def probe(mods: Path, *args: str, **kw) -> TaskSpec:
    return TaskSpec("wasm", mods / "probe.wasm", args=list(args), **kw)


def counter(mods: Path, count: int, work: int, **kw) -> TaskSpec:
    return TaskSpec("wasm", mods / "counter.wasm", env={"COUNT": str(count), "WORK": str(work)}, **kw)


async def run(rt: WasmRuntime, spec: TaskSpec):
    """(status, stdout, stderr) of a task run to its end."""
    sb = await rt.prepare(spec)
    with trio.fail_after(GUARD_S):
        return await run_to_end(sb)


async def wait_for_output(sb, needle: bytes) -> bytes:
    seen = bytearray()
    async for c in sb.logs():
        seen.extend(c.data)
        if needle in seen:
            return bytes(seen)
    raise AssertionError(f"task ended without printing {needle!r}: {bytes(seen)!r}")


async def cancel_the_caller_of_a_loop(rt, mods: Path):
    """A looping guest whose caller's nursery is cancelled once it runs."""
    sb = await rt.prepare(probe(mods, "loop"))
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as n:
            await sb.start(n)
            await wait_for_output(sb, b"looping")
            n.cancel_scope.cancel()
    return sb


# --- WASI command modules ---

async def test_hello_output_and_usage(rt, wasm_modules):
    status, out, err = await run(rt, probe(wasm_modules, "hello"))
    assert (status.code, status.reason) == (0, None)
    assert out == b"hello, wasm\n"
    assert err == b"to stderr\n"
    assert status.usage.peak_memory_bytes > 0 and status.usage.wall_s > 0


@pytest.mark.parametrize("args,code", [(("exit", "0"), 0), (("exit", "3"), 3), (("exit-call", "42"), 42)])
async def test_exit_codes(rt, wasm_modules, args, code):
    status, _, _ = await run(rt, probe(wasm_modules, *args))
    assert (status.code, status.reason) == (code, None)


async def test_args_env_stdin(rt, wasm_modules):
    spec = probe(wasm_modules, "args", "two words", env={"GREETING": "bonjour"}, stdin=b"from stdin")
    status, out, _ = await run(rt, spec)
    assert status.code == 0
    assert out.decode().splitlines() == [
        "argv[0]=probe.wasm", "argv[1]=args", "argv[2]=two words",
        "GREETING=bonjour", "stdin:from stdin"]


async def test_env_is_not_inherited(rt, wasm_modules, monkeypatch):
    monkeypatch.setenv("GREETING", "leaked")
    _, out, _ = await run(rt, probe(wasm_modules, "args"))
    assert b"GREETING=(unset)" in out


async def test_trap_is_reported(rt, wasm_modules):
    status, _, err = await run(rt, probe(wasm_modules, "trap"))
    assert (status.code, status.reason) == (134, "trap")
    assert b"[synord] trap" in err and b"unreachable" in err


@pytest.mark.parametrize("args", [("hello",), ("exit", "3"), ("exit-call", "42"), ("trap",)])
async def test_direct_start_call_matches_the_public_api(rt, wasm_modules, monkeypatch, args):
    # A command's _start is looked up and called through the C API (faster than
    # wasmtime-py's wrappers); the public-API fallback must give the same result.
    import synord.runtimes.wasm as wasm_mod
    assert wasm_mod._DIRECT, "this wasmtime-py lacks the internals the direct call uses"
    results = []
    for direct in (True, False):
        monkeypatch.setattr(wasm_mod, "_DIRECT", direct)
        status, out, err = await run(rt, probe(wasm_modules, *args))
        assert status.usage.peak_memory_bytes > 0
        results.append((status.code, status.reason, out, err))
    assert results[0] == results[1]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_no_descriptor_outlives_its_task(rt, wasm_modules):
    # The pipes change hands (the worker reads a short guest's output, pumps a
    # long one's, the watcher closes what is left): none may leak.
    # Warm: modules compiled (wasmtime keeps a memfd per module's memory image), trio's threads exist.
    await run(rt, probe(wasm_modules, "hello"))
    await run(rt, counter(wasm_modules, 1, 0))
    before = _open_fds()
    for args in (("hello",), ("trap",), ("exit", "3")):
        await run(rt, probe(wasm_modules, *args))
    await run(rt, probe(wasm_modules, "loop", limits=Limits(timeout_s=0.05)))
    await run(rt, counter(wasm_modules, 3000, 0))  # more output than a pipe holds: pumped live
    await cancel_the_caller_of_a_loop(rt, wasm_modules)
    left = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in _open_fds() - before}
    assert not left


async def test_a_far_time_limit_does_not_hold_the_callers_nursery(rt, wasm_modules):
    # The time-limit timer runs in the caller's nursery; the task's end must
    # cancel it, or the nursery would wait an hour (the hang guard trips).
    status, out, _ = await run(rt, probe(wasm_modules, "hello", limits=Limits(timeout_s=3600)))
    assert (status.code, out) == (0, b"hello, wasm\n")


async def test_output_beyond_a_pipe_buffer_arrives_whole(rt, wasm_modules):
    # 3000 lines (~75 KiB) overflow the 64 KiB pipe before the guest ends: it
    # blocks until the output is pumped live, and nothing is lost or reordered.
    status, out, _ = await run(rt, counter(wasm_modules, 3000, 0))
    lines = out.decode().splitlines()
    assert status.reason is None and len(lines) == 3001
    assert [ln.split()[1] for ln in lines[:-1]] == [str(i) for i in range(1, 3001)]
    assert lines[-1].startswith("done steps=3000 ")


async def test_infinite_loop_times_out(rt, wasm_modules):
    status, out, err = await run(rt, probe(wasm_modules, "loop", limits=Limits(timeout_s=0.3)))
    assert (status.code, status.reason) == (124, "timeout")
    assert out == b"looping\n"
    assert b"time limit" in err


async def test_fuel(rt, wasm_modules):
    status, _, err = await run(rt, probe(wasm_modules, "spin", "1000000000", limits=Limits(fuel=1_000_000)))
    assert (status.code, status.reason) == (137, "out_of_fuel")
    assert b"fuel limit" in err
    status, out, _ = await run(rt, probe(wasm_modules, "spin", "1000", limits=Limits(fuel=10_000_000)))
    assert (status.code, status.reason, out) == (0, None, b"spun 499500\n")


async def test_memory_bomb_fails_cleanly(rt, wasm_modules):
    limit = 16 << 20
    status, _, err = await run(rt, probe(wasm_modules, "bomb", limits=Limits(memory_bytes=limit)))
    assert (status.code, status.reason) == (137, "oom")
    assert status.usage.peak_memory_bytes <= limit
    assert b"malloc failed" in err and b"memory limit" in err


async def test_initial_memory_over_limit_is_oom(rt, tmp_path):
    wasm = tmp_path / "big.wasm"
    wasm.write_bytes(wasmtime.wat2wasm('(module (memory (export "memory") 100) (func (export "_start")))'))
    status, _, err = await run(rt, TaskSpec("wasm", wasm, limits=Limits(memory_bytes=1 << 20)))
    assert status.reason == "oom"
    assert b"memory limit" in err


async def test_mounts_grant_only_what_is_asked(rt, wasm_modules, tmp_path):
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir(), ro.mkdir()
    (ro / "in.txt").write_text("input data\n")
    mounts = [Mount(rw, "/out", writable=True), Mount(ro, "/in")]

    status, out, _ = await run(rt, probe(wasm_modules, "write", "/out/result.txt", mounts=mounts))
    assert (status.code, out) == (0, b"write ok\n")
    assert (rw / "result.txt").read_text() == "written by wasm\n"

    status, out, _ = await run(rt, probe(wasm_modules, "read", "/in/in.txt", mounts=mounts))
    assert (status.code, out) == (0, b"read:input data\n")

    status, _, err = await run(rt, probe(wasm_modules, "write", "/in/evil.txt", mounts=mounts))
    assert status.code == 1 and b"open /in/evil.txt" in err
    assert not (ro / "evil.txt").exists()

    for path in ("/etc/passwd", "/in/../../etc/passwd", str(tmp_path / "ro" / "in.txt")):
        status, out, _ = await run(rt, probe(wasm_modules, "read", path, mounts=mounts))
        assert status.code == 1 and out == b"", path


async def test_network_is_refused(rt, wasm_modules):
    with pytest.raises(SpecError, match="network"):
        await rt.prepare(probe(wasm_modules, "hello", network=True))


async def test_kill_running_loop(rt, wasm_modules):
    sb = await rt.prepare(probe(wasm_modules, "loop"))
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as n:
            await sb.start(n)
            await wait_for_output(sb, b"looping")
            await sb.kill()
            status = await sb.wait()
    assert (status.code, status.reason) == (137, "killed")
    assert sb._worker_done  # the worker thread left wasm, nothing was abandoned
    await sb.kill()  # idempotent


async def test_a_kill_before_the_guest_runs_still_stops_it(rt, wasm_modules):
    # An untimed task has no epoch ticker: a kill that lands before the worker has
    # set its store's epoch deadline must still stop the guest, not leave it to
    # the abandon path (which would wait stop_grace_s and leave the thread running).
    for _ in range(5):
        sb = await rt.prepare(probe(wasm_modules, "loop"))
        sb.stop_grace_s = GUARD_S / 2
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as n:
                await sb.start(n)
                await sb.kill()  # before _main has even run
                status = await sb.wait()
        assert (status.code, status.reason) == (137, "killed")
        assert sb._worker_done


async def test_kill_of_a_guest_blocked_in_a_host_call(rt, wasm_modules):
    # Long enough that a loaded machine cannot finish the sleep before the kill.
    sb = await rt.prepare(probe(wasm_modules, "sleep", "6"))
    sb.stop_grace_s = 0.2
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as n:
            await sb.start(n)
            await wait_for_output(sb, b"sleeping")
            await sb.kill()
    status = await sb.wait()
    assert (status.code, status.reason) == (137, "killed")
    with trio.fail_after(GUARD_S + 6):  # ...and it stops on its own once the host call returns
        while not sb._worker_done:
            await trio.sleep(0.05)


async def test_cancelling_the_caller_stops_the_worker(rt, wasm_modules):
    sb = await cancel_the_caller_of_a_loop(rt, wasm_modules)
    assert sb._worker_done
    assert (await sb.wait()).reason == "killed"


async def test_concurrent_sandboxes_keep_their_own_limits(rt, wasm_modules):
    results = {}

    async def one(name, spec):
        results[name] = (await run(rt, spec))[0]

    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as n:
            n.start_soon(one, "timeout", probe(wasm_modules, "loop", limits=Limits(timeout_s=0.3)))
            n.start_soon(one, "fuel", probe(wasm_modules, "spin", "1000000000", limits=Limits(fuel=10**6)))
            n.start_soon(one, "long", probe(wasm_modules, "loop", limits=Limits(timeout_s=1.5)))
            n.start_soon(one, "hello", probe(wasm_modules, "hello"))
    assert {k: v.reason for k, v in results.items()} == {
        "timeout": "timeout", "fuel": "out_of_fuel", "long": "timeout", "hello": None}
    # The longer deadline was not cut short by the other sandbox's ticks.
    assert results["long"].usage.wall_s > results["timeout"].usage.wall_s


async def test_compiled_module_cache(tmp_path, wasm_modules):
    cache = tmp_path / "cache"
    first = WasmRuntime(cache_dir=cache)
    await first.prepare(probe(wasm_modules, "hello"))
    assert first.cache.stats["compiles"] == 1
    entries = list(cache.glob("*.cwasm"))
    sha = hashlib.sha256((wasm_modules / "probe.wasm").read_bytes()).hexdigest()
    assert len(entries) == 1 and entries[0].name.startswith(sha)

    second = WasmRuntime(cache_dir=cache)  # a new daemon process would look like this
    status, out, _ = await run(second, probe(wasm_modules, "hello"))
    assert (status.code, out) == (0, b"hello, wasm\n")
    await second.prepare(probe(wasm_modules, "hello"))
    assert second.cache.stats == {"memory_hits": 1, "disk_hits": 1, "compiles": 0}

    # Fuel metering compiles different code: a separate cache entry.
    await second.prepare(probe(wasm_modules, "hello", limits=Limits(fuel=10**9)))
    assert second.cache.stats["compiles"] == 1 and len(list(cache.glob("*.cwasm"))) == 2

    # A damaged entry is detected and rebuilt, never deserialized.
    entries[0].write_bytes(entries[0].read_bytes()[:-100] + b"\0" * 100)
    third = WasmRuntime(cache_dir=cache)
    status, out, _ = await run(third, probe(wasm_modules, "hello"))
    assert third.cache.stats["compiles"] == 1 and out == b"hello, wasm\n"


async def test_bad_artefacts_are_refused(rt, wasm_modules, tmp_path):
    good = wasm_modules / "probe.wasm"
    with pytest.raises(SpecError, match="sha256 mismatch"):
        await rt.prepare(TaskSpec("wasm", good, sha256="0" * 64))
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    await rt.prepare(TaskSpec("wasm", good, sha256="sha256:" + sha))

    text = tmp_path / "script.sh"
    text.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(SpecError, match="not a WebAssembly module"):
        await rt.prepare(TaskSpec("wasm", text))
    with pytest.raises(SpecError, match="not a WebAssembly module"):
        await rt.prepare(TaskSpec("wasm", tmp_path))
    with pytest.raises(SpecError, match="does not exist"):
        await rt.prepare(TaskSpec("wasm", tmp_path / "missing.wasm"))
    broken = tmp_path / "broken.wasm"
    broken.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(SpecError, match="invalid WebAssembly module"):
        await rt.prepare(TaskSpec("wasm", broken))
    lib = tmp_path / "lib.wasm"
    lib.write_bytes(wasmtime.wat2wasm('(module (func (export "f")))'))
    with pytest.raises(SpecError, match="neither _start"):
        await rt.prepare(TaskSpec("wasm", lib))


# --- step ABI v1: checkpoint / restore ---

def lines(b: bytes) -> list[str]:
    return b.decode().splitlines()


async def checkpoint_mid_run(rt, spec, dest: Path, after: bytes, leave_running: bool):
    """Run spec, checkpoint once `after` was printed; (info, status, stdout)."""
    sb = await rt.prepare(spec)
    out = bytearray()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as n:
            await sb.start(n)
            info = None
            async for c in sb.logs():
                out.extend(c.data)
                if info is None and after in out:
                    info = await sb.checkpoint(dest, leave_running=leave_running)
            status = await sb.wait()
    return info, status, bytes(out)


# Enough steps and work per step that the checkpoint lands mid-run even on a busy machine.
COUNT, WORK = 300, 1_000_000


async def test_checkpoint_then_restore_in_a_fresh_process(rt, wasm_modules, tmp_path):
    ref_status, ref_out, _ = await run(rt, counter(wasm_modules, COUNT, WORK))
    assert ref_status.reason is None
    assert lines(ref_out)[-1].startswith(f"done steps={COUNT} ")
    assert len(lines(ref_out)) == COUNT + 1

    dest = tmp_path / "ckpt"
    info, status, before = await checkpoint_mid_run(
        rt, counter(wasm_modules, COUNT, WORK), dest, b"step 5 ", leave_running=False)
    assert status.reason == "checkpointed"
    # One tar, written and hashed in one pass: the digest is the file's own.
    assert info.path == dest and info.archive == dest / "checkpoint.tar"
    assert (info.bytes, info.sha256) == (info.archive.stat().st_size, sha256_file(info.archive))
    files = _members(dest)
    assert list(files) == ["state.msgpack", "synord-output.json", "memory.bin"]  # state first
    state = msgpack.unpackb(files["state.msgpack"])
    assert 5 <= state["steps"] < COUNT and state["abi"] == 1
    assert state["memory"]["bytes"] == len(files["memory.bin"]) > 0
    assert "__stack_pointer" in [g["name"] for g in state["globals"]]
    assert lines(before) == lines(ref_out)[:state["steps"]]
    # the exact output position of the checkpoint: every byte printed by the steps before it
    offsets = json.loads(files["synord-output.json"])
    assert offsets["stdout"] == len(before) > 0
    assert json.loads((dest / "synord-output.json").read_text()) == offsets  # the executor's copy

    script = (
        "import json, sys, trio\n"
        "from pathlib import Path\n"
        "from synord.runtimes.base import TaskSpec\n"
        "from synord.runtimes.wasm import WasmRuntime\n"
        "async def main():\n"
        "    rt = WasmRuntime()\n"
        "    spec = TaskSpec('wasm', Path(sys.argv[1]), env={'COUNT': sys.argv[3], 'WORK': sys.argv[4]})\n"
        "    sb = await rt.restore(spec, Path(sys.argv[2]))\n"
        "    out = bytearray()\n"
        "    async with trio.open_nursery() as n:\n"
        "        await sb.start(n)\n"
        "        async for c in sb.logs():\n"
        "            out.extend(c.data)\n"
        "        st = await sb.wait()\n"
        "    print(json.dumps({'code': st.code, 'reason': st.reason, 'out': out.decode()}))\n"
        "trio.run(main)\n")
    res = await trio.run_process(
        [sys.executable, "-c", script, str(wasm_modules / "counter.wasm"), str(dest), str(COUNT), str(WORK)],
        capture_stdout=True, capture_stderr=True, check=False,
        env=child_env({"SYNORD_CACHE_DIR": str(tmp_path / "cache2")}))
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    after = json.loads(res.stdout)
    assert (after["code"], after["reason"]) == (ref_status.code, None)
    assert lines(before) + lines(after["out"].encode()) == lines(ref_out)


async def test_checkpoint_leave_running_then_restore(rt, wasm_modules, tmp_path):
    spec = counter(wasm_modules, COUNT, WORK // 4)
    dest = tmp_path / "ckpt"
    info, status, full = await checkpoint_mid_run(rt, spec, dest, b"step 3 ", leave_running=True)
    assert status.reason is None and len(lines(full)) == COUNT + 1  # kept running to the end
    steps = msgpack.unpackb(_members(dest)["state.msgpack"])["steps"]

    sb = await rt.restore(spec, dest)
    status2, tail, _ = await _run_prepared(sb)
    assert status2.code == status.code
    assert lines(tail) == lines(full)[steps:]
    assert status2.usage.cpu_s > 0


async def _run_prepared(sb):
    out = bytearray()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as n:
            await sb.start(n)
            async for c in sb.logs():
                out.extend(c.data)
            status = await sb.wait()
    return status, bytes(out), b""


@pytest.fixture
async def checkpoint_dir(rt, wasm_modules, tmp_path) -> Path:
    dest = tmp_path / "ckpt"
    _, status, _ = await checkpoint_mid_run(
        rt, counter(wasm_modules, 10**6, 1000), dest, b"step 1 ", leave_running=False)
    assert status.reason == "checkpointed"
    return dest


def _members(d: Path) -> dict[str, bytes]:
    """The checkpoint archive's files, in archive order."""
    with tarfile.open(d / "checkpoint.tar") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def _rewrite(edit):
    """Damage: the archive rewritten with edit(files) applied (a valid tar around bad content)."""
    def damage(d: Path):
        files = _members(d)
        edit(files)
        with tarfile.open(d / "checkpoint.tar", "w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return damage


def _edit_state(**changes):
    def edit(files):
        state = msgpack.unpackb(files["state.msgpack"])
        state.update(changes)
        files["state.msgpack"] = msgpack.packb(state)
    return _rewrite(edit)


def _add_symlink(d: Path):
    with tarfile.open(d / "checkpoint.tar", "a") as tar:
        info = tarfile.TarInfo("state.msgpack")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)


def _truncate(d: Path):
    a = d / "checkpoint.tar"
    a.write_bytes(a.read_bytes()[:a.stat().st_size // 2])


@pytest.mark.parametrize("damage,match", [
    (_rewrite(lambda f: f.update({"memory.bin": f["memory.bin"][:-65536]})), "memory image"),
    (_rewrite(lambda f: f.update({"state.msgpack": b"\xc1garbage"})), "unreadable state"),
    (_rewrite(lambda f: f.pop("state.msgpack")), "missing"),
    (_rewrite(lambda f: f.update({"../escape": b"x"})), "unexpected archive member"),
    (_add_symlink, "unexpected archive member"),
    (_truncate, "archive"),
    (lambda d: (d / "checkpoint.tar").write_bytes(b"\0" * 100), "archive"),
    (_edit_state(module_sha256="ab" * 32), "not by this module"),
    (_edit_state(abi=2), "unsupported ABI"),
    (_edit_state(globals=[{"name": "__stack_pointer", "type": "i64", "value": 1}]), "does not match"),
    (_edit_state(steps="many"), "malformed"),
])
async def test_damaged_checkpoint_is_refused(rt, wasm_modules, checkpoint_dir, damage, match):
    spec = counter(wasm_modules, 10**6, 1000)
    await rt.restore(spec, checkpoint_dir)  # intact: accepted
    damage(checkpoint_dir)
    with pytest.raises(SpecError, match=match):
        await rt.restore(spec, checkpoint_dir)


async def test_unpacked_checkpoint_with_a_memory_digest_is_verified(rt, wasm_modules, checkpoint_dir, tmp_path):
    """The older form (files, memory digest in the state) still restores, and a flipped
    byte of its memory is refused."""
    spec = counter(wasm_modules, 10**6, 1000)
    files, old = _members(checkpoint_dir), tmp_path / "old"
    old.mkdir()
    state = msgpack.unpackb(files["state.msgpack"])
    state["memory"]["sha256"] = hashlib.sha256(files["memory.bin"]).hexdigest()
    (old / "state.msgpack").write_bytes(msgpack.packb(state))
    (old / "memory.bin").write_bytes(files["memory.bin"])
    sb = await rt.restore(spec, old)
    assert sb.restore_from.steps == state["steps"]
    data = bytearray(files["memory.bin"])
    data[70000] ^= 0xFF
    (old / "memory.bin").write_bytes(bytes(data))
    with pytest.raises(SpecError, match="corrupted"):
        await rt.restore(spec, old)


async def test_restore_respects_memory_limit(rt, wasm_modules, checkpoint_dir):
    spec = counter(wasm_modules, 10**6, 1000, limits=Limits(memory_bytes=64 << 10))
    with pytest.raises(SpecError, match="memory"):
        await rt.restore(spec, checkpoint_dir)


async def test_command_module_cannot_checkpoint(rt, wasm_modules, tmp_path):
    sb = await rt.prepare(probe(wasm_modules, "loop"))
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as n:
            await sb.start(n)
            await wait_for_output(sb, b"looping")
            with pytest.raises(CheckpointUnsupported):
                await sb.checkpoint(tmp_path / "ckpt")
            await sb.kill()
    with pytest.raises(CheckpointUnsupported):
        await rt.restore(probe(wasm_modules, "loop"), tmp_path)


async def test_step_module_with_hidden_state_is_refused(rt, tmp_path):
    wasm = tmp_path / "hidden.wasm"
    wasm.write_bytes(wasmtime.wat2wasm("""
        (module (memory (export "memory") 1)
          (global $n (mut i32) (i32.const 0))
          (func (export "synord_step") (result i32)
            (global.set $n (i32.add (global.get $n) (i32.const 1)))
            (i32.ge_u (global.get $n) (i32.const 3))))"""))
    with pytest.raises(SpecError, match="not exported"):
        await rt.prepare(TaskSpec("wasm", wasm))


async def test_wat_step_module_with_exported_state(rt, tmp_path):
    # The smallest ABI v1 module: its state is one exported mutable global.
    wasm = tmp_path / "steps.wasm"
    wasm.write_bytes(wasmtime.wat2wasm("""
        (module (memory (export "memory") 1)
          (global $n (export "n") (mut i32) (i32.const 0))
          (func (export "synord_step") (result i32)
            (global.set $n (i32.add (global.get $n) (i32.const 1)))
            (i32.ge_u (global.get $n) (i32.const 1000)))
          (func (export "synord_exit_code") (result i32) (i32.rem_u (global.get $n) (i32.const 256))))"""))
    status, _, _ = await run(rt, TaskSpec("wasm", wasm))
    assert (status.code, status.reason) == (1000 % 256, None)
