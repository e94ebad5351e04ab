"""The SDXL refiner (worker.image.refiner): a txt2img job is the base's first part of the
schedule and the refiner's rest, pixel for pixel diffusers' "ensemble of expert denoisers";
the refiner is in the engine info; it is refused on another family's base."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from PIL import Image

from protocol.infotext import PNG_PARAMETERS_KEY
from protocol.messages import EngineInfo
from protocol.params import ImageParams
from tests.reference import plain_image, plain_xl_pipeline, scheduler_of
from worker.errors import UnsupportedArchitecture
from worker.image.engine import ImageEngine
from worker.image.refiner import base_steps
from worker.image.worker import engine_info

# (a negative prompt: the published refiner encodes an empty one where A1111 and the
# engine give zeros; a non-empty one means the same to both)
BASE: dict[str, Any] = {
    "prompt": "a photo of a red cat",
    "negative_prompt": "blurry dog",
    "width": 64,
    "height": 64,
    "steps": 5,
    "cfg_scale": 7.0,
    "seed": 11,
    "sampler": "Euler a",
}
SWITCH = 0.5
TOLERANCE = 2


@pytest.fixture(scope="module")
def engine(tiny_sdxl: Path, tiny_sdxl_refiner: Path) -> ImageEngine:
    return ImageEngine(
        {"model": str(tiny_sdxl), "refiner": str(tiny_sdxl_refiner), "refiner_switch": SWITCH}
    )


@pytest.fixture(scope="module")
def base_pipe(tiny_sdxl: Path) -> StableDiffusionXLPipeline:
    return plain_xl_pipeline(tiny_sdxl)


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def plain_refiner(
    base_pipe: StableDiffusionXLPipeline, tiny_sdxl_refiner: Path
) -> StableDiffusionXLImg2ImgPipeline:
    """diffusers' documented way: the refiner given the base's second text encoder and VAE."""
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        tiny_sdxl_refiner,
        text_encoder_2=base_pipe.text_encoder_2,
        vae=base_pipe.vae,
        use_safetensors=True,
        local_files_only=True,
    )
    refiner.set_progress_bar_config(disable=True)
    return refiner


def _plain_ensemble(
    base: StableDiffusionXLPipeline,
    refiner: StableDiffusionXLImg2ImgPipeline,
    params: ImageParams,
    seed: int,
    refiner_prompt: str | None = None,
) -> np.ndarray:
    """diffusers' documented recipe: base with denoising_end, refiner with denoising_start
    (with `refiner_prompt` if given); one generator through both."""
    generator = torch.Generator("cpu").manual_seed(seed)
    common = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "num_inference_steps": params.steps,
        "guidance_scale": params.cfg_scale,
        "generator": generator,
    }
    with scheduler_of(base, params):
        latents = base(
            **common,
            width=params.width,
            height=params.height,
            denoising_end=SWITCH,
            output_type="latent",
        ).images
    with scheduler_of(refiner, params):  # type: ignore[arg-type]
        if refiner_prompt is not None:
            common["prompt"] = refiner_prompt
        image = refiner(**common, image=latents, denoising_start=SWITCH).images[0]
    return np.asarray(image).astype(int)


def test_txt2img_is_base_then_refiner_as_in_diffusers(
    engine: ImageEngine,
    base_pipe: StableDiffusionXLPipeline,
    plain_refiner: StableDiffusionXLImg2ImgPipeline,
) -> None:
    params = ImageParams.model_validate(BASE)
    events: list[dict[str, object]] = []
    _, blobs = engine.handle("image", BASE, events.append)
    got = _pixels(blobs[0])
    expected = _plain_ensemble(base_pipe, plain_refiner, params, 11)
    assert np.abs(got - expected).max() <= TOLERANCE
    # the refiner visibly changes the image: the base alone over the whole schedule differs
    # on average by more than the bound above allows anywhere (4.1 when written)
    with torch.no_grad():
        alone = plain_image(base_pipe, params, 11).astype(int)
    assert np.abs(got - alone).mean() > 1.5 * TOLERANCE
    # both passes report progress, each step once, up to the job's steps
    steps = [cast(int, event["step"]) for event in events]
    assert steps == sorted(steps) and steps[-1] == BASE["steps"]
    assert base_steps(engine.pipe.scheduler, 5, SWITCH) == 2
    with Image.open(io.BytesIO(blobs[0])) as image:
        text = image.info[PNG_PARAMETERS_KEY]
    assert 'Refiner: "sdxl-refiner", Refiner switch at: "0.5"' in text
    # prompt editing counts the job's steps in both passes: here the text changes as the
    # refiner takes over (steps 0-1 the base's, 2-4 the refiner's)
    # (strong guidance: the tiny refiner's text barely shows at 7)
    edited = {**BASE, "prompt": "[a photo of a red cat:a blue dog:1]", "cfg_scale": 30}
    _, blobs = engine.handle("image", edited, lambda _: None)
    strong = params.model_copy(update={"cfg_scale": 30.0})
    refined = _plain_ensemble(base_pipe, plain_refiner, strong, 11, "a blue dog")
    assert np.abs(_pixels(blobs[0]) - refined).max() <= TOLERANCE
    unedited = _plain_ensemble(base_pipe, plain_refiner, strong, 11)
    # (the edit shows: an engine within the bound of the unedited image could not also be
    # within it of the edited one; 6 when written)
    assert np.abs(refined - unedited).max() > 2 * TOLERANCE


def test_the_refiner_shares_the_bases_modules_and_is_in_the_engine_info(
    engine: ImageEngine,
) -> None:
    refiner = engine.refiner
    assert refiner is not None
    assert refiner.shared == ("vae", "text_encoder_2")
    assert refiner.pipe.vae is engine.pipe.vae
    # a plain prompt is exactly the refiner pipeline's own encode_prompt
    with torch.no_grad():
        embeds, _, pooled, _ = refiner.pipe.encode_prompt("a red cat", device=engine.device)
        ours = refiner.encoding(engine.device).encode_pooled("a red cat", 1)
    assert torch.equal(ours[0], embeds)
    assert torch.equal(ours[1], pooled)
    data, _ = engine.handle("image_info", {}, lambda _: None)
    assert data["refiner"] == "sdxl-refiner"
    assert data["refiner_switch"] == SWITCH
    # the worker's engine build (spot checks) names it, so that a worker with a refiner is
    # never held to the pixels of one without
    build = engine_info(refiner_sha256="ab" * 32, refiner_switch=0.8)
    assert (build["refiner_sha256"], build["refiner_switch"]) == ("ab" * 32, 0.8)
    # (as the coordinator reads it; and another build than the one without a refiner)
    reported = EngineInfo.model_validate(build)
    assert reported != EngineInfo.model_validate(engine_info())
    assert "refiner_sha256" not in engine_info()


def test_a_batch_is_refined_image_by_image(engine: ImageEngine) -> None:
    _, single = engine.handle("image", {**BASE, "seed": 12}, lambda _: None)
    _, batch = engine.handle("image", {**BASE, "n": 2}, lambda _: None)
    assert len(batch) == 2
    assert np.abs(_pixels(batch[1]) - _pixels(single[0])).max() <= TOLERANCE


def test_img2img_jobs_run_on_the_base_alone(
    engine: ImageEngine, base_pipe: StableDiffusionXLPipeline
) -> None:
    # a hires fix below the native size is a plain txt2img (refined); an img2img job is not
    source = Image.fromarray(
        np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB"
    )
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    job = {**BASE, "source_processing": "img2img", "denoising_strength": 0.6}
    _, blobs = engine.handle("image", job, lambda _: None, [buffer.getvalue()])
    with Image.open(io.BytesIO(blobs[0])) as image:
        assert "Refiner" not in image.info[PNG_PARAMETERS_KEY]


def test_a_single_file_refiner_refines_as_its_folder(
    engine: ImageEngine,
    tiny_sdxl: Path,
    tiny_sdxl_refiner: Path,
    tiny_sdxl_refiner_single_file: Path,
) -> None:
    """`--refiner x.safetensors --refiner-config DIR`: the refiner in the original layout
    (OpenCLIP alone, as embedder 0) shares the base's modules and gives the same pixels."""
    single = ImageEngine(
        {
            "model": str(tiny_sdxl),
            "refiner": str(tiny_sdxl_refiner_single_file),
            "refiner_config": str(tiny_sdxl_refiner),
            "refiner_switch": SWITCH,
        }
    )
    assert single.refiner is not None
    assert single.refiner.shared == ("vae", "text_encoder_2")
    _, blobs = single.handle("image", BASE, lambda _: None)
    _, reference = engine.handle("image", BASE, lambda _: None)
    np.testing.assert_array_equal(_pixels(blobs[0]), _pixels(reference[0]))
    with Image.open(io.BytesIO(blobs[0])) as image:
        assert 'Refiner: "tiny-sdxl-refiner"' in image.info[PNG_PARAMETERS_KEY]


def test_a_refiner_is_refused_on_another_family_or_as_the_wrong_model(
    tiny_sd: Path, tiny_sdxl: Path, tiny_sdxl_refiner: Path
) -> None:
    with pytest.raises(UnsupportedArchitecture, match="--refiner: sd is an sd1 checkpoint"):
        ImageEngine({"model": str(tiny_sd), "refiner": str(tiny_sdxl_refiner)})
    # an SDXL base given as the refiner
    with pytest.raises(UnsupportedArchitecture, match="not an SDXL refiner"):
        ImageEngine({"model": str(tiny_sdxl), "refiner": str(tiny_sdxl)})
