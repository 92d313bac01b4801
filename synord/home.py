"""The node's state directory (``--home`` / ``SYNORD_HOME``) and the files in it."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path


SERVICE_HOME = Path("/var/lib/synord")  # the systemd service's StateDirectory=


def default_home(client: bool = False) -> Path:
    """$SYNORD_HOME, else the user's own home. A ``client`` command (status, run, ...) of
    root or of a member of the service's group that has no daemon of its own talks to
    the service's daemon instead (its api.json and group-readable token)."""
    env = os.environ.get("SYNORD_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0 and os.environ.get("INVOCATION_ID"):  # running under systemd
        return SERVICE_HOME
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    own = Path(xdg) / "synord"
    service = Path(os.environ.get("SYNORD_SERVICE_HOME") or SERVICE_HOME)  # (tests point it elsewhere)
    if client and not Home(own).api_json.exists() and os.access(service / "api.json", os.R_OK) \
            and os.access(service / "api.token", os.R_OK):
        return service
    return own


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically replace ``path`` with ``data``, created with ``mode`` (never world-readable)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Home:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def identity(self) -> Path:
        return self.path / "identity.key"

    @property
    def db(self) -> Path:
        return self.path / "state.db"

    @property
    def api_json(self) -> Path:
        return self.path / "api.json"

    @property
    def api_token(self) -> Path:
        return self.path / "api.token"

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    @property
    def work(self) -> Path:
        return self.path / "work"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def ensure_token(self) -> str:
        """The control-API bearer token; created (0600) on first use, stable afterwards."""
        try:
            token = self.api_token.read_text().strip()
            if token:
                return token
        except FileNotFoundError:
            pass
        token = secrets.token_urlsafe(32)
        # A home its owner opened to a group (the service's 0750) shares the token with it.
        shared = self.path.stat().st_mode & 0o050 == 0o050
        write_private(self.api_token, token.encode() + b"\n", 0o640 if shared else 0o600)
        return token

    def write_api_json(self, url: str) -> None:
        write_private(self.api_json, json.dumps({"url": url, "pid": os.getpid()}).encode(), 0o644)

    def read_api(self) -> tuple[str, str, int]:
        """(url, token, pid) of the running daemon; FileNotFoundError when it is not running."""
        info = json.loads(self.api_json.read_text())
        return info["url"], self.api_token.read_text().strip(), int(info.get("pid", 0))
