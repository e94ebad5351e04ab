"""The engine call of an image job with LoRAs or textual inversions.

The worker resolves and downloads the files (worker.image.civitai) and sends them with the
job; the engine loads them with diffusers (`load_lora_weights` + `set_adapters`, not fused;
`load_textual_inversion`) and runs the job as `protocol.engine.IMAGE` does.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from protocol.engine import EngineCall, ImageProgress, ImageResult
from protocol.loras import MAX_LORAS, MAX_TIS
from protocol.params import ImageParams

__all__ = ["ADAPTED_IMAGE", "AdaptedImage", "EngineLora", "EngineTi"]


class EngineLora(BaseModel):
    """A downloaded LoRA as the engine loads it: the file (bound read-only into the sandbox),
    an adapter name and the strengths of `set_adapters`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    adapter: str = Field(min_length=1)
    model: float
    clip: float


class EngineTi(BaseModel):
    """A downloaded textual inversion: the file, the token it is loaded as, its strength."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    token: str = Field(min_length=1)
    strength: float = 1.0


class AdaptedImage(BaseModel):
    """An image job with LoRAs and TIs: `params` (the prompt with any injected triggers and
    tokens) and the files to apply."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: ImageParams
    loras: list[EngineLora] = Field(default=[], max_length=MAX_LORAS)
    tis: list[EngineTi] = Field(default=[], max_length=MAX_TIS)


# AdaptedImage (+ the source image and mask, as for IMAGE) -> ImageResult (+ one PNG each)
ADAPTED_IMAGE: EngineCall[AdaptedImage, ImageProgress, ImageResult] = EngineCall(
    "adapted_image", AdaptedImage, ImageResult, ImageProgress
)
