"""A job's output as the API streams it: NDJSON lines, then its end.

    {"stream": "stdout"|"stderr", "data": text[, "member": rank]}*   in the order received
    {"exit_code": int | null, "state": str[, "error": text]}   once the job has ended

The consumer's jobs stream what the job store holds (`consumer_lines`); the
provider's owner sees what a task it runs still holds (synord.jobs.provider,
with the same two line shapes from here).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, AsyncIterator

import trio

from .spec import TERMINAL

if TYPE_CHECKING:
    from .jobstore import JobStore

FOLLOW_POLL_S = 1.0  # a follower looks again at least this often (the job's event may be missed)


def data_line(stream: str, data: bytes, member: int | None = None) -> bytes:
    """``member``: a gang member's rank (synord.jobs.gang), which marks its lines."""
    line: dict[str, Any] = {"stream": stream, "data": data.decode("utf-8", "surrogateescape")}
    if member is not None:
        line["member"] = member
    return (json.dumps(line) + "\n").encode()


def end_line(exit_code: int | None, state: str | None, error: str | None) -> bytes:
    end: dict[str, Any] = {"exit_code": exit_code, "state": state}
    if error:
        end["error"] = error
    return (json.dumps(end) + "\n").encode()


async def consumer_lines(job: Any, jobs: "JobStore", follow: bool) -> AsyncIterator[bytes]:
    """What was stored of ``job``'s output; with ``follow``, what comes, until it ends."""
    last_seq = 0
    while True:
        changed = job.changed
        rows = jobs.output_after(job.id, last_seq)
        for seq, s, data in rows:
            last_seq = seq
            yield data_line(s, data)
        if job.state in TERMINAL and not job.pending_output:
            if not rows:
                yield end_line(job.exit_code, job.state, job.error)
                return
            continue
        if not follow:
            return
        with trio.move_on_after(FOLLOW_POLL_S):
            await changed.wait()
