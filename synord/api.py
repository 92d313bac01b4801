"""The local control API: HTTP+JSON for the CLI, the dashboard and the tray.

Listens on loopback or a Unix socket only. Every request needs
``Authorization: Bearer <api.token>`` (401 otherwise), except the static
dashboard page, which holds no data. A Host header that is not loopback gets
421: that blocks DNS-rebinding attacks from web pages in the user's browser.

The routes are thin: each calls one method of the component that owns the
state (reached through the Node, synord.daemon). Domain errors (synord.errors)
become JSON {"error": ...} with the status `STATUS` gives them: this module is
the one place that speaks HTTP codes.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .dashboard import FILES as DASHBOARD_FILES, response as dashboard_response
from .errors import (Busy, Conflict, DomainError, Forbidden, Gone, InsufficientStorage, Invalid, NotFound,
                     Unavailable, Unsupported)
from synord.protocols.refusals import REFUSALS

if TYPE_CHECKING:
    from .daemon import Node

log = logging.getLogger("synord.api")

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# Each domain error's HTTP status (the CLI and tests see these codes).
STATUS: dict[type[DomainError], int] = {Invalid: 400, Forbidden: 403, NotFound: 404, Conflict: 409,
                                        Gone: 410, Busy: 429, Unsupported: 501, Unavailable: 502,
                                        InsufficientStorage: 507}


def http_error(exc: Exception) -> ApiError | None:
    """The HTTP form of an ApiError or a domain error; None for anything else (a bug)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DomainError):
        status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
        return ApiError(status, exc.message)
    return None


def host_is_loopback(host_header: str) -> bool:
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[: host.find("]") + 1]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in LOOPBACK_HOSTS


