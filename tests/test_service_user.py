"""The provider service as packaging/systemd/synord.service runs it, without systemd as PID 1.

What the unit does, done by hand (root needed, as in CI):
- a dedicated system user, in the kvm group when the host has one (SupplementaryGroups=);
- a cgroup subtree delegated the way ``Delegate=yes`` does it: the unit's cgroup
  made by root, the directory and its cgroup.procs / cgroup.subtree_control /
  cgroup.threads (v1: tasks) chowned to the user, the daemon started inside;
- no capabilities at all and no_new_privs (CapabilityBoundingSet=, NoNewPrivileges=yes);
- a private mount namespace: / read-only except the state, runtime and cache
  directories (ProtectSystem=strict + StateDirectory= etc.), a private /tmp
  (PrivateTmp=yes), /root replaced by an empty tmpfs (ProtectHome=tmpfs), except
  the Python this test runs on when it lives there.

A root consumer daemon places a container task and a microVM task on it; the
container runs in the delegated subtree, as the service's uid, at idle CPU priority.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from daemons import ROOT, SYNORD, DaemonCluster, DaemonProcess, wait_for
from jobs_helpers import BUSYBOX_TAR, CONSUMER_ONLY, ensure_assets, providers_in_book, submit, wait_job
from synord.runtimes import cgroups

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creating a user and delegating a cgroup need root"),
    pytest.mark.skipif(not (shutil.which("runc") or shutil.which("crun")), reason="no OCI runtime installed"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("setpriv", "unshare", "useradd", "userdel")),
                       reason="util-linux setpriv/unshare or shadow useradd missing"),
]


@pytest.fixture
def service_user():
    name = f"synord-t{secrets.token_hex(3)}"
    groups = [g for g in ("kvm",) if _group_exists(g)]
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    *(["--groups", ",".join(groups)] if groups else []), name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False)


def _group_exists(name: str) -> bool:
    import grp
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _hierarchies() -> list[Path]:
    return [cgroups.ROOT] if cgroups.cgroup_mode() == "v2" else cgroups._v1_hierarchies()


@pytest.fixture
def delegated_cgroup(service_user):
    """The unit's cgroup, delegated to the service user as systemd's Delegate=yes does."""
    name = f"synord-svc-test-{secrets.token_hex(3)}"
    dirs = []
    try:
        if cgroups.cgroup_mode() == "v2":  # systemd enables the controllers on the unit's parent
            ctrls = [c for c in cgroups.CONTROLLERS
                     if c in (cgroups.ROOT / "cgroup.controllers").read_text().split()]
            (cgroups.ROOT / "cgroup.subtree_control").write_text(" ".join("+" + c for c in ctrls))
        for h in _hierarchies():
            d = h / name
            d.mkdir()
            dirs.append(d)
            for f in ("cpuset.cpus", "cpuset.mems"):
                if (d / f).exists():
                    (d / f).write_text((h / f).read_text())
            for p in [d] + [d / f for f in ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads", "tasks")]:
                if p.exists():
                    os.chown(p, service_user.pw_uid, service_user.pw_gid)
        yield name, dirs
    finally:
        cgroups.remove_tree(dirs, timeout=10)


def _blocking_dir(path: Path) -> Path | None:
    """The first directory above ``path`` that others cannot traverse (e.g. /root, 0700)."""
    for parent in reversed(path.parents):
        if parent != Path("/") and not os.stat(parent).st_mode & stat.S_IXOTH:
            return parent
    return None


def _service_argv(user: pwd.struct_passwd, procs: list[Path], writable: list[Path], hold: Path,
                  argv: list[str]) -> list[str]:
    """``argv`` as the unit would start it (see the module doc)."""
    # What the service must still see under the directories it hides (/tmp, an 0700 /root):
    # this Python, its venv and the checkout, wherever they are.
    python = Path(os.path.realpath(sys.executable))
    block = _blocking_dir(python)
    hidden = [Path("/tmp")] + ([block] if block else [])
    keep = {h / p.relative_to(h).parts[0] for p in (python, Path(sys.prefix).resolve(), ROOT.resolve())
            for h in hidden if p.is_relative_to(h) and p != h}
    script = ["set -e", "mount --make-rprivate /"]
    script += [f"mkdir -p {hold}/{i} && mount --bind {k} {hold}/{i}" for i, k in enumerate(sorted(keep))]
    if block is not None:
        script += [f"mount -t tmpfs -o mode=0755 tmpfs {block}"]  # ProtectHome=tmpfs
    script += ["mount -t tmpfs -o mode=1777 tmpfs /tmp"]  # PrivateTmp=yes
    script += [f"mkdir -p {k} && mount --move {hold}/{i} {k}" for i, k in enumerate(sorted(keep))]
    script += [f"mount --bind {d} {d}" for d in writable]
    script += ["mount -o remount,bind,ro /",  # ProtectSystem=strict: /dev, /proc, /sys stay
               'exec setpriv --reuid "$SVC_UID" --regid "$SVC_GID" --init-groups --bounding-set -all '
               '--inh-caps -all --no-new-privs "$@"']
    inner = ["unshare", "-m", "sh", "-c", "\n".join(script), "sh", *argv]
    # like systemd: the process is in the unit's cgroup before it execs the service
    return ["sh", "-c", 'for p in $1; do echo $$ > "$p"; done; shift; exec "$@"', "sh",
            " ".join(str(p) for p in procs), *inner]


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid in /proc/{pid}/status")


def test_service_user_runs_container_and_microvm_tasks(tmp_path, service_user, delegated_cgroup):
    ensure_assets()
    name, dirs = delegated_cgroup
    user = service_user
    base = Path(tempfile.mkdtemp(prefix="synord-svc-", dir="/var/tmp"))  # outside the private /tmp
    try:
        home, run, cache, hold = (base / n for n in ("home", "run", "cache", "hold"))
        for d in (home, run, cache, hold):
            d.mkdir()
        with DaemonCluster(tmp_path) as cluster:
            consumer = cluster.start("consumer", config=CONSUMER_ONLY)
            subprocess.run([*SYNORD, "--home", str(home), "init"], check=True, cwd=ROOT, capture_output=True)
            for p in [base, home, run, cache, *home.rglob("*")]:
                os.chown(p, user.pw_uid, user.pw_gid)
            os.chmod(base, 0o755)
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
                   "RUNTIME_DIRECTORY": str(run), "SYNORD_CACHE_DIR": str(cache),
                   "SVC_UID": str(user.pw_uid), "SVC_GID": str(user.pw_gid)}
            argv = [*SYNORD, "--home", str(home), "daemon", "--listen", "/ip4/127.0.0.1/tcp/0",
                    "--api", "127.0.0.1:0", "--no-mdns", "--bootstrap", consumer.p2p_addrs()[0]]
            log_path = base / "provider.log"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    _service_argv(user, [d / "cgroup.procs" for d in dirs], [home, run, cache], hold, argv),
                    stdout=log, stderr=log, cwd=ROOT, env=env, start_new_session=True)
            provider = DaemonProcess(home, "provider", proc, log_path)
            cluster.daemons.append(provider)
            provider.wait_ready(60)
            assert _uid_of(provider.pid) == user.pw_uid
            pid = provider.status()["peer_id"]
            wait_for(lambda: pid in providers_in_book(consumer), 60, what="the service's ask in the book")

            # A container task: right output, as the image's root mapped onto the service user.
            res = consumer.cli("run", "--runtime", "container", str(BUSYBOX_TAR), "--",
                               "sh", "-c", "id -u; cat /proc/self/uid_map", check=False, timeout=120)
            assert res.returncode == 0, res.stderr + provider.log()[-3000:]
            uid_inside, mapping = res.stdout.splitlines()
            assert uid_inside == "0"
            assert mapping.split() == ["0", str(user.pw_uid), "1"]

            # The daemon left the unit's cgroup for its leaf; a running task sits in the
            # delegated subtree, runs as the service's uid, at idle CPU priority.
            leaf = dirs[0] / cgroups.DAEMON_LEAF
            assert str(provider.pid) in (leaf / "cgroup.procs").read_text().split()
            job_id = submit(consumer, "--runtime", "container", str(BUSYBOX_TAR), "--", "sleep", "120")
            sandboxes = [d / cgroups.SANDBOXES for d in dirs if (d / cgroups.SANDBOXES).exists()]

            def task_pids():
                return [(d, int(p)) for s in sandboxes for d in s.iterdir() if d.is_dir()
                        for p in (d / "cgroup.procs").read_text().split()]
            placed = wait_for(task_pids, 90, what="the task's processes in the delegated subtree")
            assert all(_uid_of(p) == user.pw_uid for _, p in placed if Path(f"/proc/{p}").exists())
            task_dirs = {d for d, _ in placed}
            if cgroups.cgroup_mode() == "v2":
                assert any((d / "cpu.idle").read_text().strip() == "1" or
                           (d / "cpu.weight").read_text().strip() == "1" for d in task_dirs if
                           (d / "cpu.idle").exists() or (d / "cpu.weight").exists())
            else:
                cpu = [d for d in task_dirs if d.is_relative_to(cgroups.ROOT / "cpu")]
                assert cpu and all((d / "cpu.shares").read_text().strip() == "2" for d in cpu)
            consumer.cli("cancel", job_id)
            wait_job(consumer, job_id, timeout=60)
            wait_for(lambda: not task_pids(), 30, what="the task's cgroup emptied")

            # A microVM task on the same service (KVM when the kvm group may open /dev/kvm, else TCG).
            res = consumer.cli("run", "--runtime", "microvm", str(BUSYBOX_TAR), "--",
                               "sh", "-c", "echo from the vm; uname -s", check=False, timeout=240)
            assert res.returncode == 0, res.stderr + provider.log()[-3000:]
            assert res.stdout.splitlines() == ["from the vm", "Linux"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_container_runtime_tests_pass_as_the_service_user(tmp_path, service_user, delegated_cgroup):
    """tests/test_runtime_container.py itself (limits, OOM, fork bomb, timeout, kill, mounts,
    network), run rootless the way the unit runs the daemon. runsc checkpoints skip there:
    a rootless daemon offers none (runsc --rootless cannot restore)."""
    _, dirs = delegated_cgroup
    user = service_user
    hold = Path(tempfile.mkdtemp(prefix="synord-svc-", dir="/var/tmp"))
    try:
        os.chmod(hold, 0o755)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp", "LANG": "C.UTF-8",
               "RUNTIME_DIRECTORY": "/tmp/run", "SVC_UID": str(user.pw_uid), "SVC_GID": str(user.pw_gid)}
        argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--basetemp=/tmp/pt",
                "tests/test_runtime_container.py"]
        res = subprocess.run(_service_argv(user, [d / "cgroup.procs" for d in dirs], [], hold, argv),
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
        assert " passed" in res.stdout and " failed" not in res.stdout
    finally:
        shutil.rmtree(hold, ignore_errors=True)
