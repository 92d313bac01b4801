"""Order messages of the market: ``ask``, ``bid`` and ``cancel``.

Orders travel on ``synord/orders/<class>/1`` inside signed envelopes; the
order's owner is the envelope sender, so no body carries a peer id.  An order
is identified by (sender, ``id``); a newer ``seq`` replaces an older one, a
``cancel`` with ``seq`` >= the live one removes it.

Prices are per *unit-hour*.  The unit depends on the resource class: one CPU
core for ``cpu``, one device for every accelerator class (``gpu``, ``opencl``,
``tpu``, ``npu``, ``fpga``, ...).  `units()` computes it.

Every field is checked here (types, ranges, string and list lengths), so a
body that passes its checker can be used without further validation.  Field
tables live in docs/WIRE.md.
"""

from __future__ import annotations

import math
import re
import sys
from itertools import product
from dataclasses import dataclass
from typing import Any

from .envelope import message_type, pack_body
from .identity import b58encode
from .kinds import RUNTIME_KINDS

MAX_ORDER_BODY_BYTES = 2048
MAX_KEYS = 32
MAX_ID_LEN = 64
MAX_CORES = 4096.0
MAX_MEMORY = 1 << 50  # 1 PiB
MAX_GPUS = 1024
MAX_PRICE = 1e9
MAX_DURATION_S = 366 * 24 * 3600
RUNTIMES = RUNTIME_KINDS  # the one list, synord/protocols/kinds.py
CPU_CLASS = "cpu"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")  # class, gpu class, region
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class OrderError(ValueError):
    """A body that is not a valid order."""


# --- field checkers ---------------------------------------------------------

def _req(body: dict, key: str) -> Any:
    if key not in body:
        raise OrderError(f"missing field {key!r}")
    return body[key]


