"""Comparing a spot check's images with the original's.

Workers running the same engine build (same engine, package versions, device and dtype,
as reported to `POST /api/v1/workers/engine`) produce bit-identical pixels for the same
seed and parameters, so their decoded pixels must be identical. Across builds (another
torch, another GPU, fp16 vs fp32) pixels drift a little; there the mean absolute
difference per channel (0-255 scale) must stay within `verify_tolerance` (default 3.0).
Honest cross-build drift is typically below 1-2; a different seed, prompt or a fake
image differs by tens.

The pixels arrive decoded by coordinator.jobs.png_check.read_pixels, which never decodes
more than the job's size; an image it refuses counts against the worker that made it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["Outcome", "images_agree", "same_build"]

# What one spot check found about the job it re-ran (coordinator.economy.checks acts on it):
# the images agree or not; or one side's image cannot be decoded (by the coordinator, with
# the caps of coordinator.jobs.png_check), which counts against whoever made it.
Outcome = Literal["agree", "disagree", "original unreadable", "check unreadable"]

# rows compared at a time: the int16 difference of a 2048-pixel-wide strip stays small
_STRIP_ROWS = 256


def same_build(engine_a: str | None, engine_b: str | None) -> bool:
    """Both workers reported their engine, and the reports are identical."""
    return engine_a is not None and engine_a == engine_b


def images_agree(
    original: np.ndarray, check: np.ndarray, identical: bool, tolerance: float
) -> bool:
    """Whether two RGB images (uint8 arrays) show the same image: identical pixels, or a
    mean absolute difference within `tolerance`."""
    if original.shape != check.shape:
        return False
    if identical:
        return bool(np.array_equal(original, check))
    total = 0
    for top in range(0, original.shape[0], _STRIP_ROWS):
        a = original[top : top + _STRIP_ROWS].astype(np.int16)
        total += int(np.abs(a - check[top : top + _STRIP_ROWS]).sum())
    return total / max(original.size, 1) <= tolerance
