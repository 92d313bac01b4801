"""CDI, the Container Device Interface: how devices reach containers.

A CDI spec (JSON or YAML, what ``nvidia-ctk cdi generate`` writes into
``/etc/cdi`` or ``/var/run/cdi``) names devices of one kind
(``vendor/class``, e.g. ``nvidia.com/gpu``) and, per device and for the
whole spec, *container edits*: device nodes, mounts, environment, hooks and
additional groups.  A fully qualified device name is ``nvidia.com/gpu=NAME``.

This module reads specs (versions 0.3.0 to 0.8.0; the fields we apply exist
since 0.5.0 except ``additionalGIDs`` (0.7.0) and ``intelRdt`` (0.7.0, refused
here: we set no RDT)), resolves names to the merged edits, and applies them to
an OCI runtime config.  No Python CDI library exists on PyPI, so it stays
small and follows the spec (cncf-tags/container-device-interface SPEC.md):
- a later spec directory overrides an earlier one for the same kind
  (``/var/run/cdi`` after ``/etc/cdi``); two specs of one kind in one
  directory that name the same device are a conflict and that device is
  refused;
- device nodes get their type/major/minor from the host path when the spec
  omits them, and each one is allowed in the device cgroup
  (``linux.resources.devices``) — nothing else is: the bundle starts from
  "deny all", so only the allocated devices exist and open in the task.

`nvidia_spec` generates the spec ``nvidia-ctk`` would write, from the GPUs
NVML reported and the host (device nodes, the driver's user-space libraries
through the linker cache ``ldconfig -p``, mounted read-only).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DIRS = ("/etc/cdi", "/var/run/cdi")
VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0")
MAX_SPEC_BYTES = 4 << 20
_KIND_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?/[a-zA-Z0-9]([a-zA-Z0-9_.-]*[a-zA-Z0-9])?$")
_DEVICE_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9_.:-]*[a-zA-Z0-9])?$")
_HOOKS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")


class CDIError(ValueError):
    pass


def _abs(p) -> bool:
    return isinstance(p, str) and p.startswith("/") and ".." not in p.split("/")


@dataclass
class Edits:
    """Merged containerEdits (spec level, then device level)."""
    env: list[str] = field(default_factory=list)
    device_nodes: list[dict] = field(default_factory=list)
    mounts: list[dict] = field(default_factory=list)
    hooks: list[dict] = field(default_factory=list)
    additional_gids: list[int] = field(default_factory=list)

    def add(self, raw: dict | None, where: str) -> None:
        if raw is None:
            return
        if not isinstance(raw, dict):
            raise CDIError(f"{where}: containerEdits must be a map")
        if raw.get("intelRdt"):
            raise CDIError(f"{where}: intelRdt edits are not supported")
        for e in raw.get("env") or []:
            if not isinstance(e, str) or "=" not in e:
                raise CDIError(f"{where}: env entries are KEY=VALUE strings")
            self.env.append(e)
        for d in raw.get("deviceNodes") or []:
            if not isinstance(d, dict) or not _abs(d.get("path")) or ("hostPath" in d and not _abs(d["hostPath"])):
                raise CDIError(f"{where}: a device node needs an absolute path (and hostPath)")
            self.device_nodes.append(dict(d))
        for m in raw.get("mounts") or []:
            if not isinstance(m, dict) or not all(_abs(m.get(k)) for k in ("hostPath", "containerPath")):
                raise CDIError(f"{where}: a mount needs absolute hostPath and containerPath")
            self.mounts.append(dict(m))
        for h in raw.get("hooks") or []:
            if not isinstance(h, dict) or h.get("hookName") not in _HOOKS or not isinstance(h.get("path"), str):
                raise CDIError(f"{where}: a hook needs hookName (one of {', '.join(_HOOKS)}) and path")
            self.hooks.append(dict(h))
        for g in raw.get("additionalGIDs") or []:
            if isinstance(g, bool) or not isinstance(g, int) or g < 0:
                raise CDIError(f"{where}: additionalGIDs are non-negative integers")
            if g:  # the spec: GID 0 is ignored
                self.additional_gids.append(g)

    def to_json(self) -> dict:
        return {"env": list(self.env), "deviceNodes": list(self.device_nodes), "mounts": list(self.mounts),
                "hooks": list(self.hooks), "additionalGIDs": list(self.additional_gids)}

    @classmethod
    def from_json(cls, d: dict) -> "Edits":
        e = cls()
        e.add(d, "edits")
        return e


@dataclass
class Spec:
    version: str
    kind: str
    devices: dict[str, dict]  # name -> containerEdits
    edits: dict | None  # spec-wide containerEdits
    source: str
    priority: int = 0  # its directory's rank (later wins); generated specs rank below every file


def _load_text(path: Path) -> dict:
    data = path.read_bytes()
    if len(data) > MAX_SPEC_BYTES:
        raise CDIError(f"{path}: larger than {MAX_SPEC_BYTES} bytes")
    if path.suffix == ".json":
        return json.loads(data)
    import yaml  # YAML is a superset of JSON: one loader for .yaml/.yml
    return yaml.safe_load(data)


def parse_spec(raw: dict, source: str = "<spec>") -> Spec:
    if not isinstance(raw, dict):
        raise CDIError(f"{source}: not a map")
    version = raw.get("cdiVersion")
    if version not in VERSIONS:
        raise CDIError(f"{source}: unsupported cdiVersion {version!r} (supported: {', '.join(VERSIONS)})")
    kind = raw.get("kind")
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise CDIError(f"{source}: kind must be vendor/class, got {kind!r}")
    devices: dict[str, dict] = {}
    for d in raw.get("devices") or []:
        name = d.get("name") if isinstance(d, dict) else None
        if not isinstance(name, str) or not _DEVICE_RE.match(name):
            raise CDIError(f"{source}: bad device name {name!r}")
        if name in devices:
            raise CDIError(f"{source}: device {name} defined twice")
        ce = d.get("containerEdits")
        Edits().add(ce, f"{source}: {name}")  # validate now, not at use
        devices[name] = ce or {}
    if not devices:
        raise CDIError(f"{source}: a spec must define at least one device")
    Edits().add(raw.get("containerEdits"), source)
    return Spec(version, kind, devices, raw.get("containerEdits"), source)


class Registry:
    """The devices of every spec in ``dirs`` (later directories take priority)."""

    def __init__(self, dirs=DEFAULT_DIRS, extra: list[Spec] = ()):
        self.specs: dict[str, list[Spec]] = {}
        self.errors: list[str] = []
        self._conflicts: set[str] = set()
        for prio, d in enumerate(dirs):
            d = Path(d)
            if not d.is_dir():
                continue
            for path in sorted(d.iterdir()):
                if path.suffix not in (".json", ".yaml", ".yml") or not path.is_file():
                    continue
                try:
                    self._add(parse_spec(_load_text(path), str(path)), prio)
                except (CDIError, OSError, ValueError) as exc:  # a bad file costs only itself
                    self.errors.append(str(exc))
                except Exception as exc:  # yaml.YAMLError: that file only
                    self.errors.append(f"{path}: {type(exc).__name__}: {str(exc)[:200]}")
        for s in extra:  # generated specs: lowest priority, files win
            self._add(s, -1)

    def _add(self, spec: Spec, prio: int) -> None:
        spec.priority = prio
        self.specs.setdefault(spec.kind, []).append(spec)

    def kinds(self) -> list[str]:
        return sorted(self.specs)

    def devices(self, kind: str) -> list[str]:
        return sorted({n for s in self.specs.get(kind, []) for n in s.devices})

    def has(self, qualified: str) -> bool:
        try:
            self._spec_of(qualified)
            return True
        except CDIError:
            return False

    def _spec_of(self, qualified: str) -> tuple[Spec, str]:
        kind, sep, name = qualified.partition("=")
        if not sep or not _KIND_RE.match(kind) or not _DEVICE_RE.match(name):
            raise CDIError(f"not a qualified CDI device name: {qualified!r}")
        found = [s for s in self.specs.get(kind, []) if name in s.devices]
        if not found:
            raise CDIError(f"unresolvable CDI device {qualified}")
        top = max(s.priority for s in found)
        best = [s for s in found if s.priority == top]
        if len(best) > 1:
            raise CDIError(f"CDI device {qualified} is defined by {best[0].source} and {best[1].source}")
        return best[0], name

    def resolve(self, names: list[str]) -> Edits:
        """The edits that inject ``names`` (spec-wide edits once per spec)."""
        out, seen = Edits(), set()
        for q in names:
            spec, name = self._spec_of(q)
            if id(spec) not in seen:
                seen.add(id(spec))
                out.add(spec.edits, spec.source)
            out.add(spec.devices[name], f"{spec.source}: {name}")
        return out


# ---- applying edits to an OCI config --------------------------------------------------------

def _node_numbers(node: dict) -> dict:
    """type/major/minor (and mode) of a device node: from the spec, else the host file."""
    host = node.get("hostPath") or node["path"]
    out = {"path": node["path"]}
    if node.get("type") and node.get("major") is not None:
        out.update(type=node["type"], major=int(node["major"]), minor=int(node.get("minor", 0)))
    else:
        try:
            st = os.stat(host)
        except OSError as exc:
            raise CDIError(f"device node {host}: {exc.strerror}") from None
        if stat.S_ISCHR(st.st_mode):
            t = "c"
        elif stat.S_ISBLK(st.st_mode):
            t = "b"
        else:
            raise CDIError(f"device node {host} is not a character or block device")
        out.update(type=t, major=os.major(st.st_rdev), minor=os.minor(st.st_rdev))
        out.setdefault("fileMode", stat.S_IMODE(st.st_mode))
    if node.get("fileMode") is not None:
        out["fileMode"] = int(node["fileMode"])
    for k in ("uid", "gid"):
        if node.get(k) is not None:
            out[k] = int(node[k])
    return out


def apply(config: dict, edits: Edits) -> dict:
    """Apply ``edits`` to an OCI runtime ``config`` in place (and return it)."""
    proc = config.setdefault("process", {})
    env = proc.setdefault("env", [])
    for e in edits.env:  # a CDI variable replaces one of the same name
        k = e.split("=", 1)[0] + "="
        env[:] = [x for x in env if not x.startswith(k)] + [e]
    linux = config.setdefault("linux", {})
    devices = linux.setdefault("devices", [])
    allow = linux.setdefault("resources", {}).setdefault("devices", [{"allow": False, "access": "rwm"}])
    for node in edits.device_nodes:
        n = _node_numbers(node)
        devices[:] = [d for d in devices if d.get("path") != n["path"]] + [n]
        allow.append({"allow": True, "type": n["type"], "major": n["major"], "minor": n["minor"],
                      "access": node.get("permissions") or "rwm"})
    mounts = config.setdefault("mounts", [])
    for m in edits.mounts:
        mounts.append({"destination": m["containerPath"], "type": m.get("type") or "bind",
                       "source": m["hostPath"], "options": list(m.get("options") or ["ro", "nosuid", "nodev", "bind"])})
    for h in edits.hooks:
        entry = {"path": h["path"]}
        for k in ("args", "env"):
            if h.get(k):
                entry[k] = list(h[k])
        if h.get("timeout") is not None:
            entry["timeout"] = int(h["timeout"])
        config.setdefault("hooks", {}).setdefault(h["hookName"], []).append(entry)
    if edits.additional_gids:
        user = proc.setdefault("user", {"uid": 0, "gid": 0})
        user["additionalGids"] = sorted(set(user.get("additionalGids", [])) | set(edits.additional_gids))
    return config


# ---- generating the NVIDIA spec from NVML and the host -----------------------------------------

# The driver's user-space libraries a CUDA/NVML program opens (what nvidia-ctk mounts for "compute,utility").
NVIDIA_LIBS = ("libcuda.so", "libnvidia-ml.so", "libnvidia-ptxjitcompiler.so", "libnvidia-nvvm.so",
               "libnvidia-gpucomp.so", "libnvidia-allocator.so", "libnvidia-cfg.so", "libcudadebugger.so",
               "libnvidia-opencl.so")
NVIDIA_BINS = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nvidia-cuda-mps-control",
               "nvidia-cuda-mps-server")


def ldconfig_libs(names=NVIDIA_LIBS, ldconfig_output: str | None = None) -> list[str]:
    """Host paths of the libraries in the linker cache whose soname starts with one of ``names``
    (x86-64 / the native ABI only)."""
    if ldconfig_output is None:
        try:
            ldconfig_output = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                                             timeout=10, env={"PATH": "/sbin:/usr/sbin:/bin:/usr/bin"}).stdout
        except (OSError, subprocess.SubprocessError):
            return []
    found: dict[str, str] = {}
    for line in ldconfig_output.splitlines():
        line = line.strip()
        if "=>" not in line:
            continue
        left, path = (p.strip() for p in line.split("=>", 1))
        soname, _, tags = left.partition(" ")
        if not any(soname.startswith(n) for n in names) or ("x86-64" not in tags and "64" not in tags):
            continue
        found.setdefault(soname, path)
    return sorted(found.values())


def mig_cap_minor(proc_root: str | Path, minor: int, gi: int, ci: int | None = None) -> int | None:
    """The ``/dev/nvidia-caps/nvidia-cap<N>`` minor that grants a MIG GPU instance (``ci``
    None) or compute instance, from ``/proc/driver/nvidia/capabilities`` (what nvidia-ctk reads)."""
    path = Path(proc_root) / f"driver/nvidia/capabilities/gpu{minor}/mig/gi{gi}"
    path = (path / f"ci{ci}" if ci is not None else path) / "access"
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "DeviceFileMinor":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def nvidia_spec(gpus: list[dict], dev_root: str | Path = "/dev", libs: list[str] | None = None,
                bins_root: str | Path = "/usr/bin", proc_root: str | Path = "/proc") -> Spec | None:
    """The ``nvidia.com/gpu`` spec for ``gpus`` (dicts with ``uuid`` and ``minor``; a MIG
    instance also ``gi`` and ``ci``), or None when the host lacks the control device nodes.
    Devices are named by UUID and by index. A MIG instance gets its parent's node and the
    two capability nodes that grant its GPU and compute instance, as nvidia-ctk does; one
    whose capability nodes cannot be found is left out (it would be unusable)."""
    dev = Path(dev_root)
    if not (dev / "nvidiactl").exists():
        return None
    libs = ldconfig_libs() if libs is None else libs
    common = [{"path": "/dev/nvidiactl", "hostPath": str(dev / "nvidiactl")}]
    for extra in ("nvidia-uvm", "nvidia-uvm-tools"):
        if (dev / extra).exists():
            common.append({"path": f"/dev/{extra}", "hostPath": str(dev / extra)})
    mounts = [{"hostPath": p, "containerPath": p, "options": ["ro", "nosuid", "nodev", "bind"]} for p in libs]
    for b in NVIDIA_BINS:
        p = Path(bins_root) / b
        if p.exists():
            mounts.append({"hostPath": str(p), "containerPath": f"/usr/bin/{b}",
                           "options": ["ro", "nosuid", "nodev", "bind"]})
    devices: dict[str, dict] = {}
    for g in gpus:
        if not g.get("uuid") or g.get("minor") is None:
            continue
        node = dev / f"nvidia{int(g['minor'])}"
        if not node.exists():
            continue
        edits = {"deviceNodes": [{"path": f"/dev/nvidia{int(g['minor'])}", "hostPath": str(node)}]}
        if g["uuid"].startswith("MIG-"):
            gi, ci, minor = g.get("gi"), g.get("ci"), int(g["minor"])
            caps = [] if gi is None or ci is None else \
                [mig_cap_minor(proc_root, minor, gi), mig_cap_minor(proc_root, minor, gi, ci)]
            nodes = [dev / "nvidia-caps" / f"nvidia-cap{c}" for c in caps if c is not None]
            if len(nodes) != 2 or not all(n.exists() for n in nodes):
                continue
            edits["deviceNodes"] += [{"path": f"/dev/nvidia-caps/{n.name}", "hostPath": str(n)} for n in nodes]
            devices[g["uuid"]] = edits
            continue  # a MIG instance is named by its UUID only
        devices[g["uuid"]] = edits
        if g.get("index") is not None:
            devices[str(g["index"])] = edits
    if not devices:
        return None
    raw = {"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
           "devices": [{"name": n, "containerEdits": e} for n, e in devices.items()],
           "containerEdits": {"deviceNodes": common, "mounts": mounts,
                              "env": ["NVIDIA_VISIBLE_DEVICES=void"]}}
    return parse_spec(raw, "generated from NVML")


def dri_spec(kind: str, devices: dict[str, list[str]], dev_root: str | Path = "/dev") -> Spec | None:
    """``amd.com/gpu`` / ``intel.com/gpu`` from sysfs: name -> device node paths (``/dev/kfd``,
    ``/dev/dri/renderD128``) as seen in the container; host paths under ``dev_root``."""
    out = []
    for name, nodes in devices.items():
        present = [n for n in nodes if (Path(dev_root) / n.removeprefix("/dev/")).exists()]
        if present and len(present) == len(nodes):
            out.append({"name": name, "containerEdits": {"deviceNodes": [
                {"path": n, "hostPath": str(Path(dev_root) / n.removeprefix("/dev/"))} for n in nodes]}})
    if not out:
        return None
    return parse_spec({"cdiVersion": "0.5.0", "kind": kind, "devices": out}, f"generated from sysfs ({kind})")
