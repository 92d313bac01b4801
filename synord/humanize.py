"""Readable sizes, durations, prices, peer ids and tables for the CLI's human
output (--json output never goes through here). Standard library only: the
CLI imports it on every call.

Money: prices and amounts are in credits, CRD, the unit the owner's
`pricing.electricity_per_kwh` is written in; prices are per unit-hour (a
core for the cpu class, a device for accelerators).
"""

from __future__ import annotations

import math
import time

CURRENCY = "CRD"
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(n: float | None) -> str:
    """1288490188 -> "1.2 GiB"; 512 -> "512 B"; None -> "-"."""
    if n is None:
        return "-"
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in _UNITS:
        if n < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{sign}{n:.0f} B"
            return f"{sign}{n:.1f} {unit}" if n < 100 else f"{sign}{n:.0f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rate(n: float | None) -> str:
    return "-" if n is None else size(n) + "/s"


def duration(s: float | None) -> str:
    """200 -> "3m 20s"; 4.25 -> "4.2s"; 7380 -> "2h 03m"; 93784 -> "1d 02h"."""
    if s is None:
        return "-"
    s = float(s)
    if s < 10:
        return f"{s:.1f}s"
    s = int(round(s))
    d, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    if d:
        return f"{d}d {h:02d}h"
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {sec:02d}s"
    return f"{sec}s"


def ago(ts: float | None, now: float | None = None) -> str:
    """A wall-clock time (seconds, or milliseconds if it looks like them) as "3m 20s ago"."""
    if not ts:
        return "-"
    if ts > 1e11:  # milliseconds
        ts /= 1000.0
    now = time.time() if now is None else now
    delta = now - ts
    return f"in {duration(-delta)}" if delta < 0 else f"{duration(delta)} ago"


def number(x: float | None, digits: int = 3) -> str:
    """Significant digits without scientific notation: -8.5083e-08 -> "-0.0000000851"."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def amount(x: float | None) -> str:
    """-8.508339555555555e-08 -> "-0.0000000851 CRD"."""
    return "-" if x is None else f"{number(x)} {CURRENCY}"


NO_MAX_PRICE = 1e9  # synord.protocols.orders.MAX_PRICE: what a bid without --max-price carries


def price(p: float | None) -> str:
    """Per unit-hour: 0.00123 -> "0.00123 CRD/h"; a bid's "no maximum" -> "any"."""
    if p is None:
        return "-"
    return "any" if p >= NO_MAX_PRICE else f"{number(p)} {CURRENCY}/h"


def short_ids(ids) -> dict[str, str]:
    """Each id -> its shortest distinguishing tail (at least 6 characters) among ``ids``.
    Peer ids all start alike ("12D3KooW…"): their ends tell them apart."""
    ids = sorted({i for i in ids if i})
    out = {}
    for i in ids:
        n = min(6, len(i))
        while n < len(i) and any(o != i and o.endswith(i[-n:]) for o in ids):
            n += 1
        out[i] = i if n >= len(i) else "…" + i[-n:]
    return out


def yes_no(flag: bool, why: str | None = None) -> str:
    return "yes" if flag else ("no: " + why if why else "no")


def table(rows: list[list], header: list[str], right: tuple[int, ...] = ()) -> str:
    """Columns padded to their widest cell; column indexes in ``right`` are
    right-aligned (numbers with units)."""
    if not rows:
        return "(none)"
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells + [header]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(header)] + [line(r) for r in cells])
