"""Checking an uploaded image before anyone is paid for it.

An upload must be a complete PNG of exactly the job's width and height. The size is read
from the PNG header first, so a file declaring 50000x50000 pixels (a "PNG bomb") is
refused before anything is inflated. Then the image data is inflated in small pieces and
counted, and refused as soon as it is longer than the declared size allows (the other
bomb: a small file of highly compressed zeros). Only then does Pillow decode the pixels,
at most 2048x2048 of them (protocol.params.MAX_SIDE), far below its own bomb limits.

Spot checks decode stored images the same way (`read_pixels`), so whatever got into the
result files by another road (an older coordinator, a shared data directory) is never
decoded past the job's size either: memory stays below a few tens of MB per image.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from coordinator.errors import BadImage
from protocol.params import MAX_SIDE

__all__ = [
    "MAX_PNG_BYTES",
    "PNG_SIGNATURE",
    "byte_limit",
    "check_png",
    "check_png_bytes",
    "read_pixels",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# signature, then the IHDR chunk: length, type, width, height, bit depth, colour type,
# compression, filter, interlace
_HEADER = struct.Struct(">8sI4sIIBBBBB")
_CHUNK = struct.Struct(">I4s")
# samples per pixel of each PNG colour type
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# inflate at most this much at a time
_INFLATE_STEP = 1024 * 1024
# room for the text chunks (the generation parameters) and anything else small
_METADATA_BYTES = 1024 * 1024


def byte_limit(width: int, height: int, channels: int = 3) -> int:
    """Largest accepted PNG of width x height pixels: the raw 8-bit pixels (RGB; `channels`
    4 for RGBA) with a filter byte per row (a PNG that does not compress at all), plus
    generous room for deflate's framing and metadata. Real images are several times
    smaller."""
    raw = width * height * channels + height
    return raw + raw // 100 + _METADATA_BYTES


# No job is larger than MAX_SIDE x MAX_SIDE, so no upload is ever larger than this.
MAX_PNG_BYTES = byte_limit(MAX_SIDE, MAX_SIDE)


def _refuse(message: str, fix: str) -> BadImage:
    return BadImage(message, [("body", fix)])


def check_png(path: Path, width: int, height: int) -> None:
    """Raise BadImage unless `path` holds a valid PNG of `width` x `height` pixels.

    Blocking (decodes the pixels): call it in a thread."""
    _decode(path, width, height, pixels=False)


def check_png_bytes(data: bytes, width: int, height: int) -> None:
    """check_png of a PNG held in memory. Blocking (decodes the pixels): call it in a
    thread."""
    _decode_open(io.BytesIO(data), width, height, pixels=False)


def read_pixels(path: Path, width: int, height: int) -> np.ndarray:
    """The RGB pixels (height x width x 3, uint8) of the PNG at `path`; BadImage when it
    is not a complete, valid PNG of exactly that size (or is missing).

    Blocking (decodes the pixels): call it in a thread."""
    pixels = _decode(path, width, height, pixels=True)
    assert pixels is not None
    return pixels


def _decode(path: Path, width: int, height: int, *, pixels: bool) -> np.ndarray | None:
    """Check (and decode) the PNG at `path`, the file opened once; its RGB pixels if
    `pixels` (a check alone does not convert them)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise _refuse("the PNG file is missing", "upload the image again") from None
    with handle:
        return _decode_open(handle, width, height, pixels=pixels)


def _decode_open(handle: BinaryIO, width: int, height: int, *, pixels: bool) -> np.ndarray | None:
    """_decode of an open file (left open)."""
    head = handle.read(_HEADER.size)
    if not head.startswith(PNG_SIGNATURE):
        raise _refuse("the body is not a PNG file", "send the raw bytes of a PNG image")
    if len(head) < _HEADER.size:
        raise _refuse("the PNG ends inside its header", "send the complete PNG file")
    _, length, kind, declared_width, declared_height, depth, colour, _, _, interlace = (
        _HEADER.unpack(head)
    )
    if kind != b"IHDR" or length != 13 or colour not in _CHANNELS:
        raise _refuse("the PNG does not start with a valid IHDR chunk", "send a valid PNG file")
    if (declared_width, declared_height) != (width, height):
        raise _refuse(
            f"the PNG is {declared_width}x{declared_height} pixels, but this job's images "
            f"are {width}x{height}",
            f"must be a {width}x{height} PNG",
        )
    row = math.ceil(width * _CHANNELS[colour] * depth / 8)
    # one filter byte per row; Adam7 interlacing adds a few partial rows per pass
    bound = height * (1 + row) + (8 * (height + row) if interlace else 0)
    handle.seek(8)
    _check_inflated_size(handle, bound)
    try:
        # verify() checks every chunk's CRC through to IEND without decoding pixels;
        # load() then decodes them (a verified image cannot be loaded, so open twice;
        # Pillow leaves a handle it was given open)
        handle.seek(0)
        with Image.open(handle, formats=["PNG"]) as image:
            if image.size != (width, height):  # pragma: no cover - the header said so
                raise _refuse(f"the PNG is {image.size}", f"must be a {width}x{height} PNG")
            image.verify()
        handle.seek(0)
        with Image.open(handle, formats=["PNG"]) as image:
            image.load()
            if not pixels:
                return None
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as exc:
        # truncated data, bad CRCs, corrupt deflate streams, oversized text chunks
        raise _refuse(
            f"the PNG cannot be decoded: {exc}", "send the complete, valid PNG file"
        ) from None
    except Image.DecompressionBombError as exc:  # pragma: no cover - sizes checked above
        raise _refuse(f"the PNG is too large to decode: {exc}", "send a smaller PNG") from None


def _check_inflated_size(handle: BinaryIO, bound: int) -> None:
    """Inflate the IDAT chunks piece by piece; refuse once they exceed `bound` bytes."""
    inflater = zlib.decompressobj()
    total = 0
    while True:
        header = handle.read(_CHUNK.size)
        if len(header) < _CHUNK.size:
            return  # truncated: Pillow names the problem below
        length, kind = _CHUNK.unpack(header)
        if kind == b"IEND":
            return
        if kind != b"IDAT":
            handle.seek(length + 4, 1)  # data and CRC
            continue
        # (a chunk may declare up to 2 GB: read it in pieces too)
        while length:
            data = handle.read(min(length, _INFLATE_STEP))
            if not data:
                return  # truncated
            length -= len(data)
            while True:
                try:
                    out = inflater.decompress(data, _INFLATE_STEP)
                except zlib.error:
                    return  # corrupt: Pillow names the problem below
                total += len(out)
                if total > bound:
                    raise _refuse(
                        f"the PNG's image data inflates to more than the {bound} bytes a "
                        "picture of its size holds (a decompression bomb)",
                        "send a PNG whose image data fits its size",
                    )
                data = inflater.unconsumed_tail
                if not data and len(out) < _INFLATE_STEP:
                    break
        handle.seek(4, 1)  # CRC
