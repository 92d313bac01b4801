"""Container limits from cgroup v1 and v2 (psutil does not see them).

Paths are resolved like the kernel does: this process's cgroup from
``/proc/self/cgroup``, the controller mount points from
``/proc/self/mountinfo``; the effective limit is the tightest one on the way
from our cgroup up to the mount root.
"""

from __future__ import annotations

from pathlib import Path

# Values at or above this mean "no limit" (v1 writes 2**63 rounded to a page).
_UNLIMITED = 1 << 60


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _parse_cpuset(text: str | None) -> int | None:
    if not text:
        return None
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi) - int(lo) + 1 if hi else 1
    return n


def _mounts(root: Path) -> dict[str, tuple[Path, str]]:
    """controller ("cpu", "memory", "cpuset", or "" for v2) -> (mount point, mount root)."""
    found: dict[str, tuple[Path, str]] = {}
    text = _read(root / "proc/self/mountinfo")
    if text is None:
        # No mountinfo (fake trees, odd containers): the conventional layout.
        base = root / "sys/fs/cgroup"
        if (base / "cgroup.controllers").exists():
            found[""] = (base, "/")
            return found
        for ctl, names in (("cpu", ("cpu", "cpu,cpuacct")), ("memory", ("memory",)), ("cpuset", ("cpuset",))):
            for name in names:
                if (base / name).is_dir():
                    found[ctl] = (base / name, "/")
                    break
        return found
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        mroot, mpoint, fstype, opts = fields[3], fields[4], rfields[0], rfields[2]
        point = root / mpoint.lstrip("/")
        if fstype == "cgroup2":
            found.setdefault("", (point, mroot))
        elif fstype == "cgroup":
            for ctl in ("cpu", "memory", "cpuset"):
                if ctl in opts.split(","):
                    found.setdefault(ctl, (point, mroot))
    return found


def _own_paths(root: Path) -> dict[str, str]:
    """controller -> cgroup path of this process ("" key for v2)."""
    paths: dict[str, str] = {}
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctls, path = parts
        if ctls == "":
            paths[""] = path
        for ctl in ctls.split(","):
            if ctl:
                paths[ctl] = path
    return paths


def _chain(mount: tuple[Path, str], path: str) -> list[Path]:
    """Directories from our cgroup up to the mount point (leaf first)."""
    point, mroot = mount
    rel = path
    if mroot != "/" and rel.startswith(mroot):
        rel = rel[len(mroot):]
    leaf = point / rel.lstrip("/")
    if not leaf.is_dir():
        # cgroup namespace not in use but the mount shows only our subtree.
        return [point]
    chain = [leaf]
    while chain[-1] != point and point in chain[-1].parents:
        chain.append(chain[-1].parent)
    return chain


def _v2_cpu(d: Path) -> float | None:
    text = _read(d / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max":
        return None
    return int(quota) / int(period or 100000)


def _v1_cpu(d: Path) -> float | None:
    quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
    if quota is None or int(quota) <= 0:
        return None
    return int(quota) / int(period or 100000)


def _mem(d: Path, name: str) -> int | None:
    text = _read(d / name)
    if text is None or text == "max":
        return None
    value = int(text)
    return None if value >= _UNLIMITED else value


def _tightest(values) -> float | int | None:
    vals = [v for v in values if v is not None]
    return min(vals) if vals else None


def read_limits(root: str | Path = "/") -> dict:
    """``{"version", "cpu_quota_cores", "cpuset_cpus", "memory_limit_bytes",
    "memory_usage_bytes"}``; None where there is no limit or no cgroup."""
    root = Path(root)
    mounts, own = _mounts(root), _own_paths(root)
    out = {"version": None, "cpu_quota_cores": None, "cpuset_cpus": None,
           "memory_limit_bytes": None, "memory_usage_bytes": None}
    v1 = {c for c in ("cpu", "memory", "cpuset") if c in mounts}
    if v1:
        out["version"] = 1
        if "cpu" in mounts:
            out["cpu_quota_cores"] = _tightest(_v1_cpu(d) for d in _chain(mounts["cpu"], own.get("cpu", "/")))
        if "memory" in mounts:
            chain = _chain(mounts["memory"], own.get("memory", "/"))
            out["memory_limit_bytes"] = _tightest(_mem(d, "memory.limit_in_bytes") for d in chain)
            out["memory_usage_bytes"] = _mem(chain[0], "memory.usage_in_bytes")
        if "cpuset" in mounts:
            chain = _chain(mounts["cpuset"], own.get("cpuset", "/"))
            out["cpuset_cpus"] = _parse_cpuset(_read(chain[0] / "cpuset.effective_cpus") or _read(chain[0] / "cpuset.cpus"))
    if "" in mounts:
        chain = _chain(mounts[""], own.get("", "/"))
        controllers = (_read(mounts[""][0] / "cgroup.controllers") or "").split()
        # Hybrid hosts mount an empty v2 tree beside v1: only use v2 for the
        # controllers it actually has.
        if controllers:
            out["version"] = 2 if not v1 else out["version"]
            if "cpu" in controllers and "cpu" not in v1:
                out["cpu_quota_cores"] = _tightest(_v2_cpu(d) for d in chain)
            if "memory" in controllers and "memory" not in v1:
                out["memory_limit_bytes"] = _tightest(_mem(d, "memory.max") for d in chain)
                out["memory_usage_bytes"] = _mem(chain[0], "memory.current")
            if "cpuset" in controllers and "cpuset" not in v1:
                out["cpuset_cpus"] = _parse_cpuset(_read(chain[0] / "cpuset.cpus.effective"))
    return out
