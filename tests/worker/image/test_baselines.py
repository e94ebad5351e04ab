"""The engine follows the model (worker.image.baselines): SD 1.x, SD 2 (v-prediction) and
SDXL, each pixel-identical to plain diffusers' pipeline of its family, the family reported
in the engine info; what an SDXL engine does not serve is refused naming the field."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from PIL import Image

from protocol.params import ImageParams
from tests.reference import (
    plain_image,
    plain_pipeline,
    plain_xl_pipeline,
    plain_xl_source,
)
from worker.errors import InvalidGenerationInput, UnsupportedArchitecture
from worker.image.baselines import text_encoding
from worker.image.engine import ImageEngine

BASE: dict[str, Any] = {
    "prompt": "a photo of a red cat",
    "width": 64,
    "height": 64,
    "steps": 3,
    "cfg_scale": 7.0,
    "seed": 11,
    "sampler": "Euler",
}
# |diff| allowed between the engine and the reference (the bound)
TOLERANCE = 2


@pytest.fixture(scope="module")
def xl_engine(tiny_sdxl: Path) -> ImageEngine:
    return ImageEngine({"model": str(tiny_sdxl)})


@pytest.fixture(scope="module")
def xl_pipe(tiny_sdxl: Path) -> StableDiffusionXLPipeline:
    return plain_xl_pipeline(tiny_sdxl)


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def _image(engine: ImageEngine, *inputs: bytes, **fields: object) -> np.ndarray:
    _, blobs = engine.handle("image", {**BASE, **fields}, lambda _: None, list(inputs))
    return _pixels(blobs[0])


def _params(**fields: Any) -> ImageParams:
    return ImageParams.model_validate({**BASE, **fields})


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_engine_info_reports_the_baseline(
    xl_engine: ImageEngine, tiny_sd: Path, tiny_sd2: Path
) -> None:
    data, _ = xl_engine.handle("image_info", {}, lambda _: None)
    assert cast(int, data.pop("peak_memory_bytes")) > 0
    assert data == {
        "model": "sdxl",
        "inpainting": False,
        "baseline": "sdxl",
        "dtype": "float32",
        "refiner": None,
        "refiner_switch": None,
    }
    for folder, baseline in ((tiny_sd, "sd1"), (tiny_sd2, "sd2")):
        data, _ = ImageEngine({"model": str(folder)}).handle("image_info", {}, lambda _: None)
        assert data["baseline"] == baseline


@pytest.mark.slow
def test_sdxl_txt2img_equals_plain_diffusers(
    xl_engine: ImageEngine, xl_pipe: StableDiffusionXLPipeline
) -> None:
    # an empty negative prompt is zeros (diffusers' force_zeros_for_empty_prompt); another
    # one is encoded
    fields: dict[str, object] = {"negative_prompt": "blurry dog", "sampler": "DPM++ 2M Karras"}
    for job in ({}, fields):
        expected = plain_image(xl_pipe, _params(**job), 11).astype(int)
        assert np.abs(_image(xl_engine, **job) - expected).max() <= TOLERANCE
    # clip skip 2 is diffusers' SDXL clip_skip=1 (which it applies to the prompt only: the
    # engine skips in the negative prompt too, as A1111 and SD 1's pipelines do, so the
    # comparison has the empty one)
    with torch.no_grad():
        skipped = xl_pipe(
            prompt=BASE["prompt"],
            width=64,
            height=64,
            num_inference_steps=3,
            guidance_scale=7.0,
            clip_skip=1,
            generator=torch.Generator().manual_seed(11),
        ).images[0]
    got = _image(xl_engine, clip_skip=2)
    assert np.abs(got - np.asarray(skipped).astype(int)).max() <= TOLERANCE
    with pytest.raises(InvalidGenerationInput, match="clip_skip: .* use 1 to 2"):
        _image(xl_engine, clip_skip=3)


@pytest.mark.slow
def test_sdxl_img2img_and_inpainting_equal_plain_diffusers(
    xl_engine: ImageEngine, xl_pipe: StableDiffusionXLPipeline
) -> None:
    rng = np.random.default_rng(5)
    source = Image.fromarray(rng.integers(0, 255, (96, 80, 3), dtype=np.uint8), "RGB")
    mask = Image.new("L", (80, 96), 0)
    mask.paste(255, (20, 24, 60, 72))
    for processing, inputs, mask_image in (
        ("img2img", [_png(source)], None),
        ("inpainting", [_png(source), _png(mask)], mask),
    ):
        fields = {"source_processing": processing, "denoising_strength": 0.6}
        expected = plain_xl_source(xl_pipe, _params(**fields), 11, source, mask_image)
        got = _image(xl_engine, *inputs, **fields)
        assert np.abs(got - expected.astype(int)).max() <= TOLERANCE, processing


def test_sdxl_prompts_are_encoded_a1111s_way_with_both_encoders(
    xl_pipe: StableDiffusionXLPipeline,
) -> None:
    encoding = text_encoding(xl_pipe, torch.device("cpu"))
    with torch.no_grad():
        # a plain prompt: exactly diffusers' encode_prompt, hidden states and pooled text
        embeds, _, pooled, _ = xl_pipe.encode_prompt("a red cat", device=torch.device("cpu"))
        ours = encoding.encode_pooled("a red cat", 1)  # type: ignore[union-attr]
        assert torch.equal(ours[0], embeds) and torch.equal(ours[1], pooled)
        # BREAK: the chunks side by side, each encoded alone; the pooled text the first's
        two = encoding.encode_pooled("a red cat BREAK blue sky", 1)  # type: ignore[union-attr]
        sky = encoding.encode_pooled("blue sky", 1)  # type: ignore[union-attr]
        assert two[0].shape == (1, 154, 64)
        assert torch.equal(two[0], torch.cat([ours[0], sky[0]], dim=1))
        assert torch.equal(two[1], ours[1])
        # a weight changes the hidden states of both encoders, not the pooled text
        weighted = encoding.encode_pooled("a (red:1.5) cat", 1)  # type: ignore[union-attr]
        assert not torch.equal(weighted[0][..., :32], ours[0][..., :32])
        assert not torch.equal(weighted[0][..., 32:], ours[0][..., 32:])
        assert torch.equal(weighted[1], ours[1])
        # prompt editing: each step's text with its own pooled text; an empty negative
        # prompt is zeros at every length
        edited = encoding.conditioning("a [dog:cat:1] BREAK x", 3, 1)
        assert edited.pooled is not None and len(edited.pooled) == 2
        assert not torch.equal(edited.pooled[0], edited.pooled[1])
        negative = encoding.conditioning("", 3, 1, "negative_prompt")
        assert negative.pooled is not None
        assert not negative.embeds[0].any() and not negative.pooled[0].any()


def test_an_sdxl_single_file_makes_its_folders_images(
    tiny_sdxl_wide: Path, tiny_sdxl_single_file: Path
) -> None:
    """`--model x.safetensors --model-config DIR` of an SDXL checkpoint in the original
    layout: the family found (sdxl), the folder's pixels exactly."""
    folder = ImageEngine({"model": str(tiny_sdxl_wide)})
    single = ImageEngine({"model": str(tiny_sdxl_single_file), "model_config": str(tiny_sdxl_wide)})
    assert single.source.kind == "single_file"
    data, _ = single.handle("image_info", {}, lambda _: None)
    assert (data["baseline"], data["model"]) == ("sdxl", "tiny-sdxl")
    job: dict[str, object] = {"negative_prompt": "blurry dog", "seed": 12}
    np.testing.assert_array_equal(_image(single, **job), _image(folder, **job))


def test_sdxl_refuses_what_it_does_not_serve(tiny_sdxl: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitecture, match="ControlNet only on SD 1.x and 2.x"):
        ImageEngine({"model": str(tiny_sdxl), "controlnets": {"canny": str(tmp_path)}})
    # a refiner (the second text encoder alone) makes no images by itself
    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None])
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedArchitecture, match="SDXL refiner"):
        ImageEngine({"model": str(refiner)})


@pytest.mark.slow
def test_sd2_v_prediction_equals_plain_diffusers(tiny_sd2: Path) -> None:
    engine = ImageEngine({"model": str(tiny_sd2)})
    pipe = plain_pipeline(tiny_sd2)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    fields: dict[str, object] = {"negative_prompt": "blurry", "sampler": "DPM++ 2M Karras"}
    expected = plain_image(pipe, _params(**fields), 11).astype(int)
    assert np.abs(_image(engine, **fields) - expected).max() <= TOLERANCE
