"""Per-task parent cgroup: limits, usage and OOM/pids events that outlive the container.

The OCI runtime creates (and on exit deletes) the container's own cgroup, so
anything read from it after `crun run` returns is gone, and cgroup v1 does not
propagate memory/pids events to ancestors. We therefore put the limits on a
parent we own, ``synord/<task>``, and point the container's ``cgroupsPath`` at
``synord/<task>/ctr``: charges and OOM kills land in our parent, which we read
after the container has exited and then remove.

Works on cgroup v1 (legacy or hybrid: controllers under /sys/fs/cgroup/<ctl>)
and v2 (unified at /sys/fs/cgroup).

Where the task cgroups live (`task_parent`): a root daemon outside a service
makes them at the top, ``/synord/<task>``. A daemon in a delegated subtree (the
systemd unit's own cgroup with ``Delegate=yes``, and any non-root daemon) makes
them under its own cgroup: it first moves itself into the leaf
``<own>/daemon`` (cgroup v2 allows no processes in a cgroup whose children
have controllers), then puts tasks in ``<own>/sandboxes/<task>`` (not
"tasks": v1 reserves that name for its thread list). There the tasks, not the
daemon, run at idle CPU priority (cpu.idle / the lowest weight), the way
BOINC idles its work and not its client. A non-root daemon cannot give the OCI
runtime a cgroup path outside its user namespace, so it starts the runtime
inside the task's cgroup (`place_argv`) and the container inherits it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
TOP = "synord"
DAEMON_LEAF = "daemon"
SANDBOXES = "sandboxes"
CONTROLLERS = ("cpu", "memory", "pids")
_parent: str | None = None  # cached task_parent()


def cgroup_mode() -> str:
    """'v2' (unified only), 'hybrid' (v1 controllers + an empty unified mount) or 'v1'."""
    if (ROOT / "cgroup.controllers").exists():
        return "v2"
    if (ROOT / "unified" / "cgroup.controllers").exists():
        return "hybrid"
    return "v1"


def _v1_hierarchies() -> list[Path]:
    out = []
    try:
        for p in sorted(ROOT.iterdir()):
            if p.name != "unified" and p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists():
                out.append(p)
    except OSError:
        pass
    return out


def _own_path() -> str:
    """This process's cgroup: the v2 path, or on v1 the one the cpu and memory hierarchies share
    ("" when they differ: no single subtree to put tasks in)."""
    v2, v1 = "/", {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        hid, ctls, path = (line.split(":", 2) + ["", ""])[:3]
        if hid == "0" and ctls == "":
            v2 = path
        for c in ctls.split(","):
            v1[c] = path
    if cgroup_mode() == "v2":
        return v2
    paths = {v1.get(c, "/") for c in ("cpu", "memory")}
    return paths.pop() if len(paths) == 1 else ""


def delegated() -> bool:
    """Whether tasks go under our own cgroup: any non-root daemon, and a root one that
    systemd started itself (its main process: parent PID 1, INVOCATION_ID set) — not a
    daemon that merely inherited INVOCATION_ID from, say, a CI runner's unit. The
    daemon's children (the reaper) find themselves in ``<own>/daemon``."""
    if os.geteuid() != 0:
        return True
    own = _own_path()
    if own.rstrip("/").endswith("/" + DAEMON_LEAF):
        return True
    return bool(os.environ.get("INVOCATION_ID")) and os.getppid() == 1 and own not in ("", "/")


def _own_dirs(own: str) -> list[Path]:
    """The directories of our own cgroup that we may write (one per v1 hierarchy, or the v2 one)."""
    bases = [ROOT] if cgroup_mode() == "v2" else _v1_hierarchies()
    return [d for d in (b / own.lstrip("/") for b in bases) if os.access(d, os.W_OK)]


def _enable_controllers(d: Path) -> None:
    ctrls = set(_read(d / "cgroup.controllers").split())
    want = [c for c in CONTROLLERS if c in ctrls]
    if want:
        _write(d / "cgroup.subtree_control", " ".join("+" + c for c in want))


