"""What a service asks for, as it travels in `task.start` (``"service"``) and is
stored with the job: the renewal period, named volumes and a health check.

    {"period_s": 60.0,
     "volumes": [{"name": "data", "path": "/data"}],          # at most MAX_VOLUMES
     "health": {"cmd": ["sh", "-c", "test -f /tmp/ok"]       # or "tcp": 8080
                "interval_s": 5.0, "retries": 3} | null,
     "restore": {"data": "<sha256>"}}   # task.start only: volumes shipped from the last hand-over

`check_service` is the one check of that map, on both sides: the consumer's
`--service` options pass through it at submit, the provider runs it on the
peer's task.start before anything becomes a path or a command (a volume name
is a short lowercase word, never a path; a mount path is plain and absolute,
outside the sandbox's system trees).
"""

from __future__ import annotations

import math
import posixpath
import re

from .servicelease import DEFAULT_PERIOD_S, check_period_s

_SHA = re.compile(r"[0-9a-f]{64}")
MIN_HEALTH_INTERVAL_S = 0.2
MAX_HEALTH_RETRIES = 100
MAX_HEALTH_ARGV = 32


class ServiceSpecError(ValueError):
    """A service map refused; ``slug``: the counted reason (ours, never the peer's text)."""
    default_slug = "bad_service"

    def __init__(self, message: str, slug: str | None = None):
        super().__init__(message)
        self.slug = slug or self.default_slug


class VolumeError(ServiceSpecError):
    default_slug = "bad_volume"


NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MAX_VOLUMES = 4  # per service
MAX_PATH = 200
# Where a volume may not go: the sandbox's own system trees and mounts.
RESERVED = ("/proc", "/sys", "/dev", "/tmp", "/etc", "/bin", "/sbin", "/lib", "/usr")


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise VolumeError("volume name must be 1-63 characters of a-z, 0-9, '-' or '_', "
                          "starting with a letter or digit", "bad_volume_name")
    return name


def check_mount_path(path) -> str:
    if not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_PATH \
            or "\x00" in path or ":" in path:
        raise VolumeError("volume path must be an absolute path in the sandbox", "bad_volume_path")
    norm = posixpath.normpath(path)
    if norm != path.rstrip("/") or ".." in path.split("/") or norm == "/":
        raise VolumeError("volume path must be a plain absolute path (no '..', not '/')", "bad_volume_path")
    if any(norm == r or norm.startswith(r + "/") for r in RESERVED):
        raise VolumeError(f"volume path {norm} is reserved in the sandbox", "bad_volume_path")
    return norm


def parse_arg(arg: str) -> dict:
    """``NAME:/path`` (the CLI's ``--volume``) -> {"name", "path"}; VolumeError if bad."""
    name, sep, path = str(arg).partition(":")
    if not sep:
        raise VolumeError(f"--volume {arg!r}: expected NAME:/path")
    return {"name": check_name(name), "path": check_mount_path(path)}


def check_list(value) -> list[dict]:
    """The ``volumes`` list of a job spec / task.start (peer input on the provider)."""
    if not isinstance(value, list) or len(value) > MAX_VOLUMES:
        raise VolumeError(f"volumes must be a list of at most {MAX_VOLUMES}")
    out, names, paths = [], set(), set()
    for v in value:
        if not isinstance(v, dict) or set(v) - {"name", "path"}:
            raise VolumeError("a volume is {name, path}")
        name, path = check_name(v.get("name")), check_mount_path(v.get("path"))
        if name in names or path in paths:
            raise VolumeError("a volume name or path appears twice")
        names.add(name)
        paths.add(path)
        out.append({"name": name, "path": path})
    return out


def _number(v, name: str, low: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
        raise ServiceSpecError(f"{name} must be a number >= {low:g}", "bad_health")
    return float(v)


def check_health(h) -> dict | None:
    if h is None:
        return None
    if not isinstance(h, dict) or set(h) - {"cmd", "tcp", "interval_s", "retries"}:
        raise ServiceSpecError("health must be a map of cmd | tcp, interval_s, retries", "bad_health")
    out: dict = {"interval_s": _number(h.get("interval_s", 5.0), "health interval", MIN_HEALTH_INTERVAL_S)}
    retries = h.get("retries", 3)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 1 <= retries <= MAX_HEALTH_RETRIES:
        raise ServiceSpecError(f"health retries must be 1..{MAX_HEALTH_RETRIES}", "bad_health")
    out["retries"] = retries
    cmd, tcp = h.get("cmd"), h.get("tcp")
    if (cmd is None) == (tcp is None):
        raise ServiceSpecError("a health check is a command or a TCP port (exactly one)", "bad_health")
    if cmd is not None:
        if not isinstance(cmd, list) or not 0 < len(cmd) <= MAX_HEALTH_ARGV or not all(
                isinstance(a, str) and len(a) <= 4096 and "\x00" not in a for a in cmd) or not cmd[0]:
            raise ServiceSpecError("health cmd must be a non-empty argv list", "bad_health")
        out["cmd"] = list(cmd)
    else:
        if isinstance(tcp, bool) or not isinstance(tcp, int) or not 0 < tcp < 65536:
            raise ServiceSpecError("health tcp must be a port 1-65535", "bad_health")
        out["tcp"] = tcp
    return out


def check_service(s) -> dict:
    """The normalised service map, or ServiceSpecError / VolumeError (each with a slug)."""
    if not isinstance(s, dict) or set(s) - {"period_s", "volumes", "health", "restore"}:
        raise ServiceSpecError("service must be a map of period_s, volumes, health, restore")
    try:
        period = check_period_s(s.get("period_s", DEFAULT_PERIOD_S))
    except ValueError as exc:
        raise ServiceSpecError(str(exc), "bad_period") from None
    out = {"period_s": period, "volumes": check_list(s.get("volumes", [])),
           "health": check_health(s.get("health"))}
    restore = s.get("restore")
    if restore is not None:
        names = {v["name"] for v in out["volumes"]}
        if not isinstance(restore, dict) or not set(restore) <= names or not all(
                isinstance(v, str) and _SHA.fullmatch(v) for v in restore.values()):
            raise VolumeError("restore must map the service's volume names to sha256 digests")
        out["restore"] = dict(restore)
    return out
