"""Comparing a spot check's images with the original's.

Workers running the same engine build (same engine, package versions, device and dtype,
as reported to `POST /api/v1/workers/engine`) produce bit-identical pixels for the same
seed and parameters, so their decoded pixels must be identical. Across builds (another
torch, another GPU, fp16 vs fp32) pixels drift a little; there the mean absolute
difference per channel (0-255 scale) must stay within `verify_tolerance` (default 3.0).
Honest cross-build drift is typically below 1-2; a different seed, prompt or a fake
image differs by tens.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["images_agree", "same_build"]


def same_build(engine_a: str | None, engine_b: str | None) -> bool:
    """Both workers reported their engine, and the reports are identical."""
    return engine_a is not None and engine_a == engine_b


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def images_agree(original: bytes, check: bytes, identical: bool, tolerance: float) -> bool:
    """Whether two PNGs show the same image: identical pixels, or within `tolerance`."""
    try:
        a, b = _pixels(original), _pixels(check)
    except (OSError, ValueError):
        return False
    if a.shape != b.shape:
        return False
    if identical:
        return bool(np.array_equal(a, b))
    return float(np.abs(a - b).mean()) <= tolerance
