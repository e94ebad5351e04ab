"""Quantized blocks (`idlegrid worker blocks --quant MODE`), and how much noise a spot
check allows each quantization.

- `int8`: weight-only int8 through torchao (`Int8WeightOnlyConfig`: each Linear's weight
  stored as int8 with one scale per output row, activations stay in the span's dtype). Runs
  on CPU and CUDA. Measured on SmolLM2 (bench/llm_quant.py): 0.25x the fp32 block memory,
  and a worst relative L2 distance per position of 4 % against fp32 over 15 blocks on real
  text.
- `bnb-int8`: bitsandbytes' LLM.int8 (`Linear8bitLt`, threshold 6.0, Petals' int8): int8
  weights and int8 activations, feature columns with outliers kept in 16-bit. CUDA only.
- `nf4`: bitsandbytes' 4-bit NormalFloat (`Linear4bit`, blocks of 64, Petals' nf4): about
  an eighth of the fp32 weights. CUDA only.

bitsandbytes is an optional, CUDA-only dependency (`pip install bitsandbytes`, or the
`idlegrid[cuda]` extra); it is imported only when a server asks for its modes, and
`unavailable()` says before anything is loaded why a mode cannot run on this machine.

A server announces its quantization in its DHT record. Two servers of the same
quantization compute the same rounded weights, so they are compared within `tolerance`
alone; two of different quantizations within `tolerance + EXTRA_TOLERANCE[a] +
EXTRA_TOLERANCE[b]`. A liar that claims a quantization gains at most that quantization's
allowance against a checker of another one, and none against a checker of its own.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable

import torch

from protocol.engine import QUANTS

__all__ = [
    "CUDA_QUANTS",
    "EXTRA_TOLERANCE",
    "QUANTS",
    "pair_tolerance",
    "quantize_layers",
    "unavailable",
]

log = logging.getLogger(__name__)

# the modes that run on CUDA only, through bitsandbytes
CUDA_QUANTS: tuple[str, ...] = ("bnb-int8", "nf4")

# Relative L2 distance per position that an honest server of each quantization may add to
# a comparison with a server of another quantization: the worst measured against fp32 on
# SmolLM2 over 15 blocks of real text, plus a margin (bench/llm_quant.py, and
# bench/llm_quant_bnb.py for the bitsandbytes formats, simulated on CPU): int8 0.045,
# bnb-int8 0.12 (its activations are rounded too), nf4 0.41 (16 levels per weight; SmolLM2
# keeps 77 % of its greedy tokens).
EXTRA_TOLERANCE: dict[str, float] = {"none": 0.0, "int8": 0.05, "bnb-int8": 0.15, "nf4": 0.5}

_PIP = "pip install bitsandbytes"


def pair_tolerance(tolerance: float, a: str, b: str) -> float:
    """What two servers of quantizations `a` and `b` may differ by: `tolerance` when they
    quantize alike, else each side's allowance on top (unknown names count as unquantized:
    records are validated before they get here)."""
    if a == b:
        return tolerance
    return tolerance + EXTRA_TOLERANCE.get(a, 0.0) + EXTRA_TOLERANCE.get(b, 0.0)


def unavailable(quant: str) -> str | None:
    """Why `--quant quant` cannot run on this machine, or None if it can."""
    if quant not in QUANTS:
        return f"unknown quantization {quant!r}; use one of {', '.join(QUANTS)}"
    if quant not in CUDA_QUANTS:
        return None
    here = ", ".join(q for q in QUANTS if q not in CUDA_QUANTS)
    if not torch.cuda.is_available():
        return (
            f"{quant} runs on CUDA only (bitsandbytes), and this machine has no CUDA device; "
            f"use --quant {here} here"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"{quant} needs bitsandbytes, which is not installed: {_PIP}"
    return None


def quantize_layers(layers: Iterable[torch.nn.Module], quant: str) -> None:
    """Quantize the Linear weights of `layers` in place ("none" leaves them). The CUDA modes
    replace each Linear by bitsandbytes' and move the layers to the GPU."""
    if quant == "none":
        return
    if quant == "int8":
        # torchao tries to load its CUDA kernels at import and logs each that fails
        logging.getLogger("torchao").setLevel(logging.ERROR)
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        for layer in layers:
            quantize_(layer, Int8WeightOnlyConfig())
        return
    if quant in CUDA_QUANTS:
        reason = unavailable(quant)
        if reason is not None:
            raise RuntimeError(f"--quant {quant}: {reason}")
        for layer in layers:
            _replace_linears(layer, quant)
            layer.to("cuda")  # bitsandbytes quantizes the weights as they move
        return
    raise ValueError(f"quantization {quant!r}; use one of {', '.join(QUANTS)}")


def _replace_linears(module: torch.nn.Module, quant: str) -> None:
    import bitsandbytes as bnb

    for name, child in module.named_children():
        if not isinstance(child, torch.nn.Linear):
            _replace_linears(child, quant)
            continue
        bias = child.bias is not None
        replacement: torch.nn.Module
        if quant == "nf4":
            replacement = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=bias,
                compute_dtype=child.weight.dtype,
                quant_type="nf4",
            )
        else:
            replacement = bnb.nn.Linear8bitLt(
                child.in_features,
                child.out_features,
                bias=bias,
                has_fp16_weights=False,
                threshold=6.0,
            )
        replacement.load_state_dict(child.state_dict())
        setattr(module, name, replacement.requires_grad_(False).eval())
