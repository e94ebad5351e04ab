"""Stable Diffusion inference, run inside the sandbox's child process.

The sandbox creates one `ImageEngine` per process (loading the pipeline once; importing
torch and diffusers alone takes seconds) and calls `handle` for each job. Image i of a job
is made with a fresh CPU generator seeded `seed + i`, so it is reproducible bit for bit and
independent of the device, of `n`, and of which other images share the job.

A job with a source image (`params.source_processing`, the bytes beside it, shaped by
`worker.image.sources`) runs diffusers' own pipeline for it, built on the loaded components
(never a second copy of the weights): `StableDiffusionImg2ImgPipeline` for img2img,
`StableDiffusionInpaintPipeline` for inpainting and outpainting, whether the checkpoint is
an inpainting one (9-channel UNet: mask and masked image as conditioning) or a plain one
(4 channels: the known area's latents are blended back in after each step). An inpainting
checkpoint serves only inpainting and outpainting.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

# (from its module: mypy resolves `diffusers.StableDiffusionPipeline` to a placeholder class)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
    StableDiffusionInpaintPipeline,
)
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from protocol.adapted import ADAPTED_IMAGE, AdaptedImage
from protocol.engine import IMAGE, ImageEngineOptions, ImageProgress, ImageResult
from protocol.infotext import PNG_PARAMETERS_KEY, parameters_text
from protocol.params import ImageParams, sampled_steps
from sandbox.calls import CallTable, Emit
from worker.errors import InvalidGenerationInput, ModelNotFound
from worker.image.adapters_engine import EngineAdapters
from worker.image.model_source import ModelSource, resolve_model
from worker.image.samplers import make_scheduler
from worker.image.sources import Sources, prepare_sources

__all__ = ["INPAINT_UNET_CHANNELS", "ImageEngine", "encode_png", "load_pipeline"]

# the UNet input of an inpainting checkpoint: noisy latent, mask and masked image latent
INPAINT_UNET_CHANNELS = 9

# any of the three pipelines the engine runs
_Pipeline = (
    StableDiffusionPipeline | StableDiffusionImg2ImgPipeline | StableDiffusionInpaintPipeline
)

logger = logging.getLogger(__name__)


def load_pipeline(source: ModelSource) -> StableDiffusionPipeline:
    """Load the pipeline `source` describes, safetensors only, in float32 on the CPU."""
    if source.kind == "folder":
        return StableDiffusionPipeline.from_pretrained(
            source.location, use_safetensors=True, local_files_only=True, dtype=torch.float32
        )
    if source.kind == "single_file":
        return StableDiffusionPipeline.from_single_file(
            source.location,
            config=str(source.config_dir),
            local_files_only=True,
            dtype=torch.float32,
        )
    # The worker downloads hub models before the engine starts (download_hub_model): the
    # engine has no network, so a hub id here means nothing was downloaded.
    raise ModelNotFound(
        f"{source.location!r} is not a local folder or file; the worker downloads hub models "
        "before starting the engine, so pass the id to `idlegrid worker image --model`"
    )


def encode_png(image: Image.Image, parameters: str) -> bytes:
    """PNG bytes with AUTOMATIC1111's `parameters` text chunk; same input, same bytes."""
    info = PngInfo()
    info.add_text(PNG_PARAMETERS_KEY, parameters)  # becomes iTXt if not latin-1
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=6)
    return buffer.getvalue()


