"""Generation parameters of an image job, validated at every boundary.

These are hard protocol limits; a coordinator narrows them further by configuration
(see `coordinator.config`), for example for anonymous requests.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Annotated, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from protocol.control import ControlType, control_problem
from protocol.loras import MAX_LORAS, MAX_TIS, LoraSpec, TiSpec
from protocol.postprocess import (
    DEFAULT_FACEFIXER_STRENGTH,
    DEFAULT_HIRES_STRENGTH,
    check_post_processing,
    upscale_factor,
)
from protocol.samplers import DEFAULT_SAMPLER, SAMPLERS, WITHOUT_KARRAS

__all__ = [
    "DEFAULT_DENOISING_STRENGTH",
    "MAX_CLIP_SKIP",
    "MAX_MODEL_NAME",
    "MAX_N",
    "MAX_SEED",
    "MAX_SEED_VARIATION",
    "MAX_SIDE",
    "MAX_SOURCE_BASE64",
    "MAX_SOURCE_BYTES",
    "MAX_SOURCE_PIXELS",
    "MAX_STEPS",
    "MAX_WORKER_MODELS",
    "MIN_SIDE",
    "ImageParams",
    "ModelName",
    "Sha256Hex",
    "SourceProcessing",
    "sampled_steps",
    "stored_params",
]

MIN_SIDE = 64
MAX_SIDE = 2048
MAX_STEPS = 150
MAX_N = 10
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 4000
# AI Horde's bounds: CLIP layers skipped (1: none) and the seed step between images
MAX_CLIP_SKIP = 12
MAX_SEED_VARIATION = 1000
# A model's name, and how many one worker may offer: AI Horde's image model reference has
# about 250 models with names well under 100 characters. Bounded so that workers cannot
# make the network's views (GET /api/v1/network) as large as they like.
MAX_MODEL_NAME = 100
MAX_WORKER_MODELS = 256
ModelName = Annotated[str, Field(min_length=1, max_length=MAX_MODEL_NAME)]

# What a job does with a source image (AI Horde's `source_processing` values, less "remix"):
# "txt2img" takes none; the others need one (sent beside the job, see protocol.engine.IMAGE).
SourceProcessing = Literal["txt2img", "img2img", "inpainting", "outpainting"]
DEFAULT_DENOISING_STRENGTH = 0.75
# A source image or mask: its encoded size and its declared pixels, both read before any
# pixel is decoded (AI Horde accepts 3072x3072 sources; a little more room than that).
MAX_SOURCE_BYTES = 32 * 1024 * 1024
MAX_SOURCE_PIXELS = 4096 * 4096
# the longest base64 text of such an image (with room for a "data:image/png;base64," prefix)
MAX_SOURCE_BASE64 = (MAX_SOURCE_BYTES + 2) // 3 * 4 + 64

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

# the weight of an A1111 "(text:weight)" group (worker.image.prompt_syntax reads the same)
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")

Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, description="pixels, a multiple of 8")]


class ImageParams(BaseModel):
    """What to generate. Image i of a job uses seed + i x seed_variation."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    width: Side = 512
    height: Side = 512
    steps: int = Field(default=20, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(default=7.0, ge=0.0, le=30.0)
    sampler: str = DEFAULT_SAMPLER
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="random if absent")
    n: int = Field(default=1, ge=1, le=MAX_N, description="number of images")
    model: str | None = Field(
        default=None, max_length=MAX_MODEL_NAME, description="model name; any model if absent"
    )
    # Left out of dumps at their defaults, so a text-to-image job serialises, hashes and
    # signs as it did before these fields existed (protocol.signing.params_hash).
    source_processing: SourceProcessing = Field(
        default="txt2img",
        exclude_if=lambda value: value == "txt2img",
        description="what to do with the source image: img2img, inpainting (repaint where "
        "the mask is white, or the source transparent) or outpainting (fill the "
        "transparent areas); txt2img takes none",
    )
    denoising_strength: float = Field(
        default=DEFAULT_DENOISING_STRENGTH,
        validate_default=True,  # (checked against steps even when left out)
        ge=0.01,
        le=1.0,
        exclude_if=lambda value: value == DEFAULT_DENOISING_STRENGTH,
        description="how much of a source image is repainted: 1.0 all of it; "
        "int(steps x strength) sampling steps run",
    )
    # The SHA-256 (hex) of the stored source image and mask the coordinator took (a worker
    # downloads them by digest); left out of dumps when absent, so they are signed with
    # the parameters of a job that has them and change nothing for one that has not.
    source_image: Sha256Hex | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="SHA-256 of the job's source image (set by the coordinator)",
    )
    source_mask: Sha256Hex | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="SHA-256 of the job's mask (set by the coordinator)",
    )
    # Image extras (protocol.postprocess), left out of dumps when off, as above.
    hires_fix: bool = Field(
        default=False,
        exclude_if=lambda value: value is False,
        description="txt2img only: a first pass at the model's native size, its latents "
        "upscaled to width x height and sampled again (A1111's hires fix)",
    )
    hires_fix_denoising_strength: float = Field(
        default=DEFAULT_HIRES_STRENGTH,
        validate_default=True,
        ge=0.01,
        le=1.0,
        exclude_if=lambda value: value == DEFAULT_HIRES_STRENGTH,
        description="the hires fix's second pass: int(steps x strength) steps run",
    )
    post_processing: list[str] = Field(
        default=[],
        max_length=4,
        exclude_if=lambda value: not value,
        description="AI Horde's post-processors: GFPGAN (face fixer, run first) and at "
        "most one upscaler (RealESRGAN_x2plus, RealESRGAN_x4plus, "
        "RealESRGAN_x4plus_anime_6B, NMKD_Siax, 4x_AnimeSharp)",
    )
    facefixer_strength: float = Field(
        default=DEFAULT_FACEFIXER_STRENGTH,
        ge=0.0,
        le=1.0,
        exclude_if=lambda value: value == DEFAULT_FACEFIXER_STRENGTH,
        description="how much of the face fixer's result is kept (A1111's GFPGAN visibility)",
    )
    # ControlNet (protocol.control), left out of dumps when off
    control_type: ControlType | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="ControlNet: the control model guiding the image, fed a map made from "
        "the source image (source_processing 'img2img'); the image is sampled from noise",
    )
    image_is_control: bool = Field(
        default=False,
        exclude_if=lambda value: not value,
        description="the source image already is the control map (no preprocessing)",
    )
    return_control_map: bool = Field(
        default=False,
        exclude_if=lambda value: not value,
        description="return the control map made from the source image, not an image",
    )

    # AI Horde's extras; left out of dumps at their defaults (as the source fields above)
    clip_skip: int = Field(
        default=1,
        ge=1,
        le=MAX_CLIP_SKIP,
        exclude_if=lambda value: value == 1,
        description="AUTOMATIC1111's 'Clip skip': 1 uses the text encoder's last layer, "
        "n the output n - 1 layers before it (with the final layer norm)",
    )
    tiling: bool = Field(
        default=False,
        exclude_if=lambda value: not value,
        description="seamless tiles: the UNet's and VAE's convolutions pad circularly",
    )
    karras: bool = Field(
        default=False,
        exclude_if=lambda value: not value,
        description="Karras sigmas (AUTOMATIC1111's 'Schedule type: Karras'); not for "
        + ", ".join(sorted(WITHOUT_KARRAS)),
    )
    seed_variation: int = Field(
        default=1,
        ge=1,
        le=MAX_SEED_VARIATION,
        exclude_if=lambda value: value == 1,
        description="AI Horde's: image i uses seed + i x seed_variation",
    )

    # LoRAs and textual inversions from CivitAI (protocol.loras); left out of dumps when
    # empty, like the fields above
    loras: list[LoraSpec] = Field(
        default=[],
        max_length=MAX_LORAS,
        exclude_if=lambda value: not value,
        description=f"at most {MAX_LORAS} CivitAI LoRAs",
    )
    tis: list[TiSpec] = Field(
        default=[],
        max_length=MAX_TIS,
        exclude_if=lambda value: not value,
        description=f"at most {MAX_TIS} CivitAI textual inversions",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain some text; write what the image should show")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _weights_are_numbers(cls, value: str) -> str:
        # A1111's "(word:1.2)": its parser takes any run of digits and dots as the weight
        for weight in _WEIGHT.findall(value):
            try:
                float(weight)
            except ValueError:
                raise ValueError(
                    f"weight {weight!r} is not a number; write one such as (word:1.2)"
                ) from None
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            lower = value - value % 8
            raise ValueError(f"{value} is not a multiple of 8; use {lower} or {lower + 8}")
        return value

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        if value not in SAMPLERS:
            known = ", ".join(SAMPLERS)
            raise ValueError(f"unknown sampler {value!r}; choose one of: {known}")
        return value

    @field_validator("denoising_strength")
    @classmethod
    def _some_steps_run(cls, value: float, info: ValidationInfo) -> float:
        steps = info.data.get("steps")
        if info.data.get("source_processing", "txt2img") == "txt2img" or steps is None:
            return value
        if min(int(steps * value), steps) < 1:
            needed = math.ceil(1 / value)
            raise ValueError(
                f"{value} x steps {steps} runs no sampling step (int(steps x strength) = 0); "
                f"use at least {needed} steps or a larger denoising_strength"
            )
        return value

    @field_validator("hires_fix")
    @classmethod
    def _hires_txt2img(cls, value: bool, info: ValidationInfo) -> bool:
        processing = info.data.get("source_processing", "txt2img")
        if value and processing != "txt2img":
            raise ValueError(
                f"the hires fix makes a txt2img image; it cannot be used with {processing!r} "
                "(leave hires_fix out, or send no source image)"
            )
        return value

    @field_validator("hires_fix_denoising_strength")
    @classmethod
    def _hires_steps_run(cls, value: float, info: ValidationInfo) -> float:
        steps = info.data.get("steps")
        if info.data.get("hires_fix") and steps is not None and int(steps * value) < 1:
            raise ValueError(
                f"{value} x steps {steps} runs no second-pass step; use at least "
                f"{math.ceil(1 / value)} steps or a larger hires_fix_denoising_strength"
            )
        return value

    @field_validator("post_processing")
    @classmethod
    def _served_post_processing(cls, value: list[str], info: ValidationInfo) -> list[str]:
        problem = check_post_processing(value)
        if problem:
            raise ValueError(problem)
        factor = upscale_factor(value)
        width, height = info.data.get("width"), info.data.get("height")
        if width and height and max(width, height) * factor > MAX_SIDE:
            raise ValueError(
                f"the {factor}x upscaled image would be {width * factor}x{height * factor}, "
                f"over {MAX_SIDE} pixels a side; ask for a smaller image or a 2x upscaler"
            )
        return value

    @property
    def output_size(self) -> tuple[int, int]:
        """The size of the images the job returns (its upscaler multiplies both sides)."""
        factor = upscale_factor(self.post_processing)
        return self.width * factor, self.height * factor

    @field_validator("control_type", "image_is_control", "return_control_map")
    @classmethod
    def _control_fits(cls, value: object, info: ValidationInfo) -> object:
        # (each runs only when sent: every default is "off")
        field = info.field_name or ""
        data: dict[str, object] = {"control_type": None, **info.data, field: value}
        if field == "control_type" and value is not None:
            strength = data.get("denoising_strength", DEFAULT_DENOISING_STRENGTH)
            if strength != DEFAULT_DENOISING_STRENGTH:
                raise ValueError(
                    "with a control_type the image is sampled from noise, so "
                    "denoising_strength does not apply; leave it out"
                )
        problem = control_problem(
            cast("ControlType | None", data["control_type"]),  # (validated before)
            data.get("image_is_control", False) is True,
            data.get("return_control_map", False) is True,
            str(data.get("source_processing", "txt2img")),
        )
        if problem is not None and problem[0] == field:
            raise ValueError(problem[1])
        if field == "return_control_map" and value is True and data.get("post_processing"):
            # (post_processing is validated before the control fields)
            raise ValueError(
                "return_control_map returns the control map, which is not post-processed; "
                "leave post_processing out, or return_control_map"
            )
        return value

    @field_validator("karras")
    @classmethod
    def _sampler_takes_karras(cls, value: bool, info: ValidationInfo) -> bool:
        sampler = info.data.get("sampler")
        if value and sampler in WITHOUT_KARRAS:
            raise ValueError(
                f"sampler {sampler!r} takes no Karras sigmas; send karras false or choose "
                "another sampler"
            )
        return value

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def seeds(self) -> list[int]:
        """The seed of each image; only valid once `seed` is set."""
        if self.seed is None:
            raise ValueError("seed is not set yet")
        return [self.seed + i * self.seed_variation for i in range(self.n)]


def sampled_steps(params: ImageParams) -> int:
    """The sampling steps a job runs: `steps` from noise; with a source image, diffusers'
    `min(int(steps x denoising_strength), steps)` (the rest of the schedule is skipped);
    with the hires fix, `steps` plus int(steps x hires_fix_denoising_strength) (the second
    pass; a worker whose model is native at the job's size runs only the first); with
    ControlNet, `steps` from noise."""
    if params.source_processing == "txt2img":
        if params.hires_fix:
            return params.steps + int(params.steps * params.hires_fix_denoising_strength)
        return params.steps
    if params.control_type is not None:
        return params.steps
    return min(int(params.steps * params.denoising_strength), params.steps)


@functools.lru_cache(maxsize=256)
def stored_params(text: str) -> ImageParams:
    """`ImageParams.model_validate_json(text)`, remembered: a coordinator reads a job's
    stored params several times in its life (its pop, upload and result within seconds),
    and the model is frozen, so one instance serves every read. At most 256 are kept (a
    params' JSON is at most some 10 KB)."""
    return ImageParams.model_validate_json(text)
