"""Speculative decoding by prompt lookup: drafts copied from the conversation, verified in one
multi-token step through the swarm (README: Speculative decoding).

After each picked token the gateway looks for the conversation's last few tokens (an
n-gram of `ngram_max` down to `ngram_min` tokens) earlier in the conversation (prompt and
text generated so far) and drafts the tokens that followed its latest occurrence there
(`PromptLookup`). The picked token and the k drafts go through the blocks as one step of
k + 1 tokens; the LM head turns the k + 1 outputs into k + 1 distributions, and `verify`
keeps the drafts while they are what decoding would have picked, then picks one token
more from the first distribution not used: 1 to k + 1 tokens per step. The session then
cuts the servers' caches back to what was kept (the next step's `start_position`).

Acceptance: greedy keeps a draft iff it is the argmax, so greedy text is plain decoding's.
With temperature, each position's distribution p is the one plain decoding would sample
from (every sampler applied with that position's context); a draft x (the draft is
deterministic: q is one-hot at x) is kept with probability p(x), and on rejection the
token is drawn from p without x, renormalised. Each token is so distributed exactly as p,
as plain sampling draws it, but the random numbers are used differently: sampled text is
reproducible (the same seed gives the same text), not the same as plain decoding's text.

`DraftLength` adapts k: it starts at `start`, grows by one after a step that kept every
draft (up to `max_draft`), falls to what was kept plus one after a miss, and after a miss
with k = 1 drafts nothing for a growing number of steps (prompts with nothing to copy go
back to plain decoding). With no n-gram match there is no draft and the step is plain.
Rejected drafts cost the servers work: they are never more than the tokens otherwise
processed (prompt and generated), so the usage report stays within the coordinator's bound.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "DraftLength",
    "DraftSettings",
    "PromptLookup",
    "RollbackStep",
    "Speculation",
    "verify",
]


class RollbackStep(Protocol):
    """A step that may cut the cache back to `start_position` tokens first
    (`worker.llm.swarm.session.InferenceSession.step`)."""

    def __call__(
        self, hidden: torch.Tensor, start_position: int | None = None
    ) -> Awaitable[torch.Tensor]: ...


@dataclass(frozen=True)
class DraftSettings:
    # most draft tokens per step (`--draft-tokens`); 0 = plain decoding
    max_draft: int = 8
    # draft tokens of the first step with a match
    start: int = 4
    # the n-gram sizes looked up, longest first
    ngram_max: int = 3
    ngram_min: int = 2

    def __post_init__(self) -> None:
        if self.max_draft < 0 or self.start < 1 or not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"bad draft settings: {self}")


@dataclass(frozen=True)
class Speculation:
    """What `generation.generate` needs to decode speculatively."""

    step: RollbackStep
    settings: DraftSettings = DraftSettings()


class PromptLookup:
    """The conversation's tokens, indexed by n-gram: `draft(k)` proposes the k tokens that
    followed the latest earlier occurrence of the conversation's last n tokens."""

    def __init__(self, tokens: Sequence[int], ngram_min: int = 2, ngram_max: int = 3) -> None:
        self.tokens: list[int] = []
        self._min = ngram_min
        self._max = ngram_max
        # n-gram -> the position just after its latest occurrence that has a follower
        self._index: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            # the n-grams ending at the last token now have a follower: `token`
            end = len(self.tokens)
            for n in range(self._min, self._max + 1):
                if end >= n:
                    self._index[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(int(token))

    def draft(self, k: int) -> list[int]:
        if k <= 0:
            return []
        for n in range(self._max, self._min - 1, -1):
            if len(self.tokens) < n:
                continue
            follows = self._index.get(tuple(self.tokens[-n:]))
            if follows is not None:
                return self.tokens[follows : follows + k]
        return []


class DraftLength:
    """How many tokens to draft next, from how the last drafts fared."""

    def __init__(self, settings: DraftSettings) -> None:
        self._max = settings.max_draft
        self.k = min(settings.start, settings.max_draft)
        self._pause = 0  # steps left without drafting
        self._backoff = 1  # steps to pause after the next miss at k = 1

    def next(self) -> int:
        if self._pause > 0:
            self._pause -= 1
            return 0
        return self.k

    def update(self, proposed: int, kept: int) -> None:
        if proposed == 0:
            return
        if kept == proposed:
            self.k = min(self.k + 1, self._max)
            self._backoff = 1
        elif kept == 0 and self.k == 1:
            self._pause = self._backoff
            self._backoff = min(self._backoff * 2, 32)
        else:
            self.k = max(1, min(kept + 1, self._max))


def verify(
    scores_at: Callable[[int, list[int]], torch.Tensor],
    drafts: Sequence[int],
    sample: bool,
    generator: torch.Generator,
) -> list[int]:
    """The tokens a speculative step yields: the drafts kept, then one picked token.

    `scores_at(row, kept)` is the processed scores [1, V] of the step's output `row` (the
    distribution after the tokens sent up to that row), given the drafts `kept` before it.
    Greedy (`sample` False) keeps a draft iff it is the argmax; sampling keeps draft x with
    probability p(x) and otherwise draws from p without x (module docstring).
    """
    kept: list[int] = []
    for row, draft in enumerate(drafts):
        scores = scores_at(row, kept)
        if not sample:
            best = int(scores.argmax(dim=-1).item())
            if best != draft:
                return [*kept, best]
            kept.append(draft)
            continue
        probs = torch.softmax(scores, dim=-1)[0]
        chance = float(probs[draft])
        if float(torch.rand((), generator=generator)) < chance:
            kept.append(draft)
            continue
        rest = probs.clone()
        rest[draft] = 0.0
        if float(rest.sum()) <= 0:  # (p(x) == 1 up to rounding: x it is)
            return [*kept, draft]
        token = int(torch.multinomial(rest / rest.sum(), 1, generator=generator).item())
        return [*kept, token]
    scores = scores_at(len(drafts), kept)
    if not sample:
        return [*kept, int(scores.argmax(dim=-1).item())]
    probs = torch.softmax(scores, dim=-1)
    return [*kept, int(torch.multinomial(probs, num_samples=1, generator=generator).item())]
