"""Seamless tiles (AI Horde's and AUTOMATIC1111's `tiling`): every 2-D convolution of the
UNet and the VAE pads circularly, so an image's left edge continues its right one and its
top its bottom. The engine sets the mode before each job (modules are shared by its jobs).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

__all__ = ["set_tiling"]


def set_tiling(modules: Iterable[torch.nn.Module], tiling: bool) -> None:
    """Circular padding in every Conv2d under `modules` if `tiling`, else zeros (the default)."""
    mode: Literal["circular", "zeros"] = "circular" if tiling else "zeros"
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d):
                layer.padding_mode = mode
