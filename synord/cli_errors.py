"""The CLI's one error: a message printed on one line, and the exit code.

Its own module so that command modules the CLI loads lazily (sandbox_cmd, …)
can raise it without importing synord.cli back."""

from __future__ import annotations


class CliError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code