class GuardMiddleware:
    """Host check (421) then bearer-token check (401), before any route runs."""

    PUBLIC = set(DASHBOARD_FILES)  # the dashboard's static files hold no data

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        # Unix-socket clients have no meaningful Host; TCP ones must say loopback.
        if scope.get("server") and not host_is_loopback(headers.get("host", "")):
            return await _send_json(send, 421, {"error": "misdirected request: host is not loopback"})
        if scope["path"] not in self.PUBLIC:
            auth = headers.get("authorization", "")
            given = auth[7:].strip().encode() if auth.lower().startswith("bearer ") else b""
            if not given or not hmac.compare_digest(given, self.token):
                return await _send_json(send, 401, {"error": "missing or wrong API token "
                                                    "(see api.token in the node's home)"})
        return await self.app(scope, receive, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# Numeric fields of API bodies: (lowest, highest); JSON admits NaN and 1e308, we do not.
SUBMIT_NUMBERS = {"cpus": (0.0, 1024.0), "memory_bytes": (0, 1 << 44), "timeout_s": (0.0, 366 * 86400.0),
                  "max_price": (0.0, 1e12), "gpus": (0, 1024), "gpu_memory": (1, 1 << 50)}
LIMIT_NUMBERS = {"cpu_share": (0.0, 1.0), "memory_share": (0.0, 1.0), "gpu_share": (0.0, 1.0),
                 "idle_after_s": (0, 366 * 86400), "min_battery_percent": (0, 100)}


def check_numbers(body: dict, ranges: dict[str, tuple[float, float]]) -> dict:
    """400 for a numeric field that is not a finite number within its range (absent/null is fine)."""
    for key, (lo, hi) in ranges.items():
        v = body.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            REFUSALS.count("api", "bad-number")
            raise ApiError(400, f"{key} must be a finite number between {lo:g} and {hi:g}, got {v!r}")
    return body


def build_app(node: "Node", token: str):
    async def call(fn, *args, request: Request | None = None) -> Response:
        """Run one Node method; with ``request``, its JSON body is the last argument."""
        try:
            if request is not None:
                args = (*args, await body_of(request))
            result = fn(*args)
            if hasattr(result, "__await__"):
                result = await result
            return JSONResponse(result)
        except Exception as exc:
            err = http_error(exc)
            if err is not None:
                return JSONResponse({"error": err.message}, status_code=err.status)
            why = node.storage.failed("control API", exc)
            if why is not None:  # the disk, not a bug: 507 with the reason (status says it too)
                return JSONResponse({"error": f"node storage full, nothing recorded: {why}"},
                                    status_code=507)
            # a bug: say so in JSON (the CLI prints it), log the trace
            log.exception("API handler failed", extra={"handler": getattr(fn, "__name__", "?")})
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"},
                                status_code=500)

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise ApiError(400, "request body is not JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data

    async def status(request: Request):
        return await call(node.status_json)

    async def doctor(request: Request):
        return await call(node.doctor_json)

    async def peers(request: Request):
        return await call(node.mesh.peers_json)

    async def probe(request: Request):
        return await call(node.probe_json, request.query_params.get("bench") == "1")

    async def book(request: Request):
        return await call(node.market.book_json, request.query_params.get("class"))

    async def ledger(request: Request):
        return await call(node.market.ledger_json)

    async def gpu(request: Request):
        return await call(lambda: node.gpu.to_json() if node.gpu is not None else {"units": []})

    async def limits(request: Request):
        return await call(node.contributor.limits_json)

    async def set_limits(request: Request):
        return await call(lambda body: node.contributor.set_limits(check_numbers(body, LIMIT_NUMBERS)), request=request)

    async def idle(request: Request):
        return await call(node.contributor.report_idle, request=request)

    async def pause(request: Request):
        return await call(node.contributor.pause)

    async def resume(request: Request):
        return await call(node.contributor.resume)

    async def jobs(request: Request):
        return await call(node.jobs.jobs_json)

    async def job(request: Request):
        return await call(node.jobs.job_json, request.path_params["job_id"])

    async def submit(request: Request):
        return await call(lambda body: node.jobs.submit(check_numbers(body, SUBMIT_NUMBERS)), request=request)

    async def placement(request: Request):
        return await call(node.jobs.placement_json, request.path_params["job_id"])

    async def cancel(request: Request):
        return await call(node.jobs.cancel, request.path_params["job_id"])

    async def preempt(request: Request):
        return await call(node.contributor.preempt_notice, request=request)

    async def logs(request: Request):
        job_id = request.path_params["job_id"]
        follow = request.query_params.get("follow") == "1"
        try:
            stream = node.jobs.output(job_id, follow)
        except (ApiError, DomainError) as exc:
            err = http_error(exc)
            return JSONResponse({"error": err.message}, status_code=err.status)
        # newline-delimited JSON: {"stream": "stdout", "data": "..."} then a final {"exit_code": ...}
        return StreamingResponse(stream, media_type="application/x-ndjson")

    async def exec_(request: Request):
        # NDJSON: [{"session": id} if interactive], {"stream", "data"}..., then {"exit_code"} or {"error"}
        try:
            stream = await node.jobs.exec_job(request.path_params["job_id"], await body_of(request))
        except (ApiError, DomainError) as exc:
            err = http_error(exc)
            return JSONResponse({"error": err.message}, status_code=err.status)
        return StreamingResponse(stream, media_type="application/x-ndjson")

    async def forward(request: Request):
        # NDJSON: {"listening", "local", "remote", "job"}, then per connection {"connection", ...}, {"ended"}
        try:
            stream = await node.jobs.forward_job(request.path_params["job_id"], await body_of(request))
        except (ApiError, DomainError) as exc:
            err = http_error(exc)
            return JSONResponse({"error": err.message}, status_code=err.status)
        return StreamingResponse(stream, media_type="application/x-ndjson")

    async def exec_stdin(request: Request):  # body {"data": text?, "eof": bool?}
        return await call(node.jobs.exec_stdin, request.path_params["session"], request=request)

    async def metrics(request: Request):
        from prometheus_client import generate_latest
        return Response(generate_latest(node.metrics_registry),
                        media_type="text/plain; version=0.0.4")

    async def history(request: Request):
        try:
            since = float(request.query_params.get("since") or 0)
        except ValueError:
            return JSONResponse({"error": "since must be a unix time in seconds"}, status_code=400)
        from .history import history_json
        return await call(history_json, node.store, node.config["history.interval_s"], since)

    async def dashboard(request: Request):
        return dashboard_response(request.url.path)

    routes = [
        *(Route(path, dashboard) for path in DASHBOARD_FILES),
        Route("/v1/history", history),
        Route("/v1/status", status),
        Route("/v1/peers", peers),
        Route("/v1/doctor", doctor),
        Route("/v1/probe", probe),
        Route("/v1/book", book),
        Route("/v1/ledger", ledger),
        Route("/v1/gpu", gpu),
        Route("/v1/limits", limits),
        Route("/v1/limits", set_limits, methods=["POST"]),
        Route("/v1/idle", idle, methods=["POST"]),
        Route("/v1/pause", pause, methods=["POST"]),
        Route("/v1/resume", resume, methods=["POST"]),
        Route("/v1/preempt", preempt, methods=["POST"]),
        Route("/v1/jobs", jobs),
        Route("/v1/jobs", submit, methods=["POST"]),
        Route("/v1/jobs/{job_id}", job),
        Route("/v1/jobs/{job_id}/placement", placement),
        Route("/v1/jobs/{job_id}/cancel", cancel, methods=["POST"]),
        Route("/v1/jobs/{job_id}/logs", logs),
        Route("/v1/jobs/{job_id}/exec", exec_, methods=["POST"]),
        Route("/v1/exec/{session}/stdin", exec_stdin, methods=["POST"]),
        Route("/v1/jobs/{job_id}/forward", forward, methods=["POST"]),
        Route("/metrics", metrics),
    ]
    return GuardMiddleware(Starlette(routes=routes), token)


async def serve(node: "Node", listen: str, token: str, task_status) -> None:
    """Run the API until cancelled; ``task_status.started(url)`` once it listens."""
    await serve_app(build_app(node, token), listen, task_status)


async def serve_app(app, listen: str, task_status) -> None:
    """Serve an ASGI app on ``listen`` (hypercorn) until cancelled; ``started(url)`` once it listens."""
    from hypercorn.config import Config as HyperConfig
    from hypercorn.trio import serve as hyper_serve

    cfg = HyperConfig()
    cfg.bind = [listen]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("hypercorn")
    cfg.graceful_timeout = 1.0

    import trio

    class _Started:
        def started(self, urls):
            url = urls[0] if urls else listen
            if listen.startswith("unix:"):
                url = listen
            task_status.started(url)

    await hyper_serve(app, cfg, shutdown_trigger=trio.sleep_forever,
                      task_status=_Started())
