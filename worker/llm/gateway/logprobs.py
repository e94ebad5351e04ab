"""Per-token log-probabilities for OpenAI's `logprobs` (README: Logprobs).

`raw_logprobs` reads the model's own distribution at one step: the log-softmax of the raw
logits, before the grammar mask and every sampler (temperature, top-k, penalties...), as
OpenAI reports it. `report` turns the recorded steps into `protocol.text.TokenLogprob`s
whose token strings concatenate to the job's text (a token cut by a stop string, or past
it, keeps only what the text holds; the end-of-sequence token is the empty string).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from protocol.text import MAX_CHARS_PER_TOKEN, TokenLogprob, TopLogprob

__all__ = ["RawLogprob", "raw_logprobs", "report"]

_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class RawLogprob:
    token: int
    logprob: float
    # the `k` likeliest (token id, logprob), likeliest first
    top: list[tuple[int, float]]


def raw_logprobs(
    logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, token: int, k: int
) -> RawLogprob:
    """The model's log-probability of `token` and its `k` likeliest tokens, from the last
    block's output `hidden` [1, 1, H] through the head's `logits`."""
    raw = logits(hidden)[:, -1, :].float()
    logprobs = torch.log_softmax(raw, dim=-1)[0]
    top = torch.topk(logprobs, k) if k else None
    alternatives = (
        []
        if top is None
        else [(int(i), float(v)) for v, i in zip(top.values, top.indices, strict=True)]
    )
    return RawLogprob(token, min(float(logprobs[token]), 0.0), alternatives)


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    text = tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return str(text).replace("\x00", _REPLACEMENT)


def _entry(token: str, logprob: float) -> dict[str, Any]:
    token = token[:MAX_CHARS_PER_TOKEN]
    return {"token": token, "logprob": min(logprob, 0.0)}


def report(tokenizer: Any, steps: Sequence[RawLogprob], text: str) -> list[TokenLogprob]:
    """One entry per generated token; their strings concatenate to `text`."""
    pieces: list[str] = []
    sent = 0
    ids: list[int] = []
    for i, step in enumerate(steps):
        ids.append(step.token)
        decoded = _decode(tokenizer, ids)
        if i < len(steps) - 1:
            # an incomplete UTF-8 character waits for the token that completes it
            decoded = decoded.rstrip(_REPLACEMENT)
        piece = decoded[sent:] if len(decoded) > sent else ""
        # what the text holds of it (a stop string cuts the text short)
        piece = piece[: max(len(text) - sent, 0)]
        pieces.append(piece)
        sent += len(piece)
    out = []
    for step, piece in zip(steps, pieces, strict=True):
        top = [
            TopLogprob(**_entry(_decode(tokenizer, [token]), logprob))
            for token, logprob in step.top
        ]
        out.append(TokenLogprob(**_entry(piece, step.logprob), top_logprobs=top))
    return out
