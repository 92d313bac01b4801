"""Real synord daemons as separate processes, for multi-daemon tests (see synord.localmesh)."""

from synord.localmesh import ROOT, SYNORD, DaemonCluster, DaemonProcess, wait_for  # noqa: F401
