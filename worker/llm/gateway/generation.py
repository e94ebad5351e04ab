"""Autoregressive text generation driven by the text gateway.

`generate` embeds the prompt with the gateway's `LMHead`, sends it through the decoder
blocks in one `step` (a swarm inference session in production, a local reference in tests),
turns the last block's output into logits, picks a token and repeats one token per step.
By default the sampling chain follows transformers' `generate` exactly, in the same order:
repetition penalty -> temperature -> top-k -> top-p -> multinomial draw from a
`torch.Generator` seeded with `SamplingParams.seed` (so `torch.manual_seed(seed)` followed
by transformers' `generate(do_sample=True, ...)` picks the same tokens on CPU). KoboldAI's
samplers (`worker.llm.gateway.samplers`) run in `SamplingParams.sampler_order` when given;
OpenAI's presence and frequency penalties follow the repetition penalty. With a
`SamplingParams.grammar` (`worker.llm.gateway.grammar`), the tokens it forbids are masked
out of the logits before any sampler, and generation ends once the grammar is complete.

With a `Speculation` (`worker.llm.gateway.speculative`), tokens are drafted from the
conversation and verified several at a time, the caches cut back to what was kept; it is
off where a grammar or logprobs are asked for.

Text is streamed through an awaitable `on_text(delta)` callback. A delta never ends in an
incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives) nor in text that
could be the start of a stop string, so deltas never need to be taken back: their
concatenation is always `GenerationResult.text`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from protocol.text import sampler_order_problem
from worker.errors import InvalidGenerationInput
from worker.llm.gateway.grammar import GrammarMask
from worker.llm.gateway.logprobs import RawLogprob, raw_logprobs
from worker.llm.gateway.samplers import (
    apply_dynamic_temperature,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_smoothing,
    apply_tail_free,
    apply_top_a,
    apply_top_k,
    apply_top_p,
    apply_typical,
    ban_tokens,
)
from worker.llm.gateway.speculative import DraftLength, PromptLookup, Speculation, verify

__all__ = [
    "GenerationResult",
    "OnText",
    "SamplingParams",
    "Step",
    "TokenHead",
    "apply_repetition_penalty",
    "apply_top_k",
    "apply_top_p",
    "generate",
    "next_token",
    "process_scores",
    "speculation_off",
]

Step = Callable[[torch.Tensor], Awaitable[torch.Tensor]]
"""Hidden states of the new tokens [1, n, H] -> last decoder block's outputs [1, n, H]."""

OnText = Callable[[str], Awaitable[None]]
"""Receives each new piece of generated text (never empty)."""

REPLACEMENT_CHAR = "\ufffd"

# without a sampler_order: transformers' order (its unknown samplers after it)
DEFAULT_ORDER = (6, 5, 0, 2, 1, 3, 4)


