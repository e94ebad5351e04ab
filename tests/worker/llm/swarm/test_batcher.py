"""StepBatcher over a real sandboxed compute (tiny model, blocks 1:3): concurrent sessions'
steps share compute calls and give what each session gets alone; prompts are cut into
chunks that let decode steps through; a step the compute cannot read fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from worker.llm.swarm.batched import batch_mask, forward_batch
from worker.llm.swarm.batcher import BadStep, StepBatcher
from worker.llm.swarm.blocks import BlockSpan, new_cache
from worker.llm.swarm.compute import ComputeSettings, SpanCompute

pytestmark = pytest.mark.slow  # starts a compute process (once for the module)
in_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def compute(tiny_models: Path) -> AsyncIterator[SpanCompute]:
    settings = ComputeSettings(tiny_models / "llm", 1, 3, None, threads=1, load_timeout=120)
    started = await SpanCompute.start(settings)
    try:
        yield started
    finally:
        await started.aclose()


def _hidden(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(seed))


def _out(answer: tuple[bytes, list[int]]) -> torch.Tensor:
    buffer, shape = answer
    return torch.frombuffer(bytearray(buffer), dtype=torch.float32).reshape(shape)


async def _session(
    batcher: StepBatcher, name: str, inputs: list[torch.Tensor]
) -> list[torch.Tensor]:
    outputs, past = [], 0
    for hidden in inputs:
        shape = list(hidden.shape)
        answer = await batcher.step(name, hidden.numpy().tobytes(), "float32", shape, past, 1, 3)
        outputs.append(_out(answer))
        past += shape[1]
    return outputs


@in_module_loop
async def test_concurrent_sessions_share_calls_and_match_their_solo_runs(
    compute: SpanCompute, tiny_models: Path
) -> None:
    span = BlockSpan.load(tiny_models / "llm", 1, 3)
    # prompts of different lengths (one longer than a chunk), then 6 decode steps each
    inputs = [
        [_hidden(prompt, 10 * s), *(_hidden(1, 10 * s + k + 1) for k in range(6))]
        for s, prompt in enumerate((3, 9, 1, 5))
    ]
    want = []
    for steps in inputs:
        cache, past, outs = new_cache(), 0, []
        for hidden in steps:
            outs.append(span.forward(hidden, cache, past=past))
            past += hidden.shape[1]
        want.append(outs)
    batcher = await StepBatcher.create(compute, chunk_tokens=4)
    try:
        got = await asyncio.gather(
            *(_session(batcher, f"s{n}", steps) for n, steps in enumerate(inputs))
        )
    finally:
        await batcher.aclose()
    for mine, theirs in zip(got, want, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert max(batcher.batch_sizes) >= 3, batcher.batch_sizes
    # the prompts in 1 + 3 + 1 + 2 chunks of at most 4 tokens, and 24 decode steps, in fewer
    # calls than steps
    assert sum(batcher.batch_sizes) == 7 + 24
    assert len(batcher.batch_sizes) < 7 + 24


@in_module_loop
async def test_a_long_prompt_lets_other_sessions_decode_between_its_chunks(
    compute: SpanCompute,
) -> None:
    batcher = await StepBatcher.create(compute, chunk_tokens=2)
    try:
        await _session(batcher, "chatting", [_hidden(2, 0)])
        order: list[str] = []

        async def prompt() -> None:
            await _session(batcher, "reading", [_hidden(40, 1)])
            order.append("prompt")

        async def decode() -> None:
            await asyncio.sleep(0)  # the prompt's first chunk is queued first
            past = 2
            for k in range(3):
                hidden = _hidden(1, k + 5)
                await batcher.step(
                    "chatting", hidden.numpy().tobytes(), "float32", [1, 1, 64], past, 1, 3
                )
                past += 1
                order.append("token")

        await asyncio.gather(prompt(), decode())
    finally:
        await batcher.aclose()
    # 20 chunks of the prompt; the 3 tokens did not wait for all of them
    assert order == ["token", "token", "token", "prompt"]


@in_module_loop
async def test_a_step_the_compute_cannot_read_fails_alone(compute: SpanCompute) -> None:
    batcher = await StepBatcher.create(compute, chunk_tokens=8)
    try:
        good = _hidden(1, 0)

        async def bad() -> None:
            await batcher.step("bad", b"\0" * 12, "float32", [1, 1, 64], 0, 1, 3)

        results = await asyncio.gather(
            bad(),
            batcher.step("good", good.numpy().tobytes(), "float32", [1, 1, 64], 0, 1, 3),
            return_exceptions=True,
        )
    finally:
        await batcher.aclose()
    assert isinstance(results[0], BadStep)
    assert "do not hold" in str(results[0])
    assert isinstance(results[1], tuple)
    assert _out(results[1]).shape == (1, 1, 64)


def test_the_batch_mask_hides_padding_and_the_future(tiny_models: Path) -> None:
    mask = batch_mask([1, 3], 2, None)
    assert mask.shape == (2, 1, 2, 5)
    assert mask[0, 0].tolist() == [
        [False, False, True, True, False],
        [False, False, True, True, True],
    ]
    assert mask[1, 0].tolist() == [[True, True, True, True, False], [True] * 5]
    windowed = batch_mask([3], 1, 2)
    assert windowed[0, 0].tolist() == [[False, False, True, True]]
    # and a batch of prompts of equal length equals the sessions run one by one
    span = BlockSpan.load(tiny_models / "llm", 0, 4)
    hiddens = [_hidden(3, 7), _hidden(3, 8)]
    caches = [new_cache(), new_cache()]
    batched = forward_batch(span, hiddens, caches, [0, 0], 0, 4)
    for hidden, output in zip(hiddens, batched, strict=True):
        torch.testing.assert_close(output, span.forward(hidden, new_cache(), past=0))
