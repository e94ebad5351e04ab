"""How often a chat's next turn starts with exactly the tokens its kept session holds.

Conversation reuse (README: How it works, Conversation reuse) keeps a finished chat's
session under the tokens the servers hold: the prompt and the generated tokens but the
last. The next turn's prompt is the chat template applied to the conversation with the
answer as text, tokenized again; it can reuse the session only if it starts with exactly
those tokens. For each question (greedy, the local model, `--tokens` new tokens) this
prints whether it does, and where the two first differ.

    .venv/bin/python bench/turn_match.py --model .cache/real-models/smollm2 [--tokens 24 64]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "List three fruits.",
    "Explain recursion briefly.",
    "What is 17 times 3?",
    "Translate 'good morning' to Spanish.",
    "Give me a Python one-liner to reverse a string.",
    "Who wrote Hamlet?",
    "Name a prime number above 50.",
    "Describe the color blue to someone who cannot see.",
    "What does HTTP stand for?",
    "Tell me a joke about cats.",
    "Summarize the plot of Cinderella in one sentence.",
    "What is the boiling point of water in Fahrenheit?",
    "Suggest a name for a pet turtle.",
    "How many legs does a spider have?",
    "Write a SQL query selecting all rows from users.",
    "What's the square root of 144?",
    "Give two synonyms for happy.",
    "Why is the sky blue?",
]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--tokens", type=int, nargs="+", default=[24, 64])
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True).eval()

    def ids(messages: list[dict[str, str]]) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]

    outcomes: Counter[tuple[int, str, bool]] = Counter()
    print(f"| {'new tokens':>10} | {'ended by':<10} | {'turn 2 starts with the kept tokens':<40} |")
    print(f"|{'-' * 12}|{'-' * 12}|{'-' * 42}|")
    for limit in args.tokens:
        for question in QUESTIONS:
            first: list[dict[str, str]] = [{"role": "user", "content": question}]
            prompt = ids(first)
            generated = _greedy(model, tokenizer, prompt, limit)
            ended = "eos" if generated[-1] == tokenizer.eos_token_id else "max_tokens"
            answer = tokenizer.decode(
                generated, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            held = prompt + generated[:-1]
            follow: list[dict[str, str]] = [
                {"role": "assistant", "content": str(answer)},
                {"role": "user", "content": "More?"},
            ]
            second = ids(first + follow)
            same = second[: len(held)] == held
            at = _differ(held, second) - len(prompt)
            where = "yes" if same else f"no: differs at token {at} of {len(generated) - 1}"
            outcomes[limit, ended, same] += 1
            print(f"| {limit:>10} | {ended:<10} | {where:<40} |", flush=True)
    total = sum(outcomes.values())
    matched = sum(n for (_, _, same), n in outcomes.items() if same)
    print(f"\nturn 2 starts with the kept tokens: {matched}/{total}")
    for (limit, ended, same), n in sorted(outcomes.items()):
        print(f"  {limit} new tokens, ended by {ended}: {'match' if same else 'differ'} {n}")
    return 0


def _greedy(model: Any, tokenizer: Any, prompt: list[int], limit: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=limit,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return [int(i) for i in out[0, len(prompt) :]]


def _differ(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


if __name__ == "__main__":
    raise SystemExit(main())
