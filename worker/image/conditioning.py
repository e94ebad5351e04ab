"""Text embeddings of a prompt the way AUTOMATIC1111 makes them, step by step.

Each text of the prompt's schedule (`worker.image.prompt_syntax.schedule`) is split into
weighted fragments (`attention`), tokenized without the begin/end markers, and cut into
chunks of 75 tokens (a BREAK ends a chunk; a full chunk moves the words after its last comma
into the next when that comma is at most 20 tokens back, A1111's default). Each chunk gets
the markers, is padded with the tokenizer's pad token and encoded by the text encoder (its
last layer, or with `clip_skip` n the output n - 1 layers before the last, through the final
layer norm); the weights multiply the chunk's vectors, which are then rescaled to the chunk's
original mean. Chunks are concatenated along the tokens.

A prompt of at most 75 tokens without syntax gives exactly the tensor diffusers'
`encode_prompt` gives (same tokens, same encoder call), so plain prompts keep their pixels;
a longer one is no longer cut at 75 tokens. The positive and negative conditionings of a
job are padded to one length with the empty prompt's chunk (A1111's "pad prompt/negative
prompt to be same length"), as diffusers needs one tensor for both.

SDXL (`DualTextEncoding`) does the same with each of its two text encoders, as A1111 does:
each encodes the chunks made with its own tokenizer, from the penultimate layer without the
final layer norm (diffusers' SDXL `encode_prompt`; `clip_skip` n takes the output n layers
before the last, diffusers' `clip_skip=n - 1`), weighted per encoder; the two are
concatenated along the features. The pooled text is the second encoder's projected output
of the first chunk, unweighted (A1111's). An empty negative prompt is zeros, embeddings and
pooled text alike (A1111 for SDXL, and diffusers' `force_zeros_for_empty_prompt`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from worker.errors import InvalidGenerationInput
from worker.image.prompt_syntax import (
    Fragment,
    PromptSyntaxError,
    attention,
    schedule,
)

__all__ = [
    "COMMA_BACKTRACK",
    "Conditioning",
    "DualTextEncoding",
    "TextEncoding",
    "encode_job",
    "prompt_arguments",
    "switched_inputs",
]

# A1111's `comma_padding_backtrack` default: how far back a full chunk looks for a comma
COMMA_BACKTRACK = 20


@dataclass(frozen=True)
class Conditioning:
    """Per-step embeddings: `embeds[k]` ([1, tokens, dim]) serves the 0-based sampling steps
    up to and including `ends[k]`."""

    ends: tuple[int, ...]
    embeds: tuple[torch.Tensor, ...]
    # SDXL: the pooled text ([1, dim]) beside each of `embeds`; None for SD 1 and 2
    pooled: tuple[torch.Tensor, ...] | None = None

    def index_at(self, step: int) -> int:
        for k, end in enumerate(self.ends):
            if step <= end:
                return k
        return len(self.ends) - 1

    def at(self, step: int) -> torch.Tensor:
        return self.embeds[self.index_at(step)]

    @property
    def tokens(self) -> int:
        return max(e.shape[1] for e in self.embeds)


class TextEncoding:
    """A pipeline's tokenizer and text encoder, used A1111's way (see the module)."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        device: torch.device,
        convert: Callable[[str], str] | None = None,
        *,
        penultimate: bool = False,
    ) -> None:
        """`convert`: rewrites a text before it is tokenized (diffusers' `maybe_convert_prompt`,
        which spells a multi-vector textual inversion's token as all of its tokens);
        `penultimate`: SDXL's layers (see the module)."""
        self.convert = convert or (lambda text: text)
        self.penultimate = penultimate
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.chunk_length = int(tokenizer.model_max_length) - 2
        self.bos = int(tokenizer.bos_token_id)
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos)
        comma = tokenizer.get_vocab().get(",</w>")
        self.comma: int | None = None if comma is None else int(comma)
        self.layers = int(text_encoder.config.num_hidden_layers)

    def chunks(self, fragments: list[Fragment]) -> list[tuple[list[int], list[float]]]:
        """Token ids and weights, `chunk_length + 2` of each per chunk."""
        done: list[tuple[list[int], list[float]]] = []
        tokens: list[int] = []
        weights: list[float] = []
        last_comma = -1

        def close() -> None:
            nonlocal tokens, weights, last_comma
            fill = self.chunk_length - len(tokens)
            done.append((self._framed(tokens, fill), [1.0, *weights, *[1.0] * fill, 1.0]))
            tokens, weights, last_comma = [], [], -1

        for fragment in fragments:
            if fragment.is_break:
                close()
                continue
            text = self.convert(fragment.text)
            ids = self.tokenizer(text, add_special_tokens=False, truncation=False)
            for token in ids.input_ids:
                if token == self.comma:
                    last_comma = len(tokens)
                elif (
                    len(tokens) == self.chunk_length
                    and last_comma != -1
                    and len(tokens) - last_comma <= COMMA_BACKTRACK
                ):
                    cut = last_comma + 1
                    moved, moved_weights = tokens[cut:], weights[cut:]
                    tokens, weights = tokens[:cut], weights[:cut]
                    close()
                    tokens, weights = moved, moved_weights
                if len(tokens) == self.chunk_length:
                    close()
                tokens.append(int(token))
                weights.append(fragment.weight)
        if tokens or not done:
            close()
        return done

    def _framed(self, tokens: list[int], fill: int) -> list[int]:
        # as diffusers' tokenizer call frames them: BOS, the tokens, EOS, then pad tokens
        # (A1111 pads before the EOS: the same ids where the pad token is EOS, as in SD 1.x)
        return [self.bos, *tokens, self.eos, *[self.pad] * fill]

    def encode_chunk(
        self, ids: list[int], weights: list[float], clip_skip: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chunk's weighted hidden states, and its pooled text if the encoder has a
        projection (SDXL's second)."""
        input_ids = torch.tensor([ids], dtype=torch.long).to(self.device)
        z: torch.Tensor
        pooled: torch.Tensor | None = None
        if self.penultimate:
            output = self.text_encoder(input_ids, output_hidden_states=True)
            z = output.hidden_states[-(clip_skip + 1)]
            if output[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = output[0]
        elif clip_skip == 1:
            z = self.text_encoder(input_ids, attention_mask=None)[0]
        else:
            output = self.text_encoder(input_ids, attention_mask=None, output_hidden_states=True)
            hidden = output.hidden_states[-clip_skip]
            # (transformers 5's CLIPTextModel holds the norm itself; 4's under text_model)
            model = getattr(self.text_encoder, "text_model", self.text_encoder)
            z = model.final_layer_norm(hidden)
        z = z.to(dtype=self.text_encoder.dtype, device=self.device)
        if any(w != 1.0 for w in weights):
            original_mean = z.mean()
            scale = torch.tensor(weights, dtype=z.dtype, device=z.device)
            z = z * scale.reshape(1, -1, 1)
            z = z * (original_mean / z.mean())
        return z, pooled

    def encoded_chunks(
        self, text: str, clip_skip: int, field: str = "prompt"
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Each chunk of one text (no prompt editing left) encoded; `field` names the text
        in errors."""
        try:
            fragments = attention(text)
        except PromptSyntaxError as exc:
            raise InvalidGenerationInput(field, str(exc)) from None
        with torch.no_grad():
            return [self.encode_chunk(i, w, clip_skip) for i, w in self.chunks(fragments)]

    def encode(self, text: str, clip_skip: int, field: str = "prompt") -> torch.Tensor:
        """One text (no prompt editing left) as [1, 77 x chunks, dim]; `field` names it in
        errors."""
        return torch.cat([z for z, _ in self.encoded_chunks(text, clip_skip, field)], dim=1)

    def conditioning(
        self, prompt: str, steps: int, clip_skip: int, field: str = "prompt"
    ) -> Conditioning:
        entries = schedule(prompt, steps)
        # (each distinct text encoded once)
        embeds = {e.text: self.encode(e.text, clip_skip, field) for e in entries}
        return Conditioning(tuple(e.end for e in entries), tuple(embeds[e.text] for e in entries))

    def check_clip_skip(self, clip_skip: int, model: str) -> None:
        if clip_skip > self.layers:
            raise InvalidGenerationInput(
                "clip_skip",
                f"{model}'s text encoder has {self.layers} layers; use 1 to {self.layers}",
            )


class DualTextEncoding:
    """SDXL's two tokenizers and text encoders, used A1111's way (see the module). Each
    `TextEncoding` converts the text for its own tokenizer (`convert`): an SDXL textual
    inversion adds its token to both, with as many vectors in each as its `clip_l` and
    `clip_g` tensors have (worker.image.adapters_engine)."""

    def __init__(self, first: TextEncoding, second: TextEncoding) -> None:
        self.first = first
        self.second = second

    def encode_pooled(
        self, text: str, clip_skip: int, field: str = "prompt"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One text as ([1, 77 x chunks, dim 1 + dim 2], pooled [1, projection dim])."""
        parts = []
        for encoding in (self.first, self.second):
            chunks = encoding.encoded_chunks(text, clip_skip, field)
            parts.append(chunks)
        first, second = parts
        # (the two tokenizers share CLIP's vocabulary, so they cut the same chunks; should
        # they not, the shorter is filled with the empty text's chunk)
        for chunks, encoding in ((first, self.first), (second, self.second)):
            while len(chunks) < max(len(first), len(second)):
                chunks.append(encoding.encoded_chunks("", clip_skip)[0])
        pooled = second[0][1]
        if pooled is None:
            raise ValueError("SDXL's second text encoder has no projection (pooled text)")
        embeds = [torch.cat([a, b], dim=-1) for (a, _), (b, _) in zip(first, second, strict=True)]
        return torch.cat(embeds, dim=1), pooled

    def encode(self, text: str, clip_skip: int, field: str = "prompt") -> torch.Tensor:
        return self.encode_pooled(text, clip_skip, field)[0]

    def conditioning(
        self, prompt: str, steps: int, clip_skip: int, field: str = "prompt"
    ) -> Conditioning:
        entries = schedule(prompt, steps)
        encoded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for entry in entries:
            if entry.text in encoded:
                continue
            embeds, pooled = self.encode_pooled(entry.text, clip_skip, field)
            if field == "negative_prompt" and entry.text == "":
                embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
            encoded[entry.text] = (embeds, pooled)
        return Conditioning(
            tuple(e.end for e in entries),
            tuple(encoded[e.text][0] for e in entries),
            tuple(encoded[e.text][1] for e in entries),
        )

    def check_clip_skip(self, clip_skip: int, model: str) -> None:
        self.first.check_clip_skip(clip_skip, model)
        self.second.check_clip_skip(clip_skip, model)


def _padded(conditioning: Conditioning, tokens: int, empty: torch.Tensor) -> Conditioning:
    embeds = []
    for e in conditioning.embeds:
        missing = (tokens - e.shape[1]) // empty.shape[1]
        # (SDXL's empty negative prompt is zeros at any length)
        filler = empty if e.any() else torch.zeros_like(empty)
        embeds.append(torch.cat([e, *[filler] * missing], dim=1) if missing else e)
    return Conditioning(conditioning.ends, tuple(embeds), conditioning.pooled)


def encode_job(
    encoding: TextEncoding | DualTextEncoding,
    prompt: str,
    negative: str,
    steps: int,
    clip_skip: int,
) -> tuple[Conditioning, Conditioning]:
    """The positive and negative conditionings of a job, of one length throughout."""
    positive = encoding.conditioning(prompt, steps, clip_skip)
    negative_c = encoding.conditioning(negative, steps, clip_skip, "negative_prompt")
    tokens = max(positive.tokens, negative_c.tokens)
    if all(e.shape[1] == tokens for e in (*positive.embeds, *negative_c.embeds)):
        return positive, negative_c
    empty = encoding.encode("", clip_skip)
    return _padded(positive, tokens, empty), _padded(negative_c, tokens, empty)


def prompt_arguments(positive: Conditioning, negative: Conditioning) -> dict[str, torch.Tensor]:
    """The prompt keywords of a diffusers pipeline call (those of the first sampling step)."""
    arguments = {"prompt_embeds": positive.at(0), "negative_prompt_embeds": negative.at(0)}
    if positive.pooled is not None and negative.pooled is not None:
        arguments["pooled_prompt_embeds"] = positive.pooled[positive.index_at(0)]
        arguments["negative_pooled_prompt_embeds"] = negative.pooled[negative.index_at(0)]
    return arguments


def switched_inputs(
    positive: Conditioning,
    negative: Conditioning,
    indices: tuple[int, int],
    guided: bool,
    images: int = 1,
) -> dict[str, torch.Tensor]:
    """What a step callback hands the pipeline when prompt editing moves to the schedule's
    entries `indices` (positive, negative) for a batch of `images`: the embeddings, once
    per image (under classifier-free guidance the negatives first, as the pipelines
    concatenate them) and SDXL's pooled text."""

    def per_image(value: torch.Tensor) -> torch.Tensor:
        # (as diffusers' `encode_prompt` repeats them for `num_images_per_prompt`)
        return value.repeat(images, *([1] * (value.dim() - 1)))

    def pair(values: tuple[torch.Tensor, ...], others: tuple[torch.Tensor, ...]) -> torch.Tensor:
        chosen = per_image(values[indices[0]])
        return torch.cat([per_image(others[indices[1]]), chosen]) if guided else chosen

    inputs = {"prompt_embeds": pair(positive.embeds, negative.embeds)}
    if positive.pooled is not None and negative.pooled is not None:
        inputs["add_text_embeds"] = pair(positive.pooled, negative.pooled)
    return inputs
