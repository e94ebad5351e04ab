"""The reference every image test compares against: plain diffusers, no idlegrid code
in the generation path (only the sampler-name table, to pick the same scheduler).

With a source image, the contract of issue 21: diffusers' img2img or inpaint pipeline built
on the same components, the source converted to RGB and LANCZOS-resized to width x height
(the mask too: greyscale, white = repaint), `strength=denoising_strength`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch

# (from its module: mypy resolves `diffusers.StableDiffusionPipeline` to a placeholder class)
from diffusers.models.controlnets.controlnet import ControlNetModel
from diffusers.pipelines.controlnet.pipeline_controlnet import StableDiffusionControlNetPipeline
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
    StableDiffusionInpaintPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import (
    StableDiffusionXLInpaintPipeline,
)
from PIL import Image

from protocol.params import ImageParams
from worker.image.samplers import SCHEDULER_SPECS

__all__ = [
    "plain_controlnet",
    "plain_image",
    "plain_img2img",
    "plain_inpaint",
    "plain_pipeline",
    "plain_xl_pipeline",
    "plain_xl_source",
    "scheduler_of",
]

# SD 1.x / 2.x or SDXL
_Pipe = StableDiffusionPipeline | StableDiffusionXLPipeline


def plain_pipeline(sd: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(sd, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_xl_pipeline(sdxl: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(
        sdxl, use_safetensors=True, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def scheduler_of(pipe: _Pipe, params: ImageParams) -> Iterator[Any]:
    """The job's scheduler, for one run; the pipeline's own is put back after."""
    class_name, options = SCHEDULER_SPECS[params.sampler]
    original = pipe.scheduler
    scheduler = getattr(diffusers, class_name).from_config(original.config, **options)
    pipe.scheduler = scheduler
    try:
        yield scheduler
    finally:
        pipe.scheduler = original


def _common(params: ImageParams, seed: int) -> dict[str, Any]:
    return {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt or None,
        "num_inference_steps": params.steps,
        "guidance_scale": params.cfg_scale,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "num_images_per_prompt": 1,
        "output_type": "pil",
    }


def plain_image(pipe: _Pipe, params: ImageParams, seed: int) -> np.ndarray:
    """Image `seed` of `params` as RGB pixels; leaves the pipeline's scheduler as it was."""
    with scheduler_of(pipe, params):
        out = pipe(width=params.width, height=params.height, **_common(params, seed))
    return np.asarray(out.images[0])


def plain_images(pipe: _Pipe, params: ImageParams, seeds: list[int]) -> list[np.ndarray]:
    """The images of `seeds` made as one batch (one generator per image, as the engine
    batches a job's images: worker.image.batch) as RGB pixels."""
    arguments = {
        **_common(params, seeds[0]),
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        "num_images_per_prompt": len(seeds),
    }
    with scheduler_of(pipe, params):
        out = pipe(width=params.width, height=params.height, **arguments)
    return [np.asarray(image) for image in out.images]


def _sized(image: Image.Image, mode: str, params: ImageParams) -> Image.Image:
    return image.convert(mode).resize((params.width, params.height), Image.Resampling.LANCZOS)


def plain_img2img(
    pipe: StableDiffusionPipeline, params: ImageParams, seed: int, source: Image.Image
) -> np.ndarray:
    """Image `seed` of an img2img job from `source`, with diffusers' img2img pipeline on
    `pipe`'s components."""
    with scheduler_of(pipe, params) as scheduler:
        img2img = StableDiffusionImg2ImgPipeline(**{**pipe.components, "scheduler": scheduler})
        img2img.set_progress_bar_config(disable=True)
        out = img2img(
            image=_sized(source, "RGB", params),
            strength=params.denoising_strength,
            **_common(params, seed),
        )
    return np.asarray(out.images[0])


def plain_inpaint(
    pipe: StableDiffusionPipeline,
    params: ImageParams,
    seed: int,
    source: Image.Image,
    mask: Image.Image,
) -> np.ndarray:
    """Image `seed` of an inpainting job: `mask` (white = repaint) over `source`, with
    diffusers' inpaint pipeline on `pipe`'s components (either kind of UNet)."""
    with scheduler_of(pipe, params) as scheduler:
        inpaint = StableDiffusionInpaintPipeline(**{**pipe.components, "scheduler": scheduler})
        inpaint.set_progress_bar_config(disable=True)
        out = inpaint(
            image=_sized(source, "RGB", params),
            mask_image=_sized(mask, "L", params),
            width=params.width,
            height=params.height,
            strength=params.denoising_strength,
            **_common(params, seed),
        )
    assert isinstance(out, StableDiffusionPipelineOutput)
    return np.asarray(out.images[0])


def plain_controlnet(
    pipe: StableDiffusionPipeline,
    params: ImageParams,
    seed: int,
    controlnet: ControlNetModel,
    control: Image.Image,
) -> np.ndarray:
    """Image `seed` of a ControlNet job guided by the control map `control` (the job's
    size), with diffusers' ControlNet pipeline on `pipe`'s components, from noise."""
    with scheduler_of(pipe, params) as scheduler:
        components = {**pipe.components, "scheduler": scheduler}
        control_pipe = StableDiffusionControlNetPipeline(**components, controlnet=controlnet)
        control_pipe.set_progress_bar_config(disable=True)
        out = control_pipe(
            image=control, width=params.width, height=params.height, **_common(params, seed)
        )
    assert isinstance(out, StableDiffusionPipelineOutput)
    return np.asarray(out.images[0])


def plain_xl_source(
    pipe: StableDiffusionXLPipeline,
    params: ImageParams,
    seed: int,
    source: Image.Image,
    mask: Image.Image | None = None,
) -> np.ndarray:
    """Image `seed` of an SDXL img2img job (or, with `mask`, inpainting job) from `source`,
    with diffusers' SDXL img2img or inpaint pipeline on `pipe`'s components."""
    with scheduler_of(pipe, params) as scheduler:
        components = {**pipe.components, "scheduler": scheduler}
        image = _sized(source, "RGB", params)
        common = {**_common(params, seed), "strength": params.denoising_strength}
        if mask is None:
            img2img = StableDiffusionXLImg2ImgPipeline(**components)
            img2img.set_progress_bar_config(disable=True)
            out = img2img(image=image, **common)
        else:
            inpaint = StableDiffusionXLInpaintPipeline(**components)
            inpaint.set_progress_bar_config(disable=True)
            size = {"width": params.width, "height": params.height}
            out = inpaint(image=image, mask_image=_sized(mask, "L", params), **size, **common)
    return np.asarray(out.images[0])