def _int(body: dict, key: str, lo: int, hi: int, default: Any = ...) -> int:
    v = body.get(key, default) if default is not ... else _req(body, key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise OrderError(f"{key} must be an integer in [{lo}, {hi}]")
    return v


def _num(body: dict, key: str, lo: float, hi: float, default: Any = ...) -> float:
    v = body.get(key, default) if default is not ... else _req(body, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise OrderError(f"{key} must be a number in [{lo}, {hi}]")
    return float(v)


def _name(body: dict, key: str, optional: bool = False) -> str | None:
    v = body.get(key) if optional else _req(body, key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not _NAME_RE.match(v):
        raise OrderError(f"{key} must match {_NAME_RE.pattern}")
    return v


def _interned(v: str | None) -> str | None:
    """One copy of a repeated name (peer, class, region): a book holds
    100 000 orders from a few thousand peers."""
    return v if v is None else sys.intern(v)


# One copy of each repeated number of an ask (its cores, memory, price...): a
# decoded body holds a fresh object per field, a book 100 000 asks of a few
# hundred distinct values.  Bounded per field: junk values only fill the table.
_SHARED_MAX = 4096
_SHARED: dict[str, dict] = {k: {} for k in ("cores", "memory", "price", "load", "min_duration_s",
                                            "max_duration_s")}


def _shared(key: str, v: Any) -> Any:
    table = _SHARED[key]
    got = table.get(v)
    if got is None:
        if len(table) < _SHARED_MAX:
            table[v] = v
        return v
    return got


# every valid runtimes tuple, so that orders share one copy of theirs
_RUNTIME_TUPLES = {t: t for n in range(1, len(RUNTIMES) + 1) for t in product(RUNTIMES, repeat=n)}


def _ident(body: dict, key: str = "id") -> str:
    v = _req(body, key)
    if not isinstance(v, str) or not _ID_RE.match(v):
        raise OrderError(f"{key} must match {_ID_RE.pattern}")
    return v


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if not isinstance(v, bool):
        raise OrderError(f"{key} must be a boolean")
    return v


def _runtime(v: Any, key: str) -> str:
    if v not in RUNTIMES:
        raise OrderError(f"{key}: unknown runtime {v!r} (known: {', '.join(RUNTIMES)})")
    return v


_CUDA_RE = re.compile(r"^[0-9]{1,2}\.[0-9]{1,2}$")


def _opt_int(body: dict, key: str, hi: int) -> int | None:
    return None if body.get(key) is None else _int(body, key, 0, hi)


def _cuda(body: dict) -> str | None:
    v = body.get("cuda")
    if v is None:
        return None
    if not isinstance(v, str) or not _CUDA_RE.match(v):
        raise OrderError("cuda must be a compute capability MAJOR.MINOR")
    return v


def cuda_tuple(v: str | None) -> tuple[int, int] | None:
    if v is None:
        return None
    major, minor = v.split(".")
    return int(major), int(minor)


def _put_gpu_extras(b: dict, gpu_memory: int | None, cuda: str | None) -> None:
    # Optional GPU fields go on the wire only when set: older peers never see them.
    if gpu_memory is not None:
        b["gpu_memory"] = gpu_memory
    if cuda is not None:
        b["cuda"] = cuda


def _envelope_body(body: Any) -> dict:
    if not isinstance(body, dict):
        raise OrderError("body must be a map")
    if len(body) > MAX_KEYS:
        raise OrderError(f"too many fields ({len(body)} > {MAX_KEYS})")
    if len(pack_body(body)) > MAX_ORDER_BODY_BYTES:
        raise OrderError(f"body larger than {MAX_ORDER_BODY_BYTES} bytes")
    return body


def units(resource_class: str, cores: float, gpus: int) -> float:
    """How many priced units a quantity is: cores for ``cpu``, devices otherwise."""
    return cores if resource_class == CPU_CLASS else float(gpus)


# --- orders -----------------------------------------------------------------

@dataclass(slots=True)
class Ask:
    """A provider's offer.  ``peer`` (sender id, text) and ``ts`` (envelope
    timestamp, ms: the time priority) come from the envelope, not the body."""
    id: str
    seq: int
    resource_class: str
    cores: float
    memory: int
    price: float
    expires: int
    runtimes: tuple[str, ...] = ("wasm",)
    gpus: int = 0
    gpu_class: str | None = None
    min_duration_s: int = 0
    max_duration_s: int = MAX_DURATION_S
    preemptible: bool = False
    region: str | None = None
    load: float = 0.0          # provider utilisation 0..1 when announced
    perf: float | None = None  # measured throughput per unit, relative (1.0 = reference)
    gpu_memory: int | None = None  # bytes on each offered device (the least of them)
    cuda: str | None = None        # CUDA compute capability of the devices ("9.0"), NVIDIA only
    peer: str = ""
    ts: int = 0

    side = "ask"

    @property
    def units(self) -> float:
        return units(self.resource_class, self.cores, self.gpus)

    def to_body(self) -> dict:
        b = {"id": self.id, "seq": self.seq, "class": self.resource_class,
             "cores": float(self.cores), "memory": self.memory, "price": float(self.price),
             "expires": self.expires, "runtimes": list(self.runtimes), "gpus": self.gpus,
             "min_duration_s": self.min_duration_s, "max_duration_s": self.max_duration_s,
             "preemptible": self.preemptible, "load": float(self.load)}
        if self.gpu_class is not None:
            b["gpu_class"] = self.gpu_class
        if self.region is not None:
            b["region"] = self.region
        if self.perf is not None:
            b["perf"] = float(self.perf)
        _put_gpu_extras(b, self.gpu_memory, self.cuda)
        return b

    @classmethod
    def from_body(cls, body: Any, peer: str = "", ts: int = 0) -> "Ask":
        b = _envelope_body(body)
        rts = _req(b, "runtimes")
        if not isinstance(rts, list) or not 1 <= len(rts) <= len(RUNTIMES):
            raise OrderError(f"runtimes must be a list of 1..{len(RUNTIMES)} names")
        runtimes = _RUNTIME_TUPLES[tuple(_runtime(r, "runtimes") for r in rts)]
        ask = cls(
            id=_ident(b), seq=_int(b, "seq", 0, 2**63 - 1), resource_class=_interned(_name(b, "class")),
            cores=_shared("cores", _num(b, "cores", 0.0, MAX_CORES)),
            memory=_shared("memory", _int(b, "memory", 0, MAX_MEMORY)),
            price=_shared("price", _num(b, "price", 0.0, MAX_PRICE)), expires=_int(b, "expires", 0, 2**63 - 1),
            runtimes=runtimes, gpus=_int(b, "gpus", 0, MAX_GPUS, 0),
            gpu_class=_interned(_name(b, "gpu_class", optional=True)),
            min_duration_s=_shared("min_duration_s", _int(b, "min_duration_s", 0, MAX_DURATION_S, 0)),
            max_duration_s=_shared("max_duration_s", _int(b, "max_duration_s", 1, MAX_DURATION_S, MAX_DURATION_S)),
            preemptible=_bool(b, "preemptible", False), region=_interned(_name(b, "region", optional=True)),
            load=_shared("load", _num(b, "load", 0.0, 1.0, 0.0)),
            perf=None if b.get("perf") is None else _num(b, "perf", 0.0, 1e12),
            peer=_interned(peer), ts=ts,
            gpu_memory=_opt_int(b, "gpu_memory", MAX_MEMORY), cuda=_cuda(b),
        )
        if ask.min_duration_s > ask.max_duration_s:
            raise OrderError("min_duration_s > max_duration_s")
        if ask.units <= 0:
            raise OrderError(f"an ask of class {ask.resource_class!r} must offer at least one unit")
        return ask


@dataclass(slots=True)
class Bid:
    """A consumer's need.  ``max_price`` is per unit-hour, like ask prices."""
    id: str
    seq: int
    resource_class: str
    cores: float
    memory: int
    runtime: str
    max_price: float
    duration_s: int
    deadline: int              # unix ms by which it must be placed
    expires: int
    gpus: int = 0
    gpu_class: str | None = None
    priority: int = 0          # 0 (lowest) .. 9
    region: str | None = None
    min_reputation: float = 0.0
    preemptible_ok: bool = True
    gpu_memory: int | None = None  # bytes needed on each device
    cuda: str | None = None        # least CUDA compute capability ("8.0")
    peer: str = ""
    ts: int = 0

    side = "bid"

    @property
    def units(self) -> float:
        return units(self.resource_class, self.cores, self.gpus)

    def to_body(self) -> dict:
        b = {"id": self.id, "seq": self.seq, "class": self.resource_class,
             "cores": float(self.cores), "memory": self.memory, "runtime": self.runtime,
             "max_price": float(self.max_price), "duration_s": self.duration_s,
             "deadline": self.deadline, "expires": self.expires, "gpus": self.gpus,
             "priority": self.priority, "min_reputation": float(self.min_reputation),
             "preemptible_ok": self.preemptible_ok}
        if self.gpu_class is not None:
            b["gpu_class"] = self.gpu_class
        if self.region is not None:
            b["region"] = self.region
        _put_gpu_extras(b, self.gpu_memory, self.cuda)
        return b

    @classmethod
    def from_body(cls, body: Any, peer: str = "", ts: int = 0) -> "Bid":
        b = _envelope_body(body)
        bid = cls(
            id=_ident(b), seq=_int(b, "seq", 0, 2**63 - 1), resource_class=_name(b, "class"),
            cores=_num(b, "cores", 0.0, MAX_CORES), memory=_int(b, "memory", 0, MAX_MEMORY),
            runtime=_runtime(_req(b, "runtime"), "runtime"),
            max_price=_num(b, "max_price", 0.0, MAX_PRICE),
            duration_s=_int(b, "duration_s", 1, MAX_DURATION_S),
            deadline=_int(b, "deadline", 0, 2**63 - 1), expires=_int(b, "expires", 0, 2**63 - 1),
            gpus=_int(b, "gpus", 0, MAX_GPUS, 0), gpu_class=_name(b, "gpu_class", optional=True),
            priority=_int(b, "priority", 0, 9, 0), region=_name(b, "region", optional=True),
            min_reputation=_num(b, "min_reputation", 0.0, 1.0, 0.0),
            preemptible_ok=_bool(b, "preemptible_ok", True),
            gpu_memory=_opt_int(b, "gpu_memory", MAX_MEMORY), cuda=_cuda(b), peer=peer, ts=ts,
        )
        if bid.units <= 0:
            raise OrderError(f"a bid of class {bid.resource_class!r} must need at least one unit")
        return bid


@dataclass(slots=True)
class Cancel:
    id: str
    resource_class: str
    side: str  # "ask" | "bid"
    seq: int
    peer: str = ""

    def to_body(self) -> dict:
        return {"id": self.id, "class": self.resource_class, "side": self.side, "seq": self.seq}

    @classmethod
    def from_body(cls, body: Any, peer: str = "") -> "Cancel":
        b = _envelope_body(body)
        side = _req(b, "side")
        if side not in ("ask", "bid"):
            raise OrderError("side must be 'ask' or 'bid'")
        return cls(_ident(b), _name(b, "class"), side, _int(b, "seq", 0, 2**63 - 1), peer)


_ORDER_TYPES = {"ask": Ask, "bid": Bid, "cancel": Cancel}


def order_from_envelope(env) -> Ask | Bid | Cancel:
    """The typed order inside an accepted envelope (sender and timestamp filled in).

    A decoded envelope carries the order its body checker parsed
    (``env.parsed``, below): that one is completed and returned, so an order
    arriving by gossip is parsed once, not twice.  Completing it again (the
    same envelope applied twice) sets the same values."""
    try:
        cls = _ORDER_TYPES[env.type]
    except KeyError:
        raise OrderError(f"not an order message: {env.type}") from None
    order = env.parsed
    if type(order) is not cls:  # an envelope built here (seal), never decoded
        if cls is Cancel:
            return Cancel.from_body(env.body, env.sender_id)
        return cls.from_body(env.body, env.sender_id, env.timestamp_ms)
    order.peer = b58encode(env.sender)  # = env.sender_id; cached and interned: one str per peer
    if cls is not Cancel:
        order.ts = env.timestamp_ms
    return order


message_type("ask", lambda body: Ask.from_body(body))
message_type("bid", lambda body: Bid.from_body(body))
message_type("cancel", lambda body: Cancel.from_body(body))
