"""Live previews: the latents being sampled as a small picture, without the VAE.

A linear map per latent space takes each latent pixel's four channels to RGB (one 4x3
matrix and a bias), the "cheap approximation" previewers have used since Stable Diffusion
came out: a matrix product on the latent-size grid (64x64 for a 512-pixel SD 1.5 image,
128x128 for a 1024-pixel SDXL one) and a small JPEG, well under a millisecond beside a UNet
step that takes tens to thousands of milliseconds.

The factors are the published ones, fitted on the real VAEs (ours are tiny random models,
on which a fit would mean nothing):
- SD 1.x and SD 2.x (one VAE; latents scaled by 0.18215): ComfyUI's `SD15` latent format
  (comfy/latent_formats.py), the refit of the factors keturn published on the Hugging Face
  forum ("Decoding latents to RGB without upscaling", 2022).
- SDXL (its own VAE; latents scaled by 0.13025): ComfyUI's `SDXL` latent format, factors
  and bias.
Both apply to the latents as the pipeline samples them (already scaled); the result is
about [-1, 1] and becomes a colour by (x + 1) / 2. The channels read roughly as SD 1.x:
luminance, magenta-green, red-cyan, yellow-blue (`tests/worker/image/test_preview.py`
checks those directions).

TAESD instead: with the donor's `--preview-decoder DIR` (a diffusers `AutoencoderTiny`
folder in safetensors, e.g. madebyollin's taesd for SD 1.x/2.x or taesdxl for SDXL; the
donor picks the one that matches the checkpoint) the latents go through that tiny decoder
instead: a full-size picture (shrunk to PREVIEW_MAX_SIDE) for some milliseconds more.

`Previewer` is what the engine's step callback calls: every `every` sampling steps it
returns the first image's latents as a base64 JPEG (`protocol.preview`), else None.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny
from PIL import Image

from protocol.loras import Baseline
from protocol.preview import PREVIEW_MAX_BYTES, PREVIEW_MAX_SIDE

__all__ = [
    "LATENT_RGB",
    "Previewer",
    "encode_preview",
    "latent_rgb",
    "load_decoder",
    "tiny_decode",
]

# latent channel -> (R, G, B) weights, and the RGB bias (see the module docstring)
_SD1_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)

LATENT_RGB: dict[Baseline, tuple[tuple[tuple[float, float, float], ...], tuple[float, ...]]] = {
    "sd1": (_SD1_FACTORS, (0.0, 0.0, 0.0)),
    "sd2": (_SD1_FACTORS, (0.0, 0.0, 0.0)),
    "sdxl": (_SDXL_FACTORS, _SDXL_BIAS),
}

JPEG_QUALITY = 80


def latent_rgb(latent: torch.Tensor, baseline: Baseline) -> np.ndarray:
    """One image's latents (channels, height, width) as an RGB uint8 array (height, width,
    3). A latent with other than 4 channels is a ValueError."""
    if latent.ndim != 3 or latent.shape[0] != 4:
        raise ValueError(f"expected latents of shape (4, height, width), got {tuple(latent.shape)}")
    factors, bias = LATENT_RGB[baseline]
    weights = torch.tensor(factors, dtype=torch.float32)
    offset = torch.tensor(bias, dtype=torch.float32)
    pixels = latent.detach().to("cpu", torch.float32).permute(1, 2, 0) @ weights + offset
    colour = ((pixels + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).round()
    return colour.to(torch.uint8).numpy()


def load_decoder(folder: Path, device: torch.device) -> AutoencoderTiny:
    """The donor's TAESD (an `AutoencoderTiny` folder), safetensors only, float32."""
    loaded = AutoencoderTiny.from_pretrained(
        str(folder), use_safetensors=True, local_files_only=True, dtype=torch.float32
    )
    decoder = cast(AutoencoderTiny, loaded)
    cast(torch.nn.Module, decoder).to(device)
    decoder.eval()
    return decoder


def tiny_decode(decoder: AutoencoderTiny, latent: torch.Tensor) -> np.ndarray:
    """One image's latents (channels, height, width; as the pipeline samples them: TAESD
    takes them scaled) through TAESD, as an RGB uint8 array (8x the latent size)."""
    parameter = next(decoder.parameters())
    with torch.no_grad():
        output = decoder.decode(latent[None].to(parameter.device, parameter.dtype))
    decoded: torch.Tensor = output.sample[0]
    # (diffusers' AutoencoderTiny answers in [-1, 1], as the full VAE does)
    colour = ((decoded.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0).mul(255.0).round()
    return colour.to(torch.uint8).permute(1, 2, 0).numpy()


def encode_preview(rgb: np.ndarray) -> bytes:
    """A JPEG of at most PREVIEW_MAX_SIDE pixels a side and PREVIEW_MAX_BYTES bytes."""
    image = Image.fromarray(rgb, "RGB")
    if max(image.size) > PREVIEW_MAX_SIDE:
        image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    quality = JPEG_QUALITY
    while True:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        data = buffer.getvalue()
        # (a 256x256 JPEG of noise at quality 80 is about 30 KB: rarely more than one try)
        if len(data) <= PREVIEW_MAX_BYTES or quality <= 20:
            return data
        quality -= 20


@dataclass
class Previewer:
    """Makes a preview every `every` sampling steps (0: never) of `baseline` latents."""

    baseline: Baseline
    every: int
    # the donor's TAESD (load_decoder); None: the linear factors
    decoder: AutoencoderTiny | None = None

    @classmethod
    def build(
        cls, baseline: Baseline, every: int, decoder: str | None, device: torch.device
    ) -> Previewer:
        """The previewer of `baseline` latents (worker.image.baselines finds the loaded
        pipeline's), with TAESD from folder `decoder` if given."""
        tiny = None if decoder is None or every <= 0 else load_decoder(Path(decoder), device)
        return cls(baseline, every, tiny)

    def __call__(self, step: int, steps: int, kwargs: dict[str, Any]) -> str | None:
        """The preview after sampling step `step` (1-based) of `steps`, as base64, when one
        is due: every `every` steps but not after the last (the image itself follows at
        once). `kwargs`: the step callback's, holding "latents" (batch first)."""
        if self.every <= 0 or step % self.every or step >= steps:
            return None
        latents = kwargs.get("latents")
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != 4:
            return None
        # (with classifier-free guidance the callback's latents are the images', not doubled)
        if self.decoder is not None:
            data = encode_preview(tiny_decode(self.decoder, latents[0]))
        else:
            data = encode_preview(latent_rgb(latents[0], self.baseline))
        return base64.b64encode(data).decode("ascii")
