"""Speculative decoding by prompt lookup (worker.llm.gateway.speculative): drafting, the
acceptance rule, and generate() with drafts against plain generate() on the tiny LM (its
layers in this process, with rollbacks as a session does them)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tests.worker.llm.local_blocks import LocalBlocks
from worker.llm.gateway.generation import (
    GenerationResult,
    SamplingParams,
    generate,
    speculation_off,
)
from worker.llm.gateway.lm_head import LMHead
from worker.llm.gateway.speculative import (
    DraftLength,
    DraftSettings,
    PromptLookup,
    Speculation,
    verify,
)

# the tiny LM's greedy text repeats itself: plenty to copy from
PROMPT = "Copy this line: the cat sat on the mat. Copy this line: the cat sat on the mat."


def test_prompt_lookup_drafts_what_followed_the_latest_match() -> None:
    lookup = PromptLookup([1, 2, 3, 4, 9, 2, 3, 5, 6], ngram_min=2, ngram_max=3)
    assert lookup.draft(4) == []  # (5, 6) and (3, 5, 6) never occurred before
    lookup.extend([2, 3])
    assert lookup.draft(4) == [5, 6, 2, 3]  # the latest (2, 3) was followed by 5
    lookup.extend([4])
    assert lookup.draft(2) == [9, 2]  # (2, 3, 4), the longest match, only at the start
    assert lookup.draft(0) == []


def test_draft_length_grows_on_hits_shrinks_on_misses_and_pauses() -> None:
    length = DraftLength(DraftSettings(max_draft=6, start=4))
    assert length.next() == 4
    length.update(4, 4)
    length.update(5, 5)
    length.update(6, 6)
    assert length.next() == 6  # at most max_draft
    length.update(6, 2)
    assert length.next() == 3
    length.update(3, 0)
    assert length.next() == 1
    length.update(1, 0)  # a miss at k = 1: one step without drafts, then two, ...
    assert [length.next() for _ in range(2)] == [0, 1]
    length.update(1, 0)
    assert [length.next() for _ in range(3)] == [0, 0, 1]


def test_sampled_acceptance_keeps_the_target_distribution() -> None:
    """A one-hot draft x kept with probability p(x), else a draw from p without x: the
    token that comes out is distributed as p (also for x impossible under p)."""
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    generator = torch.Generator().manual_seed(seed)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    scores = p.log()[None]
    draws = 4000
    for draft in (1, 4):
        counts = torch.zeros(5)
        for _ in range(draws):
            token = verify(lambda row, kept: scores, [draft], True, generator)[0]
            counts[token] += 1
        assert (counts / draws - p).abs().max() < 0.03, (draft, counts / draws)


def test_greedy_verification_keeps_drafts_up_to_the_first_miss() -> None:
    rows = torch.eye(5)[[2, 3, 1, 4]].log().unsqueeze(1)  # argmax 2, 3, 1, 4
    generator = torch.Generator()
    assert verify(lambda row, kept: rows[row], [2, 3, 0], False, generator) == [2, 3, 1]
    assert verify(lambda row, kept: rows[row], [2, 3, 1], False, generator) == [2, 3, 1, 4]
    assert verify(lambda row, kept: rows[row], [0], False, generator) == [2]


@pytest.fixture(scope="module")
def llm(tiny_models: Path) -> tuple[LMHead, LocalBlocks, PreTrainedTokenizerBase]:
    model = tiny_models / "llm"
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    return LMHead.load(model), LocalBlocks.load(model), tokenizer


async def _generate(
    llm: tuple[LMHead, LocalBlocks, PreTrainedTokenizerBase],
    params: SamplingParams,
    speculative: bool,
) -> tuple[GenerationResult, list[tuple[int, int | None, int]]]:
    """The result and each step's (tokens, start_position, position before)."""
    head, blocks, tokenizer = llm
    blocks.reset()
    steps: list[tuple[int, int | None, int]] = []

    async def step(hidden: torch.Tensor, start_position: int | None = None) -> torch.Tensor:
        steps.append((hidden.shape[1], start_position, blocks.position))
        return await blocks(hidden, start_position)

    ids = tokenizer(PROMPT)["input_ids"]
    speculation = Speculation(step) if speculative else None
    return await generate(head, step, ids, params, tokenizer, None, speculation), steps


async def test_greedy_speculative_decoding_gives_plain_decodings_tokens(
    llm: tuple[LMHead, LocalBlocks, PreTrainedTokenizerBase],
) -> None:
    params = SamplingParams(max_new_tokens=60, temperature=0.0)
    plain, plain_steps = await _generate(llm, params, speculative=False)
    fast, fast_steps = await _generate(llm, params, speculative=True)
    assert fast.token_ids == plain.token_ids and fast.text == plain.text
    assert len(fast_steps) < len(plain_steps) * 0.8, "drafts were hardly ever kept"
    rolled_back = [s for s in fast_steps if s[1] is not None and s[1] < s[2]]
    assert rolled_back, "no draft was ever rejected: the rollback went untested"


async def test_sampled_speculative_decoding_is_reproducible_with_a_seed(
    llm: tuple[LMHead, LocalBlocks, PreTrainedTokenizerBase],
) -> None:
    params = SamplingParams(max_new_tokens=24, temperature=0.7, top_k=20, seed=7)
    first, steps = await _generate(llm, params, speculative=True)
    again, _ = await _generate(llm, params, speculative=True)
    assert first.token_ids == again.token_ids
    assert any(tokens > 1 for tokens, _, _ in steps), "nothing was drafted"
    other, _ = await _generate(
        llm, SamplingParams(max_new_tokens=24, temperature=0.7, top_k=20, seed=8), True
    )
    assert other.token_ids != first.token_ids


async def test_logprobs_and_grammars_turn_speculation_off(
    llm: tuple[LMHead, LocalBlocks, PreTrainedTokenizerBase],
) -> None:
    assert speculation_off(SamplingParams(logprobs=2)) == "logprobs"
    assert speculation_off(SamplingParams(grammar="start: /a+/")) == "response_format"
    assert speculation_off(SamplingParams(temperature=0.5, top_p=0.9, min_p=0.1)) is None
    result, steps = await _generate(
        llm, SamplingParams(max_new_tokens=30, temperature=0.0, logprobs=1), speculative=True
    )
    assert all(tokens == 1 for tokens, _, _ in steps[1:])
    assert result.logprobs is not None and len(result.logprobs) == len(result.token_ids)
