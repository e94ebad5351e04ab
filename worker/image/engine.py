"""Stable Diffusion inference, run inside the sandbox's child process.

The sandbox creates one `ImageEngine` per process (loading the pipeline once; importing
torch and diffusers alone takes seconds) and calls `handle` for each job. Image i of a job
is made with a fresh CPU generator seeded `seed + i`, so it is reproducible bit for bit on
the same settings and independent of the device; batched with other images of its job, it
may differ by a level in the last bits (`worker.image.batch`).

A job with a source image (`params.source_processing`, the bytes beside it, shaped by
`worker.image.sources`) runs diffusers' own pipeline for it, built on the loaded components
(never a second copy of the weights): `StableDiffusionImg2ImgPipeline` for img2img,
`StableDiffusionInpaintPipeline` for inpainting and outpainting, whether the checkpoint is
an inpainting one (9-channel UNet: mask and masked image as conditioning) or a plain one
(4 channels: the known area's latents are blended back in after each step). An inpainting
checkpoint serves only inpainting and outpainting. A ControlNet job (`params.control_type`)
runs `StableDiffusionControlNetPipeline` on the same modules (`worker.image.control`).

The pipeline follows the model (`worker.image.baselines`): SD 1.x and SD 2 as above, SDXL
with diffusers' SDXL pipelines (txt2img, img2img, inpainting; no ControlNet yet), and an
optional SDXL refiner for plain txt2img jobs (`worker.image.refiner`).
The images of a job run as one UNet batch when they fit (`worker.image.batch`), on the
pipeline placed with or without `--low-vram` (`worker.image.low_vram`); the result reports
the job's peak memory (`worker.image.memory`).

Image extras: the hires fix (`worker.image.hires`: txt2img at the native size, latents
upscaled, img2img on the same modules) and the donor's post-processors
(`worker.image.postprocess`: GFPGAN, then an upscaler) on each finished image.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from diffusers.pipelines.controlnet.pipeline_controlnet import (
    StableDiffusionControlNetPipeline,
)

# (from its module: mypy resolves `diffusers.StableDiffusionPipeline` to a placeholder class)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from protocol.adapted import ADAPTED_IMAGE, AdaptedImage
from protocol.engine import (
    IMAGE,
    IMAGE_INFO,
    ImageEngineInfo,
    ImageEngineOptions,
    ImageProgress,
    ImageResult,
    NoMessage,
)
from protocol.infotext import PNG_PARAMETERS_KEY, parameters_text
from protocol.params import ImageParams, sampled_steps
from protocol.refiner import refiner_takes
from sandbox.calls import CallTable, Emit
from worker.errors import InvalidGenerationInput, UnsupportedArchitecture
from worker.image.adapters_engine import EngineAdapters
from worker.image.baselines import (
    BasePipeline,
    SourcePipeline,
    baseline_of,
    load_pipeline,
    source_pipeline,
    text_encoding,
)
from worker.image.batch import BatchProgress, chunks, generators
from worker.image.conditioning import Conditioning, encode_job, prompt_arguments, switched_inputs
from worker.image.control import ControlJob, ControlNets
from worker.image.hires import hires_first_pass, hires_image
from worker.image.low_vram import place_pipeline
from worker.image.memory import PeakMemory
from worker.image.model_source import resolve_model
from worker.image.postprocess import PostProcessors
from worker.image.preview import Previewer
from worker.image.refiner import Refiner, arguments_at, base_steps, load_refiner
from worker.image.samplers import make_scheduler
from worker.image.sources import Sources, prepare_sources
from worker.image.tiling import set_tiling

__all__ = ["INPAINT_UNET_CHANNELS", "ImageEngine", "encode_png", "load_pipeline"]

# the UNet input of an inpainting checkpoint: noisy latent, mask and masked image latent
INPAINT_UNET_CHANNELS = 9

# any of the pipelines the engine runs
_Pipeline = BasePipeline | SourcePipeline | StableDiffusionControlNetPipeline

logger = logging.getLogger(__name__)


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
        if settings.low_vram and settings.controlnets and self.device.type == "cuda":
            raise ValueError(
                "ControlNet with --low-vram on CUDA is not supported (the control models are "
                "not offloaded); drop --low-vram or the --controlnet flags"
            )
        if settings.low_vram and settings.refiner and self.device.type == "cuda":
            raise ValueError(
                "--refiner with --low-vram on CUDA is not supported (the refiner shares "
                "modules with the base, which model CPU offload cannot hook twice); drop "
                "--low-vram or --refiner"
            )
        self.memory = PeakMemory(self.device)
        self.memory.start()
        # width x height x images of one UNet batch (worker.image.batch)
        self.max_batch_pixels = settings.max_batch_pixels
        pipe = load_pipeline(self.source)
        self.dtype = place_pipeline(pipe, self.device, low_vram=settings.low_vram)
        self.pipe = pipe
        self.baseline = baseline_of(pipe)
        if self.baseline == "sdxl" and settings.controlnets:
            raise UnsupportedArchitecture(
                f"{self.model_name} is an SDXL checkpoint: this worker serves ControlNet only "
                "on SD 1.x and 2.x checkpoints; start it without --controlnet"
            )
        self.inpainting_checkpoint = pipe.unet.config.in_channels == INPAINT_UNET_CHANNELS
        # the same modules under the pipelines for source images (built on first use)
        self._img2img: SourcePipeline | None = None
        self._inpaint: SourcePipeline | None = None
        self.base_scheduler_config = dict(pipe.scheduler.config)
        self.previewer = Previewer.build(
            self.baseline, settings.preview_every, settings.preview_decoder, self.device
        )
        folder = settings.post_processors
        self.post = PostProcessors.load(Path(folder) if folder else None, self.device)
        # (an SDXL engine has none: refused above)
        sd_pipe = cast(StableDiffusionPipeline, pipe)
        self.controls = ControlNets(settings.controlnets, sd_pipe, settings.annotators)
        self.text = text_encoding(pipe, self.device)
        self.refiner: Refiner | None = None
        if settings.refiner is not None:
            refiner_config = settings.refiner_config
            self.refiner = load_refiner(
                resolve_model(settings.refiner, Path(refiner_config) if refiner_config else None),
                pipe,
                settings.refiner_switch,
                self.baseline,
                self.model_name,
            )
            place_pipeline(self.refiner.pipe, self.device, low_vram=settings.low_vram)
        self.calls = CallTable()
        self.calls.add_binary(IMAGE, self.image)
        self.calls.add(IMAGE_INFO, self.info)
        # LoRAs and textual inversions (worker.image.adapters_engine)
        self.adapters = EngineAdapters(pipe)
        self.calls.add_binary(ADAPTED_IMAGE, self.adapted_image)
        logger.info(
            "loaded %s (%s, %s) on %s",
            self.model_name,
            self.baseline,
            self.source.kind,
            self.device,
        )
        self.loaded_peak = self.memory.peak()

    def handle(
        self,
        kind: str,
        payload: Mapping[str, object],
        emit: Callable[[dict[str, object]], None],
        blobs: list[bytes] | None = None,
    ) -> tuple[dict[str, object], list[bytes]]:
        """`Engine.handle`: validates `payload` as the call's request (see `image`)."""
        return self.calls.handle(kind, payload, emit, blobs)

    def info(
        self, request: NoMessage, emit: Emit[NoMessage]
    ) -> tuple[ImageEngineInfo, list[bytes]]:
        """What was loaded: the worker offers inpainting jobs only to an inpainting
        checkpoint (`IMAGE_INFO`)."""
        info = ImageEngineInfo(
            model=self.model_name,
            inpainting=self.inpainting_checkpoint,
            baseline=self.baseline,
            dtype=str(self.dtype).removeprefix("torch."),
            peak_memory_bytes=self.loaded_peak,
            refiner=None if self.refiner is None else self.refiner.name,
            refiner_switch=None if self.refiner is None else self.refiner.switch,
        )
        return info, []

    def image(
        self, params: ImageParams, inputs: list[bytes], emit: Emit[ImageProgress]
    ) -> tuple[ImageResult, list[bytes]]:
        """Run one job; returns its ImageResult and one PNG per image, emitting an
        ImageProgress as each sampling step finishes. `inputs`: the source image and
        mask, if the job has them (see `protocol.engine.IMAGE`)."""
        if params.seed is None:
            raise ValueError("payload has no seed; the caller must choose it before the job")
        self.memory.start()
        self._check_checkpoint(params)
        missing = self.post.check(params)
        if missing:
            raise InvalidGenerationInput(
                "post_processing",
                f"this worker holds no weights for {', '.join(missing)}; "
                "start it with --post-processors DIR holding them",
            )
        self.text.check_clip_skip(params.clip_skip, self.model_name)
        self.adapters.check(params)
        sources = prepare_sources(params, inputs)
        control = None
        if params.control_type is not None and sources is not None:
            control = self.controls.job(params, sources.image)
        if control is not None and params.return_control_map:
            blobs = [self._control_map_png(params, control, seed) for seed in params.seeds()]
        else:
            # A1111's prompt syntax and clip skip, encoded once for all the job's images
            prompts = encode_job(
                self.text, params.prompt, params.negative_prompt, params.steps, params.clip_skip
            )
            set_tiling((self.pipe.unet, self.pipe.vae), params.tiling)
            blobs = []
            for images in chunks(params.n, params.width * params.height, self.max_batch_pixels):
                blobs += self._images(params, sources, prompts, control, images, emit)
        width, height = params.output_size
        result = ImageResult(
            seeds=params.seeds(),
            model=self.model_name,
            width=width,
            height=height,
            peak_memory_bytes=self.memory.peak(),
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
        if sources.mask is None:
            pipe = self._img2img_pipeline()
        else:
            if self._inpaint is None:
                self._inpaint = source_pipeline(self.pipe, inpaint=True)
            pipe = self._inpaint
        pipe.scheduler = self.pipe.scheduler
        return pipe

    def _img2img_pipeline(self) -> SourcePipeline:
        if self._img2img is None:
            self._img2img = source_pipeline(self.pipe, inpaint=False)
        self._img2img.scheduler = self.pipe.scheduler
        return self._img2img

    def _control_map_png(self, params: ImageParams, control: ControlJob, seed: int) -> bytes:
        text = parameters_text(params, seed, self.model_name, control_model=control.model_name)
        return encode_png(control.image, text)

    def _images(
        self,
        params: ImageParams,
        sources: Sources | None,
        prompts: tuple[Conditioning, Conditioning],
        control: ControlJob | None,
        images: range,
        emit: Emit[ImageProgress],
    ) -> list[bytes]:
        """The PNGs of the job's images `images`, sampled as one batch."""
        seeds = [params.seeds()[i] for i in images]
        self.pipe.scheduler = make_scheduler(
            params.sampler, self.base_scheduler_config, karras=params.karras
        )
        positive, negative = prompts
        # with a source image, diffusers skips the start of the schedule
        first_pass = (
            hires_first_pass(self.pipe, params.width, params.height) if params.hires_fix else None
        )
        steps = sampled_steps(params) if first_pass or not params.hires_fix else params.steps
        reported = 0
        batch = BatchProgress(images, steps, params.n)

        def progress(
            offset: int,
            pass_steps: int,
            texts: tuple[Conditioning, Conditioning] = prompts,
            edit_offset: int = 0,
        ) -> Any:
            """The step callback of a pass of `pass_steps` sampling steps after `offset`;
            prompt editing reads `texts` at the pass's step plus `edit_offset`."""
            positive, negative = texts

            def on_step_end(
                pipe: _Pipeline, step: int, timestep: Any, kwargs: dict[str, Any]
            ) -> dict[str, Any]:
                nonlocal reported
                calls = max(pipe.num_timesteps, 1)
                # Second-order samplers (Heun, DPM2) run about two loop iterations per
                # step; report progress in the steps sampled, each step once.
                done = (step + 1) * pass_steps // calls
                if offset + done > reported:
                    reported = offset + done
                    # (a batch's preview: its first image)
                    emit(batch.event(reported, self.previewer(reported, steps, kwargs)))
                # prompt editing: the next loop iteration belongs to the pass's 0-based
                # sampling step `done` (this one to `current`), which may read another text
                current = edit_offset + step * pass_steps // calls
                now = (positive.index_at(current), negative.index_at(current))
                then = (
                    positive.index_at(edit_offset + done),
                    negative.index_at(edit_offset + done),
                )
                if now != then:
                    guided = pipe.do_classifier_free_guidance
                    kwargs.update(switched_inputs(positive, negative, then, guided, len(images)))
                return kwargs

            return on_step_end

        arguments: dict[str, Any] = {
            **prompt_arguments(positive, negative),
            "num_inference_steps": params.steps,
            "guidance_scale": params.cfg_scale,
            "generator": generators(seeds),
            "num_images_per_prompt": len(images),
            "output_type": "pil",
            # (the live previews read them: worker.image.preview)
            "callback_on_step_end_tensor_inputs": ["latents"],
        }
        if first_pass is not None:
            made = hires_image(
                self.pipe,
                self._img2img_pipeline(),
                arguments,
                first_pass,
                (params.width, params.height),
                params.hires_fix_denoising_strength,
                (progress(0, params.steps), progress(params.steps, steps - params.steps)),
            )
            return [
                self._finish(image, params, seed, first_pass, None)
                for image, seed in zip(made, seeds, strict=True)
            ]
        if self._refines(params, sources, control):
            made = self._refined(params, arguments, prompts, progress)
            return [
                self._finish(image, params, seed, None, None, refined=True)
                for image, seed in zip(made, seeds, strict=True)
            ]
        arguments["callback_on_step_end"] = progress(0, steps)
        if sources is None or sources.mask is not None or control is not None:
            arguments.update(width=params.width, height=params.height)
        if control is not None:
            # sampled from noise, guided by the control map
            arguments.update(image=control.image)
        elif sources is not None:
            # (the image already has the job's size: the pipelines do not resize it again;
            # one copy per image, so that each image's VAE sample comes from its generator)
            copies = len(images)
            arguments.update(image=[sources.image] * copies, strength=params.denoising_strength)
            if sources.mask is not None:
                arguments.update(mask_image=[sources.mask] * copies)
        if control is None:
            pipe = self._pipeline(sources)
        else:
            pipe = control.pipeline
            pipe.scheduler = self.pipe.scheduler
        result = pipe(**arguments)
        assert not isinstance(result, tuple)  # (return_dict is left True)
        return [
            self._finish(image, params, seed, None, control)
            for image, seed in zip(result.images, seeds, strict=True)
        ]

    def _refines(
        self, params: ImageParams, sources: Sources | None, control: ControlJob | None
    ) -> bool:
        """Whether the refiner takes over the job: plain txt2img only (protocol.refiner, the
        rule spot checks match checkers by; a hires fix's second pass returned before)."""
        refines = self.refiner is not None and refiner_takes(params)
        # (txt2img has no source image, so no ControlNet: prepare_sources)
        assert not refines or (sources is None and control is None)
        return refines

    def _refined(
        self,
        params: ImageParams,
        arguments: dict[str, Any],
        prompts: tuple[Conditioning, Conditioning],
        progress: Callable[..., Any],
    ) -> list[Image.Image]:
        """The base's first part of the schedule as latents, then the refiner's rest."""
        refiner = self.refiner
        assert refiner is not None
        switch = refiner.switch
        ran = base_steps(self.pipe.scheduler, params.steps, switch)
        first = {
            **arguments,
            "width": params.width,
            "height": params.height,
            "denoising_end": switch,
            "output_type": "latent",
            "callback_on_step_end": progress(0, ran),
        }
        latents = self.pipe(**first).images
        # (encoded per job: the refiner's text encoder may differ from the base's)
        texts = encode_job(
            refiner.encoding(self.device),
            params.prompt,
            params.negative_prompt,
            params.steps,
            params.clip_skip,
        )
        refiner.pipe.scheduler = make_scheduler(
            params.sampler, refiner.scheduler_config, karras=params.karras
        )
        set_tiling((refiner.pipe.unet, refiner.pipe.vae), params.tiling)
        second = {
            **{k: v for k, v in arguments.items() if "prompt_embeds" not in k},
            **arguments_at(*texts, ran),
            "image": latents,
            "denoising_start": switch,
            "output_type": "pil",
            "callback_on_step_end": progress(ran, params.steps - ran, texts, ran),
        }
        images: list[Image.Image] = refiner.pipe(**second).images
        return images

    def _finish(
        self,
        image: Image.Image,
        params: ImageParams,
        seed: int,
        first_pass: tuple[int, int] | None,
        control: ControlJob | None,
        *,
        refined: bool = False,
    ) -> bytes:
        """The post-processed image as a PNG with its parameters text."""
        if params.post_processing:
            image = self.post.apply(image, params, seed)
        control_model = None if control is None else control.model_name
        text = parameters_text(
            params,
            seed,
            self.model_name,
            first_pass,
            control_model=control_model,
            hashes={
                **self.adapters.hashes(),
                **(self.refiner.infotext() if refined and self.refiner else {}),
            },
        )
        return encode_png(image, text)