class TokenHead(Protocol):
    """What `generate` needs from the model's ends (`worker.llm.gateway.lm_head.LMHead` has it)."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. The defaults sample plainly from the model."""

    # most tokens to generate (the end-of-sequence token counts as one)
    max_new_tokens: int = 128
    # 0 picks the most likely token (greedy); higher flattens the distribution
    temperature: float = 1.0
    # nucleus sampling: keep the fewest tokens whose probability adds up to top_p; 1.0 = off
    top_p: float = 1.0
    # keep only the k most likely tokens; 0 = off
    top_k: int = 0
    # > 1 discourages tokens already in the prompt or output (as transformers does); 1.0 = off
    repetition_penalty: float = 1.0
    # generation ends before the first occurrence of any of these strings
    stop: Sequence[str] = ()
    # seeds the sampler; None draws a fresh random seed
    seed: int | None = None
    # KoboldAI's samplers (README: KoboldAI samplers); the defaults are off
    rep_pen_range: int = 0  # penalise only the last tokens; 0 = all
    rep_pen_slope: float = 0.0  # with rep_pen_range: 0 = the same penalty everywhere
    top_a: float = 0.0
    tfs: float = 1.0
    typical: float = 1.0
    min_p: float = 0.0
    smoothing_factor: float = 0.0
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    # KoboldAI's sampler ids in the order to apply them; None = DEFAULT_ORDER
    sampler_order: tuple[int, ...] | None = None
    # never pick an end-of-sequence token (KoboldAI's use_default_badwordsids)
    ban_eos: bool = False
    # OpenAI's penalties over the generated tokens; 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # an llguidance grammar the text must match (protocol.text.ResponseFormat.grammar)
    grammar: str | None = None
    # report the model's log-probabilities, with this many likeliest alternatives; None: off
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if type(self.max_new_tokens) is not int or self.max_new_tokens < 1:
            raise InvalidGenerationInput(
                "max_new_tokens", f"is {self.max_new_tokens!r}; use a whole number >= 1"
            )
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidGenerationInput(
                "temperature", f"is {self.temperature!r}; use a number >= 0 (0 = greedy)"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidGenerationInput(
                "top_p", f"is {self.top_p!r}; use a number in (0, 1] (1 = off)"
            )
        if type(self.top_k) is not int or self.top_k < 0:
            raise InvalidGenerationInput(
                "top_k", f"is {self.top_k!r}; use a whole number >= 0 (0 = off)"
            )
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidGenerationInput(
                "repetition_penalty",
                f"is {self.repetition_penalty!r}; use a number > 0 (1 = off)",
            )
        if isinstance(self.stop, str):
            raise InvalidGenerationInput("stop", "is a string; give a list of strings")
        for index, stop in enumerate(self.stop):
            if not isinstance(stop, str) or not stop:
                raise InvalidGenerationInput(
                    f"stop[{index}]", f"is {stop!r}; stop strings must be non-empty strings"
                )
        if self.seed is not None and (type(self.seed) is not int or not 0 <= self.seed < 2**64):
            raise InvalidGenerationInput(
                "seed", f"is {self.seed!r}; use a whole number in [0, 2**64) or leave it out"
            )
        self._check_kobold()

    def _check_kobold(self) -> None:
        if type(self.rep_pen_range) is not int or self.rep_pen_range < 0:
            raise InvalidGenerationInput(
                "rep_pen_range", f"is {self.rep_pen_range!r}; use a whole number >= 0 (0 = all)"
            )
        for name, low, high, off in (
            ("rep_pen_slope", 0.0, None, "0 = flat"),
            ("top_a", 0.0, 1.0, "0 = off"),
            ("tfs", 0.0, 1.0, "1 = off"),
            ("typical", 0.0, 1.0, "1 = off"),
            ("min_p", 0.0, 1.0, "0 = off"),
            ("smoothing_factor", 0.0, None, "0 = off"),
            ("dynatemp_range", 0.0, None, "0 = off"),
            ("dynatemp_exponent", 0.0, None, "1 = linear"),
            ("presence_penalty", -2.0, 2.0, "0 = off"),
            ("frequency_penalty", -2.0, 2.0, "0 = off"),
        ):
            value = getattr(self, name)
            if not _is_number(value) or value < low or (high is not None and value > high):
                where = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise InvalidGenerationInput(name, f"is {value!r}; use a number {where} ({off})")
        if self.sampler_order is not None:
            order: object = self.sampler_order
            if not isinstance(order, tuple) or any(type(i) is not int for i in order):
                raise InvalidGenerationInput("sampler_order", f"is {order!r}; use a tuple of ids")
            problem = sampler_order_problem(self.sampler_order)
            if problem:
                raise InvalidGenerationInput("sampler_order", problem)


@dataclass(frozen=True)
class GenerationResult:
    """What `generate` made, with token counts and timings."""

    # the generated text, cut before a stop string, without special tokens
    text: str
    # the generated token ids, including a final end-of-sequence token if one was drawn
    token_ids: list[int] = field(repr=False)
    prompt_tokens: int
    completion_tokens: int
    # "stop": end-of-sequence token or stop string; "length": max_new_tokens reached
    finish_reason: Literal["stop", "length"]
    # from the call to the first generated token (prefill included)
    first_token_seconds: float
    seconds: float
    # with SamplingParams.logprobs: the model's log-probabilities at each step
    logprobs: list[RawLogprob] | None = field(default=None, repr=False)


async def generate(
    head: TokenHead,
    step: Step,
    prompt_ids: Sequence[int] | torch.Tensor,
    params: SamplingParams,
    tokenizer: Any,
    on_text: OnText | None = None,
    speculation: Speculation | None = None,
) -> GenerationResult:
    """Generate a continuation of `prompt_ids` (one sequence, no padding).

    With `speculation`, the steps after the prompt go through its step (the same session
    as `step`, able to roll back), several tokens at a time, where `speculation_off(params)`
    allows it.

    `step` must keep its attention cache between calls: it receives the whole prompt once,
    then each generated token alone. `tokenizer` is a transformers tokenizer; its decode
    turns tokens into text and its `eos_token_id` ends generation, as do the head's.
    Logits and sampling run in a worker thread so that big vocabularies do not stall the
    event loop.
    """
    prompt = _prompt_list(prompt_ids)
    eos_ids = set(head.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    text = _StreamingText(tokenizer, params.stop)

    started = time.perf_counter()
    first_token_seconds = 0.0
    context = torch.tensor([prompt], dtype=torch.long)
    hidden = await step(head.embed(context))
    tokens: list[int] = []
    finish_reason: Literal["stop", "length"] = "length"
    banned = frozenset(eos_ids) if params.ban_eos else frozenset()
    # (a fresh state each call: a redo of the job starts the grammar over)
    grammar = None if params.grammar is None else GrammarMask(params.grammar, tokenizer, eos_ids)
    steps: list[RawLogprob] | None = None if params.logprobs is None else []
    if speculation is not None and speculation_off(params) is None:
        lookup = PromptLookup(
            prompt, speculation.settings.ngram_min, speculation.settings.ngram_max
        )
        length = DraftLength(speculation.settings)
    else:
        speculation = None
    drafts: list[int] = []  # drafted tokens sent after the first token of the last step
    wasted = 0  # drafted tokens rejected so far
    done = False
    while not done:
        if drafts:
            picked = await asyncio.to_thread(
                _verified, head, hidden, context, params, generator, banned, len(prompt), drafts
            )
            length.update(len(drafts), len(picked) - 1)
            wasted += len(drafts) + 1 - len(picked)
        else:
            picked = [
                await asyncio.to_thread(
                    next_token, head, hidden, context, params, generator, banned, grammar,
                    len(prompt),
                )
            ]  # fmt: skip
        for token in picked:
            if steps is not None and params.logprobs is not None:
                steps.append(
                    await asyncio.to_thread(
                        raw_logprobs, head.logits, hidden[:, -1:, :], token, params.logprobs
                    )
                )
            if not tokens:
                first_token_seconds = time.perf_counter() - started
            tokens.append(token)
            done = True
            if token in eos_ids:
                finish_reason = "stop"
                break
            if grammar is not None:
                grammar.advance(token)
            delta = text.update(tokens)
            if delta and on_text is not None:
                await on_text(delta)
            if text.stopped or (grammar is not None and grammar.done):
                finish_reason = "stop"
                break
            if len(tokens) >= params.max_new_tokens:
                break
            done = False
        if done:
            break
        context = torch.cat([context, torch.tensor([picked], dtype=torch.long)], dim=1)
        if speculation is None:
            hidden = await step(head.embed(context[:, -1:]))
            continue
        lookup.extend(picked)
        # never past max_new_tokens, and rejected drafts never more than the tokens processed
        room = min(params.max_new_tokens - len(tokens) - 1, context.shape[1] - wasted)
        drafts = lookup.draft(min(length.next(), room))
        new = torch.tensor([[picked[-1], *drafts]], dtype=torch.long)
        hidden = await speculation.step(head.embed(new), context.shape[1] - 1)
    delta = text.finish()
    if delta and on_text is not None:
        await on_text(delta)
    return GenerationResult(
        text=text.emitted,
        token_ids=tokens,
        prompt_tokens=len(prompt),
        completion_tokens=len(tokens),
        finish_reason=finish_reason,
        first_token_seconds=first_token_seconds,
        seconds=time.perf_counter() - started,
        logprobs=steps,
    )


# -- sampling -------------------------------------------------------------------------------


def speculation_off(params: SamplingParams) -> str | None:
    """Why speculative decoding cannot serve `params` (the field), or None if it can.

    Every sampler is a function of one position's logits and the tokens before it, so a
    draft's position is sampled as plain decoding would; a grammar (its matcher would
    have to step back over rejected drafts) and logprobs (reported per plain step) are not
    done speculatively."""
    if params.grammar is not None:
        return "response_format"
    if params.logprobs is not None:
        return "logprobs"
    return None


def _verified(
    head: TokenHead,
    hidden: torch.Tensor,
    context: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    banned: frozenset[int],
    prompt_length: int,
    drafts: list[int],
) -> list[int]:
    """`speculative.verify` over a step's outputs `hidden` [1, 1 + len(drafts), H]; the
    step's first token is the last of `context`."""
    logits = head.logits(hidden).float()

    def scores_at(row: int, kept: list[int]) -> torch.Tensor:
        before = context
        if kept:
            before = torch.cat([context, torch.tensor([kept], dtype=torch.long)], dim=1)
        return process_scores(logits[:, row, :], before, params, banned, prompt_length)

    return verify(scores_at, drafts, params.temperature != 0, generator)


def next_token(
    head: TokenHead,
    hidden: torch.Tensor,
    context: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    banned: frozenset[int] = frozenset(),
    grammar: GrammarMask | None = None,
    prompt_length: int = 0,
) -> int:
    """The token after `context` [1, L], given the last block's outputs `hidden` [1, n, H];
    never one of `banned`, always one `grammar` allows. `context` starts with
    `prompt_length` prompt tokens (the rest were generated)."""
    scores = head.logits(hidden[:, -1:, :])[:, -1, :].float()
    if grammar is not None:
        scores = grammar.apply(scores)
    scores = process_scores(scores, context, params, banned, prompt_length)
    if params.temperature == 0:
        return int(scores.argmax(dim=-1).item())
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator).item())