class ImageEngine:
    """Holds one Stable Diffusion pipeline and turns image jobs into PNGs.

    options: `protocol.engine.ImageEngineOptions` as JSON; calls: `protocol.engine.IMAGE`.
    """

    def __init__(self, options: Mapping[str, object]) -> None:
        settings = ImageEngineOptions.model_validate(options)
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        config = settings.model_config_dir
        self.source = resolve_model(settings.model, Path(config) if config else None)
        self.model_name: str = settings.model_name or self.source.name
        # Generators stay on the CPU whatever the device, so seeds mean the same everywhere.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        max_vram = settings.max_vram_bytes
        if max_vram and self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, max_vram / total))
        pipe = load_pipeline(self.source)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.inpainting_checkpoint = pipe.unet.config.in_channels == INPAINT_UNET_CHANNELS
        # the same modules under the pipelines for source images (built on first use)
        self._img2img: StableDiffusionImg2ImgPipeline | None = None
        self._inpaint: StableDiffusionInpaintPipeline | None = None
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self.calls = CallTable()
        self.calls.add_binary(IMAGE, self.image)
        # LoRAs and textual inversions (worker.image.adapters_engine)
        self.adapters = EngineAdapters(pipe)
        self.calls.add_binary(ADAPTED_IMAGE, self.adapted_image)
        logger.info("loaded %s (%s) on %s", self.model_name, self.source.kind, self.device)

    def handle(
        self,
        kind: str,
        payload: Mapping[str, object],
        emit: Callable[[dict[str, object]], None],
        blobs: list[bytes] | None = None,
    ) -> tuple[dict[str, object], list[bytes]]:
        """`Engine.handle`: validates `payload` as the call's request (see `image`)."""
        return self.calls.handle(kind, payload, emit, blobs)

    def image(
        self, params: ImageParams, inputs: list[bytes], emit: Emit[ImageProgress]
    ) -> tuple[ImageResult, list[bytes]]:
        """Run one job; returns its ImageResult and one PNG per image, emitting an
        ImageProgress as each sampling step finishes. `inputs`: the source image and
        mask, if the job has them (see `protocol.engine.IMAGE`)."""
        if params.seed is None:
            raise ValueError("payload has no seed; the caller must choose it before the job")
        self._check_checkpoint(params)
        self.adapters.check(params)
        sources = prepare_sources(params, inputs)
        blobs = [self._one_image(params, sources, i, emit) for i in range(params.n)]
        result = ImageResult(
            seeds=params.seeds(), model=self.model_name, width=params.width, height=params.height
        )
        return result, blobs

    def adapted_image(
        self, request: AdaptedImage, inputs: list[bytes], emit: Emit[ImageProgress]
    ) -> tuple[ImageResult, list[bytes]]:
        """`image` with the LoRAs and textual inversions the worker downloaded."""
        self.adapters.apply(request)
        return self.image(request.params, inputs, emit)

    def _check_checkpoint(self, params: ImageParams) -> None:
        if self.inpainting_checkpoint and params.source_processing not in (
            "inpainting",
            "outpainting",
        ):
            raise InvalidGenerationInput(
                "source_processing",
                f"{self.model_name} is an inpainting checkpoint: it serves only "
                f"'inpainting' and 'outpainting' jobs, not {params.source_processing!r}",
            )

    def _pipeline(self, sources: Sources | None) -> _Pipeline:
        """The pipeline for the job, on the loaded modules, with the current scheduler."""
        if sources is None:
            return self.pipe
        pipe: _Pipeline
        components = {**self.pipe.components, "requires_safety_checker": False}
        if sources.mask is None:
            if self._img2img is None:
                self._img2img = StableDiffusionImg2ImgPipeline(**components)
                self._img2img.set_progress_bar_config(disable=True)
            pipe = self._img2img
        else:
            if self._inpaint is None:
                self._inpaint = StableDiffusionInpaintPipeline(**components)
                self._inpaint.set_progress_bar_config(disable=True)
            pipe = self._inpaint
        pipe.scheduler = self.pipe.scheduler
        return pipe

    def _one_image(
        self, params: ImageParams, sources: Sources | None, index: int, emit: Emit[ImageProgress]
    ) -> bytes:
        assert params.seed is not None
        seed = params.seed + index
        self.pipe.scheduler = make_scheduler(params.sampler, self.base_scheduler_config)
        # with a source image, diffusers skips the start of the schedule
        steps = sampled_steps(params)
        reported = 0

        def on_step_end(
            pipe: _Pipeline, step: int, timestep: Any, kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            nonlocal reported
            # Second-order samplers (Heun, DPM2) run about two loop iterations per step;
            # report progress in the steps sampled, each step once.
            done = (step + 1) * steps // max(pipe.num_timesteps, 1)
            if done > reported:
                reported = done
                emit(ImageProgress(image=index, step=done, steps=steps, n=params.n))
            return kwargs

        arguments: dict[str, Any] = {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt or None,
            "num_inference_steps": params.steps,
            "guidance_scale": params.cfg_scale,
            "generator": torch.Generator("cpu").manual_seed(seed),
            "num_images_per_prompt": 1,
            "output_type": "pil",
            "callback_on_step_end": on_step_end,
        }
        if sources is None or sources.mask is not None:
            arguments.update(width=params.width, height=params.height)
        if sources is not None:
            # (the image already has the job's size: the pipelines do not resize it again)
            arguments.update(image=sources.image, strength=params.denoising_strength)
            if sources.mask is not None:
                arguments.update(mask_image=sources.mask)
        result = self._pipeline(sources)(**arguments)
        assert not isinstance(result, tuple)  # (return_dict is left True)
        image = result.images[0]
        hashes = self.adapters.hashes()
        return encode_png(image, parameters_text(params, seed, self.model_name, hashes))
