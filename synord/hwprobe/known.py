"""The known-device table (package data) and its matcher.

Peak numbers come from vendor datasheets; a probe uses them when the
hardware cannot tell its own throughput (tensor units, TPUs) and marks
them ``"source": "table"``.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources

_TOKEN = re.compile(r"[a-z0-9]+")


@functools.cache
def table() -> tuple[dict, ...]:
    raw = resources.files(__package__).joinpath("known_devices.json").read_text()
    return tuple(json.loads(raw)["devices"])


def _tokens(name: str) -> set[str]:
    return set(_TOKEN.findall(name.lower()))


def match(name: str | None = None, pci_id: str | None = None) -> dict | None:
    """Best table entry for a device: exact PCI id ("10de:2330") first, then
    the entry whose longest token list is fully contained in the name."""
    if pci_id:
        pci_id = pci_id.lower()
        for entry in table():
            if pci_id in entry["pci"]:
                return entry
    if not name:
        return None
    toks = _tokens(name)
    best, best_len = None, 0
    for entry in table():
        for pattern in entry["match"]:
            if len(pattern) > best_len and toks.issuperset(pattern):
                best, best_len = entry, len(pattern)
    return best


def throughput(entry: dict | None) -> dict:
    """A device's ``throughput`` block filled from a table entry (or nulls)."""
    if entry is None:
        return {"fp32_gflops": None, "fp16_gflops": None, "int8_tops": None,
                "bandwidth_gbs": None, "source": None, "measured_fp32_gflops": None}
    return {"fp32_gflops": entry["fp32_gflops"], "fp16_gflops": entry["fp16_gflops"],
            "int8_tops": entry["int8_tops"], "bandwidth_gbs": entry["bandwidth_gbs"],
            "source": "table", "measured_fp32_gflops": None}
