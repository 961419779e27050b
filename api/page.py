"""The pages for people: the web page at / (plain HTML, CSS and a small script from
api/static, no toolchain), and /docs, Swagger UI on the served OpenAPI document. Both talk
to the public API like any client, and load nothing from another origin: Swagger UI's
files come from the swagger-ui-bundle-v2 package and are served from here."""

from __future__ import annotations

import functools
from pathlib import Path

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from shared import errors

STATIC = Path(__file__).resolve().parent / "static"
SWAGGER_UI = Path(str(swagger_ui_path))
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
}
PAGE_ASSETS = ("app.js", "style.css")
# The explorer's files: its settings (ours), and Swagger UI's as the package ships them.
DOCS_OWN = ("docs.js",)
DOCS_ASSETS = (*DOCS_OWN, "swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
# Each page may talk only to this origin and run only its own scripts. Swagger UI sets
# style attributes from its script, which a policy without 'unsafe-inline' styles blocks.
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'"
DOCS_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "object-src 'none'; frame-ancestors 'none'"
)


@functools.cache
def _read(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def _file(name: str, policy: str = PAGE_POLICY) -> web.Response:
    response = web.Response(body=_read(name))
    response.content_type = CONTENT_TYPES[Path(name).suffix]
    response.charset = "utf-8"
    response.headers["Content-Security-Policy"] = policy
    return response


async def page(request: web.Request) -> web.Response:
    return _file("index.html")


async def page_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in PAGE_ASSETS:
        raise errors.PageNotFound(f"No page asset {name!r}")
    return _file(name)


async def docs(request: web.Request) -> web.Response:
    return _file("docs.html", DOCS_POLICY)


async def docs_asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in DOCS_ASSETS:
        raise errors.PageNotFound(f"No asset {name!r} of /docs")
    if name in DOCS_OWN:
        return _file(name, DOCS_POLICY)
    # Swagger UI's files are large (1.5 MB of script): sent from disk, with validators
    # (ETag, Last-Modified) so that a browser asks for them again only when they change.
    content_type = CONTENT_TYPES[Path(name).suffix]
    return web.FileResponse(
        SWAGGER_UI / name,
        headers={
            "Content-Type": content_type
            + ("; charset=utf-8" if content_type.startswith("text/") else ""),
            "Content-Security-Policy": DOCS_POLICY,
        },
    )
