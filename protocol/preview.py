"""Live previews of an image being sampled (README: Live previews).

Every few sampling steps the engine turns its current latents into a small picture
(worker.image.preview); the worker attaches the latest one to a progress report while some
requester watches the job's event stream with `?previews=true`, and the coordinator sends
it on that stream as a `preview` event (a `JobPreview`). Previews are never stored as
results, never paid for and never compared by spot checks.

A preview crosses three boundaries as base64 text (engine -> worker -> coordinator ->
requester), so its bytes are bounded here once: `PREVIEW_MAX_BYTES` keeps a progress report
with one inside the coordinator's default request body (64 KiB). `preview_format` names the
picture's format from its first bytes (JPEG, PNG or WebP) and refuses anything else.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.params import MAX_N, MAX_STEPS

__all__ = [
    "PREVIEW_BASE64_CHARS",
    "PREVIEW_MAX_BYTES",
    "PREVIEW_MAX_SIDE",
    "JobPreview",
    "PreviewType",
    "decode_preview",
    "preview_format",
]

# the most bytes of one preview picture (a latent-size JPEG is a few KB)
PREVIEW_MAX_BYTES = 32 * 1024
# the base64 text of the largest picture
PREVIEW_BASE64_CHARS = 4 * ((PREVIEW_MAX_BYTES + 2) // 3)
# the longest side of a preview in pixels (an SDXL latent of a 2048-pixel image is 256)
PREVIEW_MAX_SIDE = 256

PreviewType = Literal["image/jpeg", "image/png", "image/webp"]


def preview_format(data: bytes) -> PreviewType | None:
    """The picture's media type from its magic bytes; None for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def decode_preview(text: str) -> tuple[bytes, PreviewType]:
    """The picture in `text` (base64) and its type; ValueError saying what is wrong."""
    if len(text) > PREVIEW_BASE64_CHARS:
        raise ValueError(f"a preview may have at most {PREVIEW_MAX_BYTES} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"a preview must be base64: {exc}") from None
    kind = preview_format(data)
    if kind is None:
        raise ValueError("a preview must be a JPEG, PNG or WebP picture")
    return data, kind


class JobPreview(BaseModel):
    """A `preview` event of a job's event stream: image `image` of the job after sampling
    step `step` of `steps`, as `data` (base64 of a `content_type` picture)."""

    model_config = ConfigDict(frozen=True)

    image: int = Field(ge=0, lt=MAX_N)
    step: int = Field(ge=0, le=MAX_STEPS * 2)
    steps: int = Field(ge=1, le=MAX_STEPS * 2)
    content_type: PreviewType
    data: str = Field(max_length=PREVIEW_BASE64_CHARS)
