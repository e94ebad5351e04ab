"""Speculative decoding by prompt lookup vs plain decoding through two block servers (issue 25).

The model is SmolLM2 (`--model DIR/smollm2`, converted by `idlegrid models smollm2 DIR`) or
the tiny LM (default). Starts a coordinator and two block servers on loopback (real
processes, each half of the blocks: 0:15 and 15:30 of SmolLM2), every process and this one
with `--threads` torch threads. Here: the embeddings and LM head, and `generate()` through
an `InferenceSession`, as the gateway's engine runs it; for each prompt, interleaved:
  plain        - one token per step
  speculative  - drafts by prompt lookup, verified in one multi-token step, caches rolled
                 back to what was kept (worker.llm.gateway.speculative)
Greedy; the table shows the median decoding tokens/s (after the first token: the prompt's
prefill is the same for both), the ratio, the steps taken and whether the text is the
same. Prompts are echo-heavy (repeat or edit a given paragraph or code) or have nothing
to copy; the summary rows add up each kind's tokens and seconds.

    .venv/bin/python bench/llm_speculative.py [--model DIR] [--threads 1] [--runs 3]
        [--tokens 96] [--draft-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from processes import Processes, bench_llm, start_swarm

PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He polished the "
    "great lens, trimmed the wick and wrote the weather in a leather notebook. Ships passed "
    "far out at sea, and none of their crews ever knew his name."
)
CODE = (
    "def total_price(items, tax_rate):\n"
    "    subtotal = 0\n"
    "    for item in items:\n"
    "        subtotal += item.price * item.quantity\n"
    "    tax = subtotal * tax_rate\n"
    "    return subtotal + tax\n"
)
# (kind, label, user message)
PROMPTS = [
    ("echo", "repeat a paragraph", f"Repeat this paragraph exactly:\n\n{PARAGRAPH}"),
    (
        "echo",
        "edit a paragraph",
        f"Rewrite this paragraph in the present tense, changing nothing else:\n\n{PARAGRAPH}",
    ),
    (
        "echo",
        "edit code",
        f"Rename the function total_price to order_total in this code and show all of it:"
        f"\n\n```python\n{CODE}```",
    ),
    ("fresh", "haiku", "Write a haiku about the sea."),
    ("fresh", "explain", "Explain what a CPU does in three sentences."),
    ("fresh", "list", "Give three tips for learning to cook."),
]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=96, help="most tokens generated per run")
    parser.add_argument("--draft-tokens", type=int, default=8, help="most drafted per step")
    parser.add_argument(
        "--model", type=Path, help="model folder (default: the tiny LM, built if needed)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of every process (default 1)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="idlegrid-bench-"))
    llm = bench_llm(args.model, work)
    processes = Processes(work)
    try:
        _, maddr = start_swarm(processes, llm, args.threads)
        rows = asyncio.run(_measure(llm, maddr, args))
    finally:
        processes.stop()
    _print(llm, args, rows)
    return 0


async def _measure(llm: Path, maddr: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoTokenizer

    from worker.llm.gateway.generation import GenerationResult, SamplingParams, generate
    from worker.llm.gateway.lm_head import LMHead
    from worker.llm.gateway.speculative import DraftSettings, Speculation
    from worker.llm.swarm.routing import SwarmClient, SwarmClientConfig
    from worker.llm.swarm.session import InferenceSession

    torch.set_num_threads(args.threads)
    head = LMHead.load(llm)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    params = SamplingParams(max_new_tokens=args.tokens, temperature=0.0)
    settings = DraftSettings(max_draft=args.draft_tokens, start=min(4, args.draft_tokens))
    client = await SwarmClient.create(
        SwarmClientConfig(model_name=llm.name, initial_peers=(maddr,))
    )

    def prompt_ids(message: str) -> list[int]:
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = message
        return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]

    async def run(ids: list[int], speculative: bool) -> tuple[GenerationResult, int]:
        steps = 0
        async with InferenceSession(client, len(ids) + args.tokens) as session:

            async def step(hidden: torch.Tensor, start_position: int | None = None) -> torch.Tensor:
                nonlocal steps
                steps += 1
                return await session.step(hidden, start_position)

            speculation = Speculation(step, settings) if speculative else None
            result = await generate(head, step, ids, params, tokenizer, None, speculation)
        return result, steps

    def rate(result: GenerationResult) -> float:
        return (result.completion_tokens - 1) / (result.seconds - result.first_token_seconds)

    rows = []
    try:
        for kind, label, message in PROMPTS:
            ids = prompt_ids(message)
            await run(ids, False)  # warm-up
            plain: list[tuple[GenerationResult, int]] = []
            fast: list[tuple[GenerationResult, int]] = []
            for _ in range(args.runs):  # interleaved, so drift hits both alike
                plain.append(await run(ids, False))
                fast.append(await run(ids, True))
            rows.append(
                {
                    "kind": kind,
                    "label": label,
                    "tokens": plain[0][0].completion_tokens,
                    "plain": statistics.median(rate(r) for r, _ in plain),
                    "fast": statistics.median(rate(r) for r, _ in fast),
                    "plain_seconds": statistics.median(
                        r.seconds - r.first_token_seconds for r, _ in plain
                    ),
                    "fast_seconds": statistics.median(
                        r.seconds - r.first_token_seconds for r, _ in fast
                    ),
                    "steps": (plain[0][1], fast[0][1]),
                    "identical": all(r.token_ids == plain[0][0].token_ids for r, _ in plain + fast),
                }
            )
    finally:
        await client.aclose()
    return rows


def _print(llm: Path, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{llm.name}: plain vs speculative decoding (prompt lookup, up to "
        f"{args.draft_tokens} drafts) through 2 block servers, greedy, up to {args.tokens} "
        f"new tokens, median of {args.runs} runs, {args.threads} torch thread(s) per process"
    )
    print(
        f"| {'prompt':<24} | {'tokens':>6} | {'plain tok/s':>11} | {'spec tok/s':>10} | "
        f"{'ratio':>5} | {'steps plain/spec':>16} | identical text |"
    )
    print(f"|{'-' * 26}|{'-' * 8}|{'-' * 13}|{'-' * 12}|{'-' * 7}|{'-' * 18}|{'-' * 16}|")
    for row in rows:
        steps = f"{row['steps'][0]}/{row['steps'][1]}"
        print(
            f"| {row['kind'] + ': ' + row['label']:<24} | {row['tokens']:>6} | "
            f"{row['plain']:>11.1f} | {row['fast']:>10.1f} | {row['fast'] / row['plain']:>5.2f} | "
            f"{steps:>16} | {'yes' if row['identical'] else 'NO':<14} |"
        )
    for kind, target in (("echo", 1.5), ("fresh", 0.95)):
        mine = [row for row in rows if row["kind"] == kind]
        tokens = sum(row["tokens"] - 1 for row in mine)
        plain = tokens / sum(row["plain_seconds"] for row in mine)
        fast = tokens / sum(row["fast_seconds"] for row in mine)
        label = "echo-heavy, all" if kind == "echo" else "nothing to copy, all"
        print(
            f"| {label:<24} | {tokens + len(mine):>6} | {plain:>11.1f} | {fast:>10.1f} | "
            f"{fast / plain:>5.2f} | {'':>16} | target >= {target:<4} |"
        )


if __name__ == "__main__":
    sys.exit(main())
