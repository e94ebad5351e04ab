"""All decoder layers of a model, run in this process: a `step` for `generate`.

In production the step is a swarm inference session over volunteer block servers; this
local version is the reference that tests compare against. It keeps one `DynamicCache`, so
each call continues the same sequence. It uses the same standalone-layer recipe as the
block servers (`worker.llm.architecture`), but its own loading and loop, so a test that
compares it with transformers' model checks that recipe independently of `BlockSpan`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from worker.llm.architecture import (
    LAYER_PREFIX,
    architecture_for,
    causal_mask,
    load_config,
    sliding_window,
)
from worker.llm.checkpoint import SafetensorsCheckpoint
from worker.llm.swarm.blocks import truncate_cache

__all__ = ["LocalBlocks"]


class LocalBlocks:
    """Every decoder layer of a model with one attention cache; `await blocks(hidden)` steps."""

    def __init__(self, config: object, layers: list[torch.nn.Module], rotary: torch.nn.Module):
        self.config = config
        self.layers = layers
        self.rotary = rotary
        self.windows = [sliding_window(config, i) for i in range(len(layers))]
        self.cache = self._new_cache()
        # tokens already in the cache
        self.position = 0

    @classmethod
    def load(cls, model_dir: Path, dtype: torch.dtype | None = None) -> LocalBlocks:
        """Read the decoder layers of `model_dir` (`dtype` None keeps the stored dtype)."""
        config = load_config(Path(model_dir))
        config._attn_implementation = "sdpa"
        architecture = architecture_for(config)
        checkpoint = SafetensorsCheckpoint.open(Path(model_dir))
        layers = []
        for index in range(config.num_hidden_layers):
            prefix = f"{LAYER_PREFIX}{index}."
            keys = [key for key in checkpoint.files_by_key if key.startswith(prefix)]
            tensors = checkpoint.load(keys, dtype)
            with torch.device("meta"):
                layer = architecture.decoder_layer(config, layer_idx=index)
            state = {key.removeprefix(prefix): tensor for key, tensor in tensors.items()}
            layer.load_state_dict(state, strict=True, assign=True)
            layers.append(layer.requires_grad_(False).eval())
        rotary = architecture.rotary_embedding(config=config)
        return cls(config, layers, rotary)

    def _new_cache(self) -> object:
        from transformers import DynamicCache

        # without a config every layer keeps all keys; sliding windows are applied by the mask
        return DynamicCache()

    def reset(self) -> None:
        """Forget the sequence: the next step starts at position 0."""
        self.cache = self._new_cache()
        self.position = 0

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of the new tokens [1, n, H] -> last layer's outputs [1, n, H]."""
        if hidden.dim() != 3 or hidden.shape[0] != 1:
            raise ValueError(
                f"expected hidden states of shape [1, n, H], got {tuple(hidden.shape)}"
            )
        new = hidden.shape[1]
        positions = torch.arange(self.position, self.position + new)[None]
        position_embeddings = self.rotary(hidden, positions)
        masks: dict[int | None, torch.Tensor | None] = {}
        for layer, window in zip(self.layers, self.windows, strict=True):
            if window not in masks:
                full_view = new == 1 and (window is None or self.position < window)
                masks[window] = None if full_view else causal_mask(self.position, new, window)
            hidden = layer(
                hidden,
                attention_mask=masks[window],
                position_ids=positions,
                cache=self.cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
        self.position += new
        return hidden

    async def __call__(
        self, hidden: torch.Tensor, start_position: int | None = None
    ) -> torch.Tensor:
        """A step; `start_position` cuts the cache back first (as a session's step does)."""
        # Runs on the caller's thread: this is a test and benchmark tool, not a server.
        if start_position is not None and start_position != self.position:
            if not 0 <= start_position < self.position:
                raise ValueError(f"cannot roll back to {start_position} of {self.position}")
            truncate_cache(self.cache, start_position)
            self.position = start_position
        return self.forward(hidden)
