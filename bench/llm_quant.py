"""Quantized block spans (`idlegrid worker blocks --quant int8`) against fp32, in one run.

For each half of the model (0:15 and 15:30 of SmolLM2, 0:2 and 2:4 of the tiny LM), loads
the span as stored (fp32) and with weight-only int8 (torchao), then prints:
  weights MB     - the span's weight bytes (int8 data and scales for the quantized one)
  tokens/s       - one token per step after an 8-token prefix (BlockSpan.measure_throughput,
                   what a server announces), median of --runs
  worst rel L2   - the worst relative L2 distance per position between the two spans'
                   outputs on real text (what a spot check compares; its tolerance is 0.1,
                   plus 0.05 for each int8 side)
and, for the whole model, the largest |logit difference| and the share of positions whose
greedy token is unchanged when every block is int8.

    .venv/bin/python bench/llm_quant.py [--model DIR] [--threads 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.llm.swarm.blocks import BlockSpan  # noqa: E402
from worker.llm.swarm.quant import quantize_layers  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1905 Einstein published four papers "
    "that changed physics: on the photoelectric effect, Brownian motion, special relativity "
    "and the equivalence of mass and energy."
)


def weight_bytes(span: BlockSpan) -> int:
    total = 0
    for layer in span.layers:
        for tensor in layer.state_dict().values():
            parts = [tensor.qdata, tensor.scale] if hasattr(tensor, "qdata") else [tensor]
            total += sum(p.numel() * p.element_size() for p in parts)
    return total


def worst_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-6)
    return float(((a - b).norm(dim=-1) / scale).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parents[1] / ".cache" / "real-models" / "smollm2"
    parser.add_argument("--model", type=Path, default=default)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
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
        int8 = BlockSpan.load(args.model, start, end, quant="int8")
        speeds = {
            name: statistics.median(span.measure_throughput() for _ in range(args.runs))
            for name, span in (("fp32", plain), ("int8", int8))
        }
        a, b = plain.forward(hidden, None), int8.forward(hidden, None)
        rows.append(
            (
                f"{start}:{end}",
                weight_bytes(plain) / 2**20,
                weight_bytes(int8) / 2**20,
                speeds["fp32"],
                speeds["int8"],
                worst_distance(a, b),
            )
        )
        hidden = a
    quantized = copy.deepcopy(model)
    quantize_layers(quantized.model.layers, "int8")
    with torch.no_grad():
        logits, quantized_logits = model(ids).logits, quantized(ids).logits
    delta = float((logits - quantized_logits).abs().max())
    same = float((logits.argmax(-1) == quantized_logits.argmax(-1)).float().mean())

    print(f"model {args.model.name}, {ids.shape[1]} tokens of text, {args.threads} thread(s)\n")
    print(
        "| blocks | fp32 MB | int8 MB | int8 / fp32 memory | fp32 tok/s | int8 tok/s "
        "| int8 / fp32 speed | worst rel L2 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for span, fp32_mb, int8_mb, fp32_speed, int8_speed, distance in rows:
        print(
            f"| {span} | {fp32_mb:.1f} | {int8_mb:.1f} | {int8_mb / fp32_mb:.2f}x "
            f"| {fp32_speed:.1f} | {int8_speed:.1f} | {int8_speed / fp32_speed:.2f}x "
            f"| {distance:.3f} |"
        )
    print(
        f"\nwhole model int8: max |delta logit| {delta:.3f}, greedy token unchanged at {same:.1%}"
    )
    print("target: int8 memory <= 0.30x fp32")


if __name__ == "__main__":
    main()
