"""Sampler names as AUTOMATIC1111 users know them, and their cost factors.

The mapping of each name onto a diffusers scheduler lives in the worker; the protocol only
knows which names exist and how expensive each is. Second-order samplers evaluate the
model twice per step, so they count double in the cost formula.
"""

from __future__ import annotations

__all__ = ["DEFAULT_SAMPLER", "SAMPLERS", "WITHOUT_KARRAS", "sampler_factor"]

# name -> cost factor (model evaluations per step)
SAMPLERS: dict[str, int] = {
    "Euler": 1,
    "Euler a": 1,
    "Heun": 2,
    "DPM2": 2,
    "DPM2 a": 2,
    "DPM++ 2M": 1,
    "DPM++ 2M Karras": 1,
    "DPM++ 2M SDE": 1,
    "DPM++ 2M SDE Karras": 1,
    "DPM++ SDE": 2,
    "DPM++ SDE Karras": 2,
    "DDIM": 1,
    "PLMS": 1,
    "LMS": 1,
    "LMS Karras": 1,
    "UniPC": 1,
    # latent consistency: for LCM checkpoints and LoRAs (few steps, low CFG)
    "LCM": 1,
}

# samplers that take no Karras sigmas (`karras`): their schedules are not sigma-based
WITHOUT_KARRAS = frozenset({"DDIM", "PLMS", "LCM"})

DEFAULT_SAMPLER = "Euler a"


def sampler_factor(name: str) -> int:
    """Model evaluations per step for sampler `name` (KeyError if unknown)."""
    return SAMPLERS[name]
