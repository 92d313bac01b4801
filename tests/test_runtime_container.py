"""ContainerRuntime with the real OCI runtimes (crun/runc, runsc for checkpoints).

Needs root, crun or runc, and busybox-static; skips (with the reason) only where
the machine lacks them."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from synord.runtimes import oci_build
from synord.runtimes.base import (CheckpointUnsupported, Limits, Mount, SpecError, TaskSpec)
from synord.runtimes.container import ContainerRuntime

from sandbox_helpers import run_to_end

RT = ContainerRuntime()
_avail = RT.available()
if not _avail.available:
    pytest.skip(f"containers unavailable: {_avail.reason}", allow_module_level=True)
try:
    oci_build.busybox_binary()
except SpecError as e:
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("img") / "busybox"
    oci_build.build_busybox_image(d, files={"/work/count.sh": "#!/bin/sh\ni=0\nwhile true; do echo $i; i=$((i+1)); sleep 0.1; done\n"})
    return d


def spec(image: Path, args: list[str], tmp_path: Path, **kw) -> TaskSpec:
    return TaskSpec(kind="container", artifact=image, args=args, workdir=tmp_path / "wd", **kw)


def leftovers(sb) -> tuple[set[int], bool]:
    return sb.cgroup.pids(), sb.cgroup.exists()


async def test_output_exit_code_args_env(image, tmp_path):
    sb = await RT.prepare(spec(image, ["/bin/sh", "-c", 'echo "out $FOO"; echo err >&2; exit 7'],
                               tmp_path, env={"FOO": "bar"}))
    status, out, err = await run_to_end(sb)
    assert status.code == 7 and status.reason is None
    assert out == b"out bar\n" and err == b"err\n"
    assert status.usage.wall_s > 0 and status.usage.peak_memory_bytes > 0
    assert leftovers(sb) == (set(), False)


async def test_image_cmd_used_and_args_replace_it(tmp_path):
    img = tmp_path / "img"
    oci_build.build_busybox_image(img, entrypoint=["/bin/echo", "ep"], cmd=["default"])
    _, out, _ = await run_to_end(await RT.prepare(TaskSpec(kind="container", artifact=img, workdir=tmp_path / "a")))
    assert out == b"ep default\n"
    _, out, _ = await run_to_end(await RT.prepare(TaskSpec(kind="container", artifact=img, args=["x", "y"],
                                                    workdir=tmp_path / "b")))
    assert out == b"ep x y\n"


async def test_stdin(image, tmp_path):
    status, out, _ = await run_to_end(await RT.prepare(spec(image, ["/bin/cat"], tmp_path, stdin=b"piped")))
    assert (status.code, out) == (0, b"piped")


async def test_memory_bomb_is_oom(image, tmp_path):
    sb = await RT.prepare(spec(image, ["/bin/sh", "-c", "x=a; while true; do x=$x$x; done"], tmp_path,
                               limits=Limits(memory_bytes=64 << 20, timeout_s=60)))
    status, _, _ = await run_to_end(sb)
    assert status.reason == "oom" and status.code == 137
    assert status.usage.peak_memory_bytes <= 64 << 20
    assert leftovers(sb) == (set(), False)


async def test_fork_bomb_contained(image, tmp_path):
    script = "bomb() { bomb | bomb & }; bomb; sleep 1; echo survived"
    sb = await RT.prepare(spec(image, ["/bin/sh", "-c", script], tmp_path,
                               limits=Limits(pids=32, timeout_s=60)))
    status, out, err = await run_to_end(sb)
    assert b"can't fork" in err  # the bomb hit the pids wall
    # Either the main shell kept going, or its own fork failed first and it exited: reason "pids".
    assert b"survived" in out or status.reason == "pids", (status, out)
    assert leftovers(sb) == (set(), False)  # and every bomb process is gone with the container


async def test_timeout_kills(image, tmp_path):
    sb = await RT.prepare(spec(image, ["/bin/sh", "-c", "while true; do :; done"], tmp_path,
                               limits=Limits(timeout_s=1.0, cpus=0.5)))
    status, _, _ = await run_to_end(sb)
    assert status.reason == "timeout" and status.code != 0
    assert 0 < status.usage.cpu_s < status.usage.wall_s  # cpu quota of half a core held
    assert leftovers(sb) == (set(), False)


async def test_no_network_only_lo(image, tmp_path):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        sb = await RT.prepare(spec(image, ["/bin/sh", "-c",
                                           f"cat /proc/net/dev; nc -w 1 127.0.0.1 {port} </dev/null && echo CONNECTED"],
                                   tmp_path))
        status, out, _ = await run_to_end(sb)
    finally:
        srv.close()
    ifaces = [line.split(":")[0].strip() for line in out.decode().splitlines()[2:] if ":" in line]
    assert ifaces == ["lo"]
    assert b"CONNECTED" not in out


async def test_readonly_root_and_mounts(image, tmp_path):
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "in.txt").write_text("input")
    script = ("touch /root-write 2>/dev/null && echo ROOT_WRITABLE; "
              "touch /data/in/x 2>/dev/null && echo RO_WRITABLE; "
              "cat /data/in/in.txt > /data/out/copy && echo OUT_OK; "
              "echo tmp > /tmp/t && echo TMP_OK; "
              "unshare -m true 2>/dev/null && echo UNSHARE_OK; exit 0")
    sb = await RT.prepare(spec(image, ["/bin/sh", "-c", script], tmp_path,
                               mounts=[Mount(ro, "/data/in"), Mount(rw, "/data/out", writable=True)]))
    status, out, _ = await run_to_end(sb)
    assert status.code == 0
    assert b"ROOT_WRITABLE" not in out and b"RO_WRITABLE" not in out and b"UNSHARE_OK" not in out
    assert b"OUT_OK" in out and b"TMP_OK" in out
    assert (rw / "copy").read_text() == "input"
    assert not (ro / "x").exists()


async def test_kill_leaves_nothing(image, tmp_path):
    sb = await RT.prepare(spec(image, ["/bin/sh", "-c", "sleep 300 & sleep 300; echo never"], tmp_path))
    async with trio.open_nursery() as n:
        await sb.start(n)
        with trio.move_on_after(0.5):
            await sb.wait()
        pids = sb.cgroup.pids()
        assert pids  # the container really runs inside our cgroup
        await sb.kill()
        status = await sb.wait()
        await sb.kill()  # idempotent
        assert [c async for c in sb.logs()] == []  # the log stream ends once killed
    assert status.reason == "killed"
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")
    assert leftovers(sb) == (set(), False)


@pytest.mark.parametrize("damage", ["digest", "missing", "traversal"])
async def test_broken_image_refused_before_run(tmp_path, damage):
    img = tmp_path / "img"
    oci_build.build_busybox_image(img, cmd=["/bin/touch", "/tmp/ran"])
    blobs = sorted((img / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    if damage == "digest":
        big = blobs[-1]
        data = bytearray(big.read_bytes())
        data[100] ^= 1
        big.write_bytes(bytes(data))
    elif damage == "missing":
        blobs[-1].unlink()
    else:
        img2 = tmp_path / "evil"
        import io
        import tarfile
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            ti = tarfile.TarInfo("../../escaped")
            ti.size = 1
            tar.addfile(ti, io.BytesIO(b"x"))
        oci_build.build_image(img2, [oci_build.busybox_layer(), buf.getvalue()], cmd=["/bin/true"])
        img = img2
    with pytest.raises(SpecError):
        await RT.prepare(TaskSpec(kind="container", artifact=img, workdir=tmp_path / "wd"))
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


async def test_oci_archive_with_digest(image, tmp_path):
    tar = tmp_path / "img.tar"
    digest = oci_build.pack_oci_archive(image, tar)
    status, out, _ = await run_to_end(await RT.prepare(TaskSpec(kind="container", artifact=tar, sha256=digest,
                                                         args=["/bin/echo", "ok"], workdir=tmp_path / "wd")))
    assert out == b"ok\n"
    with pytest.raises(SpecError):
        await RT.prepare(TaskSpec(kind="container", artifact=tar, sha256="0" * 64, workdir=tmp_path / "w2"))


async def test_rootfs_cache_by_digest(image, tmp_path):
    rt = ContainerRuntime(cache_dir=tmp_path / "cache")
    for i in range(2):
        _, out, _ = await run_to_end(await rt.prepare(TaskSpec(kind="container", artifact=image, args=["/bin/echo", str(i)],
                                                        workdir=tmp_path / f"wd{i}")))
        assert out == f"{i}\n".encode()
    assert len(list((tmp_path / "cache").iterdir())) == 1


async def test_crun_task_cannot_checkpoint(image, tmp_path):
    sb = await RT.prepare(spec(image, ["/bin/sleep", "5"], tmp_path))
    assert not sb.supports_checkpoint
    with pytest.raises(CheckpointUnsupported):
        await sb.checkpoint(tmp_path / "ck")


@pytest.mark.skipif(not RT.checkpoint_available().available, reason="runsc (gVisor) not installed")
async def test_runsc_checkpoint_restore_continues(image, tmp_path):
    def numbers(buf: bytes) -> list[int]:
        return [int(x) for x in buf.split()]

    sb = await RT.prepare(spec(image, ["/work/count.sh"], tmp_path, checkpointable=True))
    assert sb.supports_checkpoint and sb.engine_name == "runsc"
    out = bytearray()
    async with trio.open_nursery() as n:
        await sb.start(n)
        async for c in sb.logs():
            out.extend(c.data)
            if len(numbers(out)) >= 5:
                break
        info = await sb.checkpoint(tmp_path / "ck")
        status = await sb.wait()
    assert status.reason == "checkpointed"
    assert info.bytes > 0 and len(info.sha256) == 64
    before = numbers(b"".join([c.data async for c in sb.logs()]))  # logs() replays from the start
    assert before == list(range(len(before)))

    sb2 = await RT.restore(TaskSpec(kind="container", artifact=image, args=["/work/count.sh"],
                                    workdir=tmp_path / "wd2"), tmp_path / "ck")
    after = bytearray()
    async with trio.open_nursery() as n:
        await sb2.start(n)
        async for c in sb2.logs():
            after.extend(c.data)
            if len(numbers(after)) >= 3:
                break
        await sb2.kill()
    resumed = numbers(after)
    assert resumed[0] == before[-1] + 1  # continues where it stopped, not from 0
    assert resumed == list(range(resumed[0], resumed[0] + len(resumed)))
    assert leftovers(sb2) == (set(), False)


async def test_mount_target_through_image_symlink_stays_in_root(tmp_path):
    img = tmp_path / "img"
    oci_build.build_image(img, [oci_build.busybox_layer(), _symlink_layer("data", "/")], cmd=["/bin/true"])
    host_probe = Path("/synord-test-should-not-exist")
    src = tmp_path / "src"
    src.mkdir()
    sb = await RT.prepare(TaskSpec(kind="container", artifact=img, workdir=tmp_path / "wd",
                                   args=["/bin/ls", "/synord-test-should-not-exist"],
                                   mounts=[Mount(src, "/data" + str(host_probe))]))
    assert not host_probe.exists()  # the mount point was made inside the rootfs, not on the host
    status, _, _ = await run_to_end(sb)
    assert status.code == 0


def _symlink_layer(name: str, target: str) -> bytes:
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo(name)
        ti.type, ti.linkname = tarfile.SYMTYPE, target
        tar.addfile(ti)
    return buf.getvalue()


@pytest.mark.skipif(not __import__("shutil").which("runc"), reason="runc not installed")
async def test_runc_engine_limits_and_cleanup(image, tmp_path):
    rt = ContainerRuntime(engine="runc")
    sb = await rt.prepare(spec(image, ["/bin/sh", "-c", "echo hi; x=a; while true; do x=$x$x; done"], tmp_path,
                               limits=Limits(memory_bytes=64 << 20, timeout_s=60)))
    assert sb.engine_name == "runc"
    status, out, _ = await run_to_end(sb)
    assert out == b"hi\n" and status.reason == "oom"
    assert leftovers(sb) == (set(), False)


def test_seccomp_profile_denies_namespace_and_kernel_escapes():
    from synord.runtimes import seccomp
    prof = seccomp.profile()
    allowed = {n for r in prof["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
               for n in r["names"]}
    denied = {n for r in prof["syscalls"] if r["action"] == "SCMP_ACT_ERRNO" for n in r["names"]}
    for name in ("unshare", "setns", "mount", "keyctl", "ptrace", "bpf", "init_module"):
        assert name in denied and name not in allowed
    assert {"read", "write", "execve", "exit_group"} <= allowed or prof["defaultAction"] == "SCMP_ACT_ALLOW"
    builtin = seccomp.builtin_profile()
    assert builtin["defaultAction"] == "SCMP_ACT_ALLOW" and "unshare" in builtin["syscalls"][0]["names"]


async def test_network_granted_shares_host_interfaces(image, tmp_path):
    host_ifaces = {line.split(":")[0].strip() for line in Path("/proc/net/dev").read_text().splitlines()[2:]}
    if host_ifaces == {"lo"}:
        pytest.skip("host has only lo: cannot tell a granted network from none")
    _, out, _ = await run_to_end(await RT.prepare(spec(image, ["/bin/cat", "/proc/net/dev"], tmp_path, network=True)))
    assert {line.split(":")[0].strip() for line in out.decode().splitlines()[2:]} == host_ifaces
