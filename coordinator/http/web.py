"""The web page: GET / is coordinator/static/index.html, GET /static/{name} the files beside it,
GET /static/page/{name} the page's ES modules (coordinator/static/page/, imported by app.js).

Only files that exist directly in those directories are served (a name is looked up in the
directory's listing, never joined onto a path), with a Content-Security-Policy that allows
nothing but this origin's own scripts (module scripts included), styles and connections, and
images from blob:/data: URLs (the page fetches result images with the API key header and
shows them as blobs).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from aiohttp import web

from coordinator.errors import NotFound
from coordinator.http.api import API, Call

__all__ = ["MODULES_DIR", "PAGE_CSP", "STATIC_DIR", "serve_static"]

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MODULES_DIR = STATIC_DIR / "page"

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}


def _read(folder: Path, name: str) -> bytes | None:
    """The bytes of the file `name` in `folder`, or None unless it is a file listed there."""
    try:
        listed = {entry.name: entry for entry in folder.iterdir() if entry.is_file()}
    except FileNotFoundError:
        return None
    entry = listed.get(name)
    return None if entry is None or name.startswith(".") else entry.read_bytes()


async def serve_static(
    request: web.Request,
    name: str,
    csp: str = PAGE_CSP,
    where: str = "/",
    folder: Path = STATIC_DIR,
) -> web.Response:
    """The file `name` of `folder` under the policy `csp` (404 naming `where` the page is)."""
    body = await asyncio.to_thread(_read, folder, name)
    content_type = _TYPES.get(Path(name).suffix.lower())
    if body is None or content_type is None:
        raise NotFound(f"no file {name!r} here; the page is at {where}")
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {
        "Content-Type": content_type,
        # revalidated every time (cheap with the ETag), so an upgrade shows at once
        "Cache-Control": "no-cache",
        "ETag": etag,
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, headers=headers)


@API.route("GET", "/", summary="The web page (HTML)", produces="text/html", errors=(404,))
async def index_page(request: web.Request, call: Call[None]) -> web.StreamResponse:
    return await serve_static(request, "index.html")


@API.route(
    "GET",
    "/static/{name}",
    summary="The web page's scripts, styles and icons",
    produces="application/octet-stream",
    errors=(404,),
)
async def static_file(request: web.Request, call: Call[None]) -> web.StreamResponse:
    return await serve_static(request, request.match_info["name"])


@API.route(
    "GET",
    "/static/page/{name}",
    summary="The web page's JavaScript modules",
    produces="text/javascript",
    errors=(404,),
)
async def page_module(request: web.Request, call: Call[None]) -> web.StreamResponse:
    return await serve_static(request, request.match_info["name"], folder=MODULES_DIR)
