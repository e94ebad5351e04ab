"""The API's documentation page: GET /api/docs renders /api/v1/openapi.json in the browser.

Three files of coordinator/static (docs.html, docs.js, docs.css), served here under a
Content-Security-Policy that allows this origin's scripts, styles and connections only: the
page works offline and loads nothing from elsewhere. GET /docs redirects to it.
"""

from __future__ import annotations

from aiohttp import web

from coordinator.errors import NotFound
from coordinator.http.api import API, Call
from coordinator.http.web import serve_static

__all__ = ["DOCS_CSP", "DOCS_PATH"]

DOCS_PATH = "/api/docs"

DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# nothing else in the directory is reachable here
_FILES = ("docs.html", "docs.js", "docs.css")


async def _serve(request: web.Request, name: str) -> web.Response:
    if name not in _FILES:
        raise NotFound(f"no file {name!r} here; the documentation is at {DOCS_PATH}")
    return await serve_static(request, name, DOCS_CSP, DOCS_PATH)


@API.route("GET", DOCS_PATH, summary="This API's documentation (HTML)", produces="text/html")
async def docs_page(request: web.Request, call: Call[None]) -> web.StreamResponse:
    return await _serve(request, "docs.html")


@API.route(
    "GET",
    DOCS_PATH + "/{name}",
    summary="The documentation page's script and styles (docs.js, docs.css)",
    produces="application/octet-stream",
    errors=(404,),
)
async def docs_asset(request: web.Request, call: Call[None]) -> web.StreamResponse:
    name = request.match_info["name"]
    if name == "docs.html":
        raise NotFound(f"the documentation page is at {DOCS_PATH}")
    return await _serve(request, name)


@API.route("GET", "/docs", summary="Redirects to /api/docs", status=302)
async def docs_redirect(request: web.Request, call: Call[None]) -> web.StreamResponse:
    raise web.HTTPFound(DOCS_PATH)
