"""LMHead, LocalBlocks and generate() against transformers' own model and generate()."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tests.worker.llm.local_blocks import LocalBlocks
from worker.errors import InvalidGenerationInput, UnsupportedArchitecture
from worker.llm.gateway.generation import (
    GenerationResult,
    SamplingParams,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
)
from worker.llm.gateway.lm_head import LMHead

PROMPTS = ["The quick brown fox", "Hello", "Numbers: 1 2 3 4 5 6 7 8 9 10 and more words here"]


@pytest.fixture(scope="module")
def llm_dir(tiny_models: Path) -> Path:
    return tiny_models / "llm"


@pytest.fixture(scope="module")
def tokenizer(llm_dir: Path) -> PreTrainedTokenizerBase:
    loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    return loaded


@pytest.fixture(scope="module")
def head(llm_dir: Path) -> LMHead:
    return LMHead.load(llm_dir)


@pytest.fixture(scope="module")
def model(llm_dir: Path) -> LlamaForCausalLM:
    loaded: LlamaForCausalLM = LlamaForCausalLM.from_pretrained(llm_dir, local_files_only=True)
    loaded.eval()
    return loaded


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    ids: torch.Tensor = tokenizer(text, return_tensors="pt").input_ids
    return ids


def hf_new_tokens(
    model: LlamaForCausalLM, ids: torch.Tensor, max_new_tokens: int, **kwargs: float
) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, **kwargs)
    tokens: list[int] = out[0, ids.shape[1] :].tolist()
    return tokens


class RecordingHead:
    """The real head, remembering the logits `generate` sampled from."""

    def __init__(self, head: LMHead) -> None:
        self.head = head
        self.eos_token_ids = head.eos_token_ids
        self.seen: list[torch.Tensor] = []

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head.embed(ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head.logits(hidden)
        self.seen.append(logits[0, -1])
        return logits


class ScriptedHead:
    """A fake head whose logits make greedy decoding follow a fixed script of tokens."""

    def __init__(self, script: list[int], vocab_size: int, eos_token_id: int) -> None:
        self.script = script
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset({eos_token_id})
        self.calls = 0

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, ids.shape[1], 8)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(1, hidden.shape[1], self.vocab_size)
        logits[0, -1, self.script[self.calls]] = 10.0
        self.calls += 1
        return logits


async def passthrough(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def char_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """One token per byte-level piece of each character, so tokens split words and bytes."""
    ids: list[int] = []
    for char in text:
        ids.extend(tokenizer.encode(char, add_special_tokens=False))
    return ids


async def run_scripted(
    tokenizer: PreTrainedTokenizerBase,
    script: list[int],
    *,
    stop: Sequence[str] = (),
    max_new_tokens: int = SamplingParams.max_new_tokens,
) -> tuple[GenerationResult, list[str], ScriptedHead]:
    fake = ScriptedHead(script, len(tokenizer), tokenizer.eos_token_id)
    deltas: list[str] = []

    async def on_text(delta: str) -> None:
        deltas.append(delta)

    result = await generate(
        fake,
        passthrough,
        [tokenizer.bos_token_id],
        SamplingParams(max_new_tokens, temperature=0, stop=stop),
        tokenizer,
        on_text,
    )
    return result, deltas, fake


# -- LMHead ---------------------------------------------------------------------------------


def test_head_reads_only_embeddings_norm_and_head(head: LMHead, model: LlamaForCausalLM) -> None:
    assert head.loaded_keys == ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    assert not any(key.startswith("model.layers.") for key in head.loaded_keys)
    assert head.param_count == model.num_parameters()
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    assert head.loaded_param_count == head.param_count - layer_params
    assert head.num_blocks == 4 and head.hidden_size == 64
    assert type(head.norm).__name__ == "LlamaRMSNorm"
    assert head.norm.variance_epsilon == model.config.rms_norm_eps

    ids = torch.tensor([[1, 5, 300, 999]])
    hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(head.embed(ids), model.model.embed_tokens(ids))
        expected = model.lm_head(model.model.norm(hidden))
    logits = head.logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (1, 4, head.vocab_size)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def _truncate_to_header(path: Path) -> None:
    """Keep only the header: any attempt to read a tensor from this file now fails."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
    with path.open("r+b") as file:
        file.truncate(8 + length)


