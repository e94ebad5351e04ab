"""Kudos cost formulas. Pure functions: the coordinator charges and pays with these."""

from __future__ import annotations

import math

from protocol.params import ImageParams
from protocol.samplers import sampler_factor

__all__ = ["KUDOS_PER_REFERENCE_IMAGE", "REFERENCE_PIXELS", "REFERENCE_STEPS", "image_cost"]

# A 512x512 image with 20 single-evaluation steps costs 10 kudos.
REFERENCE_PIXELS = 512 * 512
REFERENCE_STEPS = 20
KUDOS_PER_REFERENCE_IMAGE = 10


def image_cost(params: ImageParams) -> int:
    """Kudos for a job: pixels x steps x sampler factor x images, at least 1."""
    work = params.pixels * params.steps * sampler_factor(params.sampler) * params.n
    reference = REFERENCE_PIXELS * REFERENCE_STEPS
    return max(1, math.ceil(work * KUDOS_PER_REFERENCE_IMAGE / reference))
