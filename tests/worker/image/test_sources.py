"""Source images in the image engine (issue 21): img2img, inpainting with both kinds of
checkpoint, outpainting, each pixel-identical to diffusers' own pipeline on the same
components (tests/reference.py); bad inputs refused naming the field."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

# (from its module: mypy resolves `diffusers.StableDiffusionPipeline` to a placeholder class)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngImageFile

from protocol.engine import IMAGE, IMAGE_INFO
from protocol.infotext import MASK_SETTINGS, PNG_PARAMETERS_KEY, parameters_text
from protocol.params import ImageParams, sampled_steps
from protocol.signing import Identity
from sandbox import Sandbox, SandboxPolicy
from sandbox.errors import EngineFailed
from tests.reference import plain_img2img, plain_inpaint, plain_pipeline
from worker.common.link import CoordinatorLink
from worker.errors import InvalidGenerationInput
from worker.image.checkpoint_hash import checkpoint_sha256
from worker.image.config import ImageWorkerConfig
from worker.image.engine import ImageEngine
from worker.image.worker import ENGINE, ImageWorker

REPO_ROOT = Path(__file__).resolve().parents[3]
BASE: dict[str, Any] = {
    "prompt": "a photo of a red cat",
    "width": 64,
    "height": 64,
    "steps": 4,
    "cfg_scale": 7.0,
    "seed": 11,
}
# |diff| allowed between the engine and the reference (the bound)
TOLERANCE = 2


@pytest.fixture(scope="module")
def engine(tiny_sd: Path) -> ImageEngine:
    return ImageEngine({"model": str(tiny_sd)})


@pytest.fixture(scope="module")
def inpaint_engine(tiny_sd_inpaint: Path) -> ImageEngine:
    return ImageEngine({"model": str(tiny_sd_inpaint)})


@pytest.fixture(scope="module")
def plain_pipe(tiny_sd: Path) -> StableDiffusionPipeline:
    return plain_pipeline(tiny_sd)


@pytest.fixture(scope="module")
def plain_inpaint_pipe(tiny_sd_inpaint: Path) -> StableDiffusionPipeline:
    return plain_pipeline(tiny_sd_inpaint)


def _source(width: int = 80, height: int = 96, mode: str = "RGB") -> Image.Image:
    """A seeded picture, not the job's size (so the LANCZOS resize is exercised)."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    pixels = (pixels + rng.integers(0, 40, pixels.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _mask(width: int = 80, height: int = 96) -> Image.Image:
    """White (repaint) in the middle, black (keep) around it."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


def _with_transparent_border(image: Image.Image, border: int = 16) -> Image.Image:
    """The source with its border erased to transparent, as for outpainting."""
    alpha = Image.new("L", image.size, 0)
    alpha.paste(255, (border, border, image.width - border, image.height - border))
    out = image.convert("RGBA")
    out.putalpha(alpha)
    return out


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def _run(
    engine: ImageEngine, inputs: list[bytes], **fields: Any
) -> tuple[dict[str, Any], list[bytes], list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    data, blobs = engine.handle("image", {**BASE, **fields}, events.append, inputs)
    return data, blobs, events


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    diff = np.abs(actual.astype(int) - expected.astype(int)).max()
    assert diff <= TOLERANCE, f"max |diff| {diff}"


# -- the reproducibility contract ----------------------------------------------------------


@pytest.mark.parametrize(("sampler", "strength"), [("Euler a", 0.75), ("DDIM", 0.5)])
def test_img2img_matches_diffusers(
    engine: ImageEngine, plain_pipe: StableDiffusionPipeline, sampler: str, strength: float
) -> None:
    source = _source()
    fields = {"source_processing": "img2img", "denoising_strength": strength, "sampler": sampler}
    data, blobs, events = _run(engine, [_encode(source, "JPEG")], n=2, **fields)
    params = ImageParams.model_validate({**BASE, **fields, "n": 2})
    assert data.pop("peak_memory_bytes") > 0
    assert data == {"seeds": [11, 12], "model": "sd", "width": 64, "height": 64}
    decoded = Image.open(io.BytesIO(_encode(source, "JPEG")))
    for i, png in enumerate(blobs):
        _assert_close(_pixels(png), plain_img2img(plain_pipe, params, 11 + i, decoded))
    # progress counts the steps sampled: int(steps x strength)
    steps = sampled_steps(params)
    assert steps == int(4 * strength)
    # (the two images advance together: worker.image.batch.BatchProgress)
    assert [(e["image"], e["step"], e["steps"]) for e in events] == [
        ((2 * step - 1) // steps, 2 * step - (2 * step - 1) // steps * steps, steps)
        for step in range(1, steps + 1)
    ]


def test_img2img_keeps_the_source_and_depends_on_the_strength(engine: ImageEngine) -> None:
    source = _encode(_source())
    _, light, _ = _run(engine, [source], source_processing="img2img", denoising_strength=0.25)
    _, full, _ = _run(engine, [source], source_processing="img2img", denoising_strength=1.0)
    _, txt2img, _ = _run(engine, [], steps=4)
    resized = np.asarray(_source().resize((64, 64), Image.Resampling.LANCZOS)).astype(int)
    # a light touch stays nearer the source than a full repaint does
    assert np.abs(_pixels(light[0]) - resized).mean() < np.abs(_pixels(full[0]) - resized).mean()
    assert not np.array_equal(_pixels(full[0]), _pixels(txt2img[0]))


@pytest.mark.parametrize("checkpoint", ["inpainting", "plain"])
def test_inpainting_matches_diffusers(
    engine: ImageEngine,
    inpaint_engine: ImageEngine,
    plain_pipe: StableDiffusionPipeline,
    plain_inpaint_pipe: StableDiffusionPipeline,
    checkpoint: str,
) -> None:
    runner, reference = (
        (inpaint_engine, plain_inpaint_pipe) if checkpoint == "inpainting" else (engine, plain_pipe)
    )
    assert runner.inpainting_checkpoint == (checkpoint == "inpainting")
    source, mask = _source(), _mask()
    fields = {"source_processing": "inpainting", "denoising_strength": 1.0, "sampler": "Euler"}
    _, blobs, events = _run(runner, [_encode(source, "WEBP"), _encode(mask)], **fields)
    params = ImageParams.model_validate({**BASE, **fields})
    decoded = Image.open(io.BytesIO(_encode(source, "WEBP")))
    expected = plain_inpaint(reference, params, 11, decoded, mask)
    _assert_close(_pixels(blobs[0]), expected)
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    # white repaints, as for diffusers: the inverted mask is another job
    inverted = _encode(ImageOps.invert(mask))
    _, other, _ = _run(runner, [_encode(source, "WEBP"), inverted], **fields)
    assert np.abs(_pixels(other[0]).astype(int) - expected.astype(int)).max() > TOLERANCE


@pytest.mark.parametrize("checkpoint", ["inpainting", "plain"])
def test_outpainting_fills_the_transparent_areas(
    engine: ImageEngine,
    inpaint_engine: ImageEngine,
    plain_pipe: StableDiffusionPipeline,
    plain_inpaint_pipe: StableDiffusionPipeline,
    checkpoint: str,
) -> None:
    runner, reference = (
        (inpaint_engine, plain_inpaint_pipe) if checkpoint == "inpainting" else (engine, plain_pipe)
    )
    source = _with_transparent_border(_source())
    fields = {"source_processing": "outpainting", "denoising_strength": 1.0}
    _, blobs, _ = _run(runner, [_encode(source)], **fields)
    params = ImageParams.model_validate({**BASE, **fields})
    # AI Horde's convention: transparent = repaint, i.e. the mask is the inverted alpha
    mask = ImageOps.invert(source.getchannel("A"))
    _assert_close(_pixels(blobs[0]), plain_inpaint(reference, params, 11, source, mask))
    # the same job with that mask sent explicitly makes the same image
    _, explicit, _ = _run(runner, [_encode(source.convert("RGB")), _encode(mask)], **fields)
    np.testing.assert_array_equal(_pixels(explicit[0]), _pixels(blobs[0]))


def test_png_records_the_denoising_strength(engine: ImageEngine) -> None:
    fields = {"source_processing": "img2img", "denoising_strength": 0.5}
    _, blobs, _ = _run(engine, [_encode(_source())], **fields)
    params = ImageParams.model_validate({**BASE, **fields})
    with PngImageFile(io.BytesIO(blobs[0])) as image:
        text = image.text[PNG_PARAMETERS_KEY]
    assert text == parameters_text(params, 11, "sd")
    assert text.endswith(", Denoising strength: 0.5, Source processing: img2img")


# A1111's infotext: "Key: value" pairs separated by commas (values here hold no comma)
_INFOTEXT_PAIR = re.compile(r"\s*([\w][\w \-/]*):\s*([^,]*)(?:,|$)")


def _read_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) as A1111 reads its `parameters` text."""
    *lines, settings = text.split("\n")
    negative = [line for line in lines if line.startswith("Negative prompt: ")]
    prompt = "\n".join(line for line in lines if line not in negative)
    pairs = dict(_INFOTEXT_PAIR.findall(settings))
    return prompt, negative[0].removeprefix("Negative prompt: ") if negative else "", pairs


