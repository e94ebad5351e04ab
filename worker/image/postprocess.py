"""Face fixers and upscalers run on a finished image (AI Horde's `post_processing`).

The weights are the donor's (worker.image.post_files), loaded with spandrel's
architectures (worker.image.spandrel_archs): GFPGAN (GFPGANv1Clean, fixed at 512x512)
and ESRGAN/RRDBNet for the upscalers (RealESRGAN_x2plus with its pixel-unshuffle input,
x4plus, the 6-block anime model, NMKD Siax and 4x AnimeSharp are all RRDBNets). Each file
must be the architecture its name says, at the scale its name says.

- Upscalers: spandrel's `ImageModelDescriptor` called on the RGB image in [0, 1]; the
  result is rounded to 8 bits.
- GFPGAN needs a face detector (facexlib's RetinaFace) to crop and align faces; its weights
  are not in spandrel and none is loaded here. So the restorer runs on the **whole image**,
  LANCZOS-resized to 512x512, normalised to [-1, 1] as GFPGAN was trained, and resized back;
  `facefixer_strength` blends the restored image over the original (A1111's "GFPGAN
  visibility"). Its StyleGAN decoder draws noise: it comes from torch's generator seeded
  with the image's seed, so a spot check reproduces it.

Face fixers run first, then the upscaler (protocol.postprocess.ordered).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from protocol.params import ImageParams
from protocol.postprocess import UPSCALERS, ordered
from worker.errors import ModelNotFound
from worker.image.post_files import post_processor_files
from worker.image.spandrel_archs import canonicalize_state_dict, esrgan_arch, gfpgan_arch

__all__ = [
    "GFPGAN_SIZE",
    "PostProcessors",
    "face_fix",
    "from_tensor",
    "load_post_processor",
    "load_weights",
    "to_tensor",
    "upscale",
]

GFPGAN_SIZE = 512

logger = logging.getLogger(__name__)


def load_weights(path: Path) -> dict[str, Any]:
    """A state dict from safetensors, or from a `.pth` through torch.load(weights_only=True)
    (which refuses any pickled object but tensors and plain containers)."""
    if path.suffix == ".safetensors":
        return dict(load_file(str(path), device="cpu"))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise ModelNotFound(f"{path}: holds no state dict")
    return canonicalize_state_dict(loaded)


def load_post_processor(name: str, state_dict: dict[str, Any]) -> Any:
    """spandrel's ImageModelDescriptor for AI Horde's post-processor `name`, in eval mode;
    ModelNotFound when the weights are not that architecture at that scale."""
    arch = esrgan_arch() if name in UPSCALERS else gfpgan_arch()
    if not arch.detect(state_dict):
        raise ModelNotFound(
            f"--post-processors: the weights for {name} are not a {arch.id} model; "
            f"give {name} its own weights"
        )
    descriptor = arch.load(state_dict)
    expected = UPSCALERS.get(name, 1)
    if descriptor.scale != expected:
        raise ModelNotFound(
            f"--post-processors: {name} must upscale {expected}x but these weights upscale "
            f"{descriptor.scale}x; give {name} its own weights"
        )
    descriptor.model.eval()
    return descriptor


def to_tensor(image: Image.Image, device: torch.device) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).to(device)


def from_tensor(tensor: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [0, 1] -> RGB image, rounded to 8 bits."""
    array = tensor[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


@torch.inference_mode()
def upscale(descriptor: Any, image: Image.Image, device: torch.device) -> Image.Image:
    """The image through an upscaler's descriptor (spandrel pads and crops as it needs)."""
    return from_tensor(descriptor(to_tensor(image, device)))


@torch.inference_mode()
def face_fix(
    descriptor: Any, image: Image.Image, strength: float, seed: int, device: torch.device
) -> Image.Image:
    """GFPGAN on the whole image (see the module docstring), blended in at `strength`."""
    size = image.size
    face = image.convert("RGB").resize((GFPGAN_SIZE, GFPGAN_SIZE), Image.Resampling.LANCZOS)
    normalised = to_tensor(face, device) * 2 - 1
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        restored = descriptor.model(normalised, return_rgb=False)[0]
    fixed = from_tensor((restored + 1) / 2).resize(size, Image.Resampling.LANCZOS)
    return Image.blend(image.convert("RGB"), fixed, strength)


class PostProcessors:
    """The donor's post-processors, loaded once per engine."""

    def __init__(self, models: Mapping[str, Any], device: torch.device) -> None:
        self.models = dict(models)
        self.device = device

    @classmethod
    def load(cls, folder: Path | None, device: torch.device) -> PostProcessors:
        if folder is None:
            return cls({}, device)
        models = {}
        for name, path in post_processor_files(folder).items():
            descriptor = load_post_processor(name, load_weights(path))
            descriptor.model.to(device)
            models[name] = descriptor
            logger.info("loaded post-processor %s from %s", name, path.name)
        return cls(models, device)

    def check(self, params: ImageParams) -> list[str]:
        """The job's post-processors this engine does not hold."""
        return [name for name in params.post_processing if name not in self.models]

    def apply(self, image: Image.Image, params: ImageParams, seed: int) -> Image.Image:
        """The job's post-processors on one image, face fixers first."""
        for name in ordered(params.post_processing):
            descriptor = self.models[name]
            if name in UPSCALERS:
                image = upscale(descriptor, image, self.device)
            else:
                image = face_fix(descriptor, image, params.facefixer_strength, seed, self.device)
        return image
