"""The image model reference at work: a catalog name is popped only with its checkpoint,
other names only where the operator allows them; jobs naming a model are held to its
limits and priced by its baseline (SDXL x2) from reservation to settlement."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from client.api.worker_routes import Capabilities
from client.sdk import AsyncClient
from coordinator.config import CoordinatorConfig
from protocol.cost import image_cost
from protocol.image_models import ImageModel
from protocol.params import ImageParams
from tests.conftest import LiveApp, start_app
from tests.coordinator.http.test_horde import Horde
from tests.fakes import FakeWorker, png, register_accounts
from worker.errors import CoordinatorRejected

XL_SHA, SD_SHA, OTHER_SHA = "a1" * 32, "b2" * 32, "c3" * 32
XL = ImageModel(
    name="Tiny XL",
    baseline="sdxl",
    sha256=XL_SHA,
    default_width=128,
    default_height=96,
    max_pixels=256 * 256,
    max_steps=30,
    trigger=("tiny style",),
)
NAUGHTY = ImageModel(
    name="Naughty",
    baseline="sd1",
    sha256=SD_SHA,
    default_width=64,
    default_height=64,
    max_pixels=512 * 512,
    max_steps=50,
    nsfw=True,
)
CAPS: dict[str, Any] = {"max_pixels": 512 * 512, "max_steps": 50}


def _config(base: CoordinatorConfig, allow: bool | None = None) -> CoordinatorConfig:
    return dataclasses.replace(base, image_models=(XL, NAUGHTY), allow_uncatalogued_models=allow)


@pytest.fixture
def sqlite_config(tmp_path: Path) -> CoordinatorConfig:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    return CoordinatorConfig(data_dir=tmp_path / "data", database_url=url, port=0)


@pytest.fixture
async def catalogued(sqlite_config: CoordinatorConfig) -> AsyncIterator[LiveApp]:
    """A coordinator with a reference of two image models (uncatalogued ones: refused)."""
    runner, app = await start_app(_config(sqlite_config))
    try:
        yield app
    finally:
        await runner.cleanup()


async def _post(url: str, body: dict[str, Any], key: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=body, headers={"apikey": key}) as resp,
    ):
        return resp.status, await resp.json()


def _fields(answer: dict[str, Any]) -> dict[str, str]:
    return {f["field"]: f["message"] for f in answer["error"]["fields"]}


async def test_a_catalog_name_is_popped_only_with_its_checkpoint(catalogued: LiveApp) -> None:
    live = catalogued
    (donor,) = await register_accounts(live.url, "donor")
    async with FakeWorker(live.url, "xl", donor) as worker:
        for given, said in ((OTHER_SHA, f"worker holds {OTHER_SHA}"), (None, "reported none")):
            caps = Capabilities(models=["Tiny XL"], checkpoint_sha256=given, **CAPS)
            with pytest.raises(CoordinatorRejected) as refused:
                await worker.link.pop(caps, 0)
            assert refused.value.status == 400
            message = str(refused.value)
            assert XL_SHA in message and said in message
        caps = Capabilities(models=["Tiny XL"], checkpoint_sha256=XL_SHA, baseline="sdxl", **CAPS)
        assert await worker.link.pop(caps, 0) is None
        # a name the reference does not list: refused here (the reference lists some)
        caps = Capabilities(models=["my-merge"], checkpoint_sha256=OTHER_SHA, **CAPS)
        with pytest.raises(CoordinatorRejected, match=r"'my-merge' is not in .* reference"):
            await worker.link.pop(caps, 0)
    # an AI Horde worker cannot report a hash: its catalog names are taken, others not
    bridge = Horde(live.url, donor)
    pop = {"name": "Bridge", "models": ["Naughty"], "max_pixels": 512 * 512}
    assert (await bridge.ok("POST", "/v2/generate/pop", pop))["id"] is None
    pop["models"] = ["my-merge"]
    message = await bridge.error("POST", "/v2/generate/pop", pop, 400, "BadRequest")
    assert "'my-merge' is not in" in message


async def test_uncatalogued_models_where_the_operator_allows_them(
    sqlite_config: CoordinatorConfig,
) -> None:
    runner, live = await start_app(_config(sqlite_config, allow=True))
    try:
        asker, donor = await register_accounts(live.url, "asker", "donor")
        async with AsyncClient(live.url, asker) as grid:
            params = ImageParams(prompt="a cube", width=64, height=64, steps=4, model="my-merge")
            created = await grid.submit_image(params)
            assert created.kudos_cost == image_cost(params)  # priced as sd1
        async with FakeWorker(live.url, "merger", donor) as worker:
            caps = Capabilities(models=["my-merge"], baseline="sdxl", **CAPS)
            job = await worker.link.pop(caps, 0)
            assert job is not None and job.id == created.id
            # the catalog names still need their checkpoint
            with pytest.raises(CoordinatorRejected, match="reported none"):
                await worker.link.pop(Capabilities(models=["my-merge", "Tiny XL"], **CAPS), 0)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{live.url}/api/v1/models/image") as resp,
        ):
            listed = await resp.json()
        assert listed["uncatalogued"] is True
        assert [m["name"] for m in listed["models"]] == ["Tiny XL", "Naughty"]
        assert listed["models"][0]["trigger"] == ["tiny style"]
        assert listed["models"][0]["sha256"] == XL_SHA
    finally:
        await runner.cleanup()


async def test_jobs_are_held_to_their_models_limits(catalogued: LiveApp) -> None:
    live = catalogued
    (asker,) = await register_accounts(live.url, "asker")
    url = f"{live.url}/api/v1/jobs/image"
    base = {"prompt": "a cube", "model": "Tiny XL", "steps": 4}
    for extra, field in (
        ({"width": 512, "height": 256}, "width"),
        ({"steps": 31}, "steps"),
    ):
        status, answer = await _post(url, {**base, **extra}, asker)
        assert status == 400 and "Tiny XL" in _fields(answer)[field], answer
    status, answer = await _post(url, {**base, "model": "my-merge"}, asker)
    assert status == 400 and "Tiny XL, Naughty" in _fields(answer)["model"]
    # an NSFW model only for NSFW requests
    status, answer = await _post(url, {**base, "model": "Naughty"}, asker)
    assert status == 400 and "nsfw=true" in _fields(answer)["nsfw"]
    async with AsyncClient(live.url, asker) as grid:
        naughty = ImageParams(prompt="a cube", width=64, height=64, steps=4, model="Naughty")
        await grid.submit_image(naughty, nsfw=True)
    # a request that gives no size gets the model's default
    status, answer = await _post(url, base, asker)
    assert status == 202, answer
    async with AsyncClient(live.url, asker) as grid:
        params = (await grid.job(answer["id"])).params
    assert params is not None and (params.width, params.height) == (128, 96)
    # AI Horde's door: the same limits, named where its clients put them
    horde = Horde(live.url, asker)
    body: dict[str, Any] = {"prompt": "a cube", "models": ["Tiny XL"], "params": {"steps": 40}}
    for dry in (False, True):
        message = await horde.error(
            "POST", "/v2/generate/async", {**body, "dry_run": dry}, 400, "BadRequest"
        )
        assert "params.steps" in message
    body = {"prompt": "a cube", "models": ["Naughty"], "params": {"steps": 4}}
    assert "nsfw" in await horde.error("POST", "/v2/generate/async", body, 400, "BadRequest")
    created = await horde.ok("POST", "/v2/generate/async", {**body, "nsfw": True}, 202)
    async with AsyncClient(live.url, asker) as grid:
        params = (await grid.job(created["id"])).params
    assert params is not None and (params.width, params.height) == (64, 64)


async def test_status_models_tells_known_from_custom(sqlite_config: CoordinatorConfig) -> None:
    runner, live = await start_app(_config(sqlite_config, allow=True))
    try:
        (donor,) = await register_accounts(live.url, "donor")
        async with FakeWorker(live.url, "xl", donor) as xl, FakeWorker(live.url, "merge") as merge:
            caps = Capabilities(models=["Tiny XL"], checkpoint_sha256=XL_SHA, **CAPS)
            await xl.link.pop(caps, 0)
            await merge.link.pop(Capabilities(models=["my-merge"], **CAPS), 0)
            horde = Horde(live.url)
            names = {}
            for state in ("known", "custom", "all"):
                models = await horde.ok("GET", f"/v2/status/models?model_state={state}")
                names[state] = sorted(m["name"] for m in models)
        assert names == {
            "known": ["Tiny XL"],
            "custom": ["my-merge"],
            "all": ["Tiny XL", "my-merge"],
        }
    finally:
        await runner.cleanup()


async def test_an_sdxl_job_costs_twice_from_reservation_to_settlement(
    coordinator_config: CoordinatorConfig,
) -> None:
    """On SQLite and PostgreSQL: the cost reserved is the one paid out, and the ledger holds."""
    config = dataclasses.replace(_config(coordinator_config), trusted_accounts=frozenset({"donor"}))
    runner, live = await start_app(config)
    try:
        asker, donor = await register_accounts(live.url, "asker", "donor")
        params = ImageParams(prompt="a cube", width=256, height=256, steps=16, model="Tiny XL")
        plain = params.model_copy(update={"model": None})
        async with AsyncClient(live.url, asker) as grid:
            before = (await grid.me()).kudos
            quote = await grid.quote_image(params)
            # a job naming no model is priced as sd1: an SDXL-only worker does not take it
            unnamed = await grid.submit_image(plain)
            created = await grid.submit_image(params)
            cost = created.kudos_cost
            assert cost == quote.kudos_cost == image_cost(params, "sdxl")
            assert image_cost(plain) == 2 and cost == 4
            assert (await grid.me()).kudos == before - cost - unnamed.kudos_cost
            dry = await Horde(live.url, asker).ok(
                "POST",
                "/v2/generate/async",
                {
                    "prompt": "a cube",
                    "models": ["Tiny XL"],
                    "params": {"width": 256, "height": 256, "steps": 16},
                    "dry_run": True,
                },
            )
            assert dry["kudos"] == cost
        async with FakeWorker(live.url, "xl", donor) as worker:
            caps = Capabilities(models=["Tiny XL"], checkpoint_sha256=XL_SHA, **CAPS)
            job = await worker.link.pop(caps, 0)
            assert job is not None and job.id == created.id
            accepted = await worker.link.submit(job, job.params.seeds(), [png(1, 256, 256)])
        assert accepted.kudos_earned + accepted.kudos_held == cost
        async with AsyncClient(live.url, asker) as grid:
            assert (await grid.me()).kudos == before - cost - unnamed.kudos_cost
            assert (await grid.job(unnamed.id)).state == "queued"
        audit = await live.store.ledger.audit()
        assert audit["unbalanced_entries"] == 0 and audit["balance_rows_off"] == 0
        assert audit["transferable_excess"] == 0
    finally:
        await runner.cleanup()
