"""The hires fix: a first pass at the model's native size, then img2img at the job's size.

As AUTOMATIC1111 does it with its default upscaler ("Latent"):

1. txt2img at the first-pass size (protocol.postprocess.first_pass_size: the job's aspect
   ratio with its shorter side at the model's native side, which is the UNet's
   `sample_size` times the VAE's scale factor, 512 for SD 1), kept as latents;
2. the latents resized to the job's size / 8 with bilinear interpolation (no antialias);
3. diffusers' img2img pipeline on those latents (4 channels: it skips the VAE encoder)
   with `steps` and `hires_fix_denoising_strength`, so int(steps x strength) steps run.

Both passes draw from the same CPU generator, seeded with the image's seed: the first pass
draws its noise, the second pass continues from the generator's state. A batch of images
(worker.image.batch) has one generator per image through both passes.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from protocol.postprocess import first_pass_size

__all__ = ["hires_first_pass", "hires_image", "native_side", "upscale_latents"]


def native_side(pipe: Any) -> int:
    """The side, in pixels, the model was trained at (its default image size)."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def hires_first_pass(pipe: Any, width: int, height: int) -> tuple[int, int] | None:
    """The first-pass size of a hires fix at width x height; None when the model is
    native at that size (then the job is a plain txt2img)."""
    first = first_pass_size(width, height, native_side(pipe))
    return None if first == (width, height) else first


def upscale_latents(latents: torch.Tensor, width: int, height: int, factor: int) -> torch.Tensor:
    """A1111's "Latent" upscaler: bilinear, no antialias, to (height / f, width / f)."""
    size = (height // factor, width // factor)
    return torch.nn.functional.interpolate(latents, size=size, mode="bilinear", antialias=False)


def hires_image(
    txt2img: Any,
    img2img: Any,
    arguments: dict[str, Any],
    first: tuple[int, int],
    size: tuple[int, int],
    strength: float,
    callbacks: tuple[Any, Any],
) -> list[Image.Image]:
    """Both passes of a hires fix. `arguments`: those of a txt2img call (prompt, steps,
    guidance, generator, ...) without width, height and the step callback; `callbacks`:
    the step callback of each pass. Returns the batch's images (`arguments`'
    num_images_per_prompt, one generator each)."""
    first_call = {
        **arguments,
        "width": first[0],
        "height": first[1],
        "output_type": "latent",
        "callback_on_step_end": callbacks[0],
    }
    result = txt2img(**first_call)
    latents = upscale_latents(result.images, size[0], size[1], int(txt2img.vae_scale_factor))
    second_call = {
        **arguments,
        "image": latents,
        "strength": strength,
        "callback_on_step_end": callbacks[1],
    }
    images: list[Image.Image] = img2img(**second_call).images
    return images
