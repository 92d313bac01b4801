"""The microVM sandbox: real QEMU microvm guests (TCG here, KVM where usable).

Each VM boot costs ~2 s of CPU under TCG, so the suite boots six guests (two
more are killed before they finish booting) and restores three checkpoints
(one of them damaged); the framing, cpio, availability and checkpoint-refusal
checks need no VM.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import trio

from synord.runtimes import get_runtime
from synord.runtimes.base import OUTPUT_OFFSETS_FILE, Limits, SpecError, TaskSpec
from synord.runtimes.cpio import CpioWriter
from synord.runtimes.guest_exec import FRAME_MAGIC
from synord.runtimes.microvm import ConsoleParser, MicroVMRuntime, kernel_cmdline

from sandbox_helpers import run_to_end

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "packaging" / "guest" / "build.sh"


def frame(kind: bytes, payload: bytes) -> bytes:
    return FRAME_MAGIC + kind + len(payload).to_bytes(2, "big") + payload


# --------------------------------------------------------------------------
# No VM needed


def test_console_parser_splits_streams_across_arbitrary_reads():
    wire = (b"[ 0.9] kernel noise\r\n" + frame(b"o", b"hello\n") + frame(b"e", b"oops\n")
            + frame(b"o", b"\x00\x01SYbinary") + frame(b"x", b"42") + b"reboot: Power down\r\n")
    for step in (1, 2, 3, 7, len(wire)):
        p = ConsoleParser()
        chunks = []
        for i in range(0, len(wire), step):
            chunks += p.feed(wire[i:i + step])
        assert [(c.stream, c.data) for c in chunks] == [
            ("stdout", b"hello\n"), ("stderr", b"oops\n"), ("stdout", b"\x00\x01SYbinary")]
        assert p.exit_code == 42
        assert b"kernel noise" in p.noise and b"Power down" in p.noise


def test_console_parser_resumes_from_saved_half_frame():
    f = frame(b"o", b"0123456789")
    p = ConsoleParser()
    assert p.feed(f[:8]) == []
    saved = p.pending  # what a checkpoint stores in meta.json
    q = ConsoleParser(saved)
    assert [c.data for c in q.feed(f[8:])] == [b"0123456789"]


def test_cpio_writer_output_is_read_by_gnu_cpio(tmp_path):
    if not shutil.which("cpio"):
        pytest.skip("cpio not installed")
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_bytes(b"x" * 5)
    os.chmod(src / "bin" / "tool", 0o751)
    os.symlink("tool", src / "bin" / "link")
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_tree(src, "rootfs")
    w.add_bytes("synord/argv", b"echo\0hi\0")
    w.close()
    listing = subprocess.run(["cpio", "-t", "-v", "--quiet"], input=buf.getvalue(),
                             capture_output=True, check=True).stdout.decode()
    assert "rootfs/bin/link -> tool" in listing
    assert "-rwxr-x--x" in listing and "rootfs/bin/tool" in listing
    assert "synord/argv" in listing
    # deterministic: the same tree gives the same bytes
    buf2 = io.BytesIO()
    w2 = CpioWriter(buf2)
    w2.add_tree(src, "rootfs")
    w2.add_bytes("synord/argv", b"echo\0hi\0")
    w2.close()
    assert buf.getvalue() == buf2.getvalue()


def test_unavailable_without_guest(tmp_path):
    rt = MicroVMRuntime(guest_dir=tmp_path / "nothing")
    a = rt.available()
    assert not a.available
    assert "packaging/guest/build.sh" in a.reason


def test_accel_override_is_validated(monkeypatch, tmp_path):
    monkeypatch.setenv("SYNORD_MICROVM_ACCEL", "warp")
    (tmp_path / "vmlinux").write_bytes(b"x")
    (tmp_path / "base.cpio").write_bytes(b"x")
    a = MicroVMRuntime(guest_dir=tmp_path).available()
    assert not a.available and "SYNORD_MICROVM_ACCEL" in a.reason


def test_cmdline_pins_tsc_for_tcg():
    # without these ~15 % of TCG boots hang calibrating the TSC
    assert "tsc_early_khz=" in kernel_cmdline("qemu") and "tsc=reliable" in kernel_cmdline("qemu")
    assert "tsc" not in kernel_cmdline("qemu", "kvm")


# --------------------------------------------------------------------------
# Real guests


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")
    rt = MicroVMRuntime()
    if not rt.available().available and "build.sh" in rt.available().reason:
        r = subprocess.run(["sh", str(BUILD)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot build the guest: {r.stderr.strip()[-300:]}")
    a = rt.available()
    assert a.available, a.reason
    return rt.guest_dir


@pytest.fixture(scope="session")
def image(guest_dir, tmp_path_factory) -> Path:
    from synord.runtimes.oci_build import build_busybox_image
    dest = tmp_path_factory.mktemp("img") / "busybox"
    build_busybox_image(dest, entrypoint=["/bin/sh", "-c"], cmd=['echo "hello from $WHO"'],
                        env=["PATH=/bin", "WHO=the image"])
    return dest


async def run_task(spec: TaskSpec):
    rt = get_runtime("microvm")
    status, out, err = await run_to_end(await rt.prepare(spec))
    return status, {"stdout": out, "stderr": err}


def qemu_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if "qemu" in " ".join(p.cmdline() if p.is_running() else [])]


@pytest.mark.slow
async def test_hello_from_oci_image(image):
    status, out = await run_task(TaskSpec(kind="microvm", artifact=image))
    assert status.reason is None
    assert status.code == 0
    assert out["stdout"] == b"hello from the image\n"
    assert status.usage.cpu_s > 0 and status.usage.peak_memory_bytes > 0
    assert not qemu_children()


@pytest.mark.slow
async def test_args_env_stdin_stderr_exit_code_and_no_network(image):
    script = ('echo "arg=$0 $1 env=$WHO"; read l; echo "in=$l"; echo oops >&2;'
              ' ls /sys/class/net; exit 7')
    status, out = await run_task(TaskSpec(
        kind="microvm", artifact=image, args=[script, "first", "second"], stdin=b"fed\n",
        env={"WHO": "spec"}, limits=Limits(cpus=1, memory_bytes=200 << 20)))
    assert status.code == 7 and status.reason is None
    lines = out["stdout"].decode().splitlines()
    assert lines[:2] == ["arg=first second env=spec", "in=fed"]
    assert lines[2:] == ["lo"]  # no network device in the guest, only loopback
    assert out["stderr"] == b"oops\n"


async def test_bad_digest_is_refused_before_boot(image, tmp_path):
    from synord.runtimes.oci_build import pack_oci_archive
    tar = tmp_path / "img.tar"
    pack_oci_archive(image, tar)
    with pytest.raises(SpecError, match="sha256 mismatch"):
        await get_runtime("microvm").prepare(
            TaskSpec(kind="microvm", artifact=tar, sha256="0" * 64))


@pytest.mark.slow
async def test_out_of_memory_is_reported(image):
    # `tail` buffers an endless line: the guest's OOM killer ends it
    status, out = await run_task(TaskSpec(kind="microvm", artifact=image, args=["tail /dev/zero"],
                                          limits=Limits(memory_bytes=128 << 20, timeout_s=120)))
    assert status.code == 137
    assert status.reason == "oom"


async def test_restore_refuses_bad_checkpoints(guest_dir, tmp_path):
    rt = MicroVMRuntime()
    spec = TaskSpec(kind="microvm", artifact=tmp_path, limits=Limits(memory_bytes=256 << 20))
    with pytest.raises(SpecError, match="not a microvm checkpoint"):
        await rt.restore(spec, tmp_path)
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "initramfs.cpio").write_bytes(b"x")
    (ck / "vm.state").write_bytes(b"x")
    meta = {"version": 1, "kind": "microvm", "state_file": "../escape",
            "machine": {"mem_mib": 256, "smp": 1, "cmdline": "", "accel": "tcg"}}
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SpecError, match="outside the checkpoint"):
        await rt.restore(spec, ck)
    meta["state_file"] = "vm.state"
    meta["machine"]["mem_mib"] = 65536  # a peer cannot grant itself more than the spec
    (ck / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(SpecError, match="limits allow 256 MiB"):
        await rt.restore(spec, ck)


@pytest.mark.slow
async def test_timeout_kills_the_vm(image):
    status, _ = await run_task(TaskSpec(kind="microvm", artifact=image, args=["sleep 600"],
                                        limits=Limits(timeout_s=4)))
    assert status.reason == "timeout"
    assert status.code != 0
    assert not qemu_children()


@pytest.mark.slow
async def test_kill_leaves_no_qemu(image, tmp_path):
    sb = await get_runtime("microvm").prepare(TaskSpec(
        kind="microvm", artifact=image, args=["echo up; sleep 600"], workdir=tmp_path / "w"))
    async with trio.open_nursery() as n:
        await sb.start(n)
        pid = sb._proc.pid
        async for chunk in sb.logs():
            assert chunk.data == b"up\n"
            break
        await sb.kill()
        await sb.kill()  # idempotent
        status = await sb.wait()
    assert status.reason == "killed"
    assert not psutil.pid_exists(pid)
    assert not qemu_children()

    # cancelling the nursery that runs the sandbox reaps QEMU as well
    sb2 = await get_runtime("microvm").prepare(TaskSpec(kind="microvm", artifact=image,
                                                        args=["sleep 600"]))
    async with trio.open_nursery() as n:
        await sb2.start(n)
        pid2 = sb2._proc.pid
        n.cancel_scope.cancel()
    assert not psutil.pid_exists(pid2)
    assert (await sb2.wait()).reason == "killed"


DAEMON = """
import sys, trio
from pathlib import Path
from synord.runtimes import get_runtime
from synord.runtimes.base import TaskSpec

