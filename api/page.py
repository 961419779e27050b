"""The web page for people at /: plain HTML, CSS and a small script from api/static, no
toolchain and no CDN, talking to the public API like any client."""

from __future__ import annotations

import functools
from pathlib import Path

from aiohttp import web

from shared import errors

STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
ASSETS = ("app.js", "style.css")


@functools.cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def _file(name: str) -> web.Response:
    response = web.Response(body=_read(name))
    response.content_type = CONTENT_TYPES[Path(name).suffix]
    response.charset = "utf-8"
    # The page may talk only to this origin and run only its own script.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'"
    )
    return response


async def page(request: web.Request) -> web.Response:
    return _file("index.html")


async def page_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise errors.PageNotFound(f"No page asset {name!r}")
    return _file(name)