def process_scores(
    scores: torch.Tensor,
    context: torch.Tensor,
    params: SamplingParams,
    banned: frozenset[int] = frozenset(),
    prompt_length: int = 0,
) -> torch.Tensor:
    """Apply the samplers to float32 logits [1, V] in `params.sampler_order` (KoboldAI's
    ids; by default transformers' order). Temperature 0 is greedy: only the penalties
    (and `banned`) apply. An order of the ids 0-5 puts the penalties first. The presence
    and frequency penalties count the tokens of `context` after `prompt_length`."""
    if banned:
        scores = ban_tokens(scores, banned)
    order = params.sampler_order or DEFAULT_ORDER
    if params.temperature == 0:
        return _apply(6, scores, context, params, prompt_length)
    if 6 not in order:
        scores = _apply(6, scores, context, params, prompt_length)
    for sampler in order:
        scores = _apply(sampler, scores, context, params, prompt_length)
    return scores


def _apply(
    sampler: int,
    scores: torch.Tensor,
    context: torch.Tensor,
    params: SamplingParams,
    prompt_length: int,
) -> torch.Tensor:
    """One of KoboldAI's samplers, by id; a sampler at its "off" value changes nothing."""
    p = params
    if sampler == 0 and p.top_k > 0:
        return apply_top_k(scores, p.top_k)
    if sampler == 1 and p.top_a > 0:
        return apply_top_a(scores, p.top_a)
    if sampler == 2:
        if p.top_p < 1.0:
            scores = apply_top_p(scores, p.top_p)
        return apply_min_p(scores, p.min_p) if p.min_p > 0 else scores
    if sampler == 3 and p.tfs < 1.0:
        return apply_tail_free(scores, p.tfs)
    if sampler == 4 and p.typical < 1.0:
        return apply_typical(scores, p.typical)
    if sampler == 5:
        if p.smoothing_factor > 0:
            scores = apply_smoothing(scores, p.smoothing_factor)
        if p.dynatemp_range > 0:
            return apply_dynamic_temperature(
                scores, p.temperature, p.dynatemp_range, p.dynatemp_exponent
            )
        return scores / p.temperature if p.temperature != 1.0 else scores
    if sampler == 6:
        if p.repetition_penalty != 1.0:
            scores = apply_repetition_penalty(
                scores, context, p.repetition_penalty, p.rep_pen_range, p.rep_pen_slope
            )
        if p.presence_penalty != 0 or p.frequency_penalty != 0:
            generated = context[:, prompt_length:]
            scores = apply_presence_frequency(
                scores, generated, p.presence_penalty, p.frequency_penalty
            )
    return scores


