"""KoboldAI's context cut and output formatting, and a long prompt answered by the core."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from transformers import AutoTokenizer

from protocol.text import TextParams
from tests.worker.llm.local_blocks import LocalBlocks
from worker.llm.gateway.core import CoreSettings, GenerationCore, PromptTooLong, sampling_params
from worker.llm.gateway.kobold import SPECIAL_CHARS, fit_context, format_output
from worker.llm.gateway.lm_head import LMHead

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "it",
    "rained",
    "and",
    "we",
    "talked",
    "about",
    "ships",
    "kings",
    "and",
    "cabbages",
]


def long_text(tokenizer: Any, tokens: int) -> str:
    """Words until the text is at least `tokens` tokens long."""
    rng = random.Random(1)
    words: list[str] = []
    while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(200))
    return " ".join(words)


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    path = os.environ.get("IDLEGRID_TEST_SMOLLM2")
    if not path or not Path(path).is_dir():
        pytest.skip("IDLEGRID_TEST_SMOLLM2 is not set to SmolLM2's folder")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def test_a_4000_token_prompt_keeps_its_last_tokens(smollm2_tokenizer: Any) -> None:
    tokenizer = smollm2_tokenizer
    prompt = long_text(tokenizer, 4000) + " THE END"
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) >= 4000
    budget = 512 - 80  # max_context_length 512, max_length 80
    kept = fit_context(ids, budget, tokenizer.bos_token_id)
    assert len(kept) == budget and kept == ids[-budget:]  # SmolLM2 adds no BOS to prompts
    text = tokenizer.decode(kept)
    assert text.endswith(" THE END") and prompt.endswith(text)
    assert fit_context(ids[:100], budget, tokenizer.bos_token_id) == ids[:100]


def test_fit_context_keeps_a_leading_bos() -> None:
    assert fit_context([1, 5, 6, 7, 8], 3, bos_token_id=1) == [1, 7, 8]
    assert fit_context([2, 5, 6, 7, 8], 3, bos_token_id=1) == [6, 7, 8]
    assert fit_context([1, 5, 6], 5, bos_token_id=1) == [1, 5, 6]
    with pytest.raises(ValueError, match="budget"):
        fit_context([1, 2], 0, None)


@pytest.mark.parametrize(
    ("text", "flags", "expected"),
    [
        ("He left. She stayed and", {"trim_incomplete": True}, "He left."),
        ('"Go!" he said. Then', {"trim_incomplete": True}, '"Go!" he said.'),
        ('She asked "why?" and', {"trim_incomplete": True}, 'She asked "why?"'),
        ("no sentence end here", {"trim_incomplete": True}, "no sentence end here"),
        ("a\n\n\nb\nc\n\nd", {"remove_blank_lines": True}, "a\nb\nc\nd"),
        ("x #/@%}{+=~|\\^<> y", {"remove_special": True}, "x  y"),
        ("word", {"add_space": True}, " word"),
        (" word", {"add_space": True}, " word"),
        ("same", {}, "same"),
    ],
)
def test_output_formatting(text: str, flags: dict[str, bool], expected: str) -> None:
    assert format_output(text, "The prompt", **flags) == expected


def test_add_space_only_after_a_prompt_without_trailing_whitespace() -> None:
    assert format_output("word", "The prompt ", add_space=True) == "word"
    assert format_output("word", "The prompt\n", add_space=True) == "word"
    assert set(SPECIAL_CHARS) == set("#/@%}{+=~|\\^<>")


def test_singleline_and_ban_eos_reach_the_sampler() -> None:
    params = TextParams(prompt="x", stop=["END"], singleline=True, use_default_badwordsids=True)
    sampling = sampling_params(params)
    assert sampling.stop == ("END", "\n") and sampling.ban_eos
    plain = sampling_params(TextParams(prompt="x"))
    assert plain.stop == () and not plain.ban_eos and plain.sampler_order is None


class LocalSwarm:
    """The swarm client's session, run by all decoder layers in this process."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir

    @contextlib.asynccontextmanager
    async def session(
        self, max_length: int, avoid: frozenset[str] = frozenset()
    ) -> AsyncIterator[SimpleNamespace]:
        blocks = LocalBlocks.load(self.model_dir)
        yield SimpleNamespace(step=blocks, usage=[], served=[])


@pytest.fixture(scope="module")
def tiny_core(tiny_models: Path) -> GenerationCore:
    llm = tiny_models / "llm"
    settings = CoreSettings(model=llm, model_name="llm", initial_peers=(), check_rate=0.0)
    tokenizer = AutoTokenizer.from_pretrained(llm, local_files_only=True)
    return GenerationCore(
        settings,
        LMHead.load(llm),
        tokenizer,
        swarm=None,  # type: ignore[arg-type]  # no swarm: the blocks run here
        open_session=LocalSwarm(llm).session,  # type: ignore[arg-type]
    )


async def test_a_4000_token_prompt_with_max_context_length_512_is_answered(
    tiny_core: GenerationCore,
) -> None:
    """The tiny model's context is 512 tokens: without max_context_length the prompt is
    refused; with it the prompt keeps its last 512 - 16 tokens and gets its answer."""
    prompt = long_text(tiny_core.tokenizer, 4000)
    assert len(tiny_core.prompt_ids(TextParams(prompt=prompt))) >= 4000
    deltas: list[str] = []

    async def on_text(delta: str) -> None:
        deltas.append(delta)

    with pytest.raises(PromptTooLong):
        await tiny_core.run(TextParams(prompt=prompt, max_tokens=16), on_text)
    params = TextParams(
        prompt=prompt, max_tokens=16, max_context_length=512, temperature=0.0, seed=1
    )
    generated = await tiny_core.run(params, on_text)
    assert generated.result.prompt_tokens == 512 - 16
    assert 1 <= generated.result.completion_tokens <= 16
    assert generated.result.text == "".join(deltas)
    # a max_context_length above the model's context is cut to it
    roomy = params.model_copy(update={"max_context_length": 100_000})
    assert (await tiny_core.run(roomy, on_text)).result.prompt_tokens == 512 - 16


async def test_output_flags_apply_to_the_final_text(tiny_core: GenerationCore) -> None:
    # (this seed's text starts without a space, so frmtadsnsp adds one)
    base = TextParams(prompt="Hello there", max_tokens=48, temperature=1.5, seed=2)

    async def ignore(delta: str) -> None:
        return None

    plain = (await tiny_core.run(base, ignore)).result.text
    flags = {"frmtrmspch": True, "frmtrmblln": True, "frmtadsnsp": True}
    formatted = (await tiny_core.run(base.model_copy(update=flags), ignore)).result.text
    assert formatted == format_output(
        plain, "Hello there", remove_blank_lines=True, remove_special=True, add_space=True
    )
    assert formatted != plain


def test_unused_kobold_fields_leave_the_params_as_they_were() -> None:
    """A job using none of KoboldAI's fields is stored, hashed and leased as before they
    existed (gateways of the previous version parse it); used fields are sent."""
    plain = TextParams(prompt="x", temperature=0.0)
    before = {"model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k"}
    before |= {"repetition_penalty", "stop", "seed"}
    assert set(plain.model_dump(mode="json")) == before
    used = TextParams(prompt="x", min_p=0.1, singleline=True)
    assert set(used.model_dump(mode="json")) == before | {"min_p", "singleline"}
    assert TextParams.model_validate_json(used.model_dump_json()) == used
