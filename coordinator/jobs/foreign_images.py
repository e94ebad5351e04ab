"""Images from AI Horde workers: base64 WebP or PNG, checked under the same caps as our own
uploads (coordinator.jobs.png_check) and stored as PNG with the A1111 parameters text;
and our PNGs as base64 WebP for AI Horde clients that ask for images inline.

The size is read from the header before anything is decoded, so a declared 50000x50000
image is refused without inflating it; the encoded bytes are capped by what an
uncompressed image of the job's size could need.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from coordinator.errors import BadImage
from coordinator.jobs.png_check import PNG_SIGNATURE, byte_limit, read_pixels

__all__ = ["png_from_base64", "webp_base64"]


def _refuse(message: str, fix: str) -> BadImage:
    return BadImage(message, [("generation", fix)])


def png_from_base64(encoded: str, width: int, height: int, parameters: str) -> bytes:
    """The PNG (with `parameters` as its A1111 text) of a base64 WebP or PNG image of
    exactly `width` x `height`; BadImage naming the problem otherwise.

    Blocking (decodes the pixels): call it in a thread."""
    limit = byte_limit(width, height)
    if encoded.startswith("data:"):
        encoded = encoded.partition(",")[2]
    if len(encoded) > (limit + 2) // 3 * 4 + 4:
        raise _refuse(
            f"the image is over the {limit} bytes a {width}x{height} image may have",
            f"send a {width}x{height} WebP or PNG",
        )
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(
            "generation is not base64", "send the image as base64 WebP or PNG (not 'R2')"
        ) from None
    if raw.startswith(PNG_SIGNATURE):
        with tempfile.TemporaryDirectory(prefix="idlegrid-horde-") as folder:
            path = Path(folder) / "image.png"
            path.write_bytes(raw)
            pixels = read_pixels(path, width, height)
        image = Image.fromarray(pixels)
    elif raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        image = _webp(raw, width, height)
    else:
        raise _refuse("the image is neither WebP nor PNG", "send base64 WebP or PNG")
    text = PngImagePlugin.PngInfo()
    text.add_text("parameters", parameters)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=text, compress_level=6)
    return out.getvalue()


def _webp(raw: bytes, width: int, height: int) -> Image.Image:
    try:
        with Image.open(io.BytesIO(raw), formats=["WEBP"]) as image:
            # the header is read, the pixels are not yet
            if image.size != (width, height):
                raise _refuse(
                    f"the WebP is {image.size[0]}x{image.size[1]} pixels, but this job's "
                    f"image is {width}x{height}",
                    f"must be a {width}x{height} image",
                )
            image.load()
            return image.convert("RGB")
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _refuse(f"the WebP cannot be decoded: {exc}", "send a complete WebP") from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - sizes checked first
        raise _refuse(f"the WebP is too large: {exc}", "send a smaller image") from None


def webp_base64(path: Path, width: int, height: int) -> str:
    """A stored PNG as lossless base64 WebP (pixels unchanged). Blocking: in a thread."""
    image = Image.fromarray(read_pixels(path, width, height))
    out = io.BytesIO()
    image.save(out, format="WEBP", lossless=True, quality=50, method=1)
    return base64.b64encode(out.getvalue()).decode()
