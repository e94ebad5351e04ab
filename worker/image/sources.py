"""Source images and masks of a job, decoded and shaped as the pipelines take them.

The bytes travel beside the job (`protocol.engine.IMAGE`: blob 0 the source image, blob 1
the mask). Only PNG, WebP and JPEG are decoded, and only after the declared size (read from
the header, no pixels yet) is within `protocol.params.MAX_SOURCE_PIXELS`.

AI Horde's mask conventions (hordelib's `ImageUtils.add_image_alpha_channel` turns a
`source_mask` into the source's alpha channel, inverted, and its ComfyUI loader repaints
where alpha is 0):

- `source_mask`: a greyscale image the size of the source; **white = repaint**, black = keep.
- no mask: the source image's alpha channel; **transparent = repaint**, opaque = keep.

The source is converted to RGB (the colours under transparent pixels are kept) and, like
the mask, LANCZOS-resized to the job's width x height. diffusers then repaints where the
resized mask is at least half white.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from protocol.params import MAX_SOURCE_BYTES, MAX_SOURCE_PIXELS, ImageParams
from worker.errors import InvalidGenerationInput

__all__ = ["SOURCE_FORMATS", "Sources", "decode_image", "prepare_sources"]

# what AI Horde accepts as a source image or mask
SOURCE_FORMATS = ("PNG", "WEBP", "JPEG")

SOURCE_IMAGE = "source_image"
SOURCE_MASK = "source_mask"


@dataclass(frozen=True)
class Sources:
    """A job's inputs at width x height: the RGB image and, for inpainting, the mask
    (mode "L", white = repaint)."""

    image: Image.Image
    mask: Image.Image | None


def decode_image(data: bytes, field: str) -> Image.Image:
    """`data` as a loaded PIL image; InvalidGenerationInput naming `field` if it is not a
    PNG, WebP or JPEG within the size caps."""
    if not data:
        raise InvalidGenerationInput(field, "is empty; send a PNG, WebP or JPEG image")
    if len(data) > MAX_SOURCE_BYTES:
        raise InvalidGenerationInput(
            field,
            f"is {len(data)} bytes, over the {MAX_SOURCE_BYTES} allowed; send a smaller image",
        )
    try:
        image = Image.open(io.BytesIO(data), formats=SOURCE_FORMATS)
    except Image.DecompressionBombError:
        raise InvalidGenerationInput(field, _too_large("declares more pixels than")) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise InvalidGenerationInput(
            field, "is not a PNG, WebP or JPEG image (or it is damaged)"
        ) from None
    width, height = image.size  # from the header: no pixel is decoded yet
    if width * height > MAX_SOURCE_PIXELS:
        image.close()
        raise InvalidGenerationInput(field, _too_large(f"is {width}x{height} pixels, over"))
    try:
        image.load()
    except Image.DecompressionBombError:  # pragma: no cover - the size was checked above
        raise InvalidGenerationInput(field, _too_large("declares more pixels than")) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise InvalidGenerationInput(
            field, "cannot be decoded: it is truncated or damaged"
        ) from None
    return image


def _too_large(what: str) -> str:
    return f"{what} the {MAX_SOURCE_PIXELS} pixels allowed; send a smaller image"


def _alpha(image: Image.Image) -> Image.Image | None:
    """The alpha channel, if the image has one (palette transparency included)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def prepare_sources(params: ImageParams, blobs: list[bytes]) -> Sources | None:
    """The job's source image and mask as the pipeline takes them; None for txt2img.

    InvalidGenerationInput naming the field for a missing, extra or unusable input.
    """
    processing = params.source_processing
    if processing == "txt2img":
        if blobs:
            raise InvalidGenerationInput(
                SOURCE_IMAGE,
                "a txt2img job takes no source image; set source_processing to img2img, "
                "inpainting or outpainting to use it",
            )
        return None
    if not blobs:
        raise InvalidGenerationInput(
            SOURCE_IMAGE, f"source_processing {processing!r} needs a source image; none was sent"
        )
    if len(blobs) > 2:
        raise InvalidGenerationInput(
            SOURCE_MASK, f"send a source image and at most one mask, not {len(blobs)} images"
        )
    source = decode_image(blobs[0], SOURCE_IMAGE)
    size = (params.width, params.height)
    image = source.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    if processing == "img2img":
        if len(blobs) == 2:
            raise InvalidGenerationInput(
                SOURCE_MASK,
                "img2img takes no mask; use source_processing 'inpainting' to repaint only "
                "the masked area",
            )
        return Sources(image, None)
    if len(blobs) == 2:
        mask = decode_image(blobs[1], SOURCE_MASK)
        if mask.size != source.size:
            raise InvalidGenerationInput(
                SOURCE_MASK,
                f"is {mask.size[0]}x{mask.size[1]} pixels but the source image is "
                f"{source.size[0]}x{source.size[1]}; send a mask the size of the source image",
            )
        # its grey levels only, as hordelib reads it (a mask's own alpha is ignored)
        repaint = mask.convert("L")
    else:
        alpha = _alpha(source)
        if alpha is None or alpha.getextrema()[0] == 255:
            raise InvalidGenerationInput(
                SOURCE_MASK,
                f"{processing} needs to know what to repaint: send a source_mask (white = "
                "repaint) or a source image whose transparent pixels mark it",
            )
        repaint = ImageOps.invert(alpha)  # transparent (0) -> white (repaint)
    return Sources(image, repaint.resize(size, Image.Resampling.LANCZOS))
