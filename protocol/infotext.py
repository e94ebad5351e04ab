"""The AUTOMATIC1111-style `parameters` text stored in every PNG a worker makes."""

from __future__ import annotations

from protocol.params import ImageParams

__all__ = ["PNG_PARAMETERS_KEY", "parameters_text"]

PNG_PARAMETERS_KEY = "parameters"


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parameters_text(params: ImageParams, seed: int, model: str) -> str:
    """Render the text AUTOMATIC1111 writes, so its tools and users can read our PNGs."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    # A1111 names the Karras schedule apart from the sampler (but for its "… Karras" names)
    schedule = ", Schedule type: Karras" if params.karras else ""
    settings = (
        f"Steps: {params.steps}, Sampler: {params.sampler}{schedule}, "
        f"CFG scale: {_fmt_number(params.cfg_scale)}, Seed: {seed}, "
        f"Size: {params.width}x{params.height}, Model: {model}"
    )
    if params.source_processing != "txt2img":
        # A1111's key for img2img and inpainting; the second is AI Horde's name of the mode
        settings += (
            f", Denoising strength: {_fmt_number(params.denoising_strength)}"
            f", Source processing: {params.source_processing}"
        )
    # A1111's keys, written only when not at their defaults (as A1111 does); each image's
    # own seed is above, so seed_variation needs no key
    if params.clip_skip != 1:
        settings += f", Clip skip: {params.clip_skip}"
    if params.tiling:
        settings += ", Tiling: True"
    lines.append(settings)
    return "\n".join(lines)
