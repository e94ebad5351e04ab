"""KoboldAI's samplers against reference computations on fixed logits.

Where transformers has the sampler (top-k, top-p, typical, min-p, temperature, repetition
penalty) its logits processor is the reference; otherwise a few lines of numpy compute the
formula the README gives (top-a, tail-free, quadratic smoothing, dynamic temperature, the
repetition penalty's range and slope), independently of the torch code under test.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import numpy as np
import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from protocol.text import KOBOLD_SAMPLER_ORDER
from worker.errors import InvalidGenerationInput
from worker.llm.gateway.generation import SamplingParams, process_scores
from worker.llm.gateway.samplers import (
    apply_dynamic_temperature,
    apply_min_p,
    apply_repetition_penalty,
    apply_smoothing,
    apply_tail_free,
    apply_top_a,
    apply_top_k,
    apply_top_p,
    apply_typical,
    ban_tokens,
)

VOCAB = 64


def fixed_logits(seed: int = 7, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, VOCAB, generator=generator) * scale).float()


# transformers' processors take the context as a LongTensor (int64, as torch.tensor makes it)
CONTEXT = cast(torch.LongTensor, torch.tensor([[3, 9, 3, 17, 40, 9, 5, 63, 21, 3, 11, 30]]))


def softmax(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    e = np.where(finite, np.exp(x - x[finite].max()), 0.0)
    return np.asarray(e / e.sum())


def same(ours: torch.Tensor, reference: torch.Tensor | np.ndarray) -> None:
    expected = torch.as_tensor(np.asarray(reference), dtype=torch.float32).reshape(ours.shape)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(expected)), "kept tokens differ"
    finite = torch.isfinite(ours)
    torch.testing.assert_close(ours[finite], expected[finite], rtol=1e-5, atol=1e-5)


# -- against transformers' logits processors ------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 20, VOCAB + 5])
def test_top_k_is_transformers(k: int) -> None:
    scores = fixed_logits()
    same(apply_top_k(scores, k), TopKLogitsWarper(k)(CONTEXT, scores.clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_is_transformers(p: float) -> None:
    scores = fixed_logits()
    same(apply_top_p(scores, p), TopPLogitsWarper(p)(CONTEXT, scores.clone()))


@pytest.mark.parametrize("mass", [0.05, 0.2, 0.5, 0.95])
def test_typical_is_transformers(mass: float) -> None:
    for seed in range(5):
        scores = fixed_logits(seed)
        same(apply_typical(scores, mass), TypicalLogitsWarper(mass)(CONTEXT, scores.clone()))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_is_transformers(min_p: float) -> None:
    scores = fixed_logits()
    same(apply_min_p(scores, min_p), MinPLogitsWarper(min_p)(CONTEXT, scores.clone()))


@pytest.mark.parametrize("temperature", [0.3, 1.7, 4.5])
def test_temperature_is_transformers(temperature: float) -> None:
    scores = fixed_logits()
    ours = process_scores(scores, CONTEXT, SamplingParams(temperature=temperature))
    same(ours, TemperatureLogitsWarper(temperature)(CONTEXT, scores.clone()))


@pytest.mark.parametrize("penalty", [0.8, 1.3, 2.9])
def test_whole_context_repetition_penalty_is_transformers(penalty: float) -> None:
    scores = fixed_logits()
    reference = RepetitionPenaltyLogitsProcessor(penalty)(CONTEXT, scores.clone())
    same(apply_repetition_penalty(scores, CONTEXT, penalty), reference)


@pytest.mark.parametrize("range_", [1, 4, 7])
def test_rep_pen_range_penalises_only_the_last_tokens(range_: int) -> None:
    scores = fixed_logits()
    window = CONTEXT[:, -range_:]
    reference = RepetitionPenaltyLogitsProcessor(1.5)(window, scores.clone())
    same(apply_repetition_penalty(scores, CONTEXT, 1.5, range_), reference)
    # a token only before the window is untouched
    assert apply_repetition_penalty(scores, CONTEXT, 1.5, 4)[0, 17] == scores[0, 17]


# -- against the documented formulas (numpy) ------------------------------------------------


@pytest.mark.parametrize("slope", [0.3, 1.0, 3.0])
def test_rep_pen_slope_follows_the_sigmoid_formula(slope: float) -> None:
    scores, penalty, range_ = fixed_logits(), 1.8, 8
    window = CONTEXT[0, -range_:].tolist()
    logits = scores[0].double().numpy()
    expected = logits.copy()
    per_token: dict[int, float] = {}
    for i, token in enumerate(window):  # oldest first: the newest occurrence wins
        x = -1 + 2 * i / (range_ - 1)
        w = slope * x / (1 + abs(x) * (slope - 1))
        per_token[token] = 1 + (w + 1) / 2 * (penalty - 1)
    for token, p in per_token.items():
        expected[token] = logits[token] * p if logits[token] < 0 else logits[token] / p
    ours = apply_repetition_penalty(scores, CONTEXT, penalty, range_, slope)
    same(ours, expected)
    # the newest token gets the whole penalty, the oldest none
    newest, oldest = window[-1], window[0]
    assert per_token[newest] == pytest.approx(penalty)
    if oldest not in window[1:]:
        assert ours[0, oldest] == scores[0, oldest]


@pytest.mark.parametrize("top_a", [0.0001, 0.2, 0.6, 1.0])
def test_top_a_removes_below_a_times_max_squared(top_a: float) -> None:
    scores = fixed_logits()
    logits = scores[0].double().numpy()
    probs = softmax(logits)
    expected = np.where(probs < top_a * probs.max() ** 2, -np.inf, logits)
    same(apply_top_a(scores, top_a), expected)


@pytest.mark.parametrize("z", [0.0, 0.3, 0.9, 0.99])
def test_tail_free_follows_the_second_derivative(z: float) -> None:
    for seed in range(4):
        scores = fixed_logits(seed)
        logits = scores[0].double().numpy()
        order = np.argsort(-logits, kind="stable")
        p = softmax(logits)[order]
        d2 = np.abs(p[:-2] - 2 * p[1:-1] + p[2:])
        cumulative = np.cumsum(d2 / d2.sum())
        keep_sorted = np.concatenate([[True], cumulative <= z, [False]])
        expected = logits.copy()
        expected[order[~keep_sorted]] = -np.inf
        same(apply_tail_free(scores, z), expected)


@pytest.mark.parametrize("factor", [0.2, 1.0, 4.0])
def test_smoothing_is_quadratic_around_the_top_logit(factor: float) -> None:
    scores = fixed_logits()
    logits = scores[0].double().numpy()
    top = logits.max()
    same(apply_smoothing(scores, factor), top - factor * (logits - top) ** 2)
    # -inf (removed) stays removed
    removed = apply_top_k(scores, 3)
    assert int(torch.isfinite(apply_smoothing(removed, factor)).sum()) == 3


@pytest.mark.parametrize(("temperature", "spread", "exponent"), [(1.0, 0.5, 1.0), (0.7, 1.2, 2.0)])
def test_dynamic_temperature_follows_the_entropy(
    temperature: float, spread: float, exponent: float
) -> None:
    for scale in (0.3, 3.0):  # a flat and a peaked distribution
        scores = apply_top_k(fixed_logits(scale=scale), 40)
        logits = scores[0].double().numpy()
        p = softmax(logits)
        nz = p[p > 0]
        entropy = -(nz * np.log(nz)).sum()
        normalized = entropy / np.log(len(nz))
        low, high = max(temperature - spread, 0.0), temperature + spread
        t = low + (high - low) * normalized**exponent
        ours = apply_dynamic_temperature(scores, temperature, spread, exponent)
        same(ours, logits / t)


def test_ban_tokens_makes_them_impossible() -> None:
    scores = fixed_logits()
    top = int(scores.argmax())
    banned = ban_tokens(scores, {top, VOCAB + 10})
    assert banned[0, top] == -float("inf") and int(banned.argmax()) != top
    greedy = process_scores(scores, CONTEXT, SamplingParams(temperature=0.0), frozenset({top}))
    assert int(greedy.argmax()) != top


# -- the order ------------------------------------------------------------------------------


def kept(scores: torch.Tensor) -> int:
    return int(torch.isfinite(scores).sum())


def test_sampler_order_changes_the_result_as_it_should() -> None:
    """Temperature before top-p flattens the distribution that top-p cuts, so more tokens
    stay than with top-p first; each result is its two references in that order."""
    scores = fixed_logits()
    base = SamplingParams(temperature=3.0, top_p=0.6)
    hot_first = replace(base, sampler_order=(6, 5, 2, 0, 1, 3, 4))
    cut_first = replace(base, sampler_order=(6, 2, 5, 0, 1, 3, 4))
    a = process_scores(scores, CONTEXT, hot_first)
    b = process_scores(scores, CONTEXT, cut_first)
    same(a, TopPLogitsWarper(0.6)(CONTEXT, TemperatureLogitsWarper(3.0)(CONTEXT, scores.clone())))
    same(b, TemperatureLogitsWarper(3.0)(CONTEXT, TopPLogitsWarper(0.6)(CONTEXT, scores.clone())))
    assert kept(a) > kept(b)
    # top-k after top-a cuts from what top-a left; before, top-a judges the top k alone
    params = SamplingParams(top_k=10, top_a=0.9, temperature=1.0)
    k_first = process_scores(scores, CONTEXT, replace(params, sampler_order=(0, 1, 2, 3, 4, 5, 6)))
    a_first = process_scores(scores, CONTEXT, replace(params, sampler_order=(1, 0, 2, 3, 4, 5, 6)))
    same(k_first, apply_top_a(apply_top_k(scores, 10), 0.9))
    same(a_first, apply_top_k(apply_top_a(scores, 0.9), 10))


def test_repetition_penalty_position_in_the_order() -> None:
    """The penalty (6) before top-k pushes the repeated favourites out of the top 3; after
    it, top-k has already chosen them. An order of the ids 0-5 puts the penalty first."""
    scores = fixed_logits()
    favourites = torch.topk(scores, 2).indices  # [1, 2]: the context repeats them
    assert bool((scores[0, favourites[0]] > 0).all())
    params = SamplingParams(temperature=1.0, top_k=3, repetition_penalty=3.0)
    first, last, six = (
        process_scores(scores, favourites, replace(params, sampler_order=order))
        for order in ((6, 0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5, 6), (0, 1, 2, 3, 4, 5))
    )
    penalised = apply_repetition_penalty(scores, favourites, 3.0)
    same(first, TopKLogitsWarper(3)(favourites, penalised.clone()))
    same(last, RepetitionPenaltyLogitsProcessor(3.0)(favourites, apply_top_k(scores, 3)))
    same(six, first)
    assert all(bool(torch.isfinite(last[0, t])) for t in favourites[0])
    assert not any(bool(torch.isfinite(first[0, t])) for t in favourites[0])


def test_kobold_default_order_and_every_sampler_at_once() -> None:
    """KoboldCpp's default order with every sampler on equals the chain of references."""
    scores = fixed_logits()
    params = SamplingParams(
        temperature=0.9,
        top_k=30,
        top_p=0.95,
        repetition_penalty=1.2,
        rep_pen_range=6,
        rep_pen_slope=0.7,
        top_a=0.05,
        tfs=0.97,
        typical=0.9,
        min_p=0.02,
        smoothing_factor=0.3,
        sampler_order=KOBOLD_SAMPLER_ORDER,
    )
    expected = apply_repetition_penalty(scores, CONTEXT, 1.2, 6, 0.7)
    expected = apply_top_k(expected, 30)
    expected = apply_top_a(expected, 0.05)
    expected = apply_tail_free(expected, 0.97)
    expected = TypicalLogitsWarper(0.9)(CONTEXT, expected.clone())
    expected = apply_min_p(TopPLogitsWarper(0.95)(CONTEXT, expected.clone()), 0.02)
    expected = apply_smoothing(expected, 0.3) / 0.9
    same(process_scores(scores, CONTEXT, params), expected)


def test_off_values_change_nothing() -> None:
    scores = fixed_logits()
    every = SamplingParams(temperature=1.0, sampler_order=(0, 1, 2, 3, 4, 5, 6))
    assert torch.equal(process_scores(scores, CONTEXT, every), scores)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"rep_pen_range": -1}, "rep_pen_range"),
        ({"rep_pen_slope": -0.5}, "rep_pen_slope"),
        ({"top_a": 1.5}, "top_a"),
        ({"tfs": -0.1}, "tfs"),
        ({"typical": 2.0}, "typical"),
        ({"min_p": float("nan")}, "min_p"),
        ({"smoothing_factor": -1.0}, "smoothing_factor"),
        ({"dynatemp_range": -1.0}, "dynatemp_range"),
        ({"dynatemp_exponent": "1"}, "dynatemp_exponent"),
        ({"sampler_order": (0, 1, 2, 3, 4, 4, 6)}, "sampler_order"),
        ({"sampler_order": (0, 1, 2)}, "sampler_order"),
        ({"sampler_order": [6, 0, 1, 3, 4, 2, 5]}, "sampler_order"),
    ],
)
def test_bad_kobold_params_name_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidGenerationInput) as caught:
        SamplingParams(**params)
    assert caught.value.field == field
