"""Containers never outlive the daemon that started them (synord.runtimes.reaper).

Library level: a registered container is killed, deleted and un-cgrouped by a
sweep. Daemon level: a provider SIGKILLed with crun and runsc tasks running
leaves no container behind (its reaper sweeps); and when the reaper could not
act either, the next start of that daemon sweeps the leftovers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest
import trio

from synord.runtimes import reaper
from synord.runtimes.base import TaskSpec
from synord.runtimes.container import STATE_ROOT, ContainerRuntime

from daemons import DaemonCluster, wait_for

_avail = ContainerRuntime().available()
pytestmark = pytest.mark.skipif(not _avail.available, reason=f"containers unavailable: {_avail.reason}")


def busybox_dir():
    from jobs_helpers import BUSYBOX_DIR, ensure_assets
    ensure_assets()
    return BUSYBOX_DIR


def listed(engine: str) -> set[str]:
    """Container ids the OCI runtime still knows."""
    res = subprocess.run([engine, "--root", str(STATE_ROOT / engine), "list", "--quiet"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return set(res.stdout.split())


def registered(registry) -> dict[str, str]:
    """id -> engine of the containers a registry holds."""
    out = {}
    for p in registry.glob("*.json") if registry.exists() else []:
        entry = json.loads(p.read_text())
        out[entry["id"]] = entry["engine"]
    return out


async def _registered_container(nursery, tmp_path):
    """(runtime, sandbox): a busybox `sleep 600` started in ``nursery``, in the registry."""
    rt = ContainerRuntime()
    rt.registry = tmp_path / "registry"
    sb = await rt.prepare(TaskSpec(kind="container", artifact=busybox_dir(), args=["sleep", "600"],
                                   workdir=tmp_path / "wd"))
    await sb.start(nursery)
    await sb._wait_created()
    assert registered(rt.registry) == {sb.id: sb.engine_name}
    return rt, sb


def _assert_swept(rt, sb, status) -> None:
    assert status.code != 0
    assert sb.id not in listed(sb.engine_name)
    assert registered(rt.registry) == {}
    assert not sb.cgroup.exists()


async def test_sweep_kills_deletes_and_forgets_registered_containers(tmp_path):
    async with trio.open_nursery() as n:
        rt, sb = await _registered_container(n, tmp_path)
        assert await trio.to_thread.run_sync(reaper.sweep, rt.registry) == [sb.id]
        with trio.fail_after(30):
            status = await sb.wait()
    _assert_swept(rt, sb, status)


async def _reaper_waiting(nursery, registry):
    """Start a reaper of ``registry`` and return it once its TERM trap is set."""
    proc = await reaper.start(nursery, registry)
    # it waits in a shell, not in a Python (14 MiB of RSS for a process that only waits)
    assert os.path.realpath(f"/proc/{proc.pid}/exe") == os.path.realpath("/bin/sh")
    with trio.fail_after(10):
        while not int(_status(proc.pid, "SigCgt"), 16) & (1 << (signal.SIGTERM - 1)):
            await trio.sleep(0.01)
    return proc


def _status(pid: int, field: str) -> str:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return line.split()[1]
    raise KeyError(field)


async def test_the_reaper_sweeps_when_the_daemon_dies_and_when_it_stops(tmp_path):
    async with trio.open_nursery() as n:
        rt, sb = await _registered_container(n, tmp_path)
        dying = await _reaper_waiting(n, rt.registry)
        stopping = await _reaper_waiting(n, tmp_path / "empty")
        # the daemon dies (any way, SIGKILL too): the kernel closes its end of the lifeline
        os.close(dying.owned_fds.pop())
        # the daemon stops: SIGTERM
        stopping.popen.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            assert await dying.wait() == 0
            assert await stopping.wait() == 0
            status = await sb.wait()
        await dying.aclose()
        await stopping.aclose()
    _assert_swept(rt, sb, status)


def test_a_reaper_without_arguments_says_how_to_use_it():
    for args in ([], ["/some/dir"]):  # the waiting is the shell's (reaper.start); Python only sweeps
        res = subprocess.run([shutil.which("python3") or "python3", "-m", "synord.runtimes.reaper", *args],
                             capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        assert res.returncode == 2 and "usage" in res.stderr


def _start_container_tasks(cluster):
    from jobs_helpers import start_mesh, submit, wait_job
    consumer, (prov,) = start_mesh(cluster, 1)
    for flag in ([], ["--checkpointable"]):  # crun (or runc) and runsc
        job_id = submit(consumer, "--runtime", "container", *flag, str(busybox_dir()), "--", "sleep", "600")
        wait_job(consumer, job_id, states=("running",), timeout=90)
    registry = prov.home / "containers"
    ids = registered(registry)
    assert sorted(ids.values()) == sorted([ContainerRuntime().engine()[0], "runsc"])
    return consumer, prov, registry, ids


def _gone(ids: dict[str, str]) -> bool:
    return not any(cid in listed(engine) for cid, engine in ids.items())


@pytest.mark.slow
def test_containers_die_with_a_sigkilled_daemon(tmp_path):
    with DaemonCluster(tmp_path) as cluster:
        _, prov, registry, ids = _start_container_tasks(cluster)
        prov.kill()  # SIGKILL: the reaper gets SIGTERM from the kernel and sweeps
        wait_for(lambda: _gone(ids), 60, what="the containers of the killed daemon to be removed")
        wait_for(lambda: registered(registry) == {}, 10, what="the registry to be emptied")


def _reaper_pids(registry) -> list[int]:
    res = subprocess.run(["pgrep", "-f", f"synord.runtimes.reaper {registry}"], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split()]


@pytest.mark.slow
def test_the_next_start_sweeps_what_nobody_could(tmp_path):
    with DaemonCluster(tmp_path) as cluster:
        _, prov, registry, ids = _start_container_tasks(cluster)
        (reaper_pid,) = _reaper_pids(registry)
        os.kill(reaper_pid, signal.SIGSTOP)  # the reaper cannot act ...
        prov.kill()
        os.kill(reaper_pid, signal.SIGKILL)  # ... and dies too: the containers are orphaned
        assert not _gone(ids) and registered(registry) == ids
        cluster.start("p0")  # same home
        wait_for(lambda: _gone(ids) and registered(registry) == {}, 60,
                 what="the restarted daemon to sweep the leftovers")
