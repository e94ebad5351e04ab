"""How far bitsandbytes' block quantizations (`--quant bnb-int8`, `--quant nf4`) move a
span's hidden states, measured on CPU by simulating their number formats (bitsandbytes
itself runs on CUDA only), in one run against fp32 and torchao's int8:

  int8      - torchao weight-only int8 (what `--quant int8` runs)
  bnb-int8  - LLM.int8 (threshold 6.0): weights int8 with one absmax scale per output row;
              activations int8 with one absmax scale per token, except feature columns
              holding a value >= 6.0, which stay float (the "outliers")
  nf4       - 4-bit NormalFloat: weights in blocks of 64, each scaled by its absmax onto the
              16 NF4 levels of QLoRA (activations stay float)

For each half of SmolLM2 it prints the worst and the mean relative L2 distance per position
(what a spot check compares) between the span's outputs and fp32's on real text, and for
the whole model the largest |logit difference| and the share of unchanged greedy tokens.
The simulation leaves out fp16 rounding and nf4's 8-bit double quantization of the block
scales; both are small next to the 4-bit rounding.

    .venv/bin/python bench/llm_quant_bnb.py [--model DIR] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.llm.swarm.blocks import BlockSpan  # noqa: E402
from worker.llm.swarm.quant import quantize_layers  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905 Einstein published four papers "
    "that changed physics: on the photoelectric effect, Brownian motion, special relativity "
    "and the equivalence of mass and energy. def total(items):\n    return sum(i.price for i "
    "in items)\n"
)

# the 16 levels of 4-bit NormalFloat (QLoRA, Dettmers et al. 2023, appendix E)
NF4 = torch.tensor(
    [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
     0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
)  # fmt: skip


def nf4_weight(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    flat = weight.reshape(-1, block)
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    index = ((flat / scale)[..., None] - NF4).abs().argmin(dim=-1)
    return (NF4[index] * scale).reshape(weight.shape)


def int8_rows(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    return (x / scale).round().clamp(-127, 127) * scale


class LlmInt8(torch.nn.Module):
    """LLM.int8's arithmetic in float: int8 weights, int8 activations but for outliers."""

    def __init__(self, linear: torch.nn.Linear, threshold: float = 6.0) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(int8_rows(linear.weight.data), requires_grad=False)
        self.bias = linear.bias
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outliers = (x.abs() >= self.threshold).flatten(0, -2).any(dim=0)
        regular = x.masked_fill(outliers, 0.0)
        out = torch.nn.functional.linear(int8_rows(regular) + x * outliers, self.weight)
        return out if self.bias is None else out + self.bias


def replace_linears(
    module: torch.nn.Module, make: Callable[[torch.nn.Linear], torch.nn.Module]
) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, make(child))
        else:
            replace_linears(child, make)


def nf4_linear(linear: torch.nn.Linear) -> torch.nn.Linear:
    linear.weight.data = nf4_weight(linear.weight.data)
    return linear


def simulate(layers: list[torch.nn.Module], mode: str) -> None:
    if mode == "int8":
        quantize_layers(layers, "int8")
        return
    for layer in layers:
        replace_linears(layer, LlmInt8 if mode == "bnb-int8" else nf4_linear)


def distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-6)
    distance: torch.Tensor = (a - b).norm(dim=-1) / scale
    return distance


MODES = ("int8", "bnb-int8", "nf4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parents[1] / ".cache" / "real-models" / "smollm2"
    parser.add_argument("--model", type=Path, default=default)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
    blocks = int(model.config.num_hidden_layers)
    rows = []
    for start, end in ((0, blocks // 2), (blocks // 2, blocks)):
        plain = BlockSpan.load(args.model, start, end)
        reference = plain.forward(hidden, None)
        row = [f"{start}:{end}"]
        for mode in MODES:
            span = BlockSpan.load(args.model, start, end)
            simulate(span.layers, mode)
            d = distances(reference, span.forward(hidden, None))
            row += [f"{float(d.max()):.3f}", f"{float(d.mean()):.3f}"]
        rows.append(row)
        hidden = reference
    whole = []
    with torch.no_grad():
        logits = model(ids).logits
        for mode in MODES:
            quantized = copy.deepcopy(model)
            simulate(list(quantized.model.layers), mode)
            other = quantized(ids).logits
            delta = float((logits - other).abs().max())
            same = float((logits.argmax(-1) == other.argmax(-1)).float().mean())
            whole.append(f"{mode}: max |delta logit| {delta:.2f}, greedy unchanged {same:.1%}")

    print(f"model {args.model.name}, {ids.shape[1]} tokens of text, {args.threads} thread(s)\n")
    print("rel L2 per position vs fp32 (worst / mean):\n")
    print("| blocks | " + " | ".join(f"{m} worst | {m} mean" for m in MODES) + " |")
    print("|---|" + "---|" * (2 * len(MODES)))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\nwhole model: " + "; ".join(whole))


if __name__ == "__main__":
    main()
