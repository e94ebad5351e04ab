"""Jobs with LoRAs and textual inversions at the coordinator: both doors take them (AI
Horde's fields), price them with AI Horde's add-ons, bound them (5 and 20), and offer them
only to workers that take them."""

from __future__ import annotations

import pytest

from client.api.worker_routes import Capabilities
from client.errors import ApiError
from client.sdk import AsyncClient
from protocol.cost import image_cost
from protocol.loras import LoraSpec, ResolvedAdapter, TiSpec
from protocol.messages import LeasedJob
from protocol.params import ImageParams
from protocol.signing import params_hash
from tests.conftest import LiveApp
from tests.coordinator.http.test_horde import Horde, request
from tests.fakes import FakeWorker, png, register_accounts
from worker.errors import CoordinatorRejected

LORA = {"name": "Tiny Style", "model": 0.8, "clip": 0.5, "inject_trigger": "any"}
TI = {"name": "222", "inject_ti": "negprompt", "strength": 0.5}
CAPS = {"models": ["tiny"], "max_pixels": 64 * 64, "max_steps": 50}


async def test_v2_takes_loras_and_tis_as_ai_horde_names_them(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "horde")
    horde = Horde(live.url, key)
    lora = {**LORA, "is_version": False}
    body = request(loras=[lora, {"name": "1234", "is_version": True}], tis=[TI, {"name": "x"}])
    dry = await horde.ok("POST", "/v2/generate/async", {**body, "dry_run": True})
    created = await horde.ok("POST", "/v2/generate/async", body, 202)
    async with AsyncClient(live.url, key) as grid:
        params = (await grid.job(created["id"])).params
    assert params is not None
    assert [lora.model_dump() for lora in params.loras] == [
        {"name": "Tiny Style", "model": 0.8, "clip": 0.5, "inject_trigger": "any"},
        {"name": "1234", "model": 1.0, "clip": 1.0, "is_version": True},
    ]
    assert [ti.model_dump() for ti in params.tis] == [TI, {"name": "x"}]
    # AI Horde's add-ons: 3 per LoRA, 1 for any TIs
    assert created["kudos"] == dry["kudos"] == image_cost(params)
    assert image_cost(params) == image_cost(params.model_copy(update={"loras": [], "tis": []})) + 7


async def test_v1_bounds_them_naming_the_field(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "greedy")
    base = ImageParams(prompt="a cube", width=64, height=64, steps=4)
    async with AsyncClient(live.url, key) as grid:
        before = (await grid.me()).kudos
        for field, specs in (
            ("loras", [LoraSpec.model_construct(name=str(i)) for i in range(6)]),
            ("tis", [TiSpec.model_construct(name=str(i)) for i in range(21)]),
            ("loras", [LoraSpec.model_construct(name="  ")]),
        ):
            with pytest.raises(ApiError, match=field):
                # (unvalidated: the coordinator is the one to refuse it)
                await grid.submit_image(base.model_copy(update={field: specs}))
        assert (await grid.me()).kudos == before


async def test_only_workers_that_take_loras_are_offered_them(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "asker")
    async with AsyncClient(live.url, key) as grid:
        params = ImageParams.model_validate(
            {"prompt": "a cube", "width": 64, "height": 64, "steps": 4, "tis": [TI]}
        )
        created = await grid.submit_image(params)
    async with FakeWorker(live.url, "plain") as plain, FakeWorker(live.url, "lora") as taker:
        assert await plain.link.pop(Capabilities(**CAPS, img2img=True), 0) is None
        job = await taker.link.pop(Capabilities(**CAPS, loras=True), 0)
        assert job is not None and job.id == created.id
        assert job.params.tis == params.tis


def _used(job: LeasedJob, sha: str = "ab" * 32) -> list[ResolvedAdapter]:
    return [
        ResolvedAdapter(kind="lora", name=spec.name, version_id=1000 + i, sha256=sha)
        for i, spec in enumerate(job.params.loras)
    ] + [
        ResolvedAdapter(kind="ti", name=spec.name, version_id=7, sha256=sha)
        for spec in job.params.tis
    ]


async def test_the_spot_check_reruns_the_versions_and_files_the_result_signed(
    checked_network: LiveApp,
) -> None:
    live = checked_network
    requester, donor, operator = await register_accounts(live.url, "asker", "donor", "operator")
    async with AsyncClient(live.url, requester) as grid:
        params = ImageParams.model_validate(
            {
                "prompt": "a cube",
                "width": 64,
                "height": 64,
                "steps": 4,
                "seed": 3,
                "loras": [LORA, {"name": "9"}],
                "tis": [TI],
            }
        )
        await grid.submit_image(params)
    caps = Capabilities(**CAPS, loras=True)
    async with (
        FakeWorker(live.url, "newcomer", donor) as newcomer,
        FakeWorker(live.url, "referee", operator) as referee,
    ):
        job = await newcomer.link.pop(caps, wait=0)
        assert job is not None
        # a result must name what it used, in the job's order, signed
        with pytest.raises(CoordinatorRejected, match="adapters"):
            await newcomer.link.submit(job, job.params.seeds(), [png(1)])
        with pytest.raises(CoordinatorRejected, match="adapters"):
            await newcomer.link.submit(job, job.params.seeds(), [png(1)], _used(job)[::-1])
        await newcomer.link.submit(job, job.params.seeds(), [png(1)], _used(job))
        check = await referee.link.pop(caps, wait=5)
        assert check is not None and check.id != job.id
        pins = [(s.name, s.version_id, s.sha256) for s in [*check.params.loras, *check.params.tis]]
        assert pins == [
            ("Tiny Style", 1000, "ab" * 32),
            ("9", 1001, "ab" * 32),
            ("222", 7, "ab" * 32),
        ]
        # everything else as the original asked (strengths, trigger words, the TI's token)
        unpinned = {"version_id": None, "sha256": None}
        assert (
            check.params.model_copy(
                update={
                    "loras": [s.model_copy(update=unpinned) for s in check.params.loras],
                    "tis": [s.model_copy(update=unpinned) for s in check.params.tis],
                }
            )
            == job.params
        )
        assert check.params_hash == params_hash(check.params) != job.params_hash
        # the re-run must report the pinned files
        with pytest.raises(CoordinatorRejected, match="adapters"):
            await referee.link.submit(check, check.params.seeds(), [png(1)], _used(job, "cd" * 32))
        await referee.link.submit(check, check.params.seeds(), [png(1)], _used(job))
