"""Containers die with the daemon, even when the daemon is SIGKILLed.

A container outlives the ``crun``/``runc`` process that started it (its init is
re-parented, not killed), and a restored runsc sandbox is detached from the
start. So every container the daemon starts is written into a registry
directory (one small JSON file per container: the runtime command prefix, the
container id), and removed from it after its teardown. Two things empty the
registry of what was left behind:

* ``sweep(dir)``, run by the daemon at start: the previous life's leftovers
  (killed, deleted, their cgroups removed);
* a reaper (``start``): a ``/bin/sh`` that waits, reading a pipe whose other end
  only the daemon holds.  When the daemon dies for any reason the kernel closes
  that end; the read returns and the shell becomes ``python -m
  synord.runtimes.reaper --sweep DIR``, which sweeps the registry and exits.
  SIGTERM (the daemon stopping) does the same.  A waiting shell costs ~1.7 MiB
  of RSS where a waiting Python cost 14 MiB (bench/bench_idle.py), and the
  daemon's death is seen without a death signal (no race with the exec).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from . import cgroups

log = logging.getLogger(__name__)

STEP_TIMEOUT_S = 10


def register(registry: Path, container_id: str, command: list[str], engine: str) -> None:
    registry.mkdir(parents=True, exist_ok=True)
    tmp = registry / f".{container_id}.tmp"
    tmp.write_text(json.dumps({"id": container_id, "command": command, "engine": engine}))
    os.replace(tmp, registry / f"{container_id}.json")


def unregister(registry: Path, container_id: str) -> None:
    (registry / f"{container_id}.json").unlink(missing_ok=True)


def _run(argv: list[str]) -> None:
    try:
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=STEP_TIMEOUT_S,
                       check=False)
    except (OSError, subprocess.TimeoutExpired):
        pass


def sweep(registry: Path) -> list[str]:
    """Kill, delete and un-cgroup every registered container; the ids swept."""
    swept = []
    try:
        entries = sorted(registry.glob("*.json"))
    except OSError:
        return swept
    for path in entries:
        try:
            entry = json.loads(path.read_text())
            cid, command, engine = str(entry["id"]), list(entry["command"]), str(entry["engine"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        _run([*command, "kill", cid, "KILL"])
        _run([*command, "delete", "--force" if engine == "runsc" else "-f", cid])
        try:
            cgroups.TaskCgroup(cid).destroy()
        except OSError as exc:
            log.warning("cgroup of a stale container not removed", extra={"id": cid, "error": str(exc)})
        path.unlink(missing_ok=True)
        swept.append(cid)
    return swept


# $0 = "synord.runtimes.reaper" (so the command line reads "synord.runtimes.reaper DIR"),
# $1 = the registry, $2 = the Python to sweep with.  stdin is the lifeline: `read` returns
# at its EOF (the daemon died) or when the TERM trap runs (the daemon stops); INT is the
# daemon's to decide.
_WAIT_SCRIPT = """trap '' INT
trap 'exec "$2" -m synord.runtimes.reaper --sweep "$1"' TERM
read _
exec "$2" -m synord.runtimes.reaper --sweep "$1"
"""


def command(registry: Path, python: str = sys.executable) -> list[str]:
    return ["/bin/sh", "-c", _WAIT_SCRIPT, "synord.runtimes.reaper", str(registry), python]


async def start(nursery, registry: Path):
    """Start the reaper of ``registry`` (an anchored.AnchoredProcess); it sweeps when we die
    or send it SIGTERM."""
    from .anchored import spawn  # trio: not for the sweeping process
    from .base import child_env
    lifeline_r, lifeline_w = os.pipe2(os.O_CLOEXEC)  # no other child inherits the write end
    try:
        proc = await spawn(nursery, command(registry), env=child_env(), stdin=lifeline_r,
                           death_signal=0)  # no death signal: the lifeline's EOF says it
    except BaseException:
        os.close(lifeline_w)
        raise
    finally:
        os.close(lifeline_r)
    proc.owned_fds.append(lifeline_w)  # held until the reaper is closed (or we die)
    return proc


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] != "--sweep":
        print("usage: python -m synord.runtimes.reaper --sweep REGISTRY_DIR", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second stop request must not cut the sweep short
    sweep(Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