def test_an_inpainted_result_is_made_again_from_its_png_text(engine: ImageEngine) -> None:
    """The PNG's text holds every setting of the job (the mask settings as A1111 writes
    them): read back the way A1111 reads it, with the same source and mask, it makes the
    same PNG (outpainting writes the same keys: tests/protocol/test_source_params.py)."""
    fields = {
        "prompt": "a blue door",
        "negative_prompt": "fog",
        "steps": 4,
        "sampler": "DDIM",
        "cfg_scale": 5.5,
        "seed": 23,
        "height": 72,
        "source_processing": "inpainting",
        "denoising_strength": 0.5,
    }
    inputs = [_encode(_source()), _encode(_mask())]
    _, blobs, _ = _run(engine, inputs, **fields)
    with PngImageFile(io.BytesIO(blobs[0])) as image:
        prompt, negative, settings = _read_infotext(image.text[PNG_PARAMETERS_KEY])
    # our inpainting, in A1111's words: the mask as sent, not blurred, white repainted,
    # starting from the source's own latents, over the whole picture
    assert {key: settings[key] for key, _ in MASK_SETTINGS} == dict(MASK_SETTINGS)
    width, height = settings["Size"].split("x")
    again = {
        "prompt": prompt,
        "negative_prompt": negative,
        "steps": int(settings["Steps"]),
        "sampler": settings["Sampler"],
        "cfg_scale": float(settings["CFG scale"]),
        "seed": int(settings["Seed"]),
        "width": int(width),
        "height": int(height),
        "source_processing": settings["Source processing"],
        "denoising_strength": float(settings["Denoising strength"]),
    }
    assert again == {**BASE, **fields}
    _, remade, _ = _run(engine, inputs, **again)
    assert remade == blobs


