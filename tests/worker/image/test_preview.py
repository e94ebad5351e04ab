"""Live previews on the worker's side: the latent -> RGB map, the JPEG, the cadence, the
gate that decides which previews are sent, and the real engine emitting them."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from protocol.engine import ImageProgress
from protocol.preview import PREVIEW_MAX_BYTES, PREVIEW_MAX_SIDE, decode_preview
from protocol.signing import Identity
from worker.image.preview import Previewer, encode_preview, latent_rgb
from worker.image.worker import PreviewGate


def _latent(channel: int, value: float, size: int = 8) -> torch.Tensor:
    latent = torch.zeros(4, size, size)
    latent[channel] = value
    return latent


def _colour(latent: torch.Tensor, baseline: Any) -> np.ndarray:
    colour: np.ndarray = latent_rgb(latent, baseline)[0, 0].astype(int)
    return colour


def test_latent_rgb_is_a_uint8_picture_of_the_latent_size() -> None:
    latent = torch.randn(4, 12, 20, generator=torch.Generator().manual_seed(0)) * 3
    for baseline in ("sd1", "sd2", "sdxl"):
        rgb = latent_rgb(latent, baseline)
        assert rgb.shape == (12, 20, 3) and rgb.dtype == np.uint8
        # clamped at both ends by latents this large, not wrapped around
        assert rgb.min() == 0 and rgb.max() == 255
    # zero latents: mid-grey for SD 1.x, SDXL's bias tints it (red up a little)
    assert tuple(_colour(torch.zeros(4, 2, 2), "sd1")) == (128, 128, 128)
    red, green, blue = _colour(torch.zeros(4, 2, 2), "sdxl")
    assert red > green and red > blue


def test_latent_rgb_colour_directions_of_the_published_factors() -> None:
    # SD 1.x: channel 0 is luminance, channel 2 runs red (-) to cyan (+), channel 3 blue (-)
    assert (_colour(_latent(0, 2.5), "sd1") > 200).all()
    assert (_colour(_latent(0, -2.5), "sd1") < 60).all()
    red, green, blue = _colour(_latent(2, -2.0), "sd1")
    assert red > 180 and red > green + 40 and red > blue + 40
    red, green, blue = _colour(_latent(3, -1.5), "sd1")
    assert blue > red + 60 and blue > green + 60
    # SDXL: channel 0 luminance, channel 1 blue (+) against red (-)
    assert (_colour(_latent(0, 2.5), "sdxl") > 200).all()
    red, green, blue = _colour(_latent(1, 2.0), "sdxl")
    assert blue > red + 60
    red, green, blue = _colour(_latent(1, -2.0), "sdxl")
    assert red > blue + 60
    # SD 2 shares SD 1's VAE and factors
    latent = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(latent_rgb(latent, "sd1"), latent_rgb(latent, "sd2"))


def test_latent_rgb_refuses_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(4, height, width\)"):
        latent_rgb(torch.zeros(16, 8, 8), "sd1")


def test_encode_preview_is_a_small_decodable_jpeg() -> None:
    noise = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode_preview(noise)
    assert len(data) <= PREVIEW_MAX_BYTES
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.size == (64, 64)
    # an SDXL latent of a 2048x4096 image: shrunk to the bound, still within the bytes
    large = np.random.default_rng(3).integers(0, 256, (512, 256, 3), dtype=np.uint8)
    data = encode_preview(large)
    assert len(data) <= PREVIEW_MAX_BYTES
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (PREVIEW_MAX_SIDE // 2, PREVIEW_MAX_SIDE)


def test_previewer_cadence_skips_the_last_step_and_can_be_off() -> None:
    latents = {"latents": torch.zeros(2, 4, 8, 8)}
    every_two = Previewer("sd1", 2)
    made = [step for step in range(1, 7) if every_two(step, 6, latents) is not None]
    assert made == [2, 4]
    assert Previewer("sd1", 0)(2, 6, latents) is None
    # nothing to show: no latents, or latents of another shape
    assert every_two(2, 6, {}) is None
    assert every_two(2, 6, {"latents": torch.zeros(1, 16, 8, 8)}) is None
    preview = every_two(2, 6, latents)
    assert preview is not None
    assert decode_preview(preview)[1] == "image/jpeg"


def test_preview_gate_sends_only_when_wanted_and_at_most_once_an_interval() -> None:
    gate = PreviewGate(1.0)
    assert gate.take("a", 0.0) is None  # nobody watches (yet)
    gate.wanted = True
    assert gate.take(None, 0.1) is None
    assert gate.take("b", 0.2) == "b"
    assert gate.take("c", 0.9) is None  # within the interval
    assert gate.take("d", 1.3) == "d"
    gate.wanted = False
    assert gate.take("e", 5.0) is None


@pytest.mark.slow
def test_the_engine_emits_decodable_previews_every_k_steps(tiny_sd: Path) -> None:
    from worker.image.engine import ImageEngine

    engine = ImageEngine({"model": str(tiny_sd), "threads": 1, "preview_every": 2})
    events: list[dict[str, object]] = []
    fields = {"prompt": "a red cat", "width": 64, "height": 64, "steps": 5, "seed": 3, "n": 2}
    engine.handle("image", fields, events.append)
    progress = [ImageProgress.model_validate(event) for event in events]
    with_preview = [(p.image, p.step) for p in progress if p.preview is not None]
    # both images sample as one batch: its steps 2 and 4 (a preview of its first image)
    # are reported where one-by-one rendering would be after the same work (4 and 8
    # image-steps: worker.image.batch.BatchProgress)
    assert with_preview == [(0, 4), (1, 3)]
    for event in progress:
        if event.preview is not None:
            with Image.open(io.BytesIO(base64.b64decode(event.preview))) as image:
                # the latent size: 64 pixels / the VAE's factor of 8
                assert image.format == "JPEG" and image.size == (8, 8)


@pytest.mark.slow
async def test_previews_travel_from_the_sandboxed_engine_to_the_stream_that_asked(
    tiny_sd: Path, tmp_path: Path
) -> None:
    """The whole road: the real engine in its sandbox makes previews, the real worker sends
    them once the coordinator says a stream with previews watches, the stream gets them
    before the result; a stream that did not ask gets none."""
    from client.sdk import AsyncClient
    from coordinator.config import CoordinatorConfig
    from protocol.messages import JobStatus
    from protocol.params import ImageParams
    from protocol.preview import JobPreview
    from tests.conftest import start_app
    from tests.preview_streams import Collected
    from worker.common.link import CoordinatorLink
    from worker.image.config import ImageWorkerConfig
    from worker.image.worker import ImageWorker

    runner, live = await start_app(CoordinatorConfig(data_dir=tmp_path / "data", port=0))
    config = ImageWorkerConfig(
        coordinator=live.url,
        model=str(tiny_sd),
        model_config=None,
        model_name="sd",
        name="previewer",
        identity_file=tmp_path / "id.key",
        threads=1,
        load_timeout=120,
        progress_interval=0.0,
        preview_every=1,
        preview_interval=0.0,
    )
    link = CoordinatorLink(live.url, Identity.generate(), config.name, None)
    worker = await ImageWorker.create(config, link)
    watched, plain = Collected(), Collected()

    try:
        await link.register()
        async with AsyncClient(live.url) as requester:
            params = ImageParams(prompt="a red barn", width=64, height=64, steps=8, seed=4)
            created = await requester.submit_image(params)
            async with asyncio.TaskGroup() as streams:
                streams.create_task(watched.read(requester.image_events(created.id, previews=True)))
                streams.create_task(plain.read(requester.image_events(created.id)))
                # both streams open (one watching with previews) before the job runs
                async with asyncio.timeout(10):
                    await watched.opened.wait()
                    await plain.opened.wait()
                job = await link.pop(worker.capabilities, 5)
                assert job is not None and job.id == created.id
                await worker.serve(job)
    finally:
        await worker.aclose()
        await link.aclose()
        await runner.cleanup()
    seen, unseen = watched.items, plain.items
    previews = [item for item in seen if isinstance(item, JobPreview)]
    # step 1 learns that previews are wanted; from step 2 on each one goes, the last never
    assert [p.step for p in previews] == list(range(2, params.steps))
    for preview in previews:
        with Image.open(io.BytesIO(base64.b64decode(preview.data))) as image:
            assert image.format == "JPEG" and image.size == (8, 8)
    assert isinstance(seen[-1], JobStatus) and seen[-1].state == "done"
    statuses = [item for item in unseen if isinstance(item, JobStatus)]
    assert statuses == unseen and statuses[-1].state == "done"


@pytest.mark.slow
def test_with_a_preview_decoder_previews_are_taesd_pictures_of_the_image_size(
    tiny_sd: Path, tmp_path: Path
) -> None:
    """The donor's TAESD (a tiny random AutoencoderTiny here, in safetensors) makes the
    previews instead of the linear factors: pictures of the image's size, not the latents'."""
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny

    from worker.image.engine import ImageEngine

    torch.manual_seed(0)
    tiny = AutoencoderTiny(
        encoder_block_out_channels=(4, 4, 4, 4),
        decoder_block_out_channels=(4, 4, 4, 4),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    tiny.save_pretrained(tmp_path / "taesd", safe_serialization=True)
    engine = ImageEngine(
        {
            "model": str(tiny_sd),
            "threads": 1,
            "preview_every": 2,
            "preview_decoder": str(tmp_path / "taesd"),
        }
    )
    assert engine.previewer.decoder is not None
    events: list[dict[str, object]] = []
    fields = {"prompt": "a red cat", "width": 64, "height": 64, "steps": 3, "seed": 3}
    engine.handle("image", fields, events.append)
    previews = [ImageProgress.model_validate(e).preview for e in events]
    made = [p for p in previews if p is not None]
    assert len(made) == 1
    with Image.open(io.BytesIO(base64.b64decode(made[0]))) as image:
        assert image.format == "JPEG" and image.size == (64, 64)
