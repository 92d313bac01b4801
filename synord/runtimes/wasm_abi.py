"""Checkpointable step ABI v1 for WASM modules (see WASM_ABI.md).

A module that exports ``synord_step: () -> i32`` is driven by the host one
step at a time. Between two steps its whole state is its linear memory plus
its mutable globals, so a checkpoint is exactly those bytes and values. This
file knows the ABI and the checkpoint format; it runs nothing.

A checkpoint is one tar, checkpoint.tar (see write_checkpoint), of:
    state.msgpack       {"format", "abi", "module_sha256", "steps", "memory": {...}, "globals": [...]}
    synord-output.json  output offsets at the checkpoint (written by the sandbox)
    memory.bin          the linear memory, byte for byte
The archive is the file that travels; its sha256 is the checkpoint's digest.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import msgpack

from .base import OUTPUT_OFFSETS_FILE, CheckpointUnsupported, SpecError

ABI_VERSION = 1
FORMAT = "synord-wasm-checkpoint"
STEP_EXPORT = "synord_step"
EXIT_CODE_EXPORT = "synord_exit_code"
INIT_EXPORT = "_initialize"
MEMORY_FILE = "memory.bin"
STATE_FILE = "state.msgpack"
ARCHIVE_FILE = "checkpoint.tar"
_ARCHIVE_NAMES = (STATE_FILE, MEMORY_FILE, OUTPUT_OFFSETS_FILE)
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
    memory: "bytes | memoryview | None"  # None: still in `memory_file`, read straight into the guest
    globals: list[tuple[str, str, int | float]]  # (export name, type, value)
    cpu_s: float = 0.0
    memory_file: tuple[Path, int] | None = None  # (file, offset) holding the memory image
    memory_bytes: int = 0  # the image's length (set by read_checkpoint; else len(memory))


def _state(snap: Snapshot, size: int) -> dict:
    return {
        "format": FORMAT,
        "abi": ABI_VERSION,
        "module_sha256": snap.module_sha256,
        "steps": snap.steps,
        # No digest of the memory here: the archive's sha256 covers every byte
        # (hashing 64 MiB twice on the way out was a third of a migration).
        "memory": {"export": snap.memory_export, "bytes": size},
        "globals": [{"name": n, "type": t, "value": v} for n, t, v in snap.globals],
        "cpu_s": snap.cpu_s,
    }


def _tar_header(name: str, size: int) -> bytes:
    # Deterministic, like synord.jobs.checkpoints.pack: zero times and owners.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


_CHUNK = 4 << 20


def write_checkpoint(dest: Path, snap: Snapshot, extra: dict[str, bytes] | None = None) -> tuple[int, str]:
    """Write the checkpoint as one tar, ``dest/ARCHIVE_FILE``, in one pass; returns (bytes, sha256).

    Members: STATE_FILE, then ``extra`` (small files, by name), then MEMORY_FILE,
    written straight from ``snap.memory`` (the guest's own buffer: no copy) and
    hashed as it is written. The archive is what travels: its sha256 is the
    checkpoint's digest, so nothing reads it back to hash it again."""
    dest.mkdir(parents=True, exist_ok=True)
    mem = memoryview(snap.memory).cast("B")
    files = [(STATE_FILE, msgpack.packb(_state(snap, len(mem)))), *sorted((extra or {}).items())]
    h, size = hashlib.sha256(), 0
    tmp = dest / (ARCHIVE_FILE + ".tmp")
    # Write then rename so a crash never leaves a half-written checkpoint that looks valid.
    with open(tmp, "wb") as f:  # buffered: retries short writes; large ones go straight through
        def put(data) -> None:
            nonlocal size
            h.update(data)
            size += len(data)
            f.write(data)

        for name, data in files + [(MEMORY_FILE, mem)]:
            put(_tar_header(name, len(data)))
            for i in range(0, len(data), _CHUNK):
                put(data[i:i + _CHUNK])
            if len(data) % tarfile.BLOCKSIZE:
                put(bytes(tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))
        end = 2 * tarfile.BLOCKSIZE  # end of archive, padded to a whole record like tarfile does
        end += -(size + end) % tarfile.RECORDSIZE
        put(bytes(end))
    os.replace(tmp, dest / ARCHIVE_FILE)
    return size, h.hexdigest()


def _archive_members(path: Path, bad) -> dict[str, tarfile.TarInfo]:
    """The members of a checkpoint archive by name: only known names, plain files, once each."""
    out: dict[str, tarfile.TarInfo] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:  # stops at the first stranger: a hostile archive's length costs nothing
                if m.name not in _ARCHIVE_NAMES or not m.isfile() or m.name in out:
                    raise bad("unexpected archive member")  # never a path: nothing is extracted
                out[m.name] = m
    except (tarfile.TarError, OSError, EOFError) as e:
        raise bad(f"not a valid archive ({type(e).__name__})") from None
    total = path.stat().st_size
    if any(m.offset_data + m.size > total for m in out.values()):
        raise bad("archive is truncated")
    return out


def read_checkpoint(src: Path, module_sha256: str) -> Snapshot:
    """Load and check a checkpoint; SpecError says what is wrong with it.

    ``src`` is the archive write_checkpoint made (or the directory holding it),
    or a directory of unpacked files. The memory image is not read here: the
    returned Snapshot points at it (``memory_file``) and the sandbox reads it
    straight into the guest. An archive's integrity is its sha256, which the
    caller checked (the provider's blob store verifies every byte on arrival);
    a memory digest in the state (older checkpoints) is verified here."""
    src = Path(src)

    def bad(why: str) -> SpecError:
        return SpecError(f"checkpoint {src}: {why}")

    archive = src / ARCHIVE_FILE if src.is_dir() else src
    if archive.is_file():
        members = _archive_members(archive, bad)
        if STATE_FILE not in members or MEMORY_FILE not in members:
            raise bad(f"missing {STATE_FILE} or {MEMORY_FILE}")
        st, mm = members[STATE_FILE], members[MEMORY_FILE]
        if st.size > _MAX_STATE_BYTES:
            raise bad("state file too large")
        with open(archive, "rb") as f:
            f.seek(st.offset_data)
            raw_state = f.read(st.size)
        mem_file, mem_size = (archive, mm.offset_data), mm.size
    else:
        state_path, mem_path = src / STATE_FILE, src / MEMORY_FILE
        if not state_path.is_file() or not mem_path.is_file():
            raise bad(f"missing {STATE_FILE} or {MEMORY_FILE}")
        if state_path.stat().st_size > _MAX_STATE_BYTES:
            raise bad("state file too large")
        raw_state = state_path.read_bytes()
        mem_file, mem_size = (mem_path, 0), mem_path.stat().st_size
    try:
        state = msgpack.unpackb(raw_state, raw=False)
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
            or not isinstance(mem.get("bytes"), int) or not isinstance(mem.get("sha256", ""), str)):
        raise bad("malformed state")
    out = []
    for g in globs:
        if (not isinstance(g, dict) or not isinstance(g.get("name"), str)
                or g.get("type") not in _SCALARS or not isinstance(g.get("value"), (int, float))):
            raise bad("malformed global entry")
        out.append((g["name"], g["type"], g["value"]))
    if mem["bytes"] % PAGE or mem_size != mem["bytes"]:
        raise bad(f"memory image is {mem_size} bytes, state says {mem['bytes']}")
    if "sha256" in mem:  # written before the archive format: the memory carries its own digest
        h = hashlib.sha256()
        with open(mem_file[0], "rb") as f:
            f.seek(mem_file[1])
            left = mem_size
            while left and (block := f.read(min(left, _CHUNK))):
                h.update(block)
                left -= len(block)
        if h.hexdigest() != mem["sha256"]:
            raise bad("memory image does not match its digest (corrupted)")
    cpu = state.get("cpu_s", 0.0)
    return Snapshot(module_sha256, steps, mem["export"], None, out,
                    float(cpu) if isinstance(cpu, (int, float)) else 0.0,
                    memory_file=mem_file, memory_bytes=mem_size)


def load_memory(snap: Snapshot, into: memoryview) -> None:
    """Read a checkpoint's memory image into ``into`` (the guest's memory), without a copy."""
    path, offset = snap.memory_file
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < snap.memory_bytes:
            n = f.readinto(into[done:min(snap.memory_bytes, done + _CHUNK)])
            if not n:
                raise SpecError(f"checkpoint {path}: memory image ends early")
            done += n


def scalar_type_name(valtype) -> str:
    name = str(valtype)
    if name not in _SCALARS:
        raise CheckpointUnsupported(f"global of type {name} cannot be checkpointed (ABI v1: i32/i64/f32/f64)")
    return name