# -- refusals, each naming the field -------------------------------------------------------


def _bomb() -> bytes:
    """A small PNG that declares 6000x6000 pixels (36 M, over the cap)."""
    return _encode(Image.new("1", (6000, 6000)))


@pytest.mark.parametrize(
    ("fields", "inputs", "field", "words"),
    [
        ({"source_processing": "img2img"}, [], "source_image", "needs a source image"),
        ({}, [b"x"], "source_image", "txt2img job takes no source image"),
        ({"source_processing": "img2img"}, [b"not an image"], "source_image", "not a PNG"),
        ({"source_processing": "img2img"}, [b""], "source_image", "is empty"),
        ({"source_processing": "img2img"}, ["bomb"], "source_image", "6000x6000 pixels"),
        (
            {"source_processing": "img2img"},
            [_encode(_source())[:200]],
            "source_image",
            "truncated or damaged",
        ),
        ({"source_processing": "img2img"}, ["src", "mask"], "source_mask", "takes no mask"),
        ({"source_processing": "inpainting"}, ["src", "small mask"], "source_mask", "80x96"),
        ({"source_processing": "inpainting"}, ["src", b"junk"], "source_mask", "not a PNG"),
        ({"source_processing": "inpainting"}, ["src"], "source_mask", "transparent pixels"),
        ({"source_processing": "outpainting"}, ["opaque rgba"], "source_mask", "send a"),
        ({"source_processing": "inpainting"}, ["src", "mask", "mask"], "source_mask", "not 3"),
    ],
)
def test_bad_inputs_are_refused_naming_the_field(
    engine: ImageEngine, fields: dict[str, Any], inputs: list[Any], field: str, words: str
) -> None:
    named = {
        "bomb": _bomb(),
        "src": _encode(_source()),
        "mask": _encode(_mask()),
        "small mask": _encode(_mask(40, 40)),
        "opaque rgba": _encode(_source(mode="RGBA")),
    }
    blobs = [named[item] if isinstance(item, str) else item for item in inputs]
    with pytest.raises(InvalidGenerationInput, match=words) as caught:
        _run(engine, blobs, **fields)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_an_inpainting_checkpoint_serves_only_inpainting(inpaint_engine: ImageEngine) -> None:
    for fields, inputs in (({}, []), ({"source_processing": "img2img"}, [_encode(_source())])):
        with pytest.raises(InvalidGenerationInput, match="inpainting checkpoint") as caught:
            _run(inpaint_engine, inputs, **fields)
        assert caught.value.field == "source_processing"


