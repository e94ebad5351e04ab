"""GET /api/docs: the offline API documentation page and its assets."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import pytest

from coordinator.config import CoordinatorConfig
from tests.conftest import LiveApp, start_app


@pytest.fixture
async def live(sqlite_only_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """The page does not touch the database: SQLite only."""
    runner, app = await start_app(sqlite_only_config)
    try:
        yield app
    finally:
        await runner.cleanup()


async def test_docs_page_and_assets_are_served_offline(live: LiveApp) -> None:
    bodies: dict[str, str] = {}
    async with aiohttp.ClientSession() as http:
        for path, media in (
            ("/api/docs", "text/html"),
            ("/api/docs/docs.js", "text/javascript"),
            ("/api/docs/docs.css", "text/css"),
        ):
            async with http.get(live.url + path) as resp:
                assert resp.status == 200, path
                assert resp.content_type == media
                csp = resp.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "connect-src 'self'" in csp
                assert "unsafe-inline" not in csp
                assert resp.headers["X-Content-Type-Options"] == "nosniff"
                bodies[path] = await resp.text()
        async with http.get(f"{live.url}/docs", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/api/docs"
        # only the page's own files: not the rest of the directory, not a path outside it
        for name in ("docs.html", "index.html", "..%2Fhttp%2Fdocs.py", "nothing.js"):
            async with http.get(f"{live.url}/api/docs/{name}") as resp:
                assert resp.status == 404, name
                assert (await resp.json())["error"]["code"] == "not_found"
        async with http.get(f"{live.url}/api/v1/openapi.json") as resp:
            spec = await resp.json()

    page = bodies["/api/docs"]
    assert '<script src="/api/docs/docs.js"' in page
    assert 'href="/api/docs/docs.css"' in page
    # the CSP forbids inline script and style: everything lives in the two files
    assert re.search(r"<script(?![^>]*\bsrc=)", page) is None
    assert "<style" not in page and re.search(r"\s(style|on\w+)=", page) is None
    for body in bodies.values():
        assert re.search(r"https?://", body) is None
    script = bodies["/api/docs/docs.js"]
    assert "fetch(SPEC_URL" in script and '"/api/v1/openapi.json"' in script
    assert "innerHTML" not in script and "eval(" not in script
    # the page documents itself, the metrics and every other operation the spec lists
    assert "/api/docs" in spec["paths"] and "/metrics" in spec["paths"]
