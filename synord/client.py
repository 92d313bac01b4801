"""A small client of the control API for the CLI (stdlib only: the CLI must start fast)."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Iterator
from urllib.parse import urlsplit

from .home import Home


class ClientError(Exception):
    """One-line, user-facing reason."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class ApiClient:
    def __init__(self, home: Home, timeout: float = 30.0):
        self.home = home
        try:
            self.url, self.token, self.pid = home.read_api()
        except FileNotFoundError:
            raise ClientError(f"the daemon is not running for home {home.path} "
                              f"(no {home.api_json.name}; start it with `synord daemon`)") from None
        except (ValueError, KeyError) as exc:
            raise ClientError(f"{home.api_json}: unreadable ({exc})") from None
        self.timeout = timeout

    def _connection(self, timeout: float | None | object = ...) -> http.client.HTTPConnection:
        # ``...`` = the client's default; None = wait forever (a followed log stream)
        t = self.timeout if timeout is ... else timeout
        if self.url.startswith("unix:"):
            return _UnixHTTPConnection(self.url[5:], t)
        parts = urlsplit(self.url)
        return http.client.HTTPConnection(parts.hostname, parts.port, timeout=t)

    def _send(self, method: str, path: str, body: Any = None, timeout: float | None | object = ...):
        conn = self._connection(timeout)
        headers = {"Authorization": f"Bearer {self.token}", "Host": "127.0.0.1"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            return conn, conn.getresponse()
        except (ConnectionRefusedError, FileNotFoundError):
            conn.close()
            raise ClientError(f"the daemon is not reachable at {self.url} "
                              f"(pid {self.pid} gone? remove {self.home.api_json})") from None
        except (socket.timeout, TimeoutError):
            conn.close()
            raise ClientError(f"the daemon at {self.url} did not answer in time") from None
        except OSError as exc:
            conn.close()
            raise ClientError(f"cannot reach the daemon at {self.url}: {exc}") from None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn, resp = self._send(method, path, body)
        try:
            raw = resp.read()
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            raise ClientError(f"{method} {path}: the daemon answered {resp.status} with non-JSON") from None
        if resp.status >= 400:
            msg = data.get("error") if isinstance(data, dict) else None
            raise ClientError(msg or f"{method} {path}: HTTP {resp.status}")
        return data

    def dashboard_url(self) -> str:
        """The loopback dashboard, its token in the fragment (which browsers never send)."""
        if self.url.startswith("unix:"):
            raise ClientError("the dashboard needs a TCP API listener (api.listen = \"127.0.0.1:PORT\")")
        return f"{self.url}/#token={self.token}"

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def stream(self, path: str, method: str = "GET", body: Any = None) -> Iterator[dict]:
        """Newline-delimited JSON objects from a streaming endpoint, as they arrive."""
        conn, resp = self._send(method, path, body, timeout=None)
        try:
            if resp.status >= 400:
                raw = resp.read()
                try:
                    msg = json.loads(raw).get("error")
                except ValueError:
                    msg = None
                raise ClientError(msg or f"{method} {path}: HTTP {resp.status}")
            for line in resp:
                line = line.strip()
                if line:
                    yield json.loads(line)
        finally:
            conn.close()
