"""Several sessions' steps through a span as one batched forward (cross-session batching).

Each session keeps its own attention cache (`blocks.new_cache()`); for one batched pass
`_BatchCache` stands in for the layers' cache: every layer appends each session's new keys
and values to that session's own cache and attends over the sessions' keys left-padded to
the longest. The mask (`batch_mask`) is the explicit causal mask of each session aligned to
the end of its own keys (see STACK.md), with the padding hidden; positions (and so the
rotary embeddings) are each session's own. The steps of one batch must have the same
number of new tokens (decode steps: one each); `forward_batch`'s caller groups them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from worker.llm.swarm.blocks import BlockSpan

__all__ = ["batch_mask", "forward_batch"]


def batch_mask(pasts: Sequence[int], new: int, window: int | None) -> torch.Tensor:
    """Boolean mask [B, 1, new, L] (L = longest past + new) over left-padded keys: query j
    of session b (absolute position pasts[b] + j) sees that session's keys up to its own
    position (and within `window`), never another row's padding."""
    longest = max(pasts) + new
    rows = []
    for past in pasts:
        pad = longest - (past + new)
        query = torch.arange(past, past + new)[:, None]
        key = torch.arange(-pad, past + new)[None, :]  # padding has negative positions
        allowed = (key >= 0) & (key <= query)
        if window is not None:
            allowed &= query - key < window
        rows.append(allowed)
    return torch.stack(rows)[:, None]


class _BatchCache:
    """What a decoder layer needs of its cache (`update`), over the sessions' own caches."""

    def __init__(self, caches: Sequence[Any]) -> None:
        self._caches = caches

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for row, cache in enumerate(self._caches):
            k, v = cache.update(key_states[row : row + 1], value_states[row : row + 1], layer_idx)
            keys.append(k)
            values.append(v)
        longest = max(k.shape[-2] for k in keys)
        return _left_pad(keys, longest), _left_pad(values, longest)


def _left_pad(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    first = tensors[0]
    out = first.new_zeros(len(tensors), first.shape[1], length, first.shape[3])
    for row, tensor in enumerate(tensors):
        out[row, :, length - tensor.shape[-2] :] = tensor[0]
    return out


def forward_batch(
    span: BlockSpan,
    hiddens: Sequence[torch.Tensor],
    caches: Sequence[Any],
    pasts: Sequence[int],
    start: int,
    end: int,
) -> list[torch.Tensor]:
    """Hidden states [1, n, H] of several sessions (same n) -> their outputs of block
    `end - 1`, each [1, n, H], as `span.forward` gives them one by one (up to float rounding
    of the batched arithmetic). Each session's cache holds its `pasts[b]` earlier tokens."""
    if not hiddens:
        return []
    if len(hiddens) == 1:
        return [span.forward(hiddens[0], caches[0], past=pasts[0], start=start, end=end)]
    if not span.start <= start < end <= span.end:
        raise ValueError(f"blocks {start}:{end} are not within {span.start}:{span.end}")
    new = hiddens[0].shape[1]
    for hidden in hiddens:
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] != new:
            raise ValueError(f"a batch takes [1, {new}, H] per session, got {tuple(hidden.shape)}")
        if hidden.shape[-1] != span.hidden_size:
            raise ValueError(
                f"expected hidden states [1, n, {span.hidden_size}], got {tuple(hidden.shape)}"
            )
    with torch.inference_mode():
        hidden = torch.cat([h.to(span.device, span.dtype) for h in hiddens])
        positions = torch.stack(
            [torch.arange(past, past + new, device=span.device) for past in pasts]
        )
        position_embeddings = span.rotary(hidden, positions)
        cache: Any = _BatchCache(caches)
        masks: dict[int | None, torch.Tensor] = {}
        for offset in range(start - span.start, end - span.start):
            window = span.windows[offset]
            if window not in masks:
                masks[window] = batch_mask(pasts, new, window).to(span.device)
            hidden = span.layers[offset](
                hidden,
                attention_mask=masks[window],
                position_ids=positions,
                cache=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
    hidden = hidden.cpu()
    return [hidden[row : row + 1] for row in range(len(hiddens))]
