"""Sharded jobs: one input split N ways, one child job per shard, the outputs
gathered in shard order.

    synord run --shards N --input PATH [--split lines|bytes|files] [--gather concat|dir] ARTIFACT -- ARGS

- **Split** (pure, `split`): ``lines`` gives N contiguous runs of whole lines,
  ``bytes`` N contiguous byte ranges, ``files`` a directory's regular files
  (name order) in N contiguous groups, each group's files concatenated. The
  shards concatenated in order are always the whole input, byte for byte.
- **Ship**: each shard is content-addressed into the blob store and is the
  task's **stdin** (`JobSpec.stdin_sha256`): it travels on /synord/transfer
  as a blob of kind ``input`` (digest verified on arrival) and is named in
  ``task.start`` (docs/WIRE.md).
- **Place**: the shards' children are matched and assigned together, one
  per distinct provider while there are enough (Kuhn–Munkres,
  synord.jobs.migration.assign_optimal, one slot per provider); each child is
  then an ordinary job (`ConsumerJobs._drive`): a lost provider's shard is
  re-placed from its own drive loop, the others are untouched.
- **Retry**: a shard that fails (non-zero exit, no placement) is run again as
  a new attempt, away from the providers it failed on, at most
  ``MAX_ATTEMPTS`` times; the parent fails only when one shard runs out.
- **Gather** (`gather_concat`, `gather_dir`): ``concat``: the parent's stdout
  is the children's stdout in shard order (stderr likewise); ``dir``: one
  file per shard (``shard-0000`` …) in the output directory. The parent's
  output and its final state are written in one transaction: it completes
  exactly once, also across a restart of the consumer.

State it owns: the parent's plan (``RunState.shards``: the attempts per
shard) and the children's place (``RunState.shard``); the rows are the job
store's, like any job's.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from synord.protocols.tasks import MAX_STDIN_BYTES

from ..errors import Invalid
from .migration import Displaced, Slot, assign_optimal
from .placement import DEFAULT_BANDWIDTH_BPS
from .spec import TERMINAL

if TYPE_CHECKING:
    from .consumer import ConsumerJob, ConsumerJobs

log = logging.getLogger("synord.jobs.shards")

SPLITS = ("lines", "bytes", "files")
GATHERS = ("concat", "dir")
MAX_SHARDS = 256
MAX_ATTEMPTS = 3  # runs of one shard before the whole job fails
MAX_INPUT_BYTES = 1 << 30  # the input is read whole on the consumer to be split


class ShardError(ValueError):
    """A sharding request that cannot be honoured (one line, for the user)."""


# ---- split and gather (pure) -----------------------------------------------------------------

def _ranges(total: int, n: int) -> list[tuple[int, int]]:
    """N contiguous [start, end) ranges over ``total`` items, sizes differing by at most one."""
    return [(i * total // n, (i + 1) * total // n) for i in range(n)]


def split_lines(data: bytes, n: int) -> list[bytes]:
    lines = data.splitlines(keepends=True)
    if n > len(lines):
        raise ShardError(f"--shards {n} but the input has only {len(lines)} line(s)")
    return [b"".join(lines[a:b]) for a, b in _ranges(len(lines), n)]


def split_bytes(data: bytes, n: int) -> list[bytes]:
    if n > len(data):
        raise ShardError(f"--shards {n} but the input has only {len(data)} byte(s)")
    return [data[a:b] for a, b in _ranges(len(data), n)]


def input_files(directory: Path) -> list[Path]:
    """A directory's regular files (no links, no subdirectories), in name order."""
    return sorted((p for p in directory.iterdir() if p.is_file() and not p.is_symlink()),
                  key=lambda p: p.name)


def split_files(files: list[Path], n: int) -> list[bytes]:
    if n > len(files):
        raise ShardError(f"--shards {n} but the input directory has only {len(files)} file(s)")
    return [b"".join(f.read_bytes() for f in files[a:b]) for a, b in _ranges(len(files), n)]


