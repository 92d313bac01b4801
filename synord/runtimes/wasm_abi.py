"""Checkpointable step ABI v1 for WASM modules (see WASM_ABI.md).

A module that exports ``synord_step: () -> i32`` is driven by the host one
step at a time. Between two steps its whole state is its linear memory plus
its mutable globals, so a checkpoint is exactly those bytes and values. This
file knows the ABI and the checkpoint format; it runs nothing.

Checkpoint directory:
    memory.bin      the linear memory, byte for byte
    state.msgpack   {"format", "abi", "module_sha256", "steps", "memory": {...}, "globals": [...]}
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import msgpack

from .base import CheckpointUnsupported, SpecError

ABI_VERSION = 1
FORMAT = "synord-wasm-checkpoint"
STEP_EXPORT = "synord_step"
EXIT_CODE_EXPORT = "synord_exit_code"
INIT_EXPORT = "_initialize"
MEMORY_FILE = "memory.bin"
STATE_FILE = "state.msgpack"
PAGE = 65536
_SCALARS = ("i32", "i64", "f32", "f64")
_MAX_STATE_BYTES = 16 << 20


# --- a minimal reader of the sections we need (memory 5, global 6, export 7) ---

def _leb(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def _skip_const_expr(buf: bytes, pos: int) -> int:
    # Constant expressions: scalar consts, global.get, ref.null/ref.func and the
    # extended-const arithmetic ops, terminated by `end` (0x0b).
    while True:
        op = buf[pos]
        pos += 1
        if op == 0x0B:
            return pos
        if op in (0x41, 0x42, 0x23, 0xD2):  # i32.const i64.const global.get ref.func
            _, pos = _leb(buf, pos)
        elif op == 0x43:
            pos += 4
        elif op == 0x44:
            pos += 8
        elif op == 0xD0:  # ref.null heaptype
            _, pos = _leb(buf, pos)
        elif op in (0x6A, 0x6B, 0x6C, 0x7C, 0x7D, 0x7E):  # extended-const add/sub/mul
            pass
        elif op == 0xFD:  # v128.const
            _, pos = _leb(buf, pos)
            pos += 16
        else:
            raise ValueError(f"unsupported opcode 0x{op:02x} in a global initialiser")


@dataclass(frozen=True)
class Layout:
    defined_memories: int
    mutable_globals: frozenset[int]  # indices (in the global index space) of defined mutable globals
    exported_globals: dict[int, str]  # global index -> one export name
    exported_memories: dict[int, str]


def read_layout(wasm: bytes, imported_globals: int = 0, imported_memories: int = 0) -> Layout:
    if wasm[:4] != b"\0asm":
        raise ValueError("no wasm magic")
    pos, mems, mutable, exp_g, exp_m = 8, 0, set(), {}, {}
    while pos < len(wasm):
        sid = wasm[pos]
        size, pos = _leb(wasm, pos + 1)
        end = pos + size
        if sid == 5:
            mems, _ = _leb(wasm, pos)
        elif sid == 6:
            n, p = _leb(wasm, pos)
            for i in range(n):
                p += 1  # value type (scalar types are one byte; ref types too in MVP)
                mut = wasm[p]
                p = _skip_const_expr(wasm, p + 1)
                if mut:
                    mutable.add(imported_globals + i)
        elif sid == 7:
            n, p = _leb(wasm, pos)
            for _ in range(n):
                ln, p = _leb(wasm, p)
                name = wasm[p:p + ln].decode("utf-8", "replace")
                p += ln
                kind = wasm[p]
                idx, p = _leb(wasm, p + 1)
                if kind == 3:
                    exp_g.setdefault(idx, name)
                elif kind == 2:
                    exp_m.setdefault(idx, name)
        pos = end
    return Layout(mems + imported_memories, frozenset(mutable), exp_g, exp_m)


def check_step_module(wasm: bytes, imported_globals: int, imported_memories: int) -> str:
    """Validate that a step module's state is fully visible; return its memory export name."""
    try:
        layout = read_layout(wasm, imported_globals, imported_memories)
    except (ValueError, IndexError) as e:
        raise SpecError(f"cannot read the module layout: {e}") from None
    hidden = sorted(i for i in layout.mutable_globals if i not in layout.exported_globals)
    if hidden:
        raise SpecError(
            f"{STEP_EXPORT} module has {len(hidden)} mutable global(s) that are not exported "
            f"(indices {hidden[:5]}); its state could not be checkpointed. With clang, link with "
            "-mmutable-globals -Wl,--export=__stack_pointer")
    if layout.defined_memories != 1 or len(layout.exported_memories) != 1:
        raise SpecError(f"{STEP_EXPORT} module must define and export exactly one memory "
                        f"(has {layout.defined_memories}, exports {len(layout.exported_memories)})")
    return next(iter(layout.exported_memories.values()))


