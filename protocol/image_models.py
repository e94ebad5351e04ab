"""An image model of the operator's catalog: AI Horde's image model reference, pinned by hash.

The coordinator reads them from its `--models FILE` (`[[image_models]]` tables,
coordinator.economy.image_models); a worker serving a catalog name must report the
checkpoint hash the entry pins (`PopRequest.checkpoint_sha256`, computed as
worker.image.checkpoint_hash defines it). Jobs naming a catalog model are held to its
limits and priced by its baseline (protocol.cost.BASELINE_FACTORS).

Only pydantic: imported by the coordinator, the worker and the client alike.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from protocol.loras import Baseline
from protocol.params import MAX_MODEL_NAME, MAX_STEPS, Side

__all__ = ["MAX_TRIGGERS", "ImageModel"]

# trigger words of one model, each at most 200 characters (AI Horde's references list a few)
MAX_TRIGGERS = 64


class ImageModel(BaseModel):
    """One image model of the catalog (GET /api/v1/models/image lists them)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(min_length=1, max_length=MAX_MODEL_NAME, description="as jobs name it")
    baseline: Baseline = Field(description="its family (sd1, sd2, sdxl): prices and LoRAs")
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="the checkpoint's hash as worker.image.checkpoint_hash defines it: a "
        "single file's SHA-256, or a diffusers folder's hash over its .safetensors files",
    )
    default_width: Side = Field(description="width of jobs naming it that give no size")
    default_height: Side = Field(description="height of jobs naming it that give no size")
    max_pixels: int = Field(
        ge=64 * 64, le=4096 * 4096, description="largest width x height of its jobs"
    )
    max_steps: int = Field(ge=1, le=MAX_STEPS, description="most steps of its jobs")
    nsfw: bool = Field(
        default=False, description="it makes NSFW images: only requests with nsfw=true name it"
    )
    trigger: tuple[Annotated[str, Field(min_length=1, max_length=200)], ...] = Field(
        default=(),
        max_length=MAX_TRIGGERS,
        description="words that steer it (AI Horde's `trigger`): listed for clients to "
        "put in prompts; never added to a prompt by the coordinator",
    )
