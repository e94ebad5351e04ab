"""Source images and masks a requester sends (v1 and AI Horde v2: base64 WebP, PNG or JPEG),
checked before the job is queued or charged.

The encoded size is capped before decoding the base64 (`protocol.params.MAX_SOURCE_BYTES`),
the declared pixels are read from the header before any pixel is decoded
(`MAX_SOURCE_PIXELS`), then the image is decoded once, so a damaged file is refused here
and not by a worker. Pillow decodes at most the declared pixels, so a small file of highly
compressed zeros cannot inflate past them. The checks mirror the worker's
(`worker.image.sources`), which checks the bytes again before using them.

Every problem is a BadImage naming the field (`source_image`, `source_mask`) and the fix.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from coordinator.errors import BadImage
from protocol.params import (
    MAX_SOURCE_BASE64,
    MAX_SOURCE_BYTES,
    MAX_SOURCE_PIXELS,
    SourceProcessing,
)

__all__ = ["CheckedSources", "check_sources"]

# what AI Horde accepts as a source image or mask
_FORMATS = ("PNG", "WEBP", "JPEG")


@dataclass(frozen=True)
class CheckedSources:
    """The decoded-and-checked bytes (the source image, then the mask if any) and their
    SHA-256 hex digests, in the same order."""

    blobs: list[bytes]
    digests: list[str]


def _refuse(field: str, problem: str) -> BadImage:
    return BadImage(f"{field}: {problem}", [(field, problem)])


@dataclass(frozen=True)
class _Decoded:
    raw: bytes
    size: tuple[int, int]
    transparent: bool


def _decode(encoded: str, field: str) -> _Decoded:
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    if len(encoded) > MAX_SOURCE_BASE64:
        raise _refuse(
            field, f"is over the {MAX_SOURCE_BYTES} bytes an image may have; send a smaller one"
        )
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(field, "is not base64; send a WebP, PNG or JPEG image as base64") from None
    if not raw:
        raise _refuse(field, "is empty; send a WebP, PNG or JPEG image as base64")
    try:
        image = Image.open(io.BytesIO(raw), formats=_FORMATS)
    except Image.DecompressionBombError:
        raise _refuse(field, _too_large("declares more pixels than")) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise _refuse(field, "is not a WebP, PNG or JPEG image (or it is damaged)") from None
    with image:
        width, height = image.size  # from the header: no pixel decoded yet
        if width * height > MAX_SOURCE_PIXELS:
            raise _refuse(field, _too_large(f"is {width}x{height} pixels, over"))
        try:
            image.load()
        except Image.DecompressionBombError:  # pragma: no cover - the size was checked above
            raise _refuse(field, _too_large("declares more pixels than")) from None
        except (OSError, SyntaxError, ValueError, EOFError):
            raise _refuse(field, "cannot be decoded: it is truncated or damaged") from None
        transparent = False
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            lowest = image.convert("RGBA").getchannel("A").getextrema()[0]
            transparent = lowest != 255  # (one band: its lowest value)
    return _Decoded(raw, (width, height), transparent)


def _too_large(what: str) -> str:
    return f"{what} the {MAX_SOURCE_PIXELS} pixels allowed; send a smaller image"


def check_sources(
    processing: SourceProcessing, source_image: str | None, source_mask: str | None
) -> CheckedSources:
    """The checked source image and mask a job of `processing` takes (none for txt2img);
    BadImage naming the field when one is missing, extra, not an image, too large, or the
    mask is not the source's size.

    Blocking (decodes the pixels): call it in a thread."""
    if processing == "txt2img":
        if source_image or source_mask:
            field = "source_image" if source_image else "source_mask"
            raise _refuse(
                field,
                "a txt2img job takes no source image or mask; set source_processing to "
                "img2img, inpainting or outpainting to use it",
            )
        return CheckedSources([], [])
    if not source_image:
        raise _refuse(
            "source_image",
            f"source_processing {processing!r} needs a source image (base64 WebP, PNG or "
            "JPEG); send one, or use txt2img",
        )
    source = _decode(source_image, "source_image")
    decoded = [source]
    if source_mask:
        if processing == "img2img":
            raise _refuse(
                "source_mask",
                "img2img takes no mask; use source_processing 'inpainting' to repaint only "
                "the masked area",
            )
        mask = _decode(source_mask, "source_mask")
        if mask.size != source.size:
            raise _refuse(
                "source_mask",
                f"is {mask.size[0]}x{mask.size[1]} pixels but the source image is "
                f"{source.size[0]}x{source.size[1]}; send a mask the size of the source image",
            )
        decoded.append(mask)
    elif processing != "img2img" and not source.transparent:
        raise _refuse(
            "source_mask",
            f"{processing} needs to know what to repaint: send a source_mask (white = "
            "repaint) or a source image whose transparent pixels mark it",
        )
    blobs = [d.raw for d in decoded]
    return CheckedSources(blobs, [hashlib.sha256(b).hexdigest() for b in blobs])
