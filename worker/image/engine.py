"""Stable Diffusion inference, run inside the sandbox's child process.

The sandbox creates one `ImageEngine` per process (loading the pipeline once; importing
torch and diffusers alone takes seconds) and calls `handle` for each job. Image i of a job
is made with a fresh CPU generator seeded `seed + i`, so it is reproducible bit for bit and
independent of the device, of `n`, and of which other images share the job.
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
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from protocol.infotext import PNG_PARAMETERS_KEY, parameters_text
from protocol.params import ImageParams
from worker.errors import ModelNotFound
from worker.image.model_source import ModelSource, resolve_model
from worker.image.samplers import make_scheduler

__all__ = ["ImageEngine", "encode_png", "load_pipeline"]

logger = logging.getLogger(__name__)

Emit = Callable[[dict[str, Any]], None]


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

    options: {"model": spec for `resolve_model`, "model_config": str | None,
    "threads": int | None (torch intra-op threads; None keeps torch's default),
    "max_vram_bytes": int | None (the GPU memory the engine may use; None = all),
    optionally "model_name": str | None (the name written into PNGs and results; defaults
    to the folder name, file stem or hub id)}.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        threads = options.get("threads")
        if threads is not None:
            torch.set_num_threads(int(threads))
        config = options.get("model_config")
        self.source = resolve_model(str(options["model"]), Path(config) if config else None)
        self.model_name: str = options.get("model_name") or self.source.name
        # Generators stay on the CPU whatever the device, so seeds mean the same everywhere.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        max_vram = options.get("max_vram_bytes")
        if max_vram and self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, int(max_vram) / total))
        pipe = load_pipeline(self.source)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.base_scheduler_config = dict(pipe.scheduler.config)
        logger.info("loaded %s (%s) on %s", self.model_name, self.source.kind, self.device)

    def handle(
        self, kind: str, payload: Mapping[str, Any], emit: Emit
    ) -> tuple[dict[str, Any], list[bytes]]:
        """Run one job; returns ({"seeds", "model", "width", "height"}, PNG bytes per image).

        `emit` receives {"image", "step", "steps", "n"} as each sampling step finishes.
        """
        if kind != "image":
            raise ValueError(f"ImageEngine handles only 'image' jobs, not {kind!r}")
        params = ImageParams.model_validate(dict(payload))
        if params.seed is None:
            raise ValueError("payload has no seed; the caller must choose it before the job")
        blobs = [self._one_image(params, i, emit) for i in range(params.n)]
        data = {
            "seeds": params.seeds(),
            "model": self.model_name,
            "width": params.width,
            "height": params.height,
        }
        return data, blobs

    def _one_image(self, params: ImageParams, index: int, emit: Emit) -> bytes:
        assert params.seed is not None
        seed = params.seed + index
        self.pipe.scheduler = make_scheduler(params.sampler, self.base_scheduler_config)
        reported = 0

        def on_step_end(
            pipe: StableDiffusionPipeline, step: int, timestep: Any, kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            nonlocal reported
            # Second-order samplers (Heun, DPM2) run about two loop iterations per step;
            # report progress in the user's steps, each step once.
            done = (step + 1) * params.steps // max(pipe.num_timesteps, 1)
            if done > reported:
                reported = done
                emit({"image": index, "step": done, "steps": params.steps, "n": params.n})
            return kwargs

        result = self.pipe(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt or None,
            width=params.width,
            height=params.height,
            num_inference_steps=params.steps,
            guidance_scale=params.cfg_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            num_images_per_prompt=1,
            output_type="pil",
            callback_on_step_end=on_step_end,
        )
        image = result.images[0]
        return encode_png(image, parameters_text(params, seed, self.model_name))
