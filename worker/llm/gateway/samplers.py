"""The samplers: pure functions over float32 logits [1, V], one per KoboldAI sampler.

Each takes the scores (and what it needs) and returns new scores; a removed token's score
is -inf. `generation.process_scores` applies them in a request's `sampler_order`, whose ids
are KoboldAI's (`protocol.text.SAMPLER_IDS`): 0 top-k, 1 top-a, 2 top-p (then min-p),
3 tail-free, 4 typical, 5 temperature (quadratic smoothing, then the fixed or dynamic
temperature), 6 repetition penalty (then OpenAI's presence and frequency penalties,
`apply_presence_frequency`). The formulas, and where each is described, are in the
README's "KoboldAI samplers".
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

__all__ = [
    "apply_dynamic_temperature",
    "apply_min_p",
    "apply_presence_frequency",
    "apply_repetition_penalty",
    "apply_smoothing",
    "apply_tail_free",
    "apply_top_a",
    "apply_top_k",
    "apply_top_p",
    "apply_typical",
    "ban_tokens",
    "slope_penalties",
]

NEG_INF = -float("inf")


def ban_tokens(scores: torch.Tensor, banned: Iterable[int]) -> torch.Tensor:
    """Make the `banned` tokens (ids inside the vocabulary) impossible."""
    ids = [i for i in banned if 0 <= i < scores.shape[-1]]
    if not ids:
        return scores
    out = scores.clone()
    out[..., ids] = NEG_INF
    return out


def slope_penalties(penalty: float, length: int, slope: float) -> torch.Tensor:
    """The penalty of each of the last `length` positions, oldest first.

    With `slope` 0 every position gets `penalty`. Otherwise a position at x in [-1, 1]
    (oldest -1, newest 1) gets 1 + (w + 1) / 2 * (penalty - 1) with the sigmoid-shaped
    w = slope * x / (1 + |x| * (slope - 1)): 1 for the oldest, `penalty` for the newest,
    and the larger `slope`, the steeper the step between them (1 is a straight line).
    """
    if slope == 0 or length < 2:
        return torch.full((length,), float(penalty))
    x = torch.linspace(-1.0, 1.0, length, dtype=torch.float64)
    w = slope * x / (1 + x.abs() * (slope - 1))
    return (1 + (w + 1) / 2 * (penalty - 1)).float()


def apply_repetition_penalty(
    scores: torch.Tensor,
    context: torch.Tensor,
    penalty: float,
    range_: int = 0,
    slope: float = 0.0,
) -> torch.Tensor:
    """Divide positive (multiply negative) logits of the tokens in `context` [1, L] by the
    penalty: only the last `range_` tokens when `range_` > 0, each by the penalty of its
    newest position there when `slope` > 0 as well (`slope_penalties`)."""
    window = context[:, -range_:] if range_ > 0 else context
    if range_ > 0 and slope > 0:
        per_position = slope_penalties(penalty, window.shape[1], slope).unsqueeze(0)
        # scatter writes positions in order, so a token keeps its newest position's penalty
        factors = torch.ones_like(scores).scatter(1, window, per_position)
    else:
        factors = torch.ones_like(scores).scatter(1, window, float(penalty))
    return torch.where(scores < 0, scores * factors, scores / factors)


def apply_presence_frequency(
    scores: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: logit[j] -= frequency * c[j] + presence * (c[j] > 0), c[j] the
    times token j occurs in `generated` [1, n] (the tokens generated so far)."""
    counts = torch.zeros_like(scores).scatter_add_(
        1, generated, torch.ones(generated.shape, dtype=scores.dtype)
    )
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def apply_top_k(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` highest logits (ties with the k-th included), -inf the rest."""
    k = min(top_k, scores.shape[-1])
    threshold = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < threshold, NEG_INF)


def apply_top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens whose probabilities add up to `top_p` (at least one)."""
    sorted_scores, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return scores.masked_fill(remove, NEG_INF)


def apply_top_a(scores: torch.Tensor, top_a: float) -> torch.Tensor:
    """Remove the tokens whose probability is below `top_a` * (highest probability)^2."""
    probs = scores.softmax(dim=-1)
    threshold = top_a * probs.max(dim=-1, keepdim=True).values ** 2
    return scores.masked_fill(probs < threshold, NEG_INF)


def apply_min_p(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Remove the tokens whose probability is below `min_p` * (highest probability)."""
    probs = scores.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return scores.masked_fill(probs < threshold, NEG_INF)


def apply_tail_free(scores: torch.Tensor, z: float) -> torch.Tensor:
    """Tail-free sampling: sort the probabilities in descending order, take the absolute
    second differences d2[i] = |p[i] - 2 p[i+1] + p[i+2]|, normalise them to sum 1 and keep
    the most likely token plus each token i + 1 whose cumulative normalised d2 up to i is
    at most `z`; the least likely token always goes (it has no second difference)."""
    vocab = scores.shape[-1]
    if vocab < 3:
        return scores
    sorted_scores, sorted_indices = torch.sort(scores, descending=True)
    probs = sorted_scores.softmax(dim=-1)
    d2 = probs.diff(dim=-1).diff(dim=-1).abs()
    total = d2.sum(dim=-1, keepdim=True)
    if float(total.min()) <= 0:  # a flat distribution has no tail to cut
        return scores
    cumulative = (d2 / total).cumsum(dim=-1)
    keep_first = torch.zeros_like(cumulative[..., :1], dtype=torch.bool)
    drop_last = torch.ones_like(cumulative[..., :1], dtype=torch.bool)
    remove_sorted = torch.cat([keep_first, cumulative > z, drop_last], dim=-1)
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return scores.masked_fill(remove, NEG_INF)


def apply_typical(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: rank the tokens by |-log p - H| (H the distribution's
    entropy), and keep them in that order until their probabilities add up to `mass`
    (the token that reaches it included, at least one)."""
    log_probs = scores.log_softmax(dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).nansum(dim=-1, keepdim=True)
    surprise_gap = (-log_probs - entropy).abs()
    sorted_gap, sorted_indices = torch.sort(surprise_gap, descending=False)
    cumulative = probs.gather(-1, sorted_indices).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp(max=scores.shape[-1] - 1)
    remove_sorted = sorted_gap > sorted_gap.gather(-1, last)
    remove_sorted[..., :1] = False
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return scores.masked_fill(remove, NEG_INF)


def apply_smoothing(scores: torch.Tensor, factor: float) -> torch.Tensor:
    """Quadratic sampling: each finite logit l becomes m - factor * (l - m)^2, m the
    highest logit (below 1 flattens the distribution, above 1 sharpens it)."""
    top = scores.max(dim=-1, keepdim=True).values
    smoothed = top - factor * (scores - top) ** 2
    return torch.where(torch.isfinite(scores), smoothed, scores)


def apply_dynamic_temperature(
    scores: torch.Tensor, temperature: float, spread: float, exponent: float
) -> torch.Tensor:
    """Entropy-driven temperature: T = lo + (hi - lo) * (H / log N)^exponent with
    lo = max(temperature - spread, 0), hi = temperature + spread, H the entropy of the
    distribution and N the number of tokens still possible; the logits are divided by T
    (T = 0 keeps only the most likely token)."""
    log_probs = scores.log_softmax(dim=-1)
    probs = log_probs.exp()
    possible = int(torch.isfinite(scores).sum())
    if possible < 2:
        return scores
    entropy = float(-(probs * log_probs).nansum())
    normalized = min(max(entropy / math.log(possible), 0.0), 1.0)
    low, high = max(temperature - spread, 0.0), temperature + spread
    dyn = low + (high - low) * normalized**exponent
    if dyn <= 0:
        return scores.masked_fill(scores < scores.max(), NEG_INF)
    scaled: torch.Tensor = scores / dyn
    return scaled
