"""Generation parameters of an image job, validated at every boundary.

These are hard protocol limits; a coordinator narrows them further by configuration
(see `coordinator.config`), for example for anonymous requests.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol.samplers import DEFAULT_SAMPLER, SAMPLERS

__all__ = [
    "MAX_MODEL_NAME",
    "MAX_N",
    "MAX_SEED",
    "MAX_SIDE",
    "MAX_STEPS",
    "MAX_WORKER_MODELS",
    "MIN_SIDE",
    "ImageParams",
    "ModelName",
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

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def seeds(self) -> list[int]:
        """The seed of each image; only valid once `seed` is set."""
        if self.seed is None:
            raise ValueError("seed is not set yet")
        return [self.seed + i for i in range(self.n)]
