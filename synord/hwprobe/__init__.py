"""hwprobe: what this machine can compute, and how much of it a contributor
offers right now.

    profile = synord.hwprobe.probe(bench=False, runtimes={...}, limits=ContributorLimits(...))
    profile.to_json()                 # what `synord probe --json` prints
    profile = hwprobe.refresh_dynamic(profile)   # every few seconds
    hwprobe.resource_classes(profile) # ["cpu", "opencl", "gpu.h100"]

This package never imports the rest of synord (only synord.hwprobe itself).
"""

from .policy import ContributorLimits, offerable, resource_classes
from .probe import probe, refresh_dynamic
from .profile import CapabilityProfile
from .signals import ContributorSignals, read_signals

__all__ = ["CapabilityProfile", "ContributorLimits", "ContributorSignals", "offerable",
           "probe", "read_signals", "refresh_dynamic", "resource_classes"]
