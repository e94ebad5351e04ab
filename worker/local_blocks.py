"""All decoder layers of a model, run in this process: a `step` for `generation.generate`.

In production the step is a swarm inference session over volunteer block servers; this
local version is the reference that tests compare against and the baseline of the
benchmarks. It keeps one `DynamicCache`, so each call continues the same sequence.

Standalone decoder layers need three things the full model normally supplies (all seen to
fail silently on this stack when missing): an attention implementation
(`config._attn_implementation = "sdpa"`), rotary position embeddings computed from the
absolute positions, and an explicit causal mask aligned to the end of the cached keys for
steps of several tokens (sdpa's own causal flag aligns top-left, which is wrong after a
cached prefix).
"""

from __future__ import annotations

from pathlib import Path

import torch

from worker.lm_head import SafetensorsCheckpoint, architecture_for, load_config

__all__ = ["LocalBlocks", "causal_mask"]

LAYER_PREFIX = "model.layers."


def causal_mask(past: int, new: int, window: int | None = None) -> torch.Tensor:
    """Boolean mask [1, 1, new, past + new]: query j sees keys up to `past + j`.

    With a sliding `window`, it sees only the last `window` of those (as transformers does).
    """
    query = torch.arange(past, past + new)[:, None]
    key = torch.arange(past + new)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= query - key < window
    return allowed[None, None]


class LocalBlocks:
    """Every decoder layer of a model with one attention cache; `await blocks(hidden)` steps."""

    def __init__(self, config: object, layers: list[torch.nn.Module], rotary: torch.nn.Module):
        self.config = config
        self.layers = layers
        self.rotary = rotary
        self.windows = [_window(config, i) for i in range(len(layers))]
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

    async def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        # Runs on the caller's thread: this is a test and benchmark tool, not a server.
        return self.forward(hidden)


def _window(config: object, index: int) -> int | None:
    """The sliding attention window of layer `index`, None for full attention."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if getattr(config, "model_type", None) == "mistral" or layer_types is None:
        return int(window)
    return int(window) if layer_types[index] == "sliding_attention" else None
