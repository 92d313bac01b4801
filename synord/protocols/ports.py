"""The TCP ports a task exposes (`synord run --port`): one check for every
place they travel (the job request, `task.start`, the proposal and the signed
agreement terms), so both parties hold the same rule.

A port list is 1..MAX_PORTS distinct integers in 1..65535, kept sorted so the
same set always has the same (signed) encoding; an empty list means "none"
and is never put on the wire.
"""

from __future__ import annotations

from typing import Any

MAX_PORTS = 8


def check_ports(value: Any) -> tuple[int, ...]:
    """The normalised (sorted) ports, or ValueError saying what is wrong."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ValueError("ports must be a list of TCP port numbers")
    if len(value) > MAX_PORTS:
        raise ValueError(f"at most {MAX_PORTS} ports may be exposed")
    for p in value:
        if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 65535:
            raise ValueError("each port must be an integer in 1..65535")
    if len(set(value)) != len(value):
        raise ValueError("ports must be distinct")
    return tuple(sorted(value))


def wire_ports(value: Any) -> tuple[int, ...]:
    """Ports as a peer sent them (proposal, terms, task.start): one encoding per set,
    so a non-empty sorted list; ValueError otherwise."""
    ports = check_ports(value)
    if not ports or list(ports) != value:
        raise ValueError("ports must be a non-empty sorted list (absent when none)")
    return ports
