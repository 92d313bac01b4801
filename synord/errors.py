"""Domain errors: what jobs, the market and the node raise when a request cannot be done.

They say *what* went wrong, in words the user reads; synord.api alone turns
them into HTTP status codes (`api.STATUS`), so domain code never speaks HTTP.
"""

from __future__ import annotations


class DomainError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Invalid(DomainError):
    """The request is malformed or asks for something impossible (400)."""


class Forbidden(DomainError):
    """Not this caller's to ask for, e.g. another consumer's task (403)."""


class NotFound(DomainError):
    """No such job, task or session here (404)."""


class Conflict(DomainError):
    """Not in the state the request needs, e.g. exec into a job that is not running (409)."""


class Gone(DomainError):
    """It existed and has ended (410)."""


class Busy(DomainError):
    """Too many at once: try again later (429)."""


class Unsupported(DomainError):
    """A request this node or sandbox cannot do (yet), e.g. exec into a wasm task (501)."""


class Unavailable(DomainError):
    """A peer or sandbox the request needs did not answer or refused (502)."""


class InsufficientStorage(DomainError):
    """The node's disk is full: nothing was recorded (507)."""
