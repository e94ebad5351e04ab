"""The AUTOMATIC1111-style `parameters` text stored in every PNG a worker makes.

With a source image it adds A1111's img2img keys, so that the result can be made again
from its PNG (and the same source image and mask): `Denoising strength`, and for inpainting
and outpainting the mask settings A1111 writes when a mask is used, at the values our
engine (diffusers' inpaint pipeline) implements: `MASK_SETTINGS`.
"""

from __future__ import annotations

from protocol.control import control_infotext
from protocol.params import ImageParams
from protocol.postprocess import FACE_FIXERS, ordered

__all__ = ["MASK_SETTINGS", "PNG_PARAMETERS_KEY", "parameters_text"]

PNG_PARAMETERS_KEY = "parameters"

# A1111's inpainting options as our inpainting is: the mask used as sent, not blurred
# (A1111 writes `Mask blur` whenever there is a mask); white (or transparent) repainted;
# the masked area starts from the source's own latents, noised by the strength; the whole
# picture at the job's size. A1111 leaves its defaults out of the text; they are written
# here so that nothing about a result depends on a reader's defaults.
MASK_SETTINGS = (
    ("Mask blur", "0"),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
)


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _quoted(value: str) -> str:
    # A1111 quotes a value holding a comma (its reader splits the line on them)
    return f'"{value}"' if "," in value else value


def parameters_text(
    params: ImageParams,
    seed: int,
    model: str,
    first_pass: tuple[int, int] | None = None,
    *,
    control_model: str | None = None,
    hashes: dict[str, str] | None = None,
) -> str:
    """Render the text AUTOMATIC1111 writes, so its tools and users can read our PNGs.

    `first_pass`: the size a hires fix sampled first (then `Size` is that size, as in
    A1111, and `Hires resize` the job's); None when the job ran no second pass.
    `control_model`: the ControlNet model's name, for a job with a `control_type`.
    `hashes`: A1111's `Lora hashes` / `TI hashes` values of a job with LoRAs or TIs."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    width, height = first_pass or (params.width, params.height)
    # A1111 names the Karras schedule apart from the sampler (but for its "… Karras" names)
    schedule = ", Schedule type: Karras" if params.karras else ""
    settings = (
        f"Steps: {params.steps}, Sampler: {params.sampler}{schedule}, "
        f"CFG scale: {_fmt_number(params.cfg_scale)}, Seed: {seed}, "
        f"Size: {width}x{height}, Model: {model}"
    )
    if params.control_type is not None:
        # (sampled from noise, as A1111's txt2img with ControlNet)
        settings += ", " + control_infotext(
            params.control_type, params.image_is_control, control_model or params.control_type
        )
    elif params.source_processing != "txt2img":
        # A1111's key for img2img and inpainting; the second is AI Horde's name of the mode
        settings += f", Denoising strength: {_fmt_number(params.denoising_strength)}"
        if params.source_processing in ("inpainting", "outpainting"):
            settings += "".join(f", {key}: {value}" for key, value in MASK_SETTINGS)
        settings += f", Source processing: {params.source_processing}"
    if first_pass is not None:
        scale = round(params.width / width, 4)
        settings += (
            f", Denoising strength: {_fmt_number(params.hires_fix_denoising_strength)}"
            f", Hires upscale: {_fmt_number(scale)}, Hires resize: {params.width}x{params.height}"
            f", Hires steps: {params.steps}, Hires upscaler: Latent"
        )
    if params.post_processing:
        settings += f", Postprocessing: {_quoted(', '.join(ordered(params.post_processing)))}"
        if any(name in FACE_FIXERS for name in params.post_processing):
            settings += f", Face restoration strength: {_fmt_number(params.facefixer_strength)}"
    # A1111's keys, written only when not at their defaults (as A1111 does); each image's
    # own seed is above, so seed_variation needs no key
    if params.clip_skip != 1:
        settings += f", Clip skip: {params.clip_skip}"
    if params.tiling:
        settings += ", Tiling: True"
    for key, value in (hashes or {}).items():
        settings += f', {key}: "{value}"'
    lines.append(settings)
    return "\n".join(lines)
