"""Generation parameters of an image job, validated at every boundary.

These are hard protocol limits; a coordinator narrows them further by configuration
(see `coordinator.config`), for example for anonymous requests.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from protocol.loras import MAX_LORAS, MAX_TIS, LoraSpec, TiSpec
from protocol.samplers import DEFAULT_SAMPLER, SAMPLERS

__all__ = [
    "DEFAULT_DENOISING_STRENGTH",
    "MAX_MODEL_NAME",
    "MAX_N",
    "MAX_SEED",
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
]

MIN_SIDE = 64
MAX_SIDE = 2048
MAX_STEPS = 150
MAX_N = 10
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 4000
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

Side = Annotated[int, Field(ge=MIN_SIDE, le=MAX_SIDE, description="pixels, a multiple of 8")]


class ImageParams(BaseModel):
    """What to generate. Image i of a job uses seed + i."""

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

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def seeds(self) -> list[int]:
        """The seed of each image; only valid once `seed` is set."""
        if self.seed is None:
            raise ValueError("seed is not set yet")
        return [self.seed + i for i in range(self.n)]


def sampled_steps(params: ImageParams) -> int:
    """The sampling steps a job runs: `steps` from noise; with a source image, diffusers'
    `min(int(steps x denoising_strength), steps)` (the rest of the schedule is skipped)."""
    if params.source_processing == "txt2img":
        return params.steps
    return min(int(params.steps * params.denoising_strength), params.steps)