def check_request(n: Any, how: Any, gather: Any) -> tuple[int, str, str]:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SHARDS:
        raise ShardError(f"--shards must be an integer from 1 to {MAX_SHARDS}")
    if how not in SPLITS:
        raise ShardError(f"--split must be one of {', '.join(SPLITS)}")
    if gather not in GATHERS:
        raise ShardError(f"--gather must be one of {', '.join(GATHERS)}")
    return n, how, gather


def split(path: Path, n: int, how: str) -> list[bytes]:
    """The input at ``path`` in ``n`` shards; `ShardError` (one line) when it cannot be."""
    if how == "files":
        if not path.is_dir():
            raise ShardError(f"--split files needs a directory, and {path} is not one")
        files = input_files(path)
        if sum(f.stat().st_size for f in files) > MAX_INPUT_BYTES:
            raise ShardError(f"the input is over {MAX_INPUT_BYTES >> 20} MiB")
        shards = split_files(files, n)
    else:
        if not path.is_file():
            raise ShardError(f"--split {how} needs a file, and {path} is not one")
        if path.stat().st_size > MAX_INPUT_BYTES:
            raise ShardError(f"the input is over {MAX_INPUT_BYTES >> 20} MiB")
        data = path.read_bytes()
        if not data:
            raise ShardError("the input is empty: nothing to shard")
        shards = split_lines(data, n) if how == "lines" else split_bytes(data, n)
    if not any(shards):
        raise ShardError("the input is empty: nothing to shard")
    big = max(len(s) for s in shards)
    if big > MAX_STDIN_BYTES:
        raise ShardError(f"a shard would be {big >> 20} MiB, over the {MAX_STDIN_BYTES >> 20} MiB a task's "
                         f"stdin may be: use more shards")
    return shards


def gather_concat(outputs: list[list[tuple[str, bytes]]]) -> list[tuple[str, bytes]]:
    """The parent's output: every shard's stdout in shard order, then every shard's stderr."""
    return [(s, data) for stream in ("stdout", "stderr") for chunks in outputs
            for s, data in chunks if s == stream]


def shard_name(i: int) -> str:
    return f"shard-{i:04d}"


def gather_dir(outputs: list[list[tuple[str, bytes]]], dest: Path) -> list[tuple[str, bytes]]:
    """One file per shard (its stdout) in ``dest``; the parent keeps the stderr, in shard order."""
    dest.mkdir(parents=True, exist_ok=True)
    for i, chunks in enumerate(outputs):
        tmp = dest / f".{shard_name(i)}.tmp"
        tmp.write_bytes(b"".join(d for s, d in chunks if s == "stdout"))
        os.replace(tmp, dest / shard_name(i))
    return [(s, d) for chunks in outputs for s, d in chunks if s == "stderr"]


# ---- what the parent does when a shard's job ends (pure) --------------------------------------------

IGNORE, WAIT, RETRY, FAIL, GATHER = "ignore", "wait", "retry", "fail", "gather"


def next_step(attempts: list[list[str]], states: dict[str, str], ended: str, index: int,
              cancelled: bool = False) -> str:
    """The parent's move when job ``ended`` (an attempt of shard ``index``) has ended:

    IGNORE  an older attempt (a newer one runs)
    RETRY   it did not succeed and the shard has attempts left (and nobody cancelled it)
    FAIL    it did not succeed and the shard is out of attempts, or it was cancelled
    GATHER  every shard's latest attempt succeeded
    WAIT    it succeeded; others still run

    ``attempts``: job ids per shard, oldest first; ``states``: job id -> state."""
    if attempts[index][-1] != ended:
        return IGNORE
    if states[ended] != "succeeded":
        return RETRY if not cancelled and len(attempts[index]) < MAX_ATTEMPTS else FAIL
    return GATHER if all(states[a[-1]] == "succeeded" for a in attempts) else WAIT


# ---- the driver ----------------------------------------------------------------------------------

