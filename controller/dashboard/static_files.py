"""The dashboard's page and its files, shipped in the package (``static/``): no CDN, no build.

``GET /`` is ``index.html``; ``GET /ui/{file}`` serves a file of ``static/`` by its plain name
(no folders, no dot files: nothing outside it can be named) with its content type, and answers
404 for anything else. ``Cache-Control: no-cache``: an upgraded controller serves its own page.
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

# resolve(): a strict editable install links each module, not the folder beside it.
STATIC = Path(__file__).resolve().parent / "static"
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
         ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")
# The page loads nothing but its own files; scripts and styles inline are refused.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
           "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                      "object-src 'none'; base-uri 'none'; "
                                      "form-action 'none'; frame-ancestors 'none'",
           "Referrer-Policy": "no-referrer"}


def _serve(name: str) -> web.Response:
    suffix = Path(name).suffix
    if not _NAME.fullmatch(name) or ".." in name or suffix not in TYPES:
        raise web.HTTPNotFound()
    path = STATIC / name
    if not path.is_file():
        raise web.HTTPNotFound()
    content_type = TYPES[suffix]
    charset = "utf-8" if content_type.startswith("text/") or suffix == ".svg" else None
    return web.Response(body=path.read_bytes(), content_type=content_type, charset=charset,
                        headers=HEADERS)


async def index(request: web.Request) -> web.Response:
    return _serve("index.html")


async def ui_file(request: web.Request) -> web.Response:
    return _serve(request.match_info["file"])


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/ui/{file}", ui_file)