def test_the_engine_says_whether_it_loaded_an_inpainting_checkpoint(
    engine: ImageEngine, inpaint_engine: ImageEngine
) -> None:
    for loaded, name, inpainting in ((engine, "sd", False), (inpaint_engine, "sd-inpaint", True)):
        answer, blobs = loaded.handle(IMAGE_INFO.kind, {}, lambda message: None)
        assert cast(int, answer.pop("peak_memory_bytes")) > 0
        assert answer == {
            "model": name,
            "inpainting": inpainting,
            "baseline": "sd1",
            "dtype": "float32",
            "refiner": None,
            "refiner_switch": None,
        }
        assert blobs == []


# -- through the sandbox -------------------------------------------------------------------


@pytest.mark.slow
async def test_a_worker_on_an_inpainting_checkpoint_offers_only_inpainting(
    tiny_sd_inpaint: Path, tmp_path: Path
) -> None:
    """The worker asks its sandboxed engine what it loaded, and pops accordingly (the
    coordinator's side: tests/coordinator/http/test_inpainting_only.py)."""
    config = ImageWorkerConfig(
        coordinator="http://127.0.0.1:9",  # (not contacted)
        model=str(tiny_sd_inpaint),
        model_config=None,
        model_name="sd-inpaint",
        name="painter",
        identity_file=tmp_path / "id.key",
        load_timeout=120,
    )
    link = CoordinatorLink(config.coordinator, Identity.generate(), config.name, None)
    worker = await ImageWorker.create(config, link)
    try:
        offered = worker.capabilities
        assert (offered.txt2img, offered.img2img, offered.inpainting) == (False, False, True)
        # ... and reports its checkpoint for the image model reference (worker.image
        # .checkpoint_hash)
        assert offered.checkpoint_sha256 == checkpoint_sha256(tiny_sd_inpaint)
        assert offered.baseline == "sd1"
    finally:
        await worker.aclose()
        await link.aclose()


async def test_source_and_mask_cross_the_sandbox_as_binary_input(
    engine: ImageEngine, tiny_sd: Path, tmp_path: Path
) -> None:
    """The real engine in its confined child: the bytes travel beside the job."""
    params = ImageParams.model_validate(
        {**BASE, "steps": 2, "source_processing": "inpainting", "denoising_strength": 1.0}
    )
    inputs = [_encode(_source()), _encode(_mask())]
    policy = SandboxPolicy(
        workdir_root=tmp_path,
        extra_env={"PYTHONPATH": str(REPO_ROOT)},
        read_only=(tiny_sd,),  # (absolute: from the fixture)
        packages=("sandbox", "protocol", "worker"),
        start_timeout=120,
        job_timeout=120,
    )
    async with await Sandbox.create(ENGINE, {"model": str(tiny_sd)}, policy) as sandbox:
        result = await sandbox.run(IMAGE, params, blobs=inputs)
        # a refusal reaches the worker naming the field; the engine stays up
        with pytest.raises(EngineFailed, match="source_mask: is 40x40 pixels") as caught:
            await sandbox.run(IMAGE, params, blobs=[inputs[0], _encode(_mask(40, 40))])
        assert caught.value.error_type == "InvalidGenerationInput"
        assert sandbox.restarts == 0
    _, expected, _ = _run(engine, inputs, **params.model_dump(exclude={"seed"}), seed=11)
    assert result.data.seeds == [11]
    # (pixels, not bytes: torch's thread count may differ between the two processes)
    assert len(result.blobs) == 1
    _assert_close(_pixels(result.blobs[0]), _pixels(expected[0]))


# -- the slow one --------------------------------------------------------------------------


@pytest.mark.slow
def test_img2img_at_512_matches_diffusers(
    engine: ImageEngine, plain_pipe: StableDiffusionPipeline
) -> None:
    fields = {
        "source_processing": "img2img",
        "width": 512,
        "height": 512,
        "steps": 2,
        "denoising_strength": 0.5,
    }
    source = _source(600, 450)
    _, blobs, events = _run(engine, [_encode(source)], **fields)
    params = ImageParams.model_validate({**BASE, **fields})
    pixels = _pixels(blobs[0])
    assert pixels.shape == (512, 512, 3)
    _assert_close(pixels, plain_img2img(plain_pipe, params, 11, source))
    assert [e["step"] for e in events] == [1]
