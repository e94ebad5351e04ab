"""A tiny random ControlNet for the tiny Stable Diffusion pipeline, for tests.

`ControlNetModel.from_unet` copies the UNet's configuration (and here, its encoder weights);
a trained ControlNet starts with its output convolutions at zero, which would make the
control map change nothing. These are drawn at random instead (seeded), so a test can tell
whether the map reached the UNet. Saved with safetensors, as a diffusers folder or as one
file, with diffusers' parameter names or the original (lllyasviel) ones that A1111 and
ComfyUI use.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.controlnets.controlnet import ControlNetModel
from safetensors.torch import save_file

from worker.models.tiny_models import _rename, _unet_prefixes

__all__ = ["build_tiny_controlnet", "original_names"]

SEED = 7
# the spread of the output ("zero") convolutions' random weights: large enough that the
# control map visibly changes a 4-step tiny image
OUTPUT_STD = 0.5


def build_tiny_controlnet(
    sd_dir: Path, out: Path, *, single_file: bool = False, original: bool = False
) -> Path:
    """Write a ControlNet for the UNet in `sd_dir` to `out`: a diffusers folder, or with
    `single_file` one `.safetensors` file (with `original`, in the original layout).
    Returns `out`. Same inputs, same bytes."""
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
        if original:
            unet_config = json.loads((sd_dir / "unet" / "config.json").read_text("utf-8"))
            state = original_names(state, unet_config)
        save_file(dict(sorted(state.items())), str(out), metadata={"format": "pt"})
    else:
        model.save_pretrained(out, safe_serialization=True)
    return out


def original_names(
    state: dict[str, torch.Tensor], unet_config: dict[str, object]
) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet state dict under the original (lllyasviel) names: the UNet's
    encoder as in an SD-1 checkpoint, plus the hint encoder and the zero convolutions."""
    table = _unet_prefixes(unet_config)
    hint = "controlnet_cond_embedding."
    blocks = len({key.split(".")[2] for key in state if key.startswith(hint + "blocks.")})
    table[hint + "conv_in."] = ("input_hint_block.0.", {})
    for block in range(blocks):
        # (the original interleaves SiLUs: its convolutions sit at even indices)
        table[f"{hint}blocks.{block}."] = (f"input_hint_block.{2 * (block + 1)}.", {})
    table[hint + "conv_out."] = (f"input_hint_block.{2 * (blocks + 1)}.", {})
    zero_convs = len({key.split(".")[1] for key in state if key.startswith("controlnet_down_")})
    for index in range(zero_convs):
        table[f"controlnet_down_blocks.{index}."] = (f"zero_convs.{index}.0.", {})
    table["controlnet_mid_block."] = ("middle_block_out.0.", {})
    return {
        "control_model." + _rename(key, table, "ControlNet")[0]: value
        for key, value in state.items()
    }
