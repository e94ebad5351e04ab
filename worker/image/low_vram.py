"""Placing the loaded pipeline on its device, with `--low-vram` if asked.

`--low-vram` trades speed for memory, on any device:
- attention slicing (diffusers' "auto": the attention computed in two slices of heads);
- VAE slicing (a batch decoded one image at a time) and VAE tiling (images larger than the
  VAE's sample size encoded and decoded in overlapping tiles, blended at the seams).
On CUDA it also keeps the weights in float16 and moves each model (text encoder, UNet,
VAE) to the GPU only while it runs (accelerate's model CPU offload). Both need CUDA: in
float32 on the CPU nothing is offloaded and half precision is slow and inexact there.

Slicing changes only the order of sums; tiling changes images above the VAE's sample size
(512 for SD 1) at the tile seams; float16 changes pixels slightly. Spot checks compare the
dtype, which the engine reports (ImageEngineInfo.dtype).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["place_pipeline"]


def place_pipeline(pipe: Any, device: torch.device, *, low_vram: bool) -> torch.dtype:
    """Move `pipe` (loaded in float32 on the CPU) to `device`, with the `--low-vram`
    measures when asked; returns the dtype of its weights."""
    if not low_vram:
        pipe.to(device)
        return torch.float32
    pipe.enable_attention_slicing()
    # (on the VAE itself: the pipeline's enable_vae_* wrappers are deprecated)
    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()
    if device.type != "cuda":
        pipe.to(device)
        return torch.float32
    pipe.to(dtype=torch.float16)
    pipe.enable_model_cpu_offload(device=device)
    return torch.float16
