"""Quantized blocks (`idlegrid worker blocks --quant int8`), and how much noise a spot
check allows each quantization.

- `int8`: weight-only int8 through torchao (`Int8WeightOnlyConfig`: each Linear's weight
  stored as int8 with one scale per output row, activations stay in the span's dtype). Runs
  on CPU and CUDA. Measured on SmolLM2 (bench/llm_quant.py): 0.25x the fp32 block memory,
  and a worst relative L2 distance per position of 4 % against fp32 over 15 blocks on real
  text.
- Not offered: bitsandbytes' int8 and nf4 (Petals' modes). They run on CUDA only, and block
  servers compute on CPU today; they come with CUDA block servers.

A server announces its quantization in its DHT record; a spot check compares two servers
within `tolerance + EXTRA_TOLERANCE[a] + EXTRA_TOLERANCE[b]`. A liar that claims a
quantization gets only that quantization's allowance, and garbage lands far above it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from protocol.engine import QUANTS

__all__ = ["EXTRA_TOLERANCE", "QUANTS", "pair_tolerance", "quantize_layers"]

log = logging.getLogger(__name__)

# relative L2 distance per position that an honest server of each quantization may add to
# a comparison: int8 measured at 0.04 worst (SmolLM2, 15 blocks, real text; 0.10 on random
# inputs, which real hidden states never are)
EXTRA_TOLERANCE: dict[str, float] = {"none": 0.0, "int8": 0.05}


def pair_tolerance(tolerance: float, a: str, b: str) -> float:
    """What two servers of quantizations `a` and `b` may differ by (unknown names count as
    unquantized: records are validated before they get here)."""
    return tolerance + EXTRA_TOLERANCE.get(a, 0.0) + EXTRA_TOLERANCE.get(b, 0.0)


def quantize_layers(layers: Iterable[torch.nn.Module], quant: str) -> None:
    """Quantize the Linear weights of `layers` in place ("none" leaves them)."""
    if quant == "none":
        return
    if quant == "int8":
        # torchao tries to load its CUDA kernels at import and logs each that fails
        logging.getLogger("torchao").setLevel(logging.ERROR)
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        for layer in layers:
            quantize_(layer, Int8WeightOnlyConfig())
        return
    raise ValueError(f"quantization {quant!r}; use one of {', '.join(QUANTS)}")
