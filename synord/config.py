"""config.toml: defaults, validation, CLI overrides.

The schema below is the single source of truth: `init` writes it out as a
commented file, `load` checks every key against it and refuses unknown keys or
wrong types with "file: section.key: reason" so a typo never silently does
nothing.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synord.hwprobe.policy import PREFERENCES as _PREFERENCES, ContributorLimits
from synord.protocols.kinds import RUNTIME_KINDS

# section -> key -> (default, type, help). Types: "str", "int", "float", "bool", "list[str]".
SCHEMA: dict[str, dict[str, tuple[Any, str, str]]] = {
    "node": {
        "listen": (["/ip4/0.0.0.0/tcp/4001"], "list[str]", "libp2p listen multiaddrs"),
        "bootstrap": ([], "list[str]", "bootstrap peers, full multiaddrs with /p2p/<id>"),
        "mdns": (True, "bool", "discover peers on the LAN with mDNS"),
        "peer_exchange": (True, "bool", "ask connected peers whom they know (the DHT finds peers without it)"),
        "announce_interval_s": (30.0, "float", "re-announce capabilities this often"),
        "region": ("", "str", "free-form region label used by consumers' constraints"),
    },
    "api": {
        "listen": ("127.0.0.1:7070", "str",
                   "control API: HOST:PORT on loopback, or unix:/path/to.sock"),
    },
    "contributor": {
        "enabled": (True, "bool", "offer this machine's capacity to the mesh"),
        # Every preference (synord.hwprobe.policy.PREFERENCES): also `synord limits` and the limits API.
        **{key: (p.default, p.toml_type, p.help) for key, p in _PREFERENCES.items()},
        "preemptible": (False, "bool", "sell capacity as preemptible (cheaper; desktops)"),
    },
    "pricing": {
        "electricity_per_kwh": (0.25, "float", "your electricity price per kWh"),
        "watts_per_core": (12.0, "float", "power draw of one busy core"),
        "watts_per_gpu": (250.0, "float", "power draw of one busy GPU"),
        "depreciation_per_core_hour": (0.002, "float", "hardware wear per core-hour"),
        "depreciation_per_gpu_hour": (0.08, "float", "hardware wear per GPU-hour"),
        "margin": (0.10, "float", "profit margin over cost"),
        "protocol_fee": (0.02, "float", "fee fraction added to every ask"),
        "preemptible_discount": (0.3, "float", "price cut for preemptible capacity"),
        "min_price": (0.0, "float", "price floor per unit-hour"),
    },
    "market": {
        "allow_peers": ([], "list[str]", "serve only these consumer peer ids (empty = anyone)"),
        "deny_peers": ([], "list[str]", "never serve these consumer peer ids"),
        "max_price": (1.0, "float", "most a job pays per unit-hour when it names no --max-price"),
        "spend_cap": (10.0, "float", "most this node commits to pay within spend_period_s"),
        "spend_period_s": (86400.0, "float", "the period of spend_cap, seconds"),
        "max_asks_per_peer": (16, "int", "asks one peer may hold in our book"),
        "candidates_per_peer": (1, "int", "asks of one provider on a placement's shortlist"),
        "parallel_proposals": (2, "int", "proposals of one placement in flight at once"),
        "hedge_s": (1.0, "float", "propose to the next candidate when one is silent this long"),
        "backoff_s": (5.0, "float", "skip a provider that did not answer this long (doubling per silence)"),
    },
    "runtimes": {
        "enabled": (list(RUNTIME_KINDS), "list[str]", "sandboxes offered"),
        "guest_dir": ("", "str", "microVM guest kernel/initramfs dir; empty = packaged default"),
    },
    "jobs": {
        "checkpoint_interval_s": (10.0, "float", "periodic checkpoints of migratable tasks"),
        "heartbeat_interval_s": (1.0, "float", "lease heartbeat period"),
        "lease_timeout_s": (5.0, "float", "missed heartbeats for this long = provider lost"),
        "preemption_grace_s": (10.0, "float", "grace period sent with a preemption notice"),
        "placement_timeout_s": (30.0, "float", "keep trying to place a task this long before failing it"),
    },
    "forward": {
        "max_connections_per_job": (16, "int", "forwarded TCP connections one job may have at once (synord forward)"),
        "idle_s": (300.0, "float", "a forwarded connection with no byte either way for this long is closed"),
    },
    "gpu": {
        "cdi_dirs": (["/etc/cdi", "/var/run/cdi"], "list[str]",
                     "CDI spec directories (later wins); NVIDIA GPUs without a spec get one generated from NVML"),
        "dev_root": ("/dev", "str", "where the host's device nodes are (for generated CDI specs; MIG capability"
                    " minors are read from the proc/ beside it)"),
        "meter_interval_s": (1.0, "float", "sample a GPU task's devices through NVML this often"),
        "sysfs_root": ("/", "str", "root of the sysfs (and dev/vfio) where GPUs bound to vfio-pci are found"
                       " for microVMs (tests use a fake tree)"),
    },
    "history": {
        "interval_s": (60.0, "float", "sample utilisation and earnings this often (dashboard charts)"),
        "keep_days": (30.0, "float", "drop samples older than this"),
    },
    "storage": {
        "cache_max_bytes": (8 << 30, "int", "artefact and checkpoint cache limit; least recently used go first"),
        "min_free_bytes": (128 << 20, "int",
                           "below this much free disk the node takes no new work (and says why)"),
        "volume_quota_bytes": (1 << 30, "int", "most one consumer's service volumes may hold here"),
    },
    "log": {
        "level": ("info", "str", "debug, info, warning or error"),
    },
    "metrics": {
        "listen": ("", "str", "a second listener serving only /metrics, without the control token "
                              "(e.g. 0.0.0.0:9464 for a Prometheus on the LAN); empty = off"),
    },
    "streams": {
        "first_frame_s": (10.0, "float", "a peer's stream must deliver its first frame within this"),
        "idle_s": (300.0, "float", "... and each next frame within this (not task/exec streams)"),
        "frame_s": (30.0, "float", "a frame's body (or a 1 MiB blob piece) must arrive within this"),
        "max_streams_per_peer": (64, "int", "open inbound streams one peer may hold"),
        "max_streams_total": (1024, "int", "open inbound streams all peers together may hold"),
        "max_buffered_per_peer": (16 * 1024 * 1024, "int", "bytes of unfinished frames held per peer"),
        "max_buffered_total": (128 * 1024 * 1024, "int", "bytes of unfinished frames held in total"),
    },
    "dht": {
        "mode": ("auto", "str", "Kademlia DHT: auto (server when reachable, client behind NAT), "
                                "server, client or off"),
    },
    "relay": {
        "enabled": ("auto", "str", "keep reservations on circuit relays: auto (while not publicly reachable), on, off"),
        "hop": ("auto", "str", "serve as a circuit relay for NATed peers: auto (while publicly reachable), on, off"),
        "reservations": (2, "int", "relays a NATed node keeps a reservation on"),
        "max_reservations": (128, "int", "reservations this relay grants at once"),
        "max_circuits": (256, "int", "relayed connections this relay carries at once"),
        "circuit_bytes": (64 << 20, "int", "bytes one relayed connection may carry"),
        "circuit_duration_s": (3600, "int", "seconds one relayed connection may last"),
        "reservation_ttl_s": (3600, "int", "how long a reservation lasts (clients renew at half)"),
        "transfer_max_bytes": (1 << 20, "int",
                               "larger artefacts/checkpoints never go through a relay: they wait for a direct connection"),
        "direct_wait_s": (15.0, "float", "... this long, then fail with the reason"),
    },
}

_LEVELS = {"debug", "info", "warning", "error"}


class ConfigError(ValueError):
    pass


def _check_type(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise AssertionError(kind)


@dataclass
class Config:
    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<defaults>"

    def __getitem__(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return self.values[section][key]

    def set(self, dotted: str, value: Any) -> None:
        section, key = dotted.split(".", 1)
        self.values[section][key] = value

    def to_json(self) -> dict:
        return {s: dict(v) for s, v in self.values.items()}


def defaults() -> Config:
    return Config({s: {k: (list(d) if isinstance(d, list) else d) for k, (d, _, _) in keys.items()}
                   for s, keys in SCHEMA.items()})


def load(path: Path) -> Config:
    """Read and validate ``path``; a missing file means all defaults."""
    cfg = defaults()
    path = Path(path)
    if not path.exists():
        return cfg
    cfg.source = str(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                          f"at offset {exc.start}); TOML files are UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    for section, table in data.items():
        if section not in SCHEMA:
            raise ConfigError(f"{path}: [{section}]: unknown section "
                              f"(known: {', '.join(SCHEMA)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section}: must be a table")
        for key, value in table.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"{path}: {section}.{key}: unknown key "
                                  f"(known: {', '.join(SCHEMA[section])})")
            kind = SCHEMA[section][key][1]
            if not _check_type(value, kind):
                raise ConfigError(f"{path}: {section}.{key}: expected {kind}, "
                                  f"got {type(value).__name__} {value!r}")
            cfg.values[section][key] = float(value) if kind == "float" else value
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    where = cfg.source

    def fail(key: str, reason: str) -> None:
        raise ConfigError(f"{where}: {key}: {reason}")

    try:
        contributor_limits(cfg.values["contributor"])
    except (TypeError, ValueError) as exc:
        key, _, rest = str(exc).partition(" ")
        if key in _PREFERENCES:  # "cpu_share must be ..." -> "contributor.cpu_share: must be ..."
            fail(f"contributor.{key}", rest)
        fail("contributor", str(exc))
    if cfg["history.interval_s"] < 1.0:
        fail("history.interval_s", "must be at least 1 second")
    if cfg["log.level"] not in _LEVELS:
        fail("log.level", f"must be one of {', '.join(sorted(_LEVELS))}")
    for rt in cfg["runtimes.enabled"]:
        if rt not in RUNTIME_KINDS:
            fail("runtimes.enabled", f"unknown runtime {rt!r}")
    api = cfg["api.listen"]
    if not api.startswith("unix:"):
        host, _, port = api.rpartition(":")
        if not port.isdigit() or not host:
            fail("api.listen", f"expected HOST:PORT or unix:/path, got {api!r}")
        if host.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
            fail("api.listen", f"the control API listens on loopback only, not {host}")
    metrics = cfg["metrics.listen"]
    if metrics:  # "" = off
        host, _, port = metrics.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            fail("metrics.listen", f"expected HOST:PORT (e.g. 0.0.0.0:9464) or \"\" for off, got {metrics!r}")
    for addr in cfg["node.listen"] + cfg["node.bootstrap"]:
        if not addr.startswith("/"):
            fail("node.listen/bootstrap", f"not a multiaddr: {addr!r}")
    for section, keys in SCHEMA.items():  # TOML allows nan and inf; no setting means them
        for key, (_d, kind, _h) in keys.items():
            if kind == "float" and not math.isfinite(cfg[f"{section}.{key}"]):
                fail(f"{section}.{key}", "must be a finite number")
    for key in ("storage.cache_max_bytes", "storage.min_free_bytes", "storage.volume_quota_bytes"):
        if cfg[key] < 0:
            fail(key, "must not be negative")
    for key in ("jobs.heartbeat_interval_s", "jobs.lease_timeout_s", "node.announce_interval_s"):
        if cfg[key] <= 0:
            fail(key, "must be positive")
    for key in ("market.max_price", "market.spend_cap", "market.spend_period_s", "market.hedge_s",
                "market.backoff_s",
                "market.max_asks_per_peer", "market.candidates_per_peer", "market.parallel_proposals"):
        if not cfg[key] > 0:  # nan and inf were refused above
            fail(key, "must be a positive finite number")
    for key, value in cfg.values["streams"].items():
        if not 0 < value < float("inf"):  # also refuses nan
            fail(f"streams.{key}", "must be a positive finite number")
    if cfg["dht.mode"] not in ("auto", "server", "client", "off"):
        fail("dht.mode", f"must be auto, server, client or off, not {cfg['dht.mode']!r}")
    for key in ("relay.enabled", "relay.hop"):
        if cfg[key] not in ("auto", "on", "off"):
            fail(key, f"must be auto, on or off, not {cfg[key]!r}")
    for key in ("reservations", "max_reservations", "max_circuits", "circuit_bytes", "circuit_duration_s",
                "reservation_ttl_s", "transfer_max_bytes", "direct_wait_s"):
        if not cfg[f"relay.{key}"] > 0:
            fail(f"relay.{key}", "must be a positive number")


def contributor_limits(section: dict, overrides: dict | None = None) -> ContributorLimits:
    """The [contributor] preferences (plus live overrides) as the policy reads them:
    "" and 0-means-none stay as they are, an empty hours string is no limit."""
    values = {k: section[k] for k in _PREFERENCES}
    values.update(overrides or {})
    for key in ("allowed_hours", "weekday_hours", "network_hours"):
        values[key] = values[key] or None
    for key in ("bandwidth_bytes_per_s", "daily_transfer_bytes", "disk_limit_bytes"):
        if isinstance(values[key], float) and values[key].is_integer():
            values[key] = int(values[key])
    return ContributorLimits(**values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def default_toml() -> str:
    """The commented default config written by `synord init` (every key commented out)."""
    lines = ["# synord configuration. Every key is shown with its default, commented out.",
             "# Uncomment to change; command-line flags override this file.", ""]
    for section, keys in SCHEMA.items():
        lines.append(f"[{section}]")
        for key, (default, _kind, help_) in keys.items():
            lines.append(f"# {help_}")
            lines.append(f"# {key} = {_toml_value(default)}")
        lines.append("")
    return "\n".join(lines)
