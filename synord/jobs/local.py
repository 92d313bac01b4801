"""Jobs as the local API sees them: the jobs this node submitted (its consumer
side) and the tasks it runs for others (its provider side), under one name space.

A name is a consumer job of ours first; else a task run here (by agreement id
or the consumer's job id: the owner may see what their machine does). Exec
sessions (`synord exec`/`shell`) are opened through the consumer side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InsufficientStorage, NotFound

if TYPE_CHECKING:
    from ..storage_health import StorageHealth
    from .consumer import ConsumerJobs
    from .provider import ProviderJobs


class LocalJobs:
    def __init__(self, consumer: "ConsumerJobs", provider: "ProviderJobs", storage: "StorageHealth",
                 mesh, identity):
        self.consumer = consumer
        self.provider = provider
        self.storage = storage
        self.mesh = mesh
        self.identity = identity
        self.exec = None  # jobs.exec_client.ConsumerExec, on the first exec
        self.forwards = None  # jobs.forward_client.ConsumerForwards, set by the node

    def _provided(self, job_id: str) -> bool:
        return job_id not in self.consumer.jobs and self.provider.task_json(job_id) is not None

    def jobs_json(self) -> list:
        provided = [{"id": t.job_id, "role": "provider", "consumer": t.consumer,
                     "state": "running" if not t.execution.done.is_set() else "ended",
                     "runtime": t.execution.spec.kind} for t in self.provider.tasks.values()]
        return self.consumer.jobs_json() + provided

    def job_json(self, job_id: str) -> dict:
        if job_id in self.consumer.jobs:
            return self.consumer.job_json(job_id)
        task = self.provider.task_json(job_id)
        if task is None:
            return self.consumer.job_json(job_id)  # its NotFound
        return task

    async def submit(self, spec: dict) -> dict:
        if not self.storage.check():
            raise InsufficientStorage(f"node storage full: not accepting jobs until it recovers: "
                                      f"{self.storage.reason}")
        return await self.consumer.submit(spec)

    async def cancel(self, job_id: str) -> dict:
        if self._provided(job_id):
            return await self.provider.cancel_task(job_id)
        return await self.consumer.cancel(job_id)

    def output(self, job_id: str, follow: bool):
        if self._provided(job_id):
            return self.provider.task_output(job_id, follow)
        return self.consumer.output(job_id, follow)  # NotFound before the stream starts

    async def forward_job(self, job_id: str, body: dict):
        """NDJSON lines of a `synord forward` (synord.jobs.forward_client)."""
        if self.forwards is None:
            from ..errors import Unavailable
            raise Unavailable("the node is starting")
        return await self.forwards.start(job_id, body)

    def placement_json(self, job_id: str) -> dict:
        return self.consumer.placement_json(job_id)

    async def exec_job(self, job_id: str, body: dict):
        """NDJSON lines of a command run in the job's sandbox (synord.jobs.exec_client)."""
        if self.exec is None:
            from .exec_client import ConsumerExec
            self.exec = ConsumerExec(self.consumer, self.mesh, self.identity)
        return await self.exec.start(job_id, body)

    async def exec_stdin(self, session: str, body: dict) -> dict:
        if self.exec is None:
            raise NotFound(f"no exec session {session}")
        return await self.exec.stdin(session, body)

    def pinned_blobs(self) -> set[str]:
        """What the blob cache must keep: running and uploaded-for tasks here, and the
        artefacts of our own jobs that may still have to be shipped."""
        from .spec import TERMINAL
        ours = {j.jobspec.sha256 for j in self.consumer.jobs.values() if j.state not in TERMINAL}
        return self.provider.pinned_blobs() | ours
