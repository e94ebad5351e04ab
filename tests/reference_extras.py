"""References for the image extras of issue 24, with no idlegrid code in the path: the hires
fix as plain diffusers calls (A1111's recipe: txt2img latents at the first-pass size,
bilinear-resized, then img2img on them), and the post-processors as spandrel's architecture
classes called directly (imported through worker.image.spandrel_archs only because
`import spandrel` itself needs torchvision)."""

from __future__ import annotations

from typing import Any

import diffusers
import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline,
)
from PIL import Image

from protocol.params import ImageParams
from worker.image.samplers import SCHEDULER_SPECS
from worker.image.spandrel_archs import spandrel_module

__all__ = ["gfpgan_model", "plain_face_fix", "plain_hires", "plain_upscale", "rrdbnet"]


def plain_hires(
    pipe: StableDiffusionPipeline, params: ImageParams, seed: int, first: tuple[int, int]
) -> np.ndarray:
    class_name, options = SCHEDULER_SPECS[params.sampler]
    scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **options)
    txt2img = StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})
    img2img = StableDiffusionImg2ImgPipeline(**{**pipe.components, "scheduler": scheduler})
    txt2img.set_progress_bar_config(disable=True)
    img2img.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    common: dict[str, Any] = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt or None,
        "num_inference_steps": params.steps,
        "guidance_scale": params.cfg_scale,
        "generator": generator,
    }
    latents = txt2img(width=first[0], height=first[1], output_type="latent", **common).images
    latents = torch.nn.functional.interpolate(
        latents, size=(params.height // 8, params.width // 8), mode="bilinear", antialias=False
    )
    out = img2img(image=latents, strength=params.hires_fix_denoising_strength, **common)
    return np.asarray(out.images[0])


def rrdbnet(scale: int, seed: int) -> torch.nn.Module:
    """A small random-weight RRDBNet (ESRGAN), as the upscalers are, in eval mode."""
    torch.manual_seed(seed)
    esrgan = spandrel_module("architectures.ESRGAN").ESRGAN
    model: torch.nn.Module = esrgan(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
    return model.eval()


def gfpgan_model(seed: int) -> torch.nn.Module:
    """A random-weight GFPGANv1Clean at its fixed 512x512 (GFPGAN v1.3/v1.4's shape), with
    noise strengths of 0.1."""
    torch.manual_seed(seed)
    gfpgan = spandrel_module("architectures.GFPGAN").GFPGAN
    model: torch.nn.Module = gfpgan(
        out_size=512,
        num_style_feat=512,
        channel_multiplier=2,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=1,
        sft_half=True,
    )
    # StyleGAN's noise strengths start at zero, which would make the decoder's noise (and
    # so the seed) irrelevant; a trained GFPGAN's are not zero
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("stylegan_decoder.style_conv") and param.shape == (1,):
                param.fill_(0.1)
    return model.eval()


def _tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _image(tensor: torch.Tensor) -> Image.Image:
    array = (tensor[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)


@torch.inference_mode()
def plain_upscale(model: torch.nn.Module, image: Image.Image) -> Image.Image:
    return _image(model(_tensor(image)))


@torch.inference_mode()
def plain_face_fix(
    model: torch.nn.Module, image: Image.Image, strength: float, seed: int
) -> Image.Image:
    """GFPGAN on the whole image at 512x512 in [-1, 1], noise from torch seeded `seed`,
    resized back and blended at `strength`."""
    face = image.resize((512, 512), Image.Resampling.LANCZOS)
    torch.manual_seed(seed)
    out = model(_tensor(face) * 2 - 1, return_rgb=False)[0]
    restored = _image((out + 1) / 2).resize(image.size, Image.Resampling.LANCZOS)
    return Image.blend(image, restored, strength)
