"""Grammar-constrained decoding: a `ResponseFormat`'s grammar masks the logits each step.

llguidance (`protocol.text.ResponseFormat.grammar` compiles the JSON schema) matches the
grammar against the tokenizer's byte-level vocabulary; `GrammarMask` keeps its state over
one generation. Before each token is sampled, every token the grammar cannot take next
gets -inf, and end-of-sequence tokens stay possible only while the grammar accepts the
text so far. Once the grammar is complete (a JSON value closed) the generation ends.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from llguidance import LLMatcher, LLTokenizer
from llguidance.hf import from_tokenizer

from worker.errors import InvalidGenerationInput

__all__ = ["GrammarMask", "ll_tokenizer"]

# llguidance's view of each tokenizer (~0.3 s to build for a 49k vocabulary)
_TOKENIZERS: weakref.WeakKeyDictionary[Any, LLTokenizer] = weakref.WeakKeyDictionary()
_BITS = torch.arange(8, dtype=torch.uint8)


def ll_tokenizer(tokenizer: Any) -> LLTokenizer:
    """llguidance's tokenizer for a transformers fast tokenizer (cached per tokenizer)."""
    cached = _TOKENIZERS.get(tokenizer)
    if cached is None:
        cached = _TOKENIZERS[tokenizer] = from_tokenizer(tokenizer)
    return cached


class GrammarMask:
    """One generation's position in a grammar; `InvalidGenerationInput` if it cannot be
    used with this tokenizer."""

    def __init__(self, grammar: str, tokenizer: Any, eos_ids: Iterable[int]) -> None:
        self.matcher = LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
        self.eos_ids = sorted(set(eos_ids))
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise InvalidGenerationInput("response_format", self.matcher.get_error())

    @property
    def done(self) -> bool:
        """The grammar is complete: only the end of the text may follow."""
        return bool(self.matcher.is_stopped())

    def allowed(self, vocab: int) -> torch.Tensor:
        """Which of `vocab` token ids may come next (bool [vocab])."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        # bit i of the little-endian 32-bit words is token i
        bits = ((words.unsqueeze(-1) >> _BITS) & 1).flatten().bool()
        allowed = torch.zeros(vocab, dtype=torch.bool)
        n = min(vocab, bits.numel())
        allowed[:n] = bits[:n]
        accepting = bool(self.matcher.is_accepting())
        for eos in self.eos_ids:
            if 0 <= eos < vocab:
                allowed[eos] = accepting
        return allowed

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """-inf for the tokens the grammar cannot take next (scores [1, V])."""
        allowed = self.allowed(scores.shape[-1])
        if not bool(allowed.any()):
            raise InvalidGenerationInput("response_format", "the grammar allows no token here")
        return scores.masked_fill(~allowed, -float("inf"))

    def advance(self, token: int) -> None:
        """Take a sampled token (end-of-sequence tokens end the text: nothing to take)."""
        if token in self.eos_ids:
            return
        if not self.matcher.consume_token(token):
            self._check()
            raise InvalidGenerationInput("response_format", f"token {token} breaks the grammar")