# -- streaming text -------------------------------------------------------------------------


class _StreamingText:
    """Decodes the generated tokens and hands out only the text that is final.

    Decoding is incremental, over a small window of tokens (as vLLM's detokenizer does):
    the text of `tokens[prefix:]` minus the text of `tokens[prefix:read]` is what the
    newest tokens add, once it does not end in U+FFFD (an incomplete UTF-8 character of a
    byte-level tokenizer). Decoding the window with a few earlier tokens keeps tokenizers
    that treat a sequence's first token specially (SentencePiece's leading space) right.
    Text that could be the start of a stop string is held back too.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.emitted = ""
        self.stopped = False
        self._tokens: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, tokens: list[int]) -> str:
        text = str(
            self.tokenizer.decode(
                tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )
        # a model can sample the NUL byte; the coordinator refuses text holding it (no
        # database stores it as text), so it goes out as U+FFFD, like any undecodable byte
        return text.replace("\x00", REPLACEMENT_CHAR)

    def _advance(self, final: bool) -> None:
        """Append what the tokens after `read` add to the text (if whole, or `final`)."""
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT_CHAR)):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self._tokens)

    def update(self, tokens: list[int]) -> str:
        self._tokens = tokens
        self._advance(final=False)
        start = len(self.emitted)
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            return self._emit(min(found))
        return self._emit(len(self.text) - self._stop_prefix_length(self.text[start:]))

    def finish(self) -> str:
        """Everything not yet handed out (at the end, an incomplete character is final)."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        delta = self.text[len(self.emitted) : end]
        self.emitted += delta
        return delta

    def _stop_prefix_length(self, pending: str) -> int:
        """Length of the longest tail of `pending` that some stop string starts with."""
        for length in range(min(len(pending), self.longest_stop - 1), 0, -1):
            tail = pending[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0


def _prompt_list(prompt_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] == 1:
            prompt_ids = prompt_ids[0]
        if prompt_ids.dim() != 1 or prompt_ids.is_floating_point():
            raise InvalidGenerationInput(
                "prompt_ids", f"has shape {tuple(prompt_ids.shape)}; give token ids [n] or [1, n]"
            )
        prompt = [int(i) for i in prompt_ids.tolist()]
    else:
        prompt = list(prompt_ids)
        for index, token in enumerate(prompt):
            if type(token) is not int:
                raise InvalidGenerationInput(
                    f"prompt_ids[{index}]", f"is {token!r}; not a token id"
                )
    if not prompt:
        raise InvalidGenerationInput("prompt_ids", "is empty; give at least one token")
    return prompt


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value
