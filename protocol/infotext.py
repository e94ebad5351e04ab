"""The AUTOMATIC1111-style `parameters` text stored in every PNG a worker makes."""

from __future__ import annotations

from protocol.params import ImageParams

__all__ = ["PNG_PARAMETERS_KEY", "parameters_text"]

PNG_PARAMETERS_KEY = "parameters"


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parameters_text(
    params: ImageParams, seed: int, model: str, hashes: dict[str, str] | None = None
) -> str:
    """Render the text AUTOMATIC1111 writes, so its tools and users can read our PNGs.
    `hashes`: A1111's `Lora hashes` / `TI hashes` values of a job with LoRAs or TIs."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    settings = (
        f"Steps: {params.steps}, Sampler: {params.sampler}, "
        f"CFG scale: {_fmt_number(params.cfg_scale)}, Seed: {seed}, "
        f"Size: {params.width}x{params.height}, Model: {model}"
    )
    if params.source_processing != "txt2img":
        # A1111's key for img2img and inpainting; the second is AI Horde's name of the mode
        settings += (
            f", Denoising strength: {_fmt_number(params.denoising_strength)}"
            f", Source processing: {params.source_processing}"
        )
    for key, value in (hashes or {}).items():
        settings += f', {key}: "{value}"'
    lines.append(settings)
    return "\n".join(lines)
