"""The reference every image test compares against: plain diffusers, no idlegrid code
in the generation path (only the sampler-name table, to pick the same scheduler)."""

from __future__ import annotations

from pathlib import Path

import diffusers
import numpy as np
import torch

# (from its module: mypy resolves `diffusers.StableDiffusionPipeline` to a placeholder class)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)

from protocol.params import ImageParams
from worker.image.samplers import SCHEDULER_SPECS

__all__ = ["plain_image", "plain_pipeline"]


def plain_pipeline(sd: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(sd, use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_image(pipe: StableDiffusionPipeline, params: ImageParams, seed: int) -> np.ndarray:
    """Image `seed` of `params` as RGB pixels; leaves the pipeline's scheduler as it was."""
    class_name, options = SCHEDULER_SPECS[params.sampler]
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, class_name).from_config(original.config, **options)
    try:
        out = pipe(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt or None,
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            guidance_scale=params.cfg_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            num_images_per_prompt=1,
            output_type="pil",
        )
    finally:
        pipe.scheduler = original
    return np.asarray(out.images[0])