async def main():
    sb = await get_runtime("microvm").prepare(
        TaskSpec(kind="microvm", artifact=Path(sys.argv[1]), args=["sleep 600"],
                 workdir=Path(sys.argv[2])))
    async with trio.open_nursery() as n:
        await sb.start(n)
        print(sb._proc.pid, flush=True)
        await trio.sleep(600)

trio.run(main)
"""


@pytest.mark.slow
async def test_vm_dies_with_a_killed_daemon(image, tmp_path):
    # PDEATHSIG must be anchored to a live thread: SIGKILL of the daemon takes QEMU down
    daemon = await trio.lowlevel.open_process(
        [sys.executable, "-c", DAEMON, str(image), str(tmp_path / "w")], cwd=str(REPO), stdout=subprocess.PIPE)
    try:
        with trio.fail_after(60):
            line = b""
            while not line.endswith(b"\n"):
                line += await daemon.stdout.receive_some(100)
        qemu = psutil.Process(int(line))
        assert "qemu" in " ".join(qemu.cmdline())
    finally:
        daemon.kill()
        await daemon.wait()
    with trio.fail_after(10):
        while qemu.is_running() and qemu.status() != psutil.STATUS_ZOMBIE:
            await trio.sleep(0.05)


@pytest.mark.slow
async def test_checkpoint_restore_continues_counting(image, tmp_path):
    rt = get_runtime("microvm")
    count = 'i=0; while [ $i -lt 25 ]; do echo $i; i=$((i+1)); sleep 0.2; done'
    spec = TaskSpec(kind="microvm", artifact=image, args=[count])
    sb = await rt.prepare(spec)
    ckpt = tmp_path / "ckpt"
    async with trio.open_nursery() as n:
        await sb.start(n)
        lines = 0
        async for chunk in sb.logs():
            lines += chunk.data.count(b"\n")
            if lines >= 3:
                break
        # first a snapshot that leaves the guest running ...
        early = await sb.checkpoint(tmp_path / "early", leave_running=True)
        async for chunk in sb.logs():
            lines += chunk.data.count(b"\n")
            if lines >= 8:
                break
        # ... then one that stops it
        info = await sb.checkpoint(ckpt)
        first = await sb.wait()
        before = b"".join([c.data async for c in sb.logs()])
    assert first.reason == "checkpointed"
    meta = json.loads((ckpt / "meta.json").read_text())
    state = ckpt / meta["state_file"]
    assert info.bytes > 0 and state.is_file()

    sb2 = await rt.restore(TaskSpec(kind="microvm", artifact=image), ckpt)
    async with trio.open_nursery() as n:
        await sb2.start(n)
        after = b"".join([c.data async for c in sb2.logs()])
        second = await sb2.wait()
    assert second.code == 0 and second.reason is None
    # the guest went on where it stopped: nothing repeated, nothing lost
    assert not after.startswith(b"0\n")
    assert before + after == b"".join(b"%d\n" % i for i in range(25))

    # the snapshot taken while running resumes at its own point, a contiguous tail
    assert early.bytes > 0
    sb_early = await rt.restore(TaskSpec(kind="microvm", artifact=image), early.path)
    async with trio.open_nursery() as n:
        await sb_early.start(n)
        tail = b"".join([c.data async for c in sb_early.logs()])
    numbers = [int(x) for x in tail.split()]
    assert numbers and 3 <= numbers[0] <= 9
    assert numbers == list(range(numbers[0], 25))
    # and it says exactly how much output came before it (the restored tail follows on)
    offsets = json.loads((early.path / OUTPUT_OFFSETS_FILE).read_text())
    assert offsets == {"stdout": len(b"".join(b"%d\n" % i for i in range(numbers[0]))), "stderr": 0}

    # a damaged state is refused with a clear error, not a hang
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    sb3 = await rt.restore(TaskSpec(kind="microvm", artifact=image), ckpt)
    err: BaseException | None = None
    try:
        async with trio.open_nursery() as n:
            await sb3.start(n)
    except BaseExceptionGroup as eg:  # trio nurseries wrap what their body raises
        err = eg.exceptions[0]
    assert isinstance(err, SpecError) and "cannot restore microvm" in str(err)
    assert (await sb3.wait()).reason == "restore_failed"
    assert not qemu_children()