# --- checkpoint files ---

@dataclass
class Snapshot:
    module_sha256: str
    steps: int
    memory_export: str
    memory: bytes
    globals: list[tuple[str, str, int | float]]  # (export name, type, value)
    cpu_s: float = 0.0


def write_checkpoint(dest: Path, snap: Snapshot) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "abi": ABI_VERSION,
        "module_sha256": snap.module_sha256,
        "steps": snap.steps,
        "memory": {"export": snap.memory_export, "bytes": len(snap.memory),
                   "sha256": hashlib.sha256(snap.memory).hexdigest()},
        "globals": [{"name": n, "type": t, "value": v} for n, t, v in snap.globals],
        "cpu_s": snap.cpu_s,
    }
    # Write then rename so a crash never leaves a half-written checkpoint that looks valid.
    for name, data in ((MEMORY_FILE, snap.memory), (STATE_FILE, msgpack.packb(state))):
        tmp = dest / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dest / name)


def read_checkpoint(src: Path, module_sha256: str) -> Snapshot:
    """Load and verify a checkpoint; SpecError says what is wrong with it."""
    src = Path(src)

    def bad(why: str) -> SpecError:
        return SpecError(f"checkpoint {src}: {why}")

    state_path, mem_path = src / STATE_FILE, src / MEMORY_FILE
    if not state_path.is_file() or not mem_path.is_file():
        raise bad(f"missing {STATE_FILE} or {MEMORY_FILE}")
    if state_path.stat().st_size > _MAX_STATE_BYTES:
        raise bad("state file too large")
    try:
        state = msgpack.unpackb(state_path.read_bytes(), raw=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise bad(f"unreadable state ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise bad("not a synord wasm checkpoint")
    if state.get("abi") != ABI_VERSION:
        raise bad(f"unsupported ABI version {state.get('abi')!r} (this host speaks {ABI_VERSION})")
    if state.get("module_sha256") != module_sha256:
        raise bad(f"made by module {state.get('module_sha256')!r}, not by this module ({module_sha256})")
    mem, steps, globs = state.get("memory"), state.get("steps"), state.get("globals")
    if (not isinstance(mem, dict) or not isinstance(steps, int) or steps < 0
            or not isinstance(globs, list) or not isinstance(mem.get("export"), str)
            or not isinstance(mem.get("bytes"), int) or not isinstance(mem.get("sha256"), str)):
        raise bad("malformed state")
    out = []
    for g in globs:
        if (not isinstance(g, dict) or not isinstance(g.get("name"), str)
                or g.get("type") not in _SCALARS or not isinstance(g.get("value"), (int, float))):
            raise bad("malformed global entry")
        out.append((g["name"], g["type"], g["value"]))
    if mem["bytes"] % PAGE or mem_path.stat().st_size != mem["bytes"]:
        raise bad(f"memory image is {mem_path.stat().st_size} bytes, state says {mem['bytes']}")
    memory = mem_path.read_bytes()
    if hashlib.sha256(memory).hexdigest() != mem["sha256"]:
        raise bad("memory image does not match its digest (corrupted)")
    cpu = state.get("cpu_s", 0.0)
    return Snapshot(module_sha256, steps, mem["export"], memory, out,
                    float(cpu) if isinstance(cpu, (int, float)) else 0.0)


def scalar_type_name(valtype) -> str:
    name = str(valtype)
    if name not in _SCALARS:
        raise CheckpointUnsupported(f"global of type {name} cannot be checkpointed (ABI v1: i32/i64/f32/f64)")
    return name
