"""Containers die with the daemon, even when the daemon is SIGKILLed.

A container outlives the ``crun``/``runc`` process that started it (its init is
re-parented, not killed), and a restored runsc sandbox is detached from the
start. So every container the daemon starts is written into a registry
directory (one small JSON file per container: the runtime command prefix, the
container id), and removed from it after its teardown. Two things empty the
registry of what was left behind:

* ``sweep(dir)``, run by the daemon at start: the previous life's leftovers
  (killed, deleted, their cgroups removed);
* a reaper process, ``python -m synord.runtimes.reaper DIR``, that the daemon starts
  with a parent-death signal of SIGTERM (see anchored.py): when the daemon dies
  for any reason it sweeps the registry and exits.
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


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m synord.runtimes.reaper REGISTRY_DIR", file=sys.stderr)
        return 2
    registry = Path(argv[1])
    done = False

    def on_term(signum, frame) -> None:
        nonlocal done
        done = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides; we follow its death
    if os.getppid() == 1:  # the daemon died before we could arm the death signal
        done = True
    while not done:
        signal.pause()
    sweep(registry)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
