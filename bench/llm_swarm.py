"""Greedy generation locally vs through two block servers on loopback.

The model is the tiny LM (default) or `--model DIR`, e.g. SmolLM2 converted by
`idlegrid models smollm2 DIR` (then `--model DIR/smollm2`). Starts a coordinator, two block
servers (real processes, each half of the blocks: 0:2 and 2:4 of the tiny LM, 0:15 and
15:30 of SmolLM2) and a text gateway, every process and this one with `--threads` torch
threads, then times, in one run and interleaved:
  local    - the full model in this process: HF forward + DynamicCache, one token per step
  swarm    - embeddings and LM head here, the decoder blocks on the servers (SwarmClient)
  network  - what a user sees: submit to the coordinator, a gateway pops the job and runs it
             through the servers, the text streams back over server-sent events (the SDK)
and prints the median first-token latency (prompt in, first token out, session opening
included; for `network`, submit to the first streamed text) and tokens per second after it,
with ratios against the local baseline.

Then `--chats N` (default 8) different chats at once against each alone (issue 25): N
clients POST /v1/chat/completions at the same moment (different prompts, temperature 0);
aggregate tokens/s = the sum of completion_tokens / the time from the first request to the
last answer; the baseline is each of those chats alone (the table shows chat 0 alone and
the median chat alone). Every answer must equal its solo answer. `--chats 0` skips it;
`--chats-only` skips the local/swarm/network table. The table also gives each chat's time
per token (its seconds from request to answer / its completion tokens), p50 and p95.
`--profile DIR` adds where the CPU went while the chats ran at once (CPU seconds of every
process and its children, per decode round; `bench/cpu_share.py`) and, with py-spy
installed, writes py-spy's raw stacks of the gateway's engine and the first server's
compute and main process to DIR. `--then-draft-tokens N` then restarts the gateway with
`--draft-tokens N` and runs the chats at once again, against the same solo baseline.

`--turns N` (issue 25, conversation reuse) runs N conversations of two turns with a
`--history` tokens long first message (streamed /v1/chat/completions, temperature 0):
the first token's latency of turn 1, of turn 2 by the same account (the gateway kept the
session: only the new tokens are prefilled), and of the same turn 2 by another account
(a fresh session, the whole history prefilled), with ratios against turn 1.

    .venv/bin/python bench/llm_swarm.py [--model DIR] [--threads 1] [--runs 5] [--tokens 64]
        [--prompt 16] [--chats 8] [--chats-only] [--turns 3] [--history 1000] [--profile DIR]
        [--then-draft-tokens N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cpu_share import CpuShares
from processes import Processes, bench_llm, start_swarm, wait_line

# Petals 2.2 on this machine, same model and layout (STACK.md): what to beat by 2x
PETALS_TOKENS_PER_S = (52, 64)
PETALS_FIRST_TOKEN_MS = (45, 52)


Run = Callable[[], Awaitable[tuple[float, float]]]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per run")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument(
        "--model", type=Path, help="model folder (default: the tiny LM, built if needed)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of every process (default 1)"
    )
    parser.add_argument("--chats", type=int, default=8, help="chats at once (0: skip)")
    parser.add_argument("--chats-only", action="store_true", help="only the chats-at-once measure")
    parser.add_argument(
        "--turns", type=int, default=0, help="two-turn conversations to time (0: skip)"
    )
    parser.add_argument("--history", type=int, default=1000, help="first message's tokens")
    parser.add_argument(
        "--then-draft-tokens",
        type=int,
        help="then restart the gateway with this --draft-tokens and run the chats at once again",
    )
    parser.add_argument(
        "--profile", type=Path, help="profile the chats at once; py-spy stacks go to this folder"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="idlegrid-bench-"))
    llm = bench_llm(args.model, work)
    config = json.loads((llm / "config.json").read_text())
    blocks, hidden = config["num_hidden_layers"], config["hidden_size"]
    half = blocks // 2
    threads = str(args.threads)
    processes = Processes(work)
    start, named = processes.start, processes.named

    try:
        # every chat at once is one stream from the gateway's peer to each server
        url, maddr = start_swarm(
            processes, llm, args.threads, ["--max-streams-per-peer", str(max(8, args.chats))]
        )

        def gateway(*flags: str) -> subprocess.Popen[bytes]:
            proc, log = start(
                "gateway",
                ["worker", "gateway", "--model", str(llm), "--coordinator", url,
                 "--initial-peers", maddr, "--name", "gateway", "--identity",
                 str(work / "gw.key"), "--threads", threads, "--log-level",
                 "INFO" if args.turns else "WARNING", "--max-sessions",
                 str(max(args.chats, 1)), *flags],
            )  # fmt: skip
            wait_line(log, r"(idlegrid text gateway \S+ ready)", proc, 120)
            return proc

        first_gateway = gateway()
        shares = CpuShares(named) if args.profile is not None else None
        chats = asyncio.run(_chats_at_once(llm, url, args, shares)) if args.chats else None
        then = None
        if chats is not None and args.then_draft_tokens is not None:
            first_gateway.terminate()
            first_gateway.wait(timeout=60)
            gateway("--draft-tokens", str(args.then_draft_tokens))
            shares = CpuShares(named) if args.profile is not None else None
            then = asyncio.run(_chats_at_once(llm, url, args, shares, solo=False))
        turns = asyncio.run(_second_turns(llm, url, args)) if args.turns else None
        timings = None if args.chats_only else asyncio.run(_measure(llm, maddr, url, args))
    finally:
        processes.stop()

    if chats is not None:
        _print_chats(llm, args, *chats[:2])
        if chats[2] is not None:
            _print_cpu(chats[2], chats[1][2], max(chats[1][3]))
    if chats is not None and then is not None:
        print(
            f"\nthen at once again after restarting the gateway with --draft-tokens "
            f"{args.then_draft_tokens} (the solo baseline above is kept):"
        )
        _print_chats(llm, args, chats[0], then[1])
        if then[2] is not None:
            _print_cpu(then[2], then[1][2], max(then[1][3]))
    if turns is not None:
        _print_turns(llm, args, turns)
        said = (work / "gateway.log").read_text(errors="replace")
        print(
            f"the gateway's log: {said.count('reusing a kept session')} kept sessions reused, "
            f"{said.count('could not be reused')} fallbacks to a fresh session"
        )
    if timings is None:
        return 0
    local_first, local_rate = (statistics.median(t) for t in zip(*timings["local"], strict=True))
    print(
        f"\n{llm.name} (hidden {hidden}, {blocks} blocks), greedy, prompt {args.prompt} "
        f"tokens, {args.tokens} new tokens, {args.runs} runs each, medians, "
        f"{args.threads} torch thread(s) in every process"
    )
    print(f"| {'path':<34} | {'first token ms':>14} | {'tokens/s':>9} | {'vs local':>8} |")
    print(f"|{'-' * 36}|{'-' * 16}|{'-' * 11}|{'-' * 10}|")
    labels = {
        "local": "local model (baseline)",
        "swarm": f"swarm: 2 servers x {half} blocks",
        "network": "network: coordinator+gateway+SSE",
    }
    for name, label in labels.items():
        first, rate = (statistics.median(t) for t in zip(*timings[name], strict=True))
        print(f"| {label:<34} | {first * 1000:>14.1f} | {rate:>9.1f} | {rate / local_rate:>8.2f} |")
    network_first = statistics.median(t[0] for t in timings["network"])
    network_rate = statistics.median(t[1] for t in timings["network"])
    print(
        f"\nnetwork vs local: {network_rate / local_rate:.2f}x tokens/s (target >= 0.95x), "
        f"first token +{(network_first - local_first) * 1000:.0f} ms (target <= 30 ms)"
    )
    if args.model is not None:
        return 0
    print(
        f"\nPetals 2.2, same setup (STACK.md): first token {PETALS_FIRST_TOKEN_MS[0]}-"
        f"{PETALS_FIRST_TOKEN_MS[1]} ms, {PETALS_TOKENS_PER_S[0]}-{PETALS_TOKENS_PER_S[1]} "
        "tokens/s; target: at most 25 ms and at least 110 tokens/s through the swarm"
    )
    return 0


# different chats: the first CHATS are used (a fixed list, so runs compare)
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a CPU does in two sentences.",
    "Give three tips for learning to cook.",
    "What is photosynthesis?",
    "Write a short poem about autumn leaves.",
    "How do airplanes stay in the air?",
    "Name three famous painters and one work of each.",
    "What is the difference between weather and climate?",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Write a limerick about a programmer.",
    "What are prime numbers?",
    "Suggest a name for a bakery and explain it.",
    "How does a bicycle work?",
    "What should I pack for a weekend hike?",
]


async def _chats_at_once(
    llm: Path,
    url: str,
    args: argparse.Namespace,
    shares: CpuShares | None = None,
    solo: bool = True,
) -> tuple[
    list[tuple[str, int, float]],
    tuple[list[str], int, float, list[int], list[float]],
    dict[str, float] | None,
]:
    """Each chat alone (text, completion tokens, seconds), then all at once (texts, total
    completion tokens, seconds from the first request to the last answer), and with
    `shares` the CPU seconds of each process while they ran at once. `solo` False skips
    the chats alone (an empty list)."""
    import aiohttp

    from client.sdk import AsyncClient

    async with AsyncClient(url) as anonymous:
        key = (await anonymous.register("chats" if solo else "chats-then")).api_key
    prompts = [CHAT_PROMPTS[n % len(CHAT_PROMPTS)] + " " * (n // len(CHAT_PROMPTS))
               for n in range(args.chats)]  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(url, headers=headers, timeout=timeout) as http:

        async def chat(prompt: str) -> tuple[str, int, float]:
            body = {
                "model": llm.name,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": args.tokens,
                "temperature": 0,
            }
            began = time.perf_counter()
            async with http.post("/v1/chat/completions", json=body) as response:
                answer = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"chat failed: {response.status} {answer}")
            done = time.perf_counter()
            text = answer["choices"][0]["message"]["content"]
            return text, int(answer["usage"]["completion_tokens"]), done - began

        await chat(prompts[0])  # warm-up
        alone = [await chat(prompt) for prompt in prompts] if solo else []
        if shares is not None:
            spy = {"gateway/sandbox": "gateway-engine", "first/sandbox": "first-compute"}
            spy["first/main"] = "first-server"
            args.profile.mkdir(parents=True, exist_ok=True)
            tag = "" if solo else "-then"
            shares.begin({k: args.profile / f"{v}{tag}.txt" for k, v in spy.items()})
        began = time.perf_counter()
        together = await asyncio.gather(*(chat(prompt) for prompt in prompts))
        seconds = time.perf_counter() - began
        spent = shares.end() if shares is not None else None
    return (
        alone,
        (
            [t[0] for t in together],
            sum(t[1] for t in together),
            seconds,
            [t[1] for t in together],
            [t[2] for t in together],
        ),
        spent,
    )


def _print_cpu(spent: dict[str, float], seconds: float, rounds: int) -> None:
    """CPU seconds per process while the chats ran at once, per decode round (the longest
    chat's tokens) and as a share of the machine's CPU over that time."""
    cores = os.cpu_count() or 1
    total = cores * seconds
    print(
        f"\nwhere the CPU went while they ran at once ({seconds:.2f} s x {cores} cores = "
        f"{total:.1f} CPU s, {rounds} rounds):"
    )
    print(f"| {'process':<24} | {'CPU s':>6} | {'ms / round':>10} | {'share':>6} |")
    print(f"|{'-' * 26}|{'-' * 8}|{'-' * 12}|{'-' * 8}|")
    rows = sorted(spent.items(), key=lambda item: -item[1])
    rows.append(("idle or other work", total - sum(spent.values())))
    for label, cpu in rows:
        if cpu < 0.005 * total and label != "idle or other work":
            continue
        print(
            f"| {label:<24} | {cpu:>6.2f} | {cpu * 1000 / max(rounds, 1):>10.1f} "
            f"| {cpu / total:>6.1%} |"
        )


def _print_chats(
    llm: Path,
    args: argparse.Namespace,
    alone: list[tuple[str, int, float]],
    together: tuple[list[str], int, float, list[int], list[float]],
) -> None:
    texts, tokens, seconds, counts, times = together
    rates = [count / took for _, count, took in alone]
    aggregate = tokens / seconds
    identical = sum(a[0] == b for a, b in zip(alone, texts, strict=True))
    print(
        f"\n{llm.name}: {args.chats} different chats at once vs alone, greedy, up to "
        f"{args.tokens} new tokens each, /v1/chat/completions, {args.threads} torch "
        "thread(s) in every process"
    )
    print(f"| {'measure':<40} | {'tokens':>6} | {'seconds':>8} | {'tokens/s':>8} |")
    print(f"|{'-' * 42}|{'-' * 8}|{'-' * 10}|{'-' * 10}|")
    print(f"| {'chat 0 alone (baseline)':<40} | {alone[0][1]:>6} | {alone[0][2]:>8.2f} | "
          f"{rates[0]:>8.2f} |")  # fmt: skip
    median = statistics.median(rates)
    print(f"| {'median chat alone':<40} | {'':>6} | {'':>8} | {median:>8.2f} |")
    label = f"{args.chats} chats at once, aggregate"
    print(f"| {label:<40} | {tokens:>6} | {seconds:>8.2f} | {aggregate:>8.2f} |")
    per_token = sorted(took / max(count, 1) for count, took in zip(counts, times, strict=True))
    p50, p95 = _percentile(per_token, 50), _percentile(per_token, 95)
    print(
        f"\ntime per token at once (a chat's seconds / its completion tokens): p50 "
        f"{p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms"
    )
    print(
        f"\naggregate vs chat 0 alone: {aggregate / rates[0]:.2f}x, vs the median chat "
        f"alone: {aggregate / median:.2f}x (target >= 4x); answers identical to their solo "
        f"answer: {identical}/{args.chats}"
    )


async def _measure(
    llm: Path, maddr: str, url: str, args: argparse.Namespace
) -> dict[str, list[tuple[float, float]]]:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from client.sdk import AsyncClient
    from protocol.text import TextParams
    from worker.llm.gateway.lm_head import LMHead
    from worker.llm.swarm.routing import SwarmClient, SwarmClientConfig
    from worker.llm.swarm.session import InferenceSession

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(llm, use_safetensors=True).eval()
    head = LMHead.load(llm)
    prompt = torch.arange(3, 3 + args.prompt)[None]

    async def local() -> tuple[float, float]:
        began = time.perf_counter()
        cache = DynamicCache()
        with torch.inference_mode():
            token = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
            first = time.perf_counter() - began
            began = time.perf_counter()
            for _ in range(args.tokens - 1):
                token = model(token, cache=cache).logits[:, -1:].argmax(-1)
        return first, (args.tokens - 1) / (time.perf_counter() - began)

    client = await SwarmClient.create(
        SwarmClientConfig(model_name=llm.name, initial_peers=(maddr,))
    )

    async def swarm() -> tuple[float, float]:
        began = time.perf_counter()
        async with InferenceSession(client, args.prompt + args.tokens) as session:
            hidden = await session.step(head.embed(prompt))
            token = head.logits(hidden[:, -1:]).argmax(-1)
            first = time.perf_counter() - began
            began = time.perf_counter()
            for _ in range(args.tokens - 1):
                hidden = await session.step(head.embed(token))
                token = head.logits(hidden).argmax(-1)
            return first, (args.tokens - 1) / (time.perf_counter() - began)

    async with AsyncClient(url) as anonymous:
        key = (await anonymous.register("bench")).api_key
    grid = AsyncClient(url, key)
    # a prompt of about args.prompt tokens (byte-level BPE: a few characters a token)
    words = "def read(path): return open(path).read() "
    params = TextParams(
        # the gateway offers the model by its folder's name (a built-in: llm or smollm2)
        model=llm.name,
        prompt=(words * args.prompt)[: args.prompt * 3],
        max_tokens=args.tokens,
        temperature=0.0,
    )

    async def network() -> tuple[float, float]:
        began = time.perf_counter()
        first: list[float] = []

        def on_text(_: str) -> None:
            if not first:
                first.append(time.perf_counter())

        status = await grid.complete(params, on_text)
        done = time.perf_counter()
        return first[0] - began, (status.completion_tokens - 1) / (done - first[0])

    runs: dict[str, Run] = {"local": local, "swarm": swarm, "network": network}
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    try:
        for run in (*runs.values(), *runs.values()):  # warm-up
            await run()
        for _ in range(args.runs):  # interleaved, so drift hits both alike
            for name, run in runs.items():
                timings[name].append(await run())
    finally:
        await client.aclose()
        await grid.aclose()
    return timings


def _percentile(ordered: list[float], percent: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(ordered) * percent // 100))
    return ordered[int(rank) - 1]


# the first turn's message: notes long enough for --history tokens, then a question
NOTES = (
    "Meeting notes, day {n}: the team reviewed the garden plan. Tomatoes go by the south "
    "fence, beans along the trellis, and herbs near the kitchen door. Watering happens at "
    "dawn; the compost is turned every Sunday. Next, the budget: seeds cost twelve euros, "
    "tools thirty, and the new hose eighteen. "
)


def _history(tokenizer: Any, tokens: int, run: int) -> str:
    """A first message of about `tokens` tokens (different in every run)."""
    count = tokenizer
    text = f"Conversation {run}. "
    n = 0
    while len(count(text, add_special_tokens=False)["input_ids"]) < tokens - 20:
        text += NOTES.format(n=n)
        n += 1
    return text + "Summarize these notes in one sentence."


async def _second_turns(
    llm: Path, url: str, args: argparse.Namespace
) -> list[tuple[float, float, float, bool]]:
    """Per conversation: first-token seconds of turn 1, of turn 2 (same account: the kept
    session), of turn 2 by another account (a fresh session); whether both turn 2s agree."""
    import aiohttp
    from transformers import AutoTokenizer

    from client.sdk import AsyncClient

    tokenizer = AutoTokenizer.from_pretrained(str(llm))
    async with AsyncClient(url) as anonymous:
        keys = [(await anonymous.register(f"turns{i}")).api_key for i in range(2)]
    timeout = aiohttp.ClientTimeout(total=3600)
    results = []
    async with aiohttp.ClientSession(url, timeout=timeout) as http:

        async def turn(key: str, messages: list[dict[str, str]]) -> tuple[str, float]:
            body = {
                "model": llm.name,
                "messages": messages,
                "max_tokens": 24,
                "temperature": 0,
                "stream": True,
            }
            began = time.perf_counter()
            first = 0.0
            text = ""
            headers = {"Authorization": f"Bearer {key}"}
            async with http.post("/v1/chat/completions", json=body, headers=headers) as response:
                if response.status != 200:
                    raise RuntimeError(f"chat failed: {response.status} {await response.text()}")
                async for raw in response.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for choice in json.loads(line[6:]).get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece and not first:
                            first = time.perf_counter() - began
                        text += piece
            return text, first

        await turn(keys[0], [{"role": "user", "content": "Hello!"}])  # warm-up
        for run in range(args.turns):
            messages = [{"role": "user", "content": _history(tokenizer, args.history, run)}]
            answer, first_turn = await turn(keys[0], messages)
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "Which plant goes by the south fence?"},
            ]
            kept_text, kept = await turn(keys[0], messages)
            fresh_text, fresh = await turn(keys[1], messages)
            results.append((first_turn, kept, fresh, kept_text == fresh_text))
    return results


def _print_turns(
    llm: Path, args: argparse.Namespace, turns: list[tuple[float, float, float, bool]]
) -> None:
    first, kept, fresh = (statistics.median(t[i] for t in turns) for i in range(3))
    print(
        f"\n{llm.name}: second turn of a chat with a {args.history}-token first message, "
        f"first-token latency (streamed /v1/chat/completions, greedy), median of "
        f"{len(turns)} conversations, {args.threads} torch thread(s) in every process"
    )
    print(f"| {'turn':<46} | {'first token ms':>14} | {'vs turn 1':>9} |")
    print(f"|{'-' * 48}|{'-' * 16}|{'-' * 11}|")
    for label, value in (
        ("turn 1 (baseline: the whole history prefilled)", first),
        ("turn 2, same account: kept session", kept),
        ("turn 2, another account: fresh session", fresh),
    ):
        print(f"| {label:<46} | {value * 1000:>14.0f} | {value / first:>9.2f} |")
    same = sum(t[3] for t in turns)
    print(
        f"\nturn 2 kept vs turn 1: {kept / first:.2f}x (target <= 0.5x); kept and fresh "
        f"turn 2 texts identical: {same}/{len(turns)}"
    )


if __name__ == "__main__":
    sys.exit(main())
