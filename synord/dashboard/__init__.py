"""The loopback dashboard: static files in this folder, a client of the control API.

The files hold no data, so they are served without the token; the page reads
the token from the URL fragment (``http://127.0.0.1:PORT/#token=...``, printed
or opened by ``synord dashboard``: a fragment never reaches the server or its
logs) and calls the same /v1 routes as the CLI. Nothing loads from the network:
the Content-Security-Policy allows exactly these files and the API.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import Response

HERE = Path(__file__).resolve().parent

# URL path -> (file, media type)
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/icon.svg": ("icon.svg", "image/svg+xml"),
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def response(path: str) -> Response:
    name, media_type = FILES[path]
    return Response((HERE / name).read_bytes(), media_type=media_type,
                    headers={"content-security-policy": CSP, "x-content-type-options": "nosniff",
                             "cache-control": "no-cache", "referrer-policy": "no-referrer"})
