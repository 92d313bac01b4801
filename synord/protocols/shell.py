"""The shell protocol (`/synord/shell/1.0.0`): run a command inside a running
task's sandbox, beside the task (``synord exec`` / ``synord shell``).

Only the consumer that placed the task may do this: the provider checks that
the stream's authenticated (Noise) remote peer is the task's consumer, and that
the opening envelope was signed by that same peer.

Opening message (consumer → provider), a signed envelope in a frame
``{"env": bytes}``:

  shell.exec   {job_id, argv: [str, ...] (1..256), env?: {str: str},
                tty?: {rows: int, cols: int} (1..1000): run it on a new pseudo-terminal
                (its controlling terminal: ^C, job control, line editing); all of
                its output then comes as "stdout"}

Provider's answer: ``{"started": true}`` or ``{"error": text, "code": CODE}``
with CODE one of ``forbidden`` (not the task's consumer), ``no_task``,
``not_running`` (the task has finished), ``unsupported`` (the sandbox kind
cannot exec), ``busy`` (too many exec sessions on this task), ``bad_request``.

Then plain frames on the authenticated stream:

  consumer → provider   {"i": bytes}            stdin data (keystrokes on a tty)
                        {"eof": true}           close the command's stdin (^D on a tty)
                        {"resize": [rows, cols]} a tty session's new window size
  provider → consumer   {"o": "stdout"|"stderr", "d": bytes}
                        {"exit": int}           the command's exit code; the last frame

The consumer keeps the stream open until the exit frame: a consumer that
closes or resets it earlier aborts the command (the provider kills it).
"""

from __future__ import annotations

from typing import Any

from .envelope import message_type
from .tasks import _ID_RE, MAX_ARGS, TaskSpecError, check_args_env

SHELL_PROTOCOL = "/synord/shell/1.0.0"
EXEC_TYPE = "shell.exec"
OPEN_TIMEOUT_S = 15.0  # the opening request and its answer, each way
MAX_STDIN_FRAME = 64 * 1024  # bytes of stdin in one {"i": ...} frame
MAX_TERMINAL = 1000  # rows or columns
ERROR_CODES = ("forbidden", "no_task", "not_running", "unsupported", "busy", "bad_request")


def check_exec(body: Any) -> None:
    if not isinstance(body, dict) or set(body) - {"job_id", "argv", "env", "tty"}:
        raise TaskSpecError("shell.exec body must be a map of job_id, argv, env, tty")
    job_id = body.get("job_id")
    if not isinstance(job_id, str) or not _ID_RE.match(job_id):
        raise TaskSpecError(f"job_id must match {_ID_RE.pattern}")
    argv = body.get("argv")
    if not isinstance(argv, list) or not argv or not isinstance(argv[0], str) or not argv[0]:
        raise TaskSpecError("argv must be a non-empty list whose first element names a command")
    if len(argv) > MAX_ARGS:
        raise TaskSpecError(f"argv has more than {MAX_ARGS} elements")
    check_args_env(argv, body.get("env", {}))
    if "tty" in body:
        tty = body["tty"]
        if not isinstance(tty, dict) or set(tty) != {"rows", "cols"}:
            raise TaskSpecError("tty must be a map of rows and cols")
        terminal_size([tty["rows"], tty["cols"]])


def terminal_size(value: Any) -> tuple[int, int]:
    """(rows, cols) from [rows, cols]; TaskSpecError unless both are 1..1000."""
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_TERMINAL for v in value)):
        raise TaskSpecError(f"a terminal size is [rows, cols], each from 1 to {MAX_TERMINAL}")
    return int(value[0]), int(value[1])


def exec_body(job_id: str, argv: list[str], env: dict[str, str] | None = None,
              tty: tuple[int, int] | None = None) -> dict:
    """The opening message's body (checked here, so a bad request fails before dialling)."""
    body: dict = {"job_id": job_id, "argv": list(argv)}
    if env:
        body["env"] = dict(env)
    if tty is not None:
        body["tty"] = {"rows": tty[0], "cols": tty[1]}
    check_exec(body)
    return body


message_type(EXEC_TYPE, check_exec)
