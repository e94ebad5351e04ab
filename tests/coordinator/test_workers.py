"""`idlegrid coordinator --require-sandbox`: workers whose compute is not confined (started
with --unsandboxed, or too old to say) get no jobs and cannot link block servers."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from coordinator.config import CoordinatorConfig
from protocol.signing import Identity
from protocol.text import BUILTIN_TEXT_MODELS
from tests.conftest import LiveApp
from tests.fakes import CAPS, register_accounts
from worker.common.link import CoordinatorLink
from worker.errors import CoordinatorRejected
from worker.llm.swarm.peer_proof import PeerKey


@pytest.fixture
def coordinator_config(tmp_path: Path, database_url: str) -> CoordinatorConfig:
    return CoordinatorConfig(
        data_dir=tmp_path / "data", database_url=database_url, port=0, require_sandbox=True
    )


async def _refused(call: object) -> CoordinatorRejected:
    with pytest.raises(CoordinatorRejected) as caught:
        await call  # type: ignore[misc]
    assert caught.value.status == 403
    assert "serves only workers whose engine runs confined" in str(caught.value)
    return caught.value


@pytest.mark.parametrize("reported", [None, False])
async def test_an_unconfined_or_silent_worker_gets_no_work(
    live: LiveApp, reported: bool | None
) -> None:
    link = CoordinatorLink(live.url, Identity.generate(), "daring", None)
    try:
        await link.register()
        if reported is not None:
            await _refused(link.report_engine({"engine": "diffusers", "sandboxed": reported}))
        await _refused(link.pop(CAPS, 0))
        await _refused(link.pop_text([BUILTIN_TEXT_MODELS[0]], 0))
        await _refused(link.link_peer(PeerKey.generate()))
    finally:
        await link.aclose()


async def test_a_confined_worker_is_served(live: LiveApp) -> None:
    link = CoordinatorLink(live.url, Identity.generate(), "careful", None)
    try:
        await link.register()
        await link.report_engine({"engine": "diffusers", "sandboxed": True})
        assert await link.pop(CAPS, 0) is None  # asked, and nothing queued
        assert await link.pop_text([BUILTIN_TEXT_MODELS[0]], 0) is None
        await link.link_peer(PeerKey.generate())
    finally:
        await link.aclose()


async def test_ai_horde_workers_are_turned_away(live: LiveApp) -> None:
    """AI Horde's workers run whatever engine they like, unconfined as far as we know."""
    (key,) = await register_accounts(live.url, "bridge-owner")
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{live.url}/api/v2/generate/pop",
            json={"name": "bridge", "models": ["tiny"]},
            headers={"apikey": key},
        ) as resp,
    ):
        assert resp.status == 403
        assert (await resp.json())["rc"] == "Forbidden"
