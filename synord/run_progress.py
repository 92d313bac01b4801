"""`synord run`'s progress on stderr: the job's phase and notices (upload, image
unpack, VM boot, migration) while it is not yet running or moves.

On a terminal: one line redrawn in place (``\\r``), cleared once the task runs
(its output owns the screen then); notices are printed as lines of their own.
Otherwise (a pipe, a log): each notice once, as a plain line.

``until_running`` polls ``GET /v1/jobs/ID`` (the daemon keeps the notices,
numbered) before any output is printed, so the start's notices never split the
task's own stderr; then, as a context manager, a thread prints later notices (a
migration) while the output streams. Standard library only, like the CLI.
"""

from __future__ import annotations

import sys
import threading

from . import humanize as hz

POLL_S = 0.2
TERMINAL = ("succeeded", "failed", "cancelled")


class RunProgress:
    def __init__(self, client, job_id: str, stream=None):
        self.client, self.job_id = client, job_id
        self.out = stream or sys.stderr
        self.tty = self.out.isatty()
        self.seen = 0  # the last notice printed, by its number
        self.bar = ""  # the bar line drawn now (on a terminal), if any
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="run-progress")

    def __enter__(self) -> "RunProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def until_running(self) -> None:
        """Show the start, in this thread, until the task runs or the job ends."""
        while (job := self._poll()) is not None:
            phase = (job.get("progress") or {}).get("phase")
            if job.get("state") in TERMINAL or phase == "running" or (
                    phase is None and job.get("state") not in ("queued", "negotiating")):
                break
            self._stop.wait(POLL_S)
        self._clear()
        self.out.flush()

    def _loop(self) -> None:
        while True:
            stopping = self._stop.is_set()
            self._poll()
            if stopping:
                self._clear()
                return
            self._stop.wait(POLL_S)

    def _poll(self) -> dict | None:
        from .client import ClientError
        try:
            job = self.client.get(f"/v1/jobs/{self.job_id}")
        except (ClientError, OSError, ValueError):
            return None  # the daemon went away: the output stream says so
        self.show(job)
        return job

    def show(self, job: dict) -> None:
        """Print what is new in ``job`` (its JSON)."""
        for ev in job.get("events") or []:
            n = ev.get("n") if isinstance(ev, dict) else None
            if isinstance(n, int) and n > self.seen:
                self.seen = n
                self._clear()
                self.out.write(f"synord: {ev.get('text')}\n")
        p = job.get("progress")
        if self.tty and p and p.get("phase") != "running" and job.get("state") not in TERMINAL:
            self._draw(p)
        else:
            self._clear()
        self.out.flush()

    def _draw(self, p: dict) -> None:
        line = f"synord: {p.get('phase')}"
        done, total = p.get("done"), p.get("total")
        if isinstance(total, int) and total > 0 and isinstance(done, int):
            width = 30
            fill = min(width, width * done // total)
            line += f" [{'#' * fill}{'.' * (width - fill)}] {hz.size(done)} / {hz.size(total)}"
        if self.bar != line:  # redrawn only when it changed
            self.out.write("\r\x1b[K" + line)
            self.bar = line

    def _clear(self) -> None:
        if self.bar:
            self.out.write("\r\x1b[K")
            self.bar = ""
