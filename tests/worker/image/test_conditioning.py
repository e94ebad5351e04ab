"""A1111's chunks and weights on the tiny model's own tokenizer and text encoder (no UNet)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from tests.worker.image.test_prompt_extras import give_the_norm_a_bias
from worker.errors import InvalidGenerationInput
from worker.image.conditioning import COMMA_BACKTRACK, TextEncoding, encode_job
from worker.image.prompt_syntax import attention


@pytest.fixture(scope="module")
def text(tiny_sd: Path) -> TextEncoding:
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_sd / "text_encoder", use_safetensors=True)
    give_the_norm_a_bias(encoder)
    return TextEncoding(tokenizer, encoder.eval(), torch.device("cpu"))


def _diffusers_ids(text: TextEncoding, prompt: str) -> list[int]:
    # what StableDiffusionPipeline.encode_prompt feeds the text encoder
    ids = text.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    return list(ids)


def test_a_plain_prompt_is_diffusers_tokens_and_tensor(text: TextEncoding) -> None:
    prompt = "a photo of a red cat"
    ((ids, weights),) = text.chunks(attention(prompt))
    assert ids == _diffusers_ids(text, prompt) and set(weights) == {1.0}
    with torch.no_grad():
        expected = text.text_encoder(torch.tensor([ids]))[0]
    assert torch.equal(text.encode(prompt, 1), expected)


def test_long_prompts_are_chunked_at_a_nearby_comma(text: TextEncoding) -> None:
    word = text.tokenizer("cat", add_special_tokens=False).input_ids
    comma = text.comma
    assert comma is not None
    # 70 tokens of words, a comma, then words past the 75-token chunk
    words = " ".join(["cat"] * (70 // len(word)))
    prompt = f"{words}, {' '.join(['dog'] * 10)}"
    first, second = text.chunks(attention(prompt))
    assert len(first[0]) == len(second[0]) == 77
    # the first chunk ends at the comma: what came after it moved on whole
    body = first[0][1 : first[0].index(text.eos)]
    assert body[-1] == comma and len(body) <= 75
    assert 75 - len(body) <= COMMA_BACKTRACK
    assert text.encode(prompt, 1).shape == (1, 154, 32)


def test_break_pads_the_chunk_and_the_negative_is_padded_to_match(text: TextEncoding) -> None:
    positive, negative = encode_job(text, "a cat BREAK a dog", "", 20, 1)
    assert positive.embeds[0].shape == negative.embeds[0].shape == (1, 154, 32)
    empty = text.encode("", 1)
    assert torch.equal(negative.embeds[0], torch.cat([empty, empty], dim=1))


def test_weights_rescale_to_the_original_mean(text: TextEncoding) -> None:
    plain, weighted = text.encode("a red cat", 1), text.encode("a (red:1.5) cat", 1)
    assert torch.allclose(plain.mean(), weighted.mean(), atol=1e-6)
    assert not torch.allclose(plain, weighted)
    # the weights reach the tokens of "red" only: BOS and "a" scale with the mean alone
    ratio = weighted[0, 1] / plain[0, 1]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-5)


def test_clip_skip_beyond_the_encoder_is_named(text: TextEncoding) -> None:
    text.check_clip_skip(2, "tiny")
    with pytest.raises(InvalidGenerationInput, match="clip_skip"):
        text.check_clip_skip(3, "tiny")


def test_a_weight_that_is_not_a_number_is_a_prompt_error(text: TextEncoding) -> None:
    with pytest.raises(InvalidGenerationInput, match="^prompt: '1.2.3'"):
        encode_job(text, "(cat:1.2.3)", "", 4, 1)
    with pytest.raises(InvalidGenerationInput, match="^negative_prompt: "):
        encode_job(text, "a cat", "(dog:1..2)", 4, 1)


def test_prompt_editing_encodes_each_text_once(text: TextEncoding) -> None:
    positive, _ = encode_job(text, "a [red:blue:0.5] cat", "", 10, 2)
    assert positive.ends == (5, 10)
    assert torch.equal(positive.at(5), text.encode("a red cat", 2))
    assert torch.equal(positive.at(6), text.encode("a blue cat", 2))
