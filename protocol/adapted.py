"""The engine call of an image job with LoRAs or textual inversions.

The worker resolves and downloads the files (worker.image.civitai) and sends them with the
job; the engine loads them with diffusers (`load_lora_weights` + `set_adapters`, not fused;
`load_textual_inversion`) and runs the job as `protocol.engine.IMAGE` does.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from protocol.engine import EngineCall, ImageProgress, ImageResult
from protocol.loras import MAX_LORAS, MAX_TIS, ResolvedAdapter
from protocol.params import ImageParams
from protocol.signing import canonical_json

__all__ = [
    "ADAPTED_IMAGE",
    "AdaptedImage",
    "EngineLora",
    "EngineTi",
    "adapters_message",
    "pinned",
    "resolved_matches",
]


def adapters_message(job_id: str, params_digest: str, adapters: list[ResolvedAdapter]) -> bytes:
    """What a worker signs about the LoRAs and TIs it used for a job (beside its images)."""
    return canonical_json(
        {
            "domain": "idlegrid/adapters/v1",
            "job": job_id,
            "params": params_digest,
            "adapters": [adapter.model_dump(mode="json") for adapter in adapters],
        }
    )


def resolved_matches(params: ImageParams, adapters: list[ResolvedAdapter]) -> bool:
    """Whether `adapters` names the job's LoRAs, then its TIs, in order (and any pins)."""
    wanted = [("lora", spec) for spec in params.loras] + [("ti", spec) for spec in params.tis]
    if len(wanted) != len(adapters):
        return False
    for (kind, spec), got in zip(wanted, adapters, strict=True):
        if got.kind != kind or got.name != spec.name:
            return False
        if spec.version_id is not None and got.version_id != spec.version_id:
            return False
        if spec.sha256 is not None and got.sha256 != spec.sha256:
            return False
    return True


def pinned(params: ImageParams, adapters: list[ResolvedAdapter]) -> ImageParams:
    """`params` with each LoRA and TI pinned to the version and file a result used (the
    parameters of its verification re-run)."""
    pins = [{"version_id": a.version_id, "sha256": a.sha256} for a in adapters]
    loras = [spec.model_copy(update=pin) for spec, pin in zip(params.loras, pins, strict=False)]
    tis = [
        spec.model_copy(update=pin)
        for spec, pin in zip(params.tis, pins[len(params.loras) :], strict=False)
    ]
    return params.model_copy(update={"loras": loras, "tis": tis})


class EngineLora(BaseModel):
    """A downloaded LoRA as the engine loads it: the file (bound read-only into the sandbox),
    an adapter name and the strengths of `set_adapters`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    adapter: str = Field(min_length=1)
    model: float
    clip: float
    # the file's SHA-256 (written into the PNG as A1111's `Lora hashes`) and job name
    sha256: str = ""
    name: str = ""


class EngineTi(BaseModel):
    """A downloaded textual inversion: the file, the token it is loaded as, its strength."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    token: str = Field(min_length=1)
    strength: float = 1.0
    # the file's SHA-256 (A1111's `TI hashes` in the PNG)
    sha256: str = ""


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
