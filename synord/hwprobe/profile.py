"""The capability profile: what `synord probe --json` prints and what is
announced on the capabilities topic."""

from __future__ import annotations

import copy
import dataclasses
import time


@dataclasses.dataclass
class CapabilityProfile:
    devices: list[dict]
    host: dict
    runtimes: dict = dataclasses.field(default_factory=dict)
    offerable: dict = dataclasses.field(default_factory=dict)
    probed_at: float = dataclasses.field(default_factory=time.time)
    # Inputs of `offerable`, kept so refresh_dynamic can recompute it.
    limits: dict | None = None
    signals: dict | None = None
    sysfs_root: str = "/"

    def to_json(self) -> dict:
        return {"devices": copy.deepcopy(self.devices), "host": copy.deepcopy(self.host),
                "runtimes": copy.deepcopy(self.runtimes), "offerable": dict(self.offerable),
                "probed_at": self.probed_at, "limits": copy.deepcopy(self.limits),
                "signals": copy.deepcopy(self.signals)}

    @classmethod
    def from_json(cls, d: dict) -> "CapabilityProfile":
        missing = {"devices", "host"} - set(d)
        if missing:
            raise ValueError(f"capability profile lacks {', '.join(sorted(missing))}")
        return cls(devices=copy.deepcopy(list(d["devices"])), host=copy.deepcopy(dict(d["host"])),
                   runtimes=copy.deepcopy(dict(d.get("runtimes") or {})),
                   offerable=dict(d.get("offerable") or {}),
                   probed_at=float(d.get("probed_at") or 0.0),
                   limits=copy.deepcopy(d.get("limits")), signals=copy.deepcopy(d.get("signals")))

    def devices_of(self, kind: str) -> list[dict]:
        return [dev for dev in self.devices if dev.get("kind") == kind]
