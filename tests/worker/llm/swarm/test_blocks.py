"""A span of decoder layers run on its own equals the same layers inside the full model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from worker.errors import ModelError, UnsupportedArchitecture
from worker.llm.swarm.blocks import BlockSpan, ModelInfo, new_cache


@pytest.fixture(scope="module")
def llm(tiny_models: Path) -> Path:
    return tiny_models / "llm"


def _reference(model: LlamaForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden state after the final norm, and logits, of the full model."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.hidden_states[-1], out.logits


def _head(model: LlamaForCausalLM, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        normed = model.model.norm(hidden)
        return normed, model.lm_head(normed)


def test_model_info_reads_headers_only(llm: Path, full_model: LlamaForCausalLM) -> None:
    info = ModelInfo.read(llm)
    assert info.name == "llm"
    assert info.architecture == "LlamaForCausalLM"
    assert (info.num_blocks, info.hidden_size, info.dtype) == (4, 64, "float32")
    assert info.param_count == sum(p.numel() for p in full_model.parameters())
    assert ModelInfo.read(llm, "renamed").name == "renamed"


def test_two_chained_spans_equal_the_full_model(llm: Path, full_model: LlamaForCausalLM) -> None:
    first, second = BlockSpan.load(llm, 0, 2), BlockSpan.load(llm, 2, 4)
    assert len(first.layers) == len(second.layers) == 2
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, full_model.config.vocab_size, (1, 12), generator=generator)
    embeddings = full_model.model.embed_tokens(ids).detach()
    ref_hidden, ref_logits = _reference(full_model, ids)

    # prefill of 6 tokens, then single-token steps, sharing one cache per span
    caches = (new_cache(), new_cache())
    outputs: list[torch.Tensor] = []
    chunks = [embeddings[:, :6]] + [embeddings[:, i : i + 1] for i in range(6, 12)]
    for chunk in chunks:
        outputs.append(second.forward(first.forward(chunk, caches[0]), caches[1]))
    hidden, logits = _head(full_model, torch.cat(outputs, dim=1))
    assert (hidden - ref_hidden).abs().max() < 1e-5
    assert (logits - ref_logits).abs().max() < 1e-5

    # a multi-token step after a cached prefix (a replay, a chunked prefill): the mask trap
    caches = (new_cache(), new_cache())
    head = second.forward(first.forward(embeddings[:, :5], caches[0]), caches[1])
    tail = second.forward(first.forward(embeddings[:, 5:], caches[0]), caches[1])
    _, logits = _head(full_model, torch.cat([head, tail], dim=1))
    assert (logits - ref_logits).abs().max() < 1e-5


def test_a_sub_range_of_a_span_and_a_stateless_pass(
    llm: Path, full_model: LlamaForCausalLM
) -> None:
    whole, head = BlockSpan.load(llm, 0, 4), BlockSpan.load(llm, 0, 1)
    ids = torch.arange(3, 10)[None]
    embeddings = full_model.model.embed_tokens(ids).detach()
    ref_hidden, _ = _reference(full_model, ids)
    # blocks 1:4 of a 0:4 span after block 0 of another server, with caches and steps
    caches = (new_cache(), new_cache())
    outputs: list[torch.Tensor] = []
    for chunk in (embeddings[:, :4], embeddings[:, 4:5], embeddings[:, 5:]):
        past = sum(o.shape[1] for o in outputs)
        middle = head.forward(chunk, caches[0])
        outputs.append(whole.forward(middle, caches[1], past=past, start=1, end=4))
    hidden, _ = _head(full_model, torch.cat(outputs, dim=1))
    assert (hidden - ref_hidden).abs().max() < 1e-5
    # no cache: one full-sequence pass
    hidden, _ = _head(full_model, whole.forward(embeddings, None))
    assert (hidden - ref_hidden).abs().max() < 1e-5
    with pytest.raises(ValueError, match="not within 0:1"):
        head.forward(embeddings, None, start=0, end=2)


def test_blocks_outside_the_model_are_refused(llm: Path) -> None:
    with pytest.raises(ModelError, match=r"blocks 2:5 are outside the model's 4 blocks"):
        BlockSpan.load(llm, 2, 5)


def test_unsupported_architecture_names_what_was_found(llm: Path, tmp_path: Path) -> None:
    model = tmp_path / "gpt"
    shutil.copytree(llm, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (model / "config.json").write_text(json.dumps(config))
    for load in (lambda: ModelInfo.read(model), lambda: BlockSpan.load(model, 0, 2)):
        with pytest.raises(UnsupportedArchitecture, match=r"'gpt2'.*llama, mistral, qwen2, qwen3"):
            load()
