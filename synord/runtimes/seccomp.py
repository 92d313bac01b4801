"""The seccomp profile for containers (OCI ``linux.seccomp``).

Derived from containers-common's ``/usr/share/containers/seccomp.json`` (ships
with skopeo/podman): its rules are conditional on capabilities and arches, so
we resolve them for "no capabilities" on this machine's arch. That profile
allows unshare/mount/keyctl/ptrace and friends, relying on dropped
capabilities; we deny them explicitly as a second wall. Without the file, a
small built-in default-allow profile denies the same list.
"""

from __future__ import annotations

import functools
import json
import platform
from pathlib import Path

CONTAINERS_PROFILE = Path("/usr/share/containers/seccomp.json")

DENY = sorted({
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "keyctl", "add_key", "request_key",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "bpf", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at", "reboot", "swapon", "swapoff",
    "acct", "settimeofday", "clock_settime", "adjtimex", "iopl", "ioperm", "syslog",
})

_ARCHES = {
    "x86_64": ("amd64", ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"], {"amd64", "x86", "x32"}),
    "aarch64": ("arm64", ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"], {"arm64", "arm"}),
}


def _deny_rule() -> dict:
    return {"names": DENY, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}


def builtin_profile() -> dict:
    arch = _ARCHES.get(platform.machine())
    prof = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [_deny_rule()]}
    if arch:
        prof["architectures"] = arch[1]
    return prof


def convert(src: dict, machine: str | None = None) -> dict:
    """containers-common profile -> OCI profile for an unprivileged (no caps) container."""
    arch = _ARCHES.get(machine or platform.machine())
    if arch is None:
        return builtin_profile()
    _, scmp_arches, names = arch
    rules = []
    for r in src.get("syscalls") or []:
        inc, exc = r.get("includes") or {}, r.get("excludes") or {}
        if inc.get("caps"):  # only for holders of a capability: we have none
            continue
        if inc.get("arches") and not set(inc["arches"]) & names:
            continue
        if exc.get("arches") and set(exc["arches"]) & names:
            continue
        rule_names = [n for n in r.get("names") or [] if not (r.get("action") == "SCMP_ACT_ALLOW" and n in DENY)]
        if not rule_names:
            continue
        rule = {"names": rule_names, "action": r["action"]}
        if r.get("args"):
            rule["args"] = [{k: a[k] for k in ("index", "value", "valueTwo", "op") if k in a} for a in r["args"]]
        if r.get("errnoRet") is not None:
            rule["errnoRet"] = r["errnoRet"]
        rules.append(rule)
    # Names already denied by the source's own rules must not be listed twice.
    denied = {n for r in rules if r["action"] != "SCMP_ACT_ALLOW" for n in r["names"]}
    extra = [n for n in DENY if n not in denied]
    if extra:
        rules.append({"names": extra, "action": "SCMP_ACT_ERRNO", "errnoRet": 1})
    prof = {"defaultAction": src.get("defaultAction", "SCMP_ACT_ERRNO"), "architectures": scmp_arches,
            "syscalls": rules}
    if src.get("defaultErrnoRet") is not None:
        prof["defaultErrnoRet"] = src["defaultErrnoRet"]
    return prof


@functools.lru_cache(maxsize=1)
def default_profile() -> tuple[str, str]:
    """(JSON of the profile, where it came from)."""
    try:
        src = json.loads(CONTAINERS_PROFILE.read_text())
        return json.dumps(convert(src)), str(CONTAINERS_PROFILE)
    except (OSError, ValueError, KeyError, TypeError):
        return json.dumps(builtin_profile()), "built-in"


def profile() -> dict:
    return json.loads(default_profile()[0])
