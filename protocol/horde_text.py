"""AI Horde's text worker API (/api/v2/generate/text/pop and /submit), as far as idlegrid
speaks it: what KoboldCpp / aphrodite bridges (AI-Horde-Worker's scribe, horde-bridge)
send and expect.

Written from AI Horde's published API models (Haidra-Org/AI-Horde horde/apis/models:
PopInputKobold, GenerationPayloadKobold, ModelPayloadKobold, SubmitInputKobold): field names,
types and defaults are theirs. The mapping onto our text jobs is in
coordinator.http.horde_text_workers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.params import MAX_MODEL_NAME, MAX_WORKER_MODELS, ModelName

__all__ = ["TextPopRequestV2", "TextPopResponseV2", "TextSubmitRequestV2"]


class TextPopRequestV2(BaseModel):
    # AI Horde ignores what it does not know (priority_usernames, nsfw, blacklist, ...)
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64, description="the worker's name")
    models: list[ModelName] = Field(
        default=[],
        max_length=MAX_WORKER_MODELS,
        description=f"at most {MAX_WORKER_MODELS} names of at most {MAX_MODEL_NAME} characters; "
        "a catalog model's name, optionally behind the backend's prefix (koboldcpp/NAME)",
    )
    max_length: int = Field(default=512, ge=1, le=2**31, description="most tokens it generates")
    max_context_length: int = Field(
        default=2048, ge=16, le=2**31, description="most tokens of context it takes"
    )
    softprompts: list[str] | None = None
    amount: int = Field(default=1, ge=1, le=20)
    bridge_agent: str = Field(default="unknown:0:unknown", max_length=1000)
    threads: int = Field(default=1, ge=1, le=64)


class TextPopResponseV2(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None
    ids: list[str]
    payload: dict[str, Any] = Field(
        description="ModelPayloadKobold: the prompt and KoboldAI's parameters; {} for no job"
    )
    model: str | None = Field(description="the model to use, as the worker named it")
    softprompt: str | None = None
    skipped: dict[str, int]
    ttl: int | None = Field(default=None, description="seconds before the job is given away")


class TextSubmitRequestV2(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=64)
    generation: str = Field(default="", description="the generated text")
    seed: int = Field(default=0, ge=-(2**63), lt=2**64)
    state: Literal["ok", "censored", "faulted", "csam"] = "ok"