class Shards:
    """Sharded jobs of one consumer (see the module docstring); driven by `ConsumerJobs`."""

    def __init__(self, jobs: "ConsumerJobs", job_class: type):
        self.jobs = jobs
        self.job_class = job_class  # ConsumerJob (passed in: consumer.py imports this module)

    # submission: everything checked and persisted before anything is placed
    async def submit(self, req: dict, spec) -> dict:
        jobs = self.jobs
        parent, children = await trio.to_thread.run_sync(self.prepare, req, spec)
        with jobs.store.tx() as conn:  # the parent and its shards, together or not at all
            for j in (parent, *children):
                jobs.jobstore.write(conn, j)
        for j in (parent, *children):
            jobs.jobs[j.id] = j
        log.info("sharded job submitted", extra={"job": parent.id, "shards": len(children),
                                                 "split": parent.runstate.shards["split"]})
        jobs._nursery.start_soon(self.drive, parent, False)
        return self.describe(parent, parent.to_json())

    def prepare(self, req: dict, spec) -> tuple["ConsumerJob", list["ConsumerJob"]]:
        """The parent and its first children (blocking: splits and hashes; run it in a thread)."""
        try:
            n = 1 if req.get("shards") is None else req.get("shards")  # --input alone: one task
            n, how, gather = check_request(n, req.get("split") or "lines", req.get("gather") or "concat")
            raw = req.get("input")
            if not isinstance(raw, str) or not Path(raw).is_absolute():
                raise ShardError("--input must be an absolute path on this node")
            shards = split(Path(raw), n, how)
        except ShardError as exc:
            raise Invalid(f"bad task: {exc}") from None
        except OSError as exc:
            raise Invalid(f"bad task: cannot read the input: {exc.strerror or exc}") from None
        parent = self.job_class(id=uuid.uuid4().hex[:16], jobspec=spec)
        out_dir = None
        if gather == "dir":
            out = req.get("output_dir")
            if out is not None and (not isinstance(out, str) or not Path(out).is_absolute()):
                raise Invalid("bad task: --output-dir must be an absolute path on this node")
            dest = Path(out) if out else Path(self.jobs.home.path) / "shards" / parent.id
            if dest.exists() and any(dest.iterdir()):
                raise Invalid(f"bad task: the output directory {dest} is not empty")
            out_dir = str(dest)
        children = []
        for i, data in enumerate(shards):
            sha = self._add_blob(data)
            children.append(self._child(parent, replace(spec, stdin_sha256=sha, checkpointable=False), i, 0))
        parent.runstate.shards = {"n": n, "split": how, "gather": gather, "output_dir": out_dir,
                                  "bytes": [len(s) for s in shards],
                                  "attempts": [[c.id] for c in children]}
        return parent, children

    def _add_blob(self, data: bytes) -> str:
        blobs = self.jobs.blobs
        tmp = blobs.dir / f".shard.{os.getpid()}.{os.urandom(6).hex()}.tmp"
        try:
            tmp.write_bytes(data)
            return blobs.add_file(tmp)
        finally:
            tmp.unlink(missing_ok=True)

    def _child(self, parent: "ConsumerJob", spec, index: int, attempt: int) -> "ConsumerJob":
        child = self.job_class(id=f"{parent.id}-{index}" + (f"r{attempt}" if attempt else ""), jobspec=spec)
        child.runstate.shard = {"parent": parent.id, "index": index, "attempt": attempt}
        return child

    def children(self, parent: "ConsumerJob") -> list["ConsumerJob"]:
        """The latest attempt of each shard, in shard order."""
        return [self.jobs.jobs[a[-1]] for a in parent.runstate.shards["attempts"]]

    # the parent's drive loop
    async def drive(self, parent: "ConsumerJob", resumed: bool) -> None:
        jobs = self.jobs
        send, recv = trio.open_memory_channel(math.inf)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow_cancel, parent, send)
                latest = self.children(parent)
                fresh = [c for c in latest if c.state == "queued" and not c.history]
                preferred = self.assign_distinct(fresh)
                if not parent.cancel_requested:
                    jobs._set_state(parent, "running")
                    self._progress(parent)
                for child in latest:
                    if child.state in TERMINAL:
                        send.send_nowait(child.id)  # decided before our restart: judge it again
                    else:
                        nursery.start_soon(self._run, child, resumed and child not in fresh, (),
                                           preferred.get(child.id), send)
                while True:
                    msg = await recv.receive()
                    if msg == "cancel" or parent.cancel_requested:
                        await self._cancel_all(parent)
                        jobs._set_state(parent, "cancelled")
                        break
                    child = jobs.jobs[msg]
                    i, attempts = child.runstate.shard["index"], parent.runstate.shards["attempts"]
                    step = next_step(attempts, {a: jobs.jobs[a].state for s in attempts for a in s}, child.id, i,
                                     cancelled=parent.cancel_requested or child.cancel_requested)
                    if step == RETRY:
                        nursery.start_soon(self._run, *self._retry(parent, child), None, send)
                    elif step == FAIL:
                        await self._cancel_all(parent)
                        jobs._set_state(parent, "failed", exit_code=child.exit_code,
                                        error=f"shard {i} {child.state} after {len(attempts[i])} attempt(s): "
                                              f"{child.error or 'exit ' + str(child.exit_code)}")
                        break
                    self._progress(parent)
                    if step == GATHER:
                        self._gather(parent)
                        break
                nursery.cancel_scope.cancel()
        except Exception as exc:
            log.exception("sharded job failed", extra={"job": parent.id})
            if parent.state not in TERMINAL:
                jobs._set_state(parent, "failed", error=f"{type(exc).__name__}: {exc}")

    async def _run(self, child: "ConsumerJob", resumed: bool, exclude: tuple[str, ...], preferred: Any,
                   send: trio.MemorySendChannel) -> None:
        await self.jobs._drive(child, resumed, exclude=exclude, preferred=preferred)
        send.send_nowait(child.id)

    @staticmethod
    async def _follow_cancel(parent: "ConsumerJob", send: trio.MemorySendChannel) -> None:
        while not parent.cancel_requested:  # ends with the parent's nursery
            await parent.changed.wait()
        send.send_nowait("cancel")

    async def _cancel_all(self, parent: "ConsumerJob") -> None:
        async with trio.open_nursery() as n:
            for c in self.children(parent):
                if c.state not in TERMINAL:
                    n.start_soon(self.jobs.cancel, c.id)

    def _retry(self, parent: "ConsumerJob", failed: "ConsumerJob") -> tuple["ConsumerJob", bool, tuple]:
        """The shard's next attempt (job, resumed, exclude), away from the providers it failed on."""
        i = failed.runstate.shard["index"]
        attempts = parent.runstate.shards["attempts"][i]
        tried = tuple({h["provider"] for a in attempts for h in self.jobs.jobs[a].history if h.get("provider")})
        needs = failed.jobspec.needs()
        exclude = tried if self.jobs.market.candidates(needs, tried) else ()  # nowhere else: anywhere
        child = self._child(parent, failed.jobspec, i, len(attempts))
        attempts.append(child.id)
        jobs = self.jobs
        jobs.jobs[child.id] = child
        with jobs.store.tx() as conn:  # the attempt and the parent naming it, together
            jobs.jobstore.write(conn, child)
            jobs.jobstore.write(conn, parent)
        log.info("shard re-placed after a failure", extra={"job": parent.id, "shard": i,
                                                          "attempt": len(attempts) - 1})
        jobs._notice(parent, f"shard {i} {failed.state}: running it again elsewhere", shard=i)
        return child, False, exclude

    def assign_distinct(self, children: list["ConsumerJob"]) -> dict[str, Any]:
        """The children matched and assigned together, at most one per provider (the
        Kuhn–Munkres optimum over one slot per provider); child id → candidate."""
        if not children:
            return {}
        market, bandwidth = self.jobs.market, self.jobs.bandwidth
        needs = children[0].jobspec.needs()  # the shards differ only in their stdin
        per_peer: dict[str, Any] = {}
        for cand in market.candidates(needs):
            per_peer.setdefault(cand.ask.peer, cand)
        tasks = [Displaced(c.id, needs.cores, needs.memory, needs.runtime, 0, needs.max_price) for c in children]
        slots = [Slot(a.peer, a.cores, a.memory, a.price, bandwidth.get(a.peer, DEFAULT_BANDWIDTH_BPS),
                      tuple(a.runtimes)) for a in (c.ask for c in per_peer.values())]
        owners = list(per_peer.values())
        t0 = time.perf_counter()
        result = assign_optimal(tasks, slots) if slots else {}
        solve_ms = round((time.perf_counter() - t0) * 1000, 3)
        out = {}
        for c in children:
            j = result.get(c.id)
            if j is not None:
                out[c.id] = owners[j]
            c.runstate.assignment = {"method": "kuhn-munkres", "batch": len(children), "slots": len(slots),
                                     "solve_ms": solve_ms, "provider": owners[j].ask.peer if j is not None else None}
        log.info("shards assigned together", extra={"shards": len(children), "providers": len(slots),
                                                    "solve_ms": solve_ms})
        return out

    def _progress(self, parent: "ConsumerJob") -> None:
        kids = self.children(parent)
        done = sum(c.state == "succeeded" for c in kids)
        parent.progress = {"phase": "running", "done": done, "total": len(kids),
                           "running": sum(c.state == "running" for c in kids)}
        parent.notify()

    def _gather(self, parent: "ConsumerJob") -> None:
        """The outputs in shard order and the parent's success, in one transaction."""
        jobs, plan = self.jobs, parent.runstate.shards
        # What is stored, then what a full disk still holds in memory: every byte, in order.
        outputs = [[(s, d) for _, s, d in jobs.jobstore.output_after(c.id, 0)] + list(c.pending_output)
                   for c in self.children(parent)]
        if plan["gather"] == "dir":
            chunks = gather_dir(outputs, Path(plan["output_dir"]))
        else:
            chunks = gather_concat(outputs)
        parent.state, parent.exit_code = "succeeded", 0
        try:
            with jobs.store.tx() as conn:
                jobs.jobstore.append_output(conn, parent.id, chunks)
                jobs.jobstore.write(conn, parent)
        except BaseException:
            parent.state, parent.exit_code = "running", None  # not gathered: the caller fails the job
            raise
        parent.progress = None
        parent.notify()
        log.info("sharded job gathered", extra={"job": parent.id, "shards": plan["n"], "gather": plan["gather"]})

    # what status shows
    def _receipts(self, job: "ConsumerJob") -> list[dict]:
        """The usage receipts of a shard's placements that have arrived: what each leg cost."""
        out = []
        for leg in job.history:
            r = leg.get("agreement") and self.jobs.market.receipt(bytes.fromhex(leg["agreement"]))
            if r:
                out.append({k: r[k] for k in ("agreement_id", "provider", "outcome", "amount", "cpu_s", "wall_s")})
        return out

    def describe(self, job: "ConsumerJob", out: dict) -> dict:
        """``out`` (the job's JSON) with its shards (a parent) or its place (a child)."""
        plan = job.runstate.shards
        if job.runstate.shard:
            out["shard"] = job.runstate.shard
        if not plan:
            return out
        out["sharding"] = {k: plan[k] for k in ("n", "split", "gather", "output_dir")}
        rows = []
        for i, attempts in enumerate(plan["attempts"]):
            kids = [self.jobs.jobs[a] for a in attempts if a in self.jobs.jobs]
            last = kids[-1]
            rows.append({"index": i, "job": last.id, "state": last.state, "provider": last.provider,
                         "exit_code": last.exit_code, "error": last.error, "input_bytes": plan["bytes"][i],
                         "attempts": [{"job": k.id, "state": k.state, "placements": k.history,
                                       "assignment": k.runstate.assignment, "receipts": self._receipts(k)}
                                      for k in kids]})
        out["shards"] = rows
        return out
