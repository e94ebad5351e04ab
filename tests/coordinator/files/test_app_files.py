"""The coordinator over either file store (in process): an AI Horde worker's image is
stored, sent inline as WebP and as a download, and deleted when its requester disputes it."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from coordinator.config import CoordinatorConfig
from coordinator.files import LocalFiles
from coordinator.http.state import FILES
from protocol.signing import sha256_hex
from tests.conftest import (
    POSTGRES_URL,
    LiveApp,
    _drop_postgres_database,
    _postgres_database,
    start_app,
)
from tests.coordinator.http.test_horde import Horde, request, webp
from tests.fakes import register_accounts

POP = {"name": "My Bridge", "models": ["tiny"], "max_pixels": 512 * 512, "amount": 1}


@pytest.fixture(params=["local", pytest.param("database", marks=pytest.mark.postgres)])
async def live_files(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LiveApp]:
    """A coordinator with `--file-store local` (on SQLite) or `database` (on PostgreSQL)."""
    async with contextlib.AsyncExitStack() as stack:
        database_url = None
        if request.param == "database":
            created = await _postgres_database()
            if created is None:
                pytest.skip(f"no PostgreSQL server reachable at {POSTGRES_URL}")
            name, database_url = created
            stack.push_async_callback(_drop_postgres_database, name)
        config = CoordinatorConfig(
            data_dir=tmp_path / "data", database_url=database_url, port=0, file_store=request.param
        )
        runner, app = await start_app(config)
        stack.push_async_callback(runner.cleanup)
        yield app


async def test_stored_inline_downloaded_and_deleted_by_a_dispute(
    live_files: LiveApp, tmp_path: Path
) -> None:
    live = live_files
    alice_key, owner_key = await register_accounts(live.url, "alice", "bridge")
    alice, bridge = Horde(live.url, alice_key), Horde(live.url, owner_key)
    wanted = await alice.ok("POST", "/v2/generate/async", {**request(), "r2": False}, 202)
    leased = await bridge.ok("POST", "/v2/generate/pop", POP)
    assert leased["id"] == wanted["id"]
    submit = {"id": leased["id"], "seed": 11, "state": "ok", "generation": webp((9, 9, 9))}
    await bridge.ok("POST", "/v2/generate/submit", submit)

    status = await alice.ok("GET", f"/v2/generate/status/{wanted['id']}")
    inline = Image.open(io.BytesIO(base64.b64decode(status["generations"][0]["img"])))
    assert inline.format == "WEBP" and inline.getpixel((5, 5)) == (9, 9, 9)
    url = f"{live.url}/api/v1/jobs/{wanted['id']}/images/0"
    async with (
        aiohttp.ClientSession(headers={"apikey": alice_key}) as http,
        http.get(url) as resp,
    ):
        assert resp.status == 200 and resp.headers["Content-Type"] == "image/png"
        png = await resp.read()
    files = live.app[FILES]
    digest = sha256_hex(png)
    assert await files.size(digest) == len(png)
    stored_on_disk = list((tmp_path / "data").rglob("*.png"))
    assert len(stored_on_disk) == (1 if isinstance(files, LocalFiles) else 0)

    async with (
        aiohttp.ClientSession(headers={"apikey": alice_key}) as http,
        http.post(f"{live.url}/api/v1/jobs/{wanted['id']}/dispute", json={"reason": "x"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
    assert not await files.exists(digest)
    assert list((tmp_path / "data").rglob("*.png")) == []


async def test_a_result_sent_back_as_a_source_image_outlives_a_dispute(
    live_files: LiveApp,
) -> None:
    """The source of an img2img job is stored content-addressed beside the results; when
    its bytes are a disputed result's, the dispute does not delete the file the job needs."""
    live = live_files
    alice_key, owner_key = await register_accounts(live.url, "alice", "bridge")
    alice, bridge = Horde(live.url, alice_key), Horde(live.url, owner_key)
    wanted = await alice.ok("POST", "/v2/generate/async", request(), 202)
    leased = await bridge.ok("POST", "/v2/generate/pop", POP)
    submit = {"id": leased["id"], "seed": 11, "state": "ok", "generation": webp((9, 9, 9))}
    await bridge.ok("POST", "/v2/generate/submit", submit)
    url = f"{live.url}/api/v1/jobs/{wanted['id']}/images/0"
    async with (
        aiohttp.ClientSession(headers={"apikey": alice_key}) as http,
        http.get(url) as resp,
    ):
        png = await resp.read()
    again = {**request(), "source_image": base64.b64encode(png).decode()}
    await alice.ok("POST", "/v2/generate/async", again, 202)
    async with (
        aiohttp.ClientSession(headers={"apikey": alice_key}) as http,
        http.post(f"{live.url}/api/v1/jobs/{wanted['id']}/dispute", json={"reason": "x"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
    assert await live.app[FILES].size(sha256_hex(png)) == len(png)
    # and the AI Horde worker that takes the img2img job gets it inline
    popped = await bridge.ok("POST", "/v2/generate/pop", POP)
    assert base64.b64decode(popped["source_image"]) == png
