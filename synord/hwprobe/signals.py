"""Contributor-policy signals: AC power, battery, user idle time, CPU
pressure from other processes, hour of day and weekday. Cheap enough to read every few
seconds; everything comes from files under a configurable root, except the
logind idle hint (busctl, real root only)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path

# Previous /proc/stat sample per root, for CPU use between two calls.
_last_stat: dict[str, tuple[float, int, int, float]] = {}


@dataclasses.dataclass
class ContributorSignals:
    on_ac_power: bool
    battery_percent: float | None
    user_idle_s: float | None      # None: no interactive user detectable
    idle_source: str               # "logind", "tty" or "none"
    cpu_pressure: float            # 0..1, CPU used by processes other than ours
    cpu_psi_some_avg10: float | None  # 0..1 from /proc/pressure/cpu
    hour_of_day: int
    weekday: int | None = None     # 0 = Monday, local time (per-weekday hours)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ContributorSignals":
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _power(root: Path) -> tuple[bool, float | None]:
    mains_online, batteries, charging = None, [], False
    for ps in sorted((root / "sys/class/power_supply").glob("*")):
        kind = _read(ps / "type")
        if kind in ("Mains", "USB"):
            online = _read(ps / "online") == "1"
            mains_online = bool(mains_online) or online
        elif kind == "Battery" and _read(ps / "scope") != "Device":  # skip mice, headsets
            cap = _read(ps / "capacity")
            if cap is not None and cap.isdigit():
                batteries.append(float(cap))
            charging = charging or _read(ps / "status") in ("Charging", "Full")
    if not batteries:
        return True, None  # desktops and servers: no battery means mains
    on_ac = mains_online if mains_online is not None else charging
    return bool(on_ac), round(sum(batteries) / len(batteries), 1)


def _logind_idle(now: float) -> float | None:
    """Seconds idle according to systemd-logind, None when unavailable."""
    busctl = shutil.which("busctl")
    if busctl is None:
        return None
    base = [busctl, "get-property", "org.freedesktop.login1", "/org/freedesktop/login1",
            "org.freedesktop.login1.Manager"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))}
    try:
        hint = subprocess.run(base + ["IdleHint"], capture_output=True, text=True, timeout=1, env=env)
        if hint.returncode != 0:
            return None
        if hint.stdout.split()[-1] != "true":
            return 0.0
        since = subprocess.run(base + ["IdleSinceHint"], capture_output=True, text=True, timeout=1, env=env)
        usec = int(since.stdout.split()[-1]) if since.returncode == 0 else 0
        return max(0.0, now - usec / 1e6) if usec else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def _tty_idle(root: Path, now: float) -> float | None:
    """Like `w`: time since the last input on any terminal; None without terminals."""
    atimes = []
    for pattern in ("dev/pts/[0-9]*", "dev/tty[0-9]*"):
        for tty in root.glob(pattern):
            try:
                st = tty.stat()
            except OSError:
                continue
            # A pty exists only while a session has it open; virtual consoles
            # always exist and belong to root until someone logs in on them.
            if "pts" in pattern or st.st_uid != 0:
                atimes.append(st.st_atime)
    if not atimes:
        return None
    return max(0.0, now - max(atimes))


def _proc_stat(root: Path) -> tuple[int, int] | None:
    """(busy, total) jiffies from the aggregate cpu line."""
    line = (_read(root / "proc/stat") or "").split("\n", 1)[0].split()
    if not line or line[0] != "cpu":
        return None
    vals = [int(v) for v in line[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])  # guest time is already counted in user
    return total - idle, total


def _own_cpu_s() -> float:
    """CPU seconds of this process and everything it started (sandboxes,
    crun, qemu): our own work is not "other load". Each process adds its
    reaped children, so nothing is counted twice."""
    try:
        import psutil
        me = psutil.Process()
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                continue  # exited meanwhile
        return total
    except ImportError:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def _sample(root: Path, real: bool) -> tuple[float, int, int, float] | None:
    stat = _proc_stat(root)
    if stat is None:
        return None
    return time.monotonic(), stat[0], stat[1], _own_cpu_s() if real else 0.0


def _cpu_pressure(root: Path) -> float:
    """Share of all CPUs used by processes that are not ours since the last call."""
    key, real = str(root), str(root) == "/"
    cur = _sample(root, real)
    if cur is None:
        return 0.0
    prev = _last_stat.get(key)
    if prev is None and real:
        # First call: a short window now rather than a guess.
        time.sleep(0.1)
        prev, cur = cur, _sample(root, real)
    _last_stat[key] = cur
    if prev is None or cur[2] - prev[2] <= 0:
        # No elapsed jiffies to compare: the 1-minute load average per CPU.
        load = (_read(root / "proc/loadavg") or "0").split()[0]
        ncpu = max(1, (_read(root / "proc/stat") or "").count("\ncpu"))
        return round(min(1.0, float(load) / ncpu), 3)
    hz = os.sysconf("SC_CLK_TCK")
    other = (cur[1] - prev[1]) / hz - (cur[3] - prev[3])
    capacity = (cur[2] - prev[2]) / hz
    return round(min(1.0, max(0.0, other / capacity)), 3)


def _psi(root: Path) -> float | None:
    for line in (_read(root / "proc/pressure/cpu") or "").splitlines():
        if line.startswith("some"):
            for field in line.split()[1:]:
                k, _, v = field.partition("=")
                if k == "avg10":
                    return round(float(v) / 100.0, 4)
    return None


def read_signals(sysfs_root: str | Path = "/", now: float | None = None) -> ContributorSignals:
    root = Path(sysfs_root)
    now = time.time() if now is None else now
    on_ac, battery = _power(root)
    idle, source = None, "none"
    if str(root) == "/":
        idle = _logind_idle(now)
        source = "logind" if idle is not None else "none"
    if idle is None:
        idle = _tty_idle(root, now)
        source = "tty" if idle is not None else "none"
    return ContributorSignals(on_ac_power=on_ac, battery_percent=battery, user_idle_s=idle,
                              idle_source=source, cpu_pressure=_cpu_pressure(root),
                              cpu_psi_some_avg10=_psi(root),
                              hour_of_day=time.localtime(now).tm_hour,
                              weekday=time.localtime(now).tm_wday)


def disk_usage(dirs, since: float) -> tuple[int, int]:
    """(bytes under ``dirs``, bytes of the files among them written since ``since``):
    the task cache's size and, for the blob stores, what was transferred today
    (every artefact and checkpoint in or out lands there)."""
    total = recent = 0
    for d in dirs:
        for dirpath, _, files in os.walk(d):
            for name in files:
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except OSError:
                    continue  # removed meanwhile
                total += st.st_size
                if st.st_mtime >= since:
                    recent += st.st_size
    return total, recent
