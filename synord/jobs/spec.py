"""A job's one typed model: what the user asked (`JobSpec`, frozen) and what
happened to it since (`RunState`, mutable), kept apart.

The journey of the need, one type all the way:

    API body ──submit.validate──▶ JobSpec ──needs()──▶ market.port.Needs ──▶ Bid/Propose/Terms
                                     │
                                     └─task_start()──▶ task.start body ──from_task_start()──▶ JobSpec
                                                         (the wire)        (provider side) ──task_spec()──▶ runtimes TaskSpec

`cpus` is the user's and the sandbox's word; the market's `Needs` says
`cores` (its wire field, `Bid.cores`): `needs()` is the one place that maps.

Every wire and stored shape is produced and read here, next to the type:
`to_stored`/`from_stored` (the `jobs.spec` column, unchanged since migration 2,
so old rows read back), `task_start`/`from_task_start` (the `task.start`
body, byte-compatible with synord.protocols.tasks). `RunState` is stored in the same
JSON column (its keys never collide with the spec's).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterator

from ..market.port import Needs

TERMINAL = ("succeeded", "failed", "cancelled")  # a consumer job's final states
DEFAULT_MEMORY = 256 << 20
DEFAULT_TIMEOUT_S = 3600  # how long the market holds capacity for a job without timeout_s
LEASE_SLACK_S = 60  # held a minute longer than the task may run, and never under a minute


@dataclass(frozen=True)
class JobSpec:
    kind: str  # the sandbox: wasm | container | microvm
    sha256: str  # the artefact (as shipped: one file) by digest
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # (name, value) pairs, in the user's order
    cpus: float = 1.0
    memory_bytes: int = DEFAULT_MEMORY
    timeout_s: float | None = None
    pids: int | None = None  # None: the sandbox's default (never sent then)
    checkpointable: bool = False
    # Consumer side only (never on the wire): where the artefact came from, the price cap.
    artifact: str | None = None
    max_price: float | None = None
    # GPUs asked for (synord.gpu_request): {gpus, gpu_class, gpu_memory, cuda}; None: none.
    # Consumer side: the market places them; the agreement names the devices.
    gpu: dict | None = None
    # A long-running service (synord.protocols.servicespec: {period_s, volumes, health}); None: a task.
    service: dict | None = None
    # TCP ports the task exposes (`synord run --port`, sorted): in the agreement and task.start.
    ports: tuple[int, ...] = ()

    # ---- what each party makes of it -------------------------------------------------------

    def limits(self) -> dict:
        """The limits as they travel and are stored: {cpus, memory_bytes[, timeout_s][, pids]}."""
        out: dict[str, Any] = {"cpus": self.cpus, "memory_bytes": self.memory_bytes}
        if self.timeout_s is not None:
            out["timeout_s"] = self.timeout_s
        if self.pids is not None:
            out["pids"] = self.pids
        return out

    def needs(self) -> Needs:
        """What the market places: the capacity, held a minute past the task's timeout."""
        duration = int(self.timeout_s or DEFAULT_TIMEOUT_S)
        gpu = self.gpu or {}
        return Needs(runtime=self.kind, cores=self.cpus, memory=self.memory_bytes,
                     max_price=self.max_price, duration_s=max(LEASE_SLACK_S, duration + LEASE_SLACK_S),
                     gpus=gpu.get("gpus", 0), gpu_class=gpu.get("gpu_class"),
                     resource_class="gpu" if gpu else "cpu", gpu_memory=gpu.get("gpu_memory"),
                     cuda=gpu.get("cuda"), ports=self.ports)

    def task_start(self, job_id: str, agreement_id: str, checkpoint_interval_s: float,
                   restore: dict | None, progress: bool = True) -> dict:
        """The `task.start` body (synord.protocols.tasks), keys in their wire order."""
        return {"job_id": job_id, "agreement_id": agreement_id, "kind": self.kind,
                "artifact_sha256": self.sha256, "args": list(self.args), "env": dict(self.env),
                "limits": self.limits(), "checkpointable": self.checkpointable,
                "checkpoint_interval_s": checkpoint_interval_s if self.checkpointable else 0,
                "restore": restore, "progress": progress,
                **({"service": self.service} if self.service else {}),
                **({"ports": list(self.ports)} if self.ports else {})}

    @classmethod
    def from_task_start(cls, body: dict) -> "JobSpec":
        """The provider's reading of a `task.start` body already checked by synord.protocols.tasks.check_start."""
        lim = body.get("limits", {})
        return cls(kind=body["kind"], sha256=body["artifact_sha256"], args=tuple(body.get("args", [])),
                   env=tuple(dict(body.get("env", {})).items()), cpus=float(lim.get("cpus", 1.0)),
                   memory_bytes=int(lim.get("memory_bytes", DEFAULT_MEMORY)), timeout_s=lim.get("timeout_s"),
                   pids=lim.get("pids"), checkpointable=bool(body.get("checkpointable")),
                   service=body.get("service") or None, ports=tuple(body.get("ports") or ()))

    def task_spec(self, artifact: Path, workdir: Path, task_id: str):
        """The sandbox's `TaskSpec` for this job, its artefact at ``artifact``."""
        from synord.runtimes.base import Limits, TaskSpec
        limits = Limits(cpus=self.cpus, memory_bytes=self.memory_bytes, timeout_s=self.timeout_s)
        if self.pids is not None:
            limits = replace(limits, pids=self.pids)
        return TaskSpec(kind=self.kind, artifact=artifact, sha256=self.sha256, args=list(self.args),
                        env=dict(self.env), limits=limits, workdir=workdir,
                        checkpointable=self.checkpointable, task_id=task_id)

    # ---- the stored form (the jobs.spec column) ------------------------------------------------

    def to_stored(self) -> dict:
        return {"kind": self.kind, "artifact": self.artifact, "sha256": self.sha256,
                "args": list(self.args), "env": dict(self.env), "limits": self.limits(),
                "max_price": self.max_price, "checkpointable": self.checkpointable,
                **({"gpu": self.gpu} if self.gpu else {}), **({"service": self.service} if self.service else {}),
                **({"ports": list(self.ports)} if self.ports else {})}

    @classmethod
    def from_stored(cls, d: dict) -> "JobSpec":
        lim = d.get("limits") or {}
        return cls(kind=d["kind"], sha256=d["sha256"], args=tuple(d.get("args") or ()),
                   env=tuple((d.get("env") or {}).items()), cpus=float(lim.get("cpus", 1.0)),
                   memory_bytes=int(lim.get("memory_bytes", DEFAULT_MEMORY)), timeout_s=lim.get("timeout_s"),
                   pids=lim.get("pids"), checkpointable=bool(d.get("checkpointable")),
                   artifact=d.get("artifact"), max_price=d.get("max_price"), gpu=d.get("gpu") or None,
                   service=d.get("service") or None, ports=tuple(d.get("ports") or ()))

    def __getitem__(self, key: str) -> Any:
        """The stored form's keys (``spec["limits"]["cpus"]``): for code not yet moved to the fields."""
        return self.to_stored()[key]


