"""LoRAs and textual inversions as AI Horde's clients name them, and what a worker resolved.

A job names CivitAI models (`params.loras`, `params.tis`): by model id (a name made only of
digits), by version id (`is_version`), or by name (a CivitAI search). The worker resolves
them through CivitAI's REST API v1 and downloads the files (worker.image.civitai); the
engine applies them (`ADAPTED_IMAGE`). `sha256` pins an exact file: verification re-runs
carry the version id and hash the first result resolved, so a later change on CivitAI
cannot convict an honest worker.

Only pydantic: imported by the coordinator, the worker and the engine alike.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ADAPTER_FAILURES",
    "BASELINES",
    "CIVITAI_URL",
    "CIVITAI_BASELINES",
    "MAX_LORAS",
    "MAX_TIS",
    "Baseline",
    "LoraSpec",
    "ResolvedAdapter",
    "TiSpec",
    "baseline_of",
]

# CivitAI's own origin (a worker's --civitai-url)
CIVITAI_URL = "https://civitai.com"
# how a worker's failure report starts when a job's LoRA or TI cannot be used (AI Horde's
# gen_metadata values): not the worker's fault, so not counted against it
ADAPTER_FAILURES = ("download_failed:", "baseline_mismatch:", "parse_failed:")
# AI Horde's limits per job
MAX_LORAS = 5
MAX_TIS = 20
MAX_ADAPTER_NAME = 255
# AI Horde's bounds of a LoRA's model and clip strengths, and of a TI's strength
MAX_STRENGTH = 5.0

# the checkpoint families a LoRA or TI is made for
Baseline = Literal["sd1", "sd2", "sdxl"]
BASELINES: tuple[Baseline, ...] = ("sd1", "sd2", "sdxl")

# CivitAI's `baseModel` of a version -> our baseline (others are served by no checkpoint here)
CIVITAI_BASELINES: dict[str, Baseline] = {
    "SD 1.4": "sd1",
    "SD 1.5": "sd1",
    "SD 1.5 LCM": "sd1",
    "SD 1.5 Hyper": "sd1",
    "SD 2.0": "sd2",
    "SD 2.0 768": "sd2",
    "SD 2.1": "sd2",
    "SD 2.1 768": "sd2",
    "SD 2.1 Unclip": "sd2",
    "SDXL 0.9": "sdxl",
    "SDXL 1.0": "sdxl",
    "SDXL 1.0 LCM": "sdxl",
    "SDXL Turbo": "sdxl",
    "SDXL Lightning": "sdxl",
    "SDXL Hyper": "sdxl",
    "Pony": "sdxl",
    "Illustrious": "sdxl",
    "NoobAI": "sdxl",
}


def baseline_of(civitai_base_model: str) -> Baseline | None:
    """Our baseline for CivitAI's `baseModel` text, or None when no checkpoint here serves it."""
    return CIVITAI_BASELINES.get(civitai_base_model.strip())


_Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
_Strength = Annotated[float, Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(
        min_length=1,
        max_length=MAX_ADAPTER_NAME,
        description="a CivitAI model name, or its id (digits only; a version id with is_version)",
    )
    # set on verification re-runs: the version and file the first result used (never by
    # AI Horde's clients); `name` stays, as a TI's token and for the trigger words
    version_id: int | None = Field(
        default=None,
        ge=0,
        exclude_if=lambda value: value is None,
        description="pins the CivitAI version (a verification re-run sets it)",
    )
    sha256: _Sha256 | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="pins the file: its SHA-256 must match (a verification re-run sets it)",
    )

    @field_validator("name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a CivitAI model: its name or its id")
        return value.strip()


class LoraSpec(_Spec):
    """One LoRA of a job (AI Horde's `ModelPayloadLorasStable`)."""

    model: _Strength = Field(default=1.0, description="strength on the UNet")
    clip: _Strength = Field(default=1.0, description="strength on the text encoder")
    inject_trigger: str | None = Field(
        default=None,
        max_length=MAX_ADAPTER_NAME,
        exclude_if=lambda value: value is None,
        description="append trigger words to the prompt: 'any' (the first), 'all', or text "
        "that picks the trigger words containing it",
    )
    is_version: bool = Field(
        default=False,
        exclude_if=lambda value: value is False,
        description="`name` is a CivitAI model version id",
    )


class TiSpec(_Spec):
    """One textual inversion of a job (AI Horde's `ModelPayloadTextualInversionsStable`)."""

    inject_ti: Literal["prompt", "negprompt"] | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="put the embedding's token at the start of the prompt or negative "
        "prompt; without it, write the name in the prompt yourself",
    )
    strength: _Strength = Field(
        default=1.0,
        exclude_if=lambda value: value == 1.0,
        description="scales the embedding's vectors",
    )


class ResolvedAdapter(BaseModel):
    """What a worker resolved one LoRA or TI of a job to (signed into its result)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["lora", "ti"]
    # the name as the job gave it
    name: str = Field(min_length=1, max_length=MAX_ADAPTER_NAME)
    version_id: int = Field(ge=0)
    sha256: _Sha256
