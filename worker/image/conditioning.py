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

__all__ = ["COMMA_BACKTRACK", "Conditioning", "TextEncoding", "encode_job"]

# A1111's `comma_padding_backtrack` default: how far back a full chunk looks for a comma
COMMA_BACKTRACK = 20


@dataclass(frozen=True)
class Conditioning:
    """Per-step embeddings: `embeds[k]` ([1, tokens, dim]) serves the 0-based sampling steps
    up to and including `ends[k]`."""

    ends: tuple[int, ...]
    embeds: tuple[torch.Tensor, ...]

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
    ) -> None:
        """`convert`: rewrites a text before it is tokenized (diffusers' `maybe_convert_prompt`,
        which spells a multi-vector textual inversion's token as all of its tokens)."""
        self.convert = convert or (lambda text: text)
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

    def encode_chunk(self, ids: list[int], weights: list[float], clip_skip: int) -> torch.Tensor:
        input_ids = torch.tensor([ids], dtype=torch.long).to(self.device)
        z: torch.Tensor
        if clip_skip == 1:
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
        return z

    def encode(self, text: str, clip_skip: int, field: str = "prompt") -> torch.Tensor:
        """One text (no prompt editing left) as [1, 77 x chunks, dim]; `field` names it in
        errors."""
        try:
            fragments = attention(text)
        except PromptSyntaxError as exc:
            raise InvalidGenerationInput(field, str(exc)) from None
        with torch.no_grad():
            parts = [self.encode_chunk(i, w, clip_skip) for i, w in self.chunks(fragments)]
        return torch.cat(parts, dim=1)

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


def _padded(conditioning: Conditioning, tokens: int, empty: torch.Tensor) -> Conditioning:
    embeds = []
    for e in conditioning.embeds:
        missing = (tokens - e.shape[1]) // empty.shape[1]
        embeds.append(torch.cat([e, *[empty] * missing], dim=1) if missing else e)
    return Conditioning(conditioning.ends, tuple(embeds))


def encode_job(
    encoding: TextEncoding, prompt: str, negative: str, steps: int, clip_skip: int
) -> tuple[Conditioning, Conditioning]:
    """The positive and negative conditionings of a job, of one length throughout."""
    positive = encoding.conditioning(prompt, steps, clip_skip)
    negative_c = encoding.conditioning(negative, steps, clip_skip, "negative_prompt")
    tokens = max(positive.tokens, negative_c.tokens)
    if all(e.shape[1] == tokens for e in (*positive.embeds, *negative_c.embeds)):
        return positive, negative_c
    empty = encoding.encode("", clip_skip)
    return _padded(positive, tokens, empty), _padded(negative_c, tokens, empty)