def task_parent() -> str:
    """Where task cgroups are made, relative to each hierarchy root (see the module doc).
    Raises OSError when a delegated daemon has no cgroup subtree it may write."""
    global _parent
    if _parent is not None:
        return _parent
    if not delegated():
        _parent = TOP
        return _parent
    own = _own_path()
    if own.rstrip("/").endswith("/" + DAEMON_LEAF):  # already moved (or the reaper, a child of ours)
        own = own.rstrip("/")[: -len(DAEMON_LEAF) - 1]
    dirs = _own_dirs(own) if own not in ("", "/") else []
    if not dirs:
        raise PermissionError(f"no delegated cgroup subtree (own cgroup {own or '?'} is not writable): "
                              "run under systemd with Delegate=yes, or give this user a cgroup subtree")
    for d in dirs:
        leaf = d / DAEMON_LEAF
        for child in (leaf, d / SANDBOXES):
            child.mkdir(exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):  # v1: a new cpuset is empty until told
                if (child / f).exists() and not _read(child / f).strip():
                    _write(child / f, _read(d / f).strip())
        for pid in _read(d / "cgroup.procs").split():  # everything in our own cgroup is ours
            try:
                _write(leaf / "cgroup.procs", pid)
            except ProcessLookupError:
                pass
        if cgroup_mode() == "v2":
            _enable_controllers(d)
            _enable_controllers(d / SANDBOXES)
    _parent = f"{own.strip('/')}/{SANDBOXES}"
    return _parent


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _kv(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        try:
            out[k] = int(v)
        except ValueError:
            pass
    return out


class TaskCgroup:
    def __init__(self, task: str):
        self.parent = task_parent()
        self.rel = f"{self.parent}/{task}"
        self.mode = cgroup_mode()
        self.rootless = os.geteuid() != 0
        self._oom_fds: tuple[int, int] | None = None  # v1: (eventfd, oom_control fd)

    @property
    def container_path(self) -> str | None:
        """The OCI ``linux.cgroupsPath`` for the container under our parent; None when rootless
        (the runtime is started inside our cgroup instead: `place_argv`)."""
        return None if self.rootless else f"/{self.rel}/ctr"

    def place_argv(self, argv: list[str]) -> list[str]:
        """``argv`` started inside the task's cgroup (rootless; as root the runtime does it)."""
        if not self.rootless:
            return argv
        procs = [str(d / "cgroup.procs") for d in self._dirs() if d.exists()]
        return ["sh", "-c", 'for p in $1; do echo $$ > "$p" || exit 125; done; shift; exec "$@"',
                "sh", " ".join(procs), *argv] if procs else argv

    def _hierarchies(self) -> list[Path]:
        hs = _v1_hierarchies()
        if self.parent != TOP:  # delegated: only where our own cgroup is ours
            hs = [h for h in hs if os.access(h / self.parent, os.W_OK)]
        return hs

    def _dirs(self) -> list[Path]:
        if self.mode == "v2":
            return [ROOT / self.rel]
        dirs = [h / self.rel for h in self._hierarchies()]
        if self.mode == "hybrid":  # runc/runsc also make the path in the empty unified tree
            dirs.append(ROOT / "unified" / self.rel)
        return dirs

    def create(self, cpus: float, memory_bytes: int, pids: int) -> None:
        period = 100_000
        quota = max(1000, int(cpus * period))
        if self.mode == "v2":
            if self.parent == TOP:
                for d in (ROOT, ROOT / TOP):
                    d.mkdir(exist_ok=True)
                    _enable_controllers(d)
            d = ROOT / self.rel
            d.mkdir(exist_ok=True)
            if self.parent != TOP:  # the service's tasks, not the daemon, yield the CPU
                if (d / "cpu.idle").exists():
                    _write(d / "cpu.idle", "1")
                elif (d / "cpu.weight").exists():
                    _write(d / "cpu.weight", "1")
            _write(d / "memory.max", str(memory_bytes))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")  # swap = limit: no swap beyond memory
            _write(d / "cpu.max", f"{quota} {period}")
            _write(d / "pids.max", str(pids))
            return
        for h in self._hierarchies():
            d = h / self.rel
            d.mkdir(parents=True, exist_ok=True)
            if h.name == "cpuset":  # a new cpuset is empty until told which cpus/mems it may use
                for f in ("cpuset.cpus", "cpuset.mems"):
                    for p in (h / self.parent, d):
                        if not _read(p / f).strip():
                            _write(p / f, _read(p.parent / f).strip())
        mem = ROOT / "memory" / self.rel
        _write(mem / "memory.limit_in_bytes", str(memory_bytes))
        if (mem / "memory.memsw.limit_in_bytes").exists():
            _write(mem / "memory.memsw.limit_in_bytes", str(memory_bytes))
        cpu = ROOT / "cpu" / self.rel
        if cpu.exists():
            _write(cpu / "cpu.cfs_period_us", str(period))
            _write(cpu / "cpu.cfs_quota_us", str(quota))
            if self.parent != TOP:
                _write(cpu / "cpu.shares", "2")  # v1's lowest weight: the tasks yield the CPU
        pid = ROOT / "pids" / self.rel
        if pid.exists():
            _write(pid / "pids.max", str(pids))
        self._watch_oom(mem)

    def set_cpu(self, cpus: float) -> str:
        """Change the task's CPU quota live (the contributor's CPU-time throttle);
        returns what was written ("quota period")."""
        period = 100_000
        quota = max(1000, int(cpus * period))
        if self.mode == "v2":
            _write(ROOT / self.rel / "cpu.max", f"{quota} {period}")
        else:
            _write(ROOT / "cpu" / self.rel / "cpu.cfs_quota_us", str(quota))
        return f"{quota} {period}"

    def cpu_max(self) -> str | None:
        """The quota in force as "quota period" (v1: cfs_quota_us and cfs_period_us)."""
        if self.mode == "v2":
            return _read(ROOT / self.rel / "cpu.max").strip() or None
        d = ROOT / "cpu" / self.rel
        quota, period = _read(d / "cpu.cfs_quota_us").strip(), _read(d / "cpu.cfs_period_us").strip()
        return f"{quota} {period}" if quota and period else None

    def _watch_oom(self, mem: Path) -> None:
        # v1 books oom_kill on the victim's cgroup only; an eventfd on our memory.oom_control
        # is signalled whenever our limit triggers the OOM killer, whatever cgroup below it.
        try:
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            cfd = os.open(mem / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _write(mem / "cgroup.event_control", f"{efd} {cfd}")
            except OSError:
                os.close(efd)
                os.close(cfd)
                return
            self._oom_fds = (efd, cfd)
        except OSError:
            pass

    def usage(self) -> tuple[float, int]:
        """(CPU seconds, peak memory bytes) charged to the task so far."""
        if self.mode == "v2":
            d = ROOT / self.rel
            cpu = _kv(_read(d / "cpu.stat")).get("usage_usec", 0) / 1e6
            peak = _read(d / "memory.peak").strip()
            return cpu, int(peak) if peak.isdigit() else 0
        cpu_ns = _read(ROOT / "cpuacct" / self.rel / "cpuacct.usage").strip()
        peak = _read(ROOT / "memory" / self.rel / "memory.max_usage_in_bytes").strip()
        return (int(cpu_ns) / 1e9 if cpu_ns.isdigit() else 0.0), (int(peak) if peak.isdigit() else 0)

    def oom_killed(self) -> bool:
        """Whether the kernel OOM killer ran on the task's memory limit.

        v2 counts ``oom_kill`` hierarchically. v1 books the kill on the victim's own
        cgroup (the container's, gone by now), so there we use the OOM eventfd
        registered at create; callers combine it with a SIGKILL exit. Consumes
        the v1 event: call once."""
        if self.mode == "v2":
            return _kv(_read(ROOT / self.rel / "memory.events")).get("oom_kill", 0) > 0
        if _kv(_read(ROOT / "memory" / self.rel / "memory.oom_control")).get("oom_kill", 0) > 0:
            return True
        if self._oom_fds is None:
            return False
        try:
            return os.eventfd_read(self._oom_fds[0]) > 0
        except BlockingIOError:
            return False

    def pids_limited(self) -> bool:
        """A fork was refused on our pids limit. The kernel (6.1) counts the refusal in the
        forking task's own cgroup, which may be a child of ours (the runtime's own cgroup,
        e.g. rootless), so every pids.events at or below ours is read."""
        d = ROOT / self.rel if self.mode == "v2" else ROOT / "pids" / self.rel
        try:
            events = [d / "pids.events", *d.rglob("*/pids.events")]
        except OSError:  # removed meanwhile
            events = [d / "pids.events"]
        return any(_kv(_read(e)).get("max", 0) > 0 for e in events)

    def pids(self) -> set[int]:
        """Every process still in the task's cgroups (any depth)."""
        return tree_pids(self._dirs())

    def exists(self) -> bool:
        return any(d.exists() for d in self._dirs())

    def try_destroy(self) -> bool:
        """One non-blocking attempt: True when nothing is left (the usual case after exit)."""
        if self.pids():
            return False
        self.destroy(timeout=0)
        return not self.exists()

    def destroy(self, timeout: float = 2.0) -> None:
        """Kill what is left inside and remove the cgroups, deepest first (may sleep: use a thread)."""
        if self._oom_fds is not None:
            for fd in self._oom_fds:
                os.close(fd)
            self._oom_fds = None
        remove_tree(self._dirs(), timeout)


def tree_pids(dirs: list[Path]) -> set[int]:
    """Every process in these cgroups and below."""
    out: set[int] = set()
    for d in dirs:
        for dirpath, _, files in os.walk(d):
            if "cgroup.procs" in files:
                out.update(int(x) for x in _read(Path(dirpath) / "cgroup.procs").split() if x.isdigit())
    return out


def remove_tree(dirs: list[Path], timeout: float = 2.0) -> None:
    """Kill every process in these cgroups and remove them, deepest first (may sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in tree_pids(dirs):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        busy = False
        for d in dirs:
            if not d.exists():
                continue
            for dirpath, _, _ in sorted(os.walk(d), key=lambda t: -len(t[0])):
                try:
                    os.rmdir(dirpath)
                except FileNotFoundError:
                    pass
                except OSError:
                    busy = True
        if not busy or time.monotonic() > deadline:
            return
        time.sleep(0.01)
