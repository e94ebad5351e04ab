"""Kudos cost formulas. Pure functions: the coordinator charges and pays with these."""

from __future__ import annotations

import math

from protocol.loras import Baseline
from protocol.params import ImageParams
from protocol.postprocess import POST_PROCESSOR_FACTORS
from protocol.samplers import sampler_factor

__all__ = [
    "BASELINE_FACTORS",
    "BLOCK_TOKENS_PER_KUDO_AT_1B",
    "CONTROLNET_FACTOR",
    "KUDOS_FOR_TIS",
    "KUDOS_PER_LORA",
    "KUDOS_PER_PROMPT_WEIGHT",
    "KUDOS_PER_REFERENCE_IMAGE",
    "REFERENCE_PIXELS",
    "REFERENCE_STEPS",
    "SOURCE_IMAGE_FACTOR",
    "image_cost",
    "prompt_weights",
    "text_cost",
    "text_work",
]

# A 512x512 image with 20 single-evaluation steps costs 10 kudos.
REFERENCE_PIXELS = 512 * 512
REFERENCE_STEPS = 20
KUDOS_PER_REFERENCE_IMAGE = 10
# A job with a source image (img2img, inpainting, outpainting) costs half as much again:
# AI Horde's published multiplier (its kudos_standalone: x1.5 with a source image, the
# steps counted in full whatever the denoising strength).
SOURCE_IMAGE_FACTOR = 1.5
# A ControlNet job costs three times as much (AI Horde's kudos_standalone: x3 when it uses
# ControlNet, on top of the x1.5 for its source image).
CONTROLNET_FACTOR = 3
# A job's work costs this much more on a checkpoint of this baseline (AI Horde's
# kudos_standalone: x2 for SDXL); the baseline is the catalog's for the model the job names
# (coordinator.economy.image_models.baseline), so it is known when the cost is reserved.
BASELINE_FACTORS: dict[Baseline, float] = {"sd1": 1.0, "sd2": 1.0, "sdxl": 2.0}
# AI Horde's add-ons: kudos per LoRA of a job, and once for any textual inversions
KUDOS_PER_LORA = 3
KUDOS_FOR_TIS = 1


def image_cost(params: ImageParams, baseline: Baseline = "sd1") -> int:
    """Kudos for a job: pixels x steps x sampler factor x images x the baseline's factor
    (BASELINE_FACTORS), plus
    KUDOS_PER_PROMPT_WEIGHT per weighted group and image (x SOURCE_IMAGE_FACTOR with a
    source image; the hires fix adds its second pass's steps at full size; each
    post-processor multiplies by AI Horde's factor, POST_PROCESSOR_FACTORS; x
    CONTROLNET_FACTOR with ControlNet), at least 1; plus KUDOS_PER_LORA per LoRA and
    KUDOS_FOR_TIS with any textual inversion. clip_skip, tiling, karras and seed_variation
    cost nothing extra, as on AI Horde."""
    steps = params.steps
    if params.hires_fix:
        steps += int(params.steps * params.hires_fix_denoising_strength)
    work: float = (
        params.pixels
        * steps
        * sampler_factor(params.sampler)
        * params.n
        * BASELINE_FACTORS[baseline]
    )
    weights: float = (
        (prompt_weights(params.prompt) + prompt_weights(params.negative_prompt))
        * KUDOS_PER_PROMPT_WEIGHT
        * params.n
    )
    if params.source_processing != "txt2img":
        work *= SOURCE_IMAGE_FACTOR
        weights *= SOURCE_IMAGE_FACTOR
    if params.control_type is not None:
        work *= CONTROLNET_FACTOR
    for name in params.post_processing:
        work *= POST_PROCESSOR_FACTORS[name]
    reference = REFERENCE_PIXELS * REFERENCE_STEPS
    adapters = KUDOS_PER_LORA * len(params.loras) + (KUDOS_FOR_TIS if params.tis else 0)
    return max(1, math.ceil(work * KUDOS_PER_REFERENCE_IMAGE / reference + weights)) + adapters


# AI Horde adds a kudo for each weighted group of a prompt (its `count_parentheses`: a ")"
# closing an open "("), before its source-image factor, per image.
KUDOS_PER_PROMPT_WEIGHT = 1


def prompt_weights(prompt: str) -> int:
    """The weighted groups AI Horde charges for: each ")" that closes an open "(" (nested
    groups count once; escaped parentheses are not weights)."""
    count = 0
    open_group = False
    escaped = False
    for char in prompt:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "(":
            open_group = True
        elif char == ")" and open_group:
            open_group = False
            count += 1
    return count


# A block-token is one token through one transformer block. For a model of 1 billion
# parameters, 4000 block-tokens cost 1 kudo, so a 200-token reply of a 7B model with 32
# blocks costs about 12 kudos -- close to one 512x512 image.
BLOCK_TOKENS_PER_KUDO_AT_1B = 4000
MIN_MODEL_BILLIONS = 0.1


def text_work(tokens: int, blocks: int, parameters: int) -> float:
    """Kudos-weighted work of running `tokens` tokens through `blocks` blocks of a model."""
    billions = max(parameters / 1e9, MIN_MODEL_BILLIONS)
    return tokens * blocks * billions / BLOCK_TOKENS_PER_KUDO_AT_1B


def text_cost(tokens: int, blocks: int, parameters: int) -> int:
    """Kudos for a text job: tokens x blocks x model size (billions), at least 1."""
    return max(1, math.ceil(text_work(tokens, blocks, parameters)))
