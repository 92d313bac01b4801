"""GossipSub topic names (wire names: other implementations use these strings)."""

from __future__ import annotations

import re

CAPS = "synord/caps/1"
_CLASS = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def orders(resource_class: str) -> str:
    """The market topic of one resource class, e.g. ``synord/orders/cpu/1``."""
    if not _CLASS.match(resource_class):
        raise ValueError(f"resource class must match {_CLASS.pattern}: {resource_class!r}")
    return f"synord/orders/{resource_class}/1"
