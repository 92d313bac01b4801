"""Who may reach a running task beside its task stream (exec, forward): its
consumer only, and only while it runs. One check for both services."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .provider import ProviderJobs, ProviderTask


class OwnerRefused(Exception):
    """A peer may not reach that task now; ``code`` is the wire's
    (no_task, not_running, forbidden: someone else's task)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def owners_running_task(jobs: "ProviderJobs", peer: str, job_id: str, verb: str) -> "ProviderTask":
    """``peer``'s task ``job_id`` if it runs here now (``verb``: "exec into",
    "forward to"), else `OwnerRefused`."""
    task = jobs.task_of(peer, job_id) or jobs.task_named(job_id)
    if task is None:
        row = jobs.row_of(peer, job_id)
        if row is not None:
            raise OwnerRefused("not_running", f"job {job_id} is not running ({row['state']})")
        raise OwnerRefused("no_task", f"no task {job_id} runs on this provider")
    if task.consumer != peer:
        raise OwnerRefused("forbidden", f"permission denied: only the consumer that placed job "
                                        f"{job_id} may {verb} it")
    ex = task.execution
    if ex.done.is_set():
        st = ex.status
        how = f"exited with code {st.code}" if st is not None else "ended"
        raise OwnerRefused("not_running", f"job {job_id} is not running (it has finished: {how})")
    if ex.sandbox is None:
        raise OwnerRefused("not_running", f"job {job_id} has not started yet")
    return task