def test_sharded_checkpoint_layers_are_never_read(
    llm_dir: Path, tmp_path: Path, head: LMHead
) -> None:
    with safe_open(str(llm_dir / "model.safetensors"), framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    layers = {k: v for k, v in tensors.items() if k.startswith("model.layers.")}
    rest = {k: v for k, v in tensors.items() if k not in layers}
    sharded = tmp_path / "sharded"
    shutil.copytree(llm_dir, sharded)
    (sharded / "model.safetensors").unlink()
    names = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    save_file(rest, sharded / names["a"])
    save_file(layers, sharded / names["b"])
    weight_map = {k: names["a"] for k in rest} | {k: names["b"] for k in layers}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _truncate_to_header(sharded / names["b"])

    loaded = LMHead.load(sharded)
    assert loaded.param_count == head.param_count
    assert torch.equal(loaded.head_weight, head.head_weight)
    # the layer shard really is unreadable, so LMHead cannot have read from it
    with pytest.raises(SafetensorError, match="incomplete metadata"):
        LocalBlocks.load(sharded)


def test_tied_embeddings_use_the_embedding_matrix(llm_dir: Path, tmp_path: Path) -> None:
    tied = tmp_path / "tied"
    shutil.copytree(llm_dir, tied)
    with safe_open(str(llm_dir / "model.safetensors"), framework="pt") as file:
        tensors = {k: file.get_tensor(k) for k in file.keys() if k != "lm_head.weight"}  # noqa: SIM118
    save_file(tensors, tied / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))

    loaded = LMHead.load(tied, dtype=torch.float64)
    assert loaded.head_weight is loaded.embed_weight
    assert loaded.embed_weight.dtype == torch.float64
    assert "lm_head.weight" not in loaded.loaded_keys
    hidden = torch.randn(1, 2, 64, dtype=torch.float64)
    expected = loaded.norm(hidden) @ tensors["model.embed_tokens.weight"].double().T
    torch.testing.assert_close(loaded.logits(hidden), expected.float())


def test_unsupported_architecture_names_the_supported_ones(llm_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "gpt2"
    shutil.copytree(llm_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(UnsupportedArchitecture, match="'gpt2'.*llama, mistral, qwen2, qwen3"):
        LMHead.load(other)


# -- LocalBlocks ----------------------------------------------------------------------------


def test_chunked_steps_after_a_cached_prefix_match_the_full_model(
    llm_dir: Path, head: LMHead, model: LlamaForCausalLM
) -> None:
    ids = torch.randint(3, head.vocab_size, (1, 13), generator=torch.Generator().manual_seed(1))
    blocks = LocalBlocks.load(llm_dir)
    chunks = [ids[:, :5], ids[:, 5:9], ids[:, 9:10], ids[:, 10:]]
    logits = torch.cat([head.logits(blocks.forward(head.embed(chunk))) for chunk in chunks], 1)
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
    assert blocks.position == 13
    blocks.reset()
    again = head.logits(blocks.forward(head.embed(ids)))
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-4)


def _tiny_family(kind: str) -> PreTrainedModel:
    # the same sizes for every family's config, whose parameters have many types
    common: dict[str, Any] = {
        "vocab_size": 120,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": kind == "qwen2",
    }
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=4))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common))
    return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8))


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_other_families_match_their_full_model(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    full = _tiny_family(kind).eval()
    full.save_pretrained(tmp_path)
    head = LMHead.load(tmp_path)
    blocks = LocalBlocks.load(tmp_path)
    ids = torch.randint(0, 120, (1, 11), generator=torch.Generator().manual_seed(2))
    chunks = [ids[:, :6], ids[:, 6:7], ids[:, 7:]]
    logits = torch.cat([head.logits(blocks.forward(head.embed(chunk))) for chunk in chunks], 1)
    with torch.no_grad():
        expected = full(ids).logits
    assert head.param_count == full.num_parameters()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)


# -- generate() with the real model ----------------------------------------------------------


