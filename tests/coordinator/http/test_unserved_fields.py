"""Fields a client sends that we cannot honour yet get a 400 naming them, and cost nothing;
sent at their "off" values (as AI Horde's clients do by default) they are accepted."""

from __future__ import annotations

import pytest

from client.errors import ApiError
from client.sdk import AsyncClient
from protocol.params import ImageParams
from tests.conftest import LiveApp
from tests.coordinator.http.test_horde import Horde, request, webp
from tests.fakes import register_accounts


async def _kudos(horde: Horde) -> float:
    return float((await horde.ok("GET", "/v2/find_user"))["kudos"])


@pytest.mark.parametrize(
    ("extra", "params", "named"),
    [
        ({"source_image": webp((9, 9, 9)), "source_processing": "remix"}, {}, "source_processing"),
        ({"source_image": webp((9, 9, 9)), "extra_source_images": [{}]}, {}, "extra_source_images"),
        ({"source_processing": "sideways"}, {}, "source_processing"),
        ({}, {"post_processing": ["NoSuchUpscaler_x9"]}, "params.post_processing"),
        ({}, {"post_processing": ["CodeFormers"]}, "params.post_processing"),
        ({}, {"post_processing": ["NMKD_Siax", "4x_AnimeSharp"]}, "params.post_processing"),
        ({"source_image": webp((9, 9, 9))}, {"hires_fix": True}, "params.hires_fix"),
        # LoRAs and TIs are served (protocol.loras), within AI Horde's limits
        ({}, {"loras": [{"name": str(i)} for i in range(6)]}, "params.loras"),
        ({}, {"loras": [{"name": "1234", "model": 9.0}]}, "params.loras[0].model"),
        ({}, {"tis": [{"name": str(i)} for i in range(21)]}, "params.tis"),
        ({}, {"control_type": "canny"}, "params.control_type"),
        ({}, {"clip_skip": 13}, "params.clip_skip"),
        ({}, {"sampler_name": "DDIM", "karras": True}, "params.karras"),
        ({"workers": ["a" * 32]}, {}, "workers"),
    ],
)
async def test_a_v2_image_field_we_cannot_honour_is_named_and_costs_nothing(
    live: LiveApp, extra: dict[str, object], params: dict[str, object], named: str
) -> None:
    (key,) = await register_accounts(live.url, "picky")
    horde = Horde(live.url, key)
    before = await _kudos(horde)
    got, answer = await horde.call("POST", "/v2/generate/async", {**request(**params), **extra})
    assert got == 400, answer
    assert named in answer["errors"], answer
    assert await _kudos(horde) == before


async def test_off_values_of_those_fields_are_accepted(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "plain")
    off = {
        "post_processing": [],
        "loras": [],
        "tis": [],
        "hires_fix": False,
        # clients send null for what they leave unset
        "hires_fix_denoising_strength": None,
        "facefixer_strength": None,
        "clip_skip": 1,
        "control_type": None,
        "seed_variation": 1,
        "denoising_strength": 0.75,  # only meaningful with a source image
    }
    body = {**request(**off), "source_image": "", "source_processing": "img2img", "workers": []}
    created = await Horde(live.url, key).ok("POST", "/v2/generate/async", body, 202)
    assert created["id"]


async def test_v1_source_processing_without_a_source_image_is_refused(live: LiveApp) -> None:
    (key,) = await register_accounts(live.url, "early")
    async with AsyncClient(live.url, key) as grid:
        before = (await grid.me()).kudos
        params = ImageParams(prompt="a cube", width=64, height=64, steps=4)
        for mode in ("img2img", "inpainting", "outpainting"):
            with pytest.raises(ApiError, match="source_image"):
                await grid.submit_image(params.model_copy(update={"source_processing": mode}))
        assert (await grid.me()).kudos == before
