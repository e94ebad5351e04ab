"""A tiny random ControlNet for the tiny Stable Diffusion pipeline, for tests.

`ControlNetModel.from_unet` copies the UNet's configuration (and here, its encoder weights);
a trained ControlNet starts with its output convolutions at zero, which would make the
control map change nothing. These are drawn at random instead (seeded), so a test can tell
whether the map reached the UNet. Saved with safetensors, as a diffusers folder or as one
file with diffusers' parameter names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.controlnets.controlnet import ControlNetModel
from safetensors.torch import save_file

__all__ = ["build_tiny_controlnet"]

SEED = 7
# the spread of the output ("zero") convolutions' random weights: large enough that the
# control map visibly changes a 4-step tiny image
OUTPUT_STD = 0.5


def build_tiny_controlnet(sd_dir: Path, out: Path, *, single_file: bool = False) -> Path:
    """Write a ControlNet for the UNet in `sd_dir` to `out`: a diffusers folder, or with
    `single_file` one `.safetensors` file. Returns `out`. Same inputs, same bytes."""
    unet = UNet2DConditionModel.from_pretrained(
        sd_dir, subfolder="unet", use_safetensors=True, local_files_only=True
    )
    torch.manual_seed(SEED)
    model = ControlNetModel.from_unet(unet)
    generator = torch.Generator("cpu").manual_seed(SEED)
    with torch.no_grad():
        for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block]:
            assert isinstance(conv, torch.nn.Conv2d)
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * OUTPUT_STD)
    if single_file:
        out.parent.mkdir(parents=True, exist_ok=True)
        state = {key: value.contiguous() for key, value in model.state_dict().items()}
        save_file(dict(sorted(state.items())), str(out), metadata={"format": "pt"})
    else:
        model.save_pretrained(out, safe_serialization=True)
    return out
