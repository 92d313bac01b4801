"""`synord sandbox run`: run a task in a local sandbox, without the mesh.

For provider operators to check that their sandboxes work, with the same
spec and limits a mesh task would get.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import trio

from synord.runtimes import get_runtime
from synord.runtimes.artifacts import infer_kind
from synord.runtimes.base import Limits, RuntimeError_, TaskSpec


def run_local(args) -> int:
    from .cli_errors import CliError
    artifact = Path(args.artifact).resolve()
    if not artifact.exists():
        raise CliError(f"artefact {args.artifact} does not exist")
    try:
        kind = args.runtime or infer_kind(artifact)
        runtime = get_runtime(kind)
        avail = runtime.available()
        if not avail.available:
            raise CliError(f"the {kind} sandbox is not available here: {avail.reason}")
        with tempfile.TemporaryDirectory(prefix="synord-sandbox-") as work:
            spec = TaskSpec(kind=kind, artifact=artifact, args=list(args.args), env=dict(args.env),
                            limits=Limits(cpus=args.cpus, memory_bytes=args.memory,
                                          timeout_s=args.timeout),
                            workdir=Path(work), task_id="local")
            status = trio.run(_run, runtime, spec)
    except RuntimeError_ as exc:
        raise CliError(str(exc)) from None
    if args.json:
        json.dump(status.to_json(), sys.stdout)
        sys.stdout.write("\n")
    elif status.reason:
        sys.stderr.write(f"synord: task ended: {status.reason} (exit {status.code})\n")
    return status.code


async def _run(runtime, spec):
    sandbox = await runtime.prepare(spec)
    try:
        async with trio.open_nursery() as nursery:
            await sandbox.start(nursery)
            async for chunk in sandbox.logs():
                out = sys.stdout.buffer if chunk.stream == "stdout" else sys.stderr.buffer
                out.write(chunk.data)
                out.flush()
            return await sandbox.wait()
    finally:
        with trio.CancelScope(shield=True):
            await sandbox.kill()
