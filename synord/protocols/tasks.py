"""The task protocol (`/synord/task/1.0.0`): start or re-attach a task on a
provider and stream it back.

Opening message (consumer → provider), a signed envelope in a frame
``{"env": bytes}``:

  task.start   {job_id, agreement_id, kind, artifact_sha256, args, env,
                limits: {cpus, memory_bytes, timeout_s, pids},
                checkpointable, checkpoint_interval_s,
                restore: null | {sha256, offsets: {stdout, stderr}},
                progress: bool}        opt-in: the consumer reads progress frames
  task.attach  {job_id, offsets: {stdout, stderr}}

Then plain frames on the authenticated stream (the Noise session binds them
to the peer; data is not signed chunk by chunk):

  provider → consumer   {"progress": {phase, done, total}}*   before the reply below, only
                                                             when task.start asked (progress: true)
                        {"started": true} | {"error": text}
                        {"o": "stdout"|"stderr", "off": int, "d": bytes}
                        {"hb": unix_ms}                      lease heartbeat
                        {"ckpt": {sha256, bytes, offsets, final: bool[, pushed_to]}}
                                                             + {"blob": bytes} + raw bytes (not when pushed_to)
                        {"preempt": {grace_s, deadline_ms, reason}}
                        {"exit": {code, reason, usage, error, handed_back, offsets}}
                        {"ckpt_error": text}
  consumer → provider   {"cancel": true}
                        {"checkpoint": {"stop": bool[, push_to: {peer, grant, addrs}]}}
                                                             ask for a checkpoint now

Which frame may come when, and what each must contain, is the state machine
in synord/protocols/taskstream.py (docs/WIRE.md §13).

The stream ends after the exit frame. The usage receipt travels on the
negotiation protocol, where the agreement lives (signed by the provider,
countersigned by the consumer).
"""

from __future__ import annotations

import re
from typing import Any

from .envelope import message_type
from .kinds import RUNTIME_KINDS
from .ports import wire_ports

TASK_PROTOCOL = "/synord/task/1.0.0"
# A job id is the consumer's name for its job: never a path anywhere, but kept
# path-inert anyway (no "/", no leading dot, so neither "." nor "..").
_ID_RE = re.compile(r"^[A-Za-z0-9_:-][A-Za-z0-9_.:-]{0,63}$")
AID_RE = re.compile(r"^[0-9a-f]{32}$")  # an agreement id (16 bytes), lowercase hex
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_ARGS = 256
MAX_ARG_LEN = 4096


class TaskSpecError(ValueError):
    pass


def _id(body: dict, key: str, pattern: re.Pattern = _ID_RE) -> None:
    v = body.get(key)
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise TaskSpecError(f"{key} must match {pattern.pattern}")


def _offsets(v: Any) -> None:
    if not isinstance(v, dict) or set(v) - {"stdout", "stderr"} or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v.values()):
        raise TaskSpecError("offsets must be {stdout: int >= 0, stderr: int >= 0}")


def check_limits(limits: Any) -> None:
    if not isinstance(limits, dict) or set(limits) - {"cpus", "memory_bytes", "timeout_s", "pids"}:
        raise TaskSpecError("limits must be a map of cpus, memory_bytes, timeout_s, pids")
    cpus = limits.get("cpus", 1.0)
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not 0 < cpus <= 1024:
        raise TaskSpecError("limits.cpus must be in (0, 1024]")
    mem = limits.get("memory_bytes", 256 << 20)
    if isinstance(mem, bool) or not isinstance(mem, int) or not (1 << 20) <= mem <= (1 << 44):
        raise TaskSpecError("limits.memory_bytes must be between 1 MiB and 16 TiB")
    t = limits.get("timeout_s")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 366 * 86400):
        raise TaskSpecError("limits.timeout_s must be positive")
    pids = limits.get("pids", 64)
    if isinstance(pids, bool) or not isinstance(pids, int) or not 1 <= pids <= 65536:
        raise TaskSpecError("limits.pids must be in [1, 65536]")


def check_args_env(args: Any, env: Any) -> None:
    if not isinstance(args, list) or len(args) > MAX_ARGS or not all(
            isinstance(a, str) and len(a) <= MAX_ARG_LEN for a in args):
        raise TaskSpecError(f"args must be at most {MAX_ARGS} strings of <= {MAX_ARG_LEN} chars")
    if not isinstance(env, dict) or len(env) > MAX_ARGS or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) + len(v) <= MAX_ARG_LEN
            and "=" not in k and k for k, v in env.items()):
        raise TaskSpecError("env must be a map of short strings (no '=' in names)")


def check_start(body: Any) -> None:
    if not isinstance(body, dict):
        raise TaskSpecError("task.start body must be a map")
    _id(body, "job_id")
    _id(body, "agreement_id", AID_RE)
    if body.get("kind") not in RUNTIME_KINDS:
        raise TaskSpecError(f"kind must be one of {RUNTIME_KINDS}")
    if not isinstance(body.get("artifact_sha256"), str) or not _SHA_RE.fullmatch(body["artifact_sha256"]):
        raise TaskSpecError("artifact_sha256 must be 64 hex digits")
    check_args_env(body.get("args", []), body.get("env", {}))
    check_limits(body.get("limits", {}))
    if not isinstance(body.get("checkpointable", False), bool):
        raise TaskSpecError("checkpointable must be a bool")
    iv = body.get("checkpoint_interval_s", 0)
    if isinstance(iv, bool) or not isinstance(iv, (int, float)) or iv < 0:
        raise TaskSpecError("checkpoint_interval_s must be >= 0")
    if not isinstance(body.get("progress", False), bool):
        raise TaskSpecError("progress must be a bool")
    if "ports" in body:  # the ports the task exposes (synord forward): sorted, absent when none
        try:
            wire_ports(body["ports"])
        except ValueError as exc:
            raise TaskSpecError(str(exc)) from None
    restore = body.get("restore")
    if restore is not None:
        if not isinstance(restore, dict) or not isinstance(restore.get("sha256"), str) \
                or not _SHA_RE.fullmatch(restore["sha256"]):
            raise TaskSpecError("restore.sha256 must be 64 hex digits")
        _offsets(restore.get("offsets", {}))


def check_attach(body: Any) -> None:
    if not isinstance(body, dict):
        raise TaskSpecError("task.attach body must be a map")
    _id(body, "job_id")
    _offsets(body.get("offsets", {}))


# What a provider does before a task runs; a progress frame names one of these.
PROVIDER_PHASES = ("verifying", "restoring", "compiling", "unpacking", "booting", "starting")
_MAX_PROGRESS = 1 << 44


def check_progress(p: Any) -> dict:
    """A provider's progress frame body, checked (it is peer input): the normalised
    {phase, done, total}, or TaskSpecError."""
    if not isinstance(p, dict) or set(p) - {"phase", "done", "total"}:
        raise TaskSpecError("progress must be a map of phase, done, total")
    if p.get("phase") not in PROVIDER_PHASES:
        raise TaskSpecError(f"progress.phase must be one of {PROVIDER_PHASES}")
    done, total = p.get("done"), p.get("total")
    for v in (done, total):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_PROGRESS):
            raise TaskSpecError("progress.done and .total must be null or integers in range")
    if done is not None and total is not None and done > total:
        raise TaskSpecError("progress.done exceeds .total")
    return {"phase": p["phase"], "done": done, "total": total}


message_type("task.start", check_start)
message_type("task.attach", check_attach)
