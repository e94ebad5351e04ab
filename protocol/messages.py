"""Typed messages of the HTTP API (coordinator <-> client, coordinator <-> worker).

Versioned by addition: new fields get defaults, nothing is renamed. Requests forbid
unknown fields so a typo is an error, not a silently ignored option.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.params import MAX_N, MAX_STEPS, ImageParams

__all__ = [
    "AccountCreate",
    "AccountCreated",
    "AccountInfo",
    "ErrorBody",
    "ErrorDetail",
    "FailureReport",
    "FieldProblem",
    "Health",
    "ImageInfo",
    "ImageJobCreated",
    "JobState",
    "JobStatus",
    "LeaseExtended",
    "LeasedJob",
    "PopRequest",
    "PopResponse",
    "ProgressReport",
    "ResultAccepted",
    "ResultSubmit",
    "SubmittedImage",
    "WorkerRegister",
    "WorkerRegistered",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{1,31}$"
HEX_64 = r"^[0-9a-f]{64}$"
HEX_128 = r"^[0-9a-f]{128}$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


# --- accounts -------------------------------------------------------------------------


class AccountCreate(_Request):
    name: str = Field(
        pattern=NAME_PATTERN,
        description="2-32 letters, digits, '_', '.', '-'; starts with a letter or digit",
    )


class AccountCreated(_Response):
    name: str
    api_key: str = Field(description="shown once; the coordinator stores only its hash")
    kudos: int


class AccountInfo(_Response):
    name: str
    kudos: int


# --- image jobs -----------------------------------------------------------------------

JobState = Literal["queued", "leased", "done", "failed", "cancelled"]


class ImageJobCreated(_Response):
    id: str
    kudos_cost: int
    seed: int
    queue_position: int | None


class ImageInfo(_Response):
    index: int
    seed: int
    sha256: str
    url: str


class JobStatus(_Response):
    id: str
    kind: Literal["image"] = "image"
    state: JobState
    queue_position: int | None = Field(description="0 = next to run; null once running")
    n: int
    seeds: list[int]
    kudos_cost: int
    image: int = Field(default=0, description="index of the image being generated")
    step: int = 0
    steps: int = 0
    attempts: int = 0
    error: str | None = None
    images: list[ImageInfo] = []

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


# --- workers --------------------------------------------------------------------------


class WorkerRegister(_Request):
    name: str = Field(pattern=NAME_PATTERN)
    public_key: str = Field(pattern=HEX_64, description="Ed25519 public key, hex")
    timestamp: int = Field(description="unix seconds; must be within 5 minutes of the server")
    signature: str = Field(pattern=HEX_128, description="over registration_message(...)")


class WorkerRegistered(_Response):
    worker_id: str
    token: str = Field(description="send as X-Worker-Token on worker calls")


class PopRequest(_Request):
    models: list[str] = Field(min_length=1, max_length=32)
    max_pixels: int = Field(ge=64 * 64, le=4096 * 4096)
    max_steps: int = Field(ge=1, le=MAX_STEPS)
    wait: float = Field(default=10.0, ge=0.0, le=60.0, description="long-poll seconds")


class LeasedJob(_Response):
    id: str
    params: ImageParams
    params_hash: str
    lease_seconds: float
    lease_deadline: float


class PopResponse(_Response):
    job: LeasedJob | None


class ProgressReport(_Request):
    image: int = Field(ge=0, lt=MAX_N)
    step: int = Field(ge=0, le=MAX_STEPS * 2)
    steps: int = Field(ge=1, le=MAX_STEPS * 2)


class SubmittedImage(_Request):
    index: int = Field(ge=0, lt=MAX_N)
    seed: int = Field(ge=0)
    sha256: str = Field(pattern=HEX_64)
    signature: str = Field(pattern=HEX_128)
    png_base64: str = Field(min_length=1)


class ResultSubmit(_Request):
    images: list[SubmittedImage] = Field(min_length=1, max_length=MAX_N)


class ResultAccepted(_Response):
    id: str
    kudos_earned: int


class FailureReport(_Request):
    reason: str = Field(min_length=1, max_length=500)


# --- errors ---------------------------------------------------------------------------


class FieldProblem(_Response):
    field: str
    message: str


class ErrorDetail(_Response):
    code: str
    message: str
    fields: list[FieldProblem] = []


class ErrorBody(_Response):
    error: ErrorDetail


class LeaseExtended(_Response):
    id: str
    lease_deadline: float


class Health(_Response):
    status: Literal["ok"] = "ok"
    version: str