@dataclass
class RunState:
    """What happened to a job since it was asked for (the consumer's, persisted with the job)."""
    checkpoint: dict | None = None  # {sha256, bytes, offsets, path | None, at_provider?, at}
    restore_mode: str | None = None  # how the next placement starts: full | partial | restart…
    assignment: dict | None = None  # the batch assignment that chose the next provider (history)
    provider_addrs: list[str] | None = None  # where to find the provider again after our restart
    volumes: dict | None = None  # a service's volumes from its last hand-over: {name: {sha256, bytes, path}}
    gang: dict | None = None  # synord.jobs.gang: a gang's {size, members} or a member's {parent, rank, size}

    def to_stored(self) -> dict:
        out: dict[str, Any] = {"checkpoint": self.checkpoint}  # always there (since migration 2)
        out.update({f.name: getattr(self, f.name) for f in fields(self)
                    if f.name != "checkpoint" and getattr(self, f.name) is not None})
        return out

    @classmethod
    def from_stored(cls, d: dict) -> "RunState":
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


RUN_KEYS = frozenset(f.name for f in fields(RunState))


def stored(spec: JobSpec, run: RunState) -> dict:
    """The jobs.spec column: the spec's keys and the run state's, in one JSON object."""
    return {**spec.to_stored(), **run.to_stored()}


def from_stored(d: dict) -> tuple[JobSpec, RunState]:
    return JobSpec.from_stored(d), RunState.from_stored(d)


@dataclass
class SpecView(MutableMapping):
    """``job.spec`` as the dict it used to be: reads see both halves; writes go to the
    run state only (the spec is frozen). Transitional: new code uses the fields."""
    spec: JobSpec
    run: RunState = field(default_factory=RunState)

    def __getitem__(self, key: str) -> Any:
        if key in RUN_KEYS:
            value = getattr(self.run, key)
            if value is None and key != "checkpoint":
                raise KeyError(key)
            return value
        return self.spec[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in RUN_KEYS:
            raise TypeError(f"{key!r} is part of the job's frozen JobSpec")
        setattr(self.run, key, value)

    def __delitem__(self, key: str) -> None:
        if key not in RUN_KEYS or getattr(self.run, key) is None:
            raise KeyError(key)
        setattr(self.run, key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(stored(self.spec, self.run))

    def __len__(self) -> int:
        return len(stored(self.spec, self.run))