@pytest.mark.parametrize("text", PROMPTS)
async def test_greedy_equals_transformers_generate(
    text: str,
    llm_dir: Path,
    head: LMHead,
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    ids = prompt_ids(tokenizer, text)
    recorder = RecordingHead(head)
    params = SamplingParams(max_new_tokens=24, temperature=0)
    result = await generate(recorder, LocalBlocks.load(llm_dir), ids, params, tokenizer)

    assert result.token_ids == hf_new_tokens(model, ids, 24, do_sample=False)
    assert result.prompt_tokens == ids.shape[1]
    assert result.completion_tokens == len(result.token_ids)
    assert result.finish_reason == ("stop" if result.token_ids[-1] == 2 else "length")
    assert 0 < result.first_token_seconds <= result.seconds
    expected_text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert result.text == expected_text

    full_ids = torch.cat([ids, torch.tensor([result.token_ids[:-1]])], dim=1)
    with torch.no_grad():
        full_logits = model(full_ids).logits[0, ids.shape[1] - 1 :]
    assert len(recorder.seen) == len(result.token_ids)
    torch.testing.assert_close(torch.stack(recorder.seen), full_logits, rtol=0, atol=1e-4)


SAMPLERS = [
    SamplingParams(max_new_tokens=20, temperature=0.7, seed=11),
    SamplingParams(max_new_tokens=20, temperature=1.0, top_k=5, seed=12),
    SamplingParams(max_new_tokens=20, temperature=1.3, top_p=0.8, seed=13),
    SamplingParams(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=14),
    SamplingParams(max_new_tokens=20, temperature=1.0, repetition_penalty=1.8, seed=15),
]


@pytest.mark.parametrize("params", SAMPLERS, ids=lambda p: f"seed{p.seed}")
async def test_seeded_sampling_equals_transformers_sampling(
    params: SamplingParams,
    llm_dir: Path,
    head: LMHead,
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    ids = prompt_ids(tokenizer, PROMPTS[0])
    result = await generate(head, LocalBlocks.load(llm_dir), ids, params, tokenizer)
    assert params.seed is not None
    torch.manual_seed(params.seed)
    expected = hf_new_tokens(
        model,
        ids,
        params.max_new_tokens,
        do_sample=True,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        repetition_penalty=params.repetition_penalty,
    )
    assert result.token_ids == expected


async def test_seeds_reproduce_and_differ(
    llm_dir: Path, head: LMHead, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = prompt_ids(tokenizer, PROMPTS[1])

    async def sample(seed: int | None) -> list[int]:
        params = SamplingParams(max_new_tokens=16, temperature=1.5, seed=seed)
        return (await generate(head, LocalBlocks.load(llm_dir), ids, params, tokenizer)).token_ids

    first = await sample(1)
    assert await sample(1) == first
    assert await sample(2) != first
    unseeded = [await sample(None) for _ in range(2)]
    assert unseeded[0] != unseeded[1]


async def test_top_k_one_is_greedy(
    llm_dir: Path, head: LMHead, tokenizer: PreTrainedTokenizerBase
) -> None:
    ids = prompt_ids(tokenizer, PROMPTS[2])
    greedy = await generate(
        head, LocalBlocks.load(llm_dir), ids, SamplingParams(16, temperature=0), tokenizer
    )
    top1 = await generate(
        head, LocalBlocks.load(llm_dir), ids, SamplingParams(16, temperature=5, top_k=1), tokenizer
    )
    assert top1.token_ids == greedy.token_ids


# -- the sampling chain against transformers' processors -------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 0.6])
def test_repetition_penalty_equals_transformers(penalty: float) -> None:
    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(1, 50, generator=generator) * 4
    context = torch.tensor([[3, 7, 7, 20, 49, 0, 3]])
    ours = apply_repetition_penalty(scores, context, penalty)
    assert torch.equal(ours, RepetitionPenaltyLogitsProcessor(penalty)(context, scores))
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[context[0]] = False
    assert torch.equal(ours[0, untouched], scores[0, untouched])
    assert not torch.equal(ours[0, ~untouched], scores[0, ~untouched])


@pytest.mark.parametrize("top_k", [1, 3, 50, 80])
def test_top_k_equals_transformers(top_k: int) -> None:
    scores = torch.randn(1, 50, generator=torch.Generator().manual_seed(top_k))
    context = torch.tensor([[1]])
    assert torch.equal(apply_top_k(scores, top_k), TopKLogitsWarper(top_k)(context, scores))
    assert int(torch.isfinite(apply_top_k(scores, top_k)).sum()) == min(top_k, 50)


@pytest.mark.parametrize("top_p", [0.01, 0.5, 0.9, 0.999])
def test_top_p_equals_transformers(top_p: float) -> None:
    scores = torch.randn(1, 50, generator=torch.Generator().manual_seed(4)) * 2
    context = torch.tensor([[1]])
    ours = apply_top_p(scores, top_p)
    assert torch.equal(ours, TopPLogitsWarper(top_p)(context, scores))
    kept = torch.isfinite(ours)
    assert 1 <= int(kept.sum()) < 50
    assert float(torch.softmax(scores, -1)[kept].sum()) >= min(top_p, 1.0) - 1e-6


# -- stopping and streaming (scripted fake head) ---------------------------------------------


async def test_stop_string_cuts_text_and_is_never_streamed(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    script = char_tokens(tokenizer, "one two END three four")
    result, deltas, fake = await run_scripted(tokenizer, script, stop=["END", "zzz"])
    assert result.text == "one two "
    assert "".join(deltas) == result.text
    assert not any("E" in delta for delta in deltas)
    assert result.finish_reason == "stop"
    # generation stopped at the token that completed the stop string
    assert result.token_ids == script[: len(char_tokens(tokenizer, "one two END"))]
    assert fake.calls == len(result.token_ids)
    assert len(deltas) > 3


async def test_false_start_of_a_stop_string_is_released(tokenizer: PreTrainedTokenizerBase) -> None:
    script = char_tokens(tokenizer, "a ENDING b")
    result, deltas, _ = await run_scripted(
        tokenizer, script, stop=["ENDS"], max_new_tokens=len(script)
    )
    assert result.text == "a ENDING b"
    assert "".join(deltas) == result.text
    assert result.finish_reason == "length"
    # "END" was held back until "I" showed it is not "ENDS"
    assert deltas[:3] == ["a", " ", "ENDI"]


async def test_multibyte_characters_are_never_split(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "héllo 中文 world ✓"
    script = char_tokens(tokenizer, text)
    assert len(script) > len(text)  # several tokens (bytes) for some characters
    result, deltas, _ = await run_scripted(tokenizer, script, max_new_tokens=len(script))
    assert result.text == text
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert "中" in deltas and "文" in deltas


async def test_max_new_tokens_and_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    script = char_tokens(tokenizer, "abcdefghij")
    result, deltas, fake = await run_scripted(tokenizer, script, max_new_tokens=4)
    assert (result.text, result.finish_reason, result.completion_tokens) == ("abcd", "length", 4)
    assert fake.calls == 4 and "".join(deltas) == "abcd"

    script = [*char_tokens(tokenizer, "ab"), tokenizer.eos_token_id, *char_tokens(tokenizer, "c")]
    result, deltas, _ = await run_scripted(tokenizer, script, max_new_tokens=10)
    assert (result.text, result.finish_reason) == ("ab", "stop")
    assert result.token_ids == script[:3]
    assert "".join(deltas) == "ab"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": "END"}, "stop"),
        ({"stop": ["ok", ""]}, "stop[1]"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_sampling_params_name_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidGenerationInput) as caught:
        SamplingParams(**params)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


async def test_empty_prompt_is_rejected(head: LMHead, tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(InvalidGenerationInput, match="prompt_ids"):
        await generate(head, passthrough, [], SamplingParams(), tokenizer)


def test_a_sampled_nul_goes_out_as_the_replacement_character(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """The coordinator refuses text holding NUL (no database stores it as text); a gateway
    whose model samples it (garbage from a lying server can) must still deliver the job."""
    from worker.llm.gateway.generation import REPLACEMENT_CHAR, _StreamingText

    ids = tokenizer.encode("a\x00b", add_special_tokens=False)
    assert "\x00" in tokenizer.decode(ids)
    stream = _StreamingText(tokenizer, [])
    text = stream.update(ids) + stream.finish()
    assert text == f"a{REPLACEMENT_CHAR}b"
