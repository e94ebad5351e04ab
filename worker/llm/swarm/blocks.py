"""A span of decoder layers [start, end) of a model, loaded and run on its own.

Only the tensors of the span are read from the safetensors files; the embeddings, the final
norm and the LM head stay with the text gateway (`worker.llm.gateway.lm_head`). What
standalone layers need from the full model (see STACK.md and `worker.llm.architecture`):
an attention implementation (`"sdpa"`), rotary position embeddings computed from the
absolute positions, and an explicit causal mask aligned to the end of the cached keys.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from worker.errors import ModelError
from worker.llm.architecture import (
    LAYER_PREFIX,
    architecture_for,
    causal_mask,
    load_config,
    sliding_window,
)
from worker.llm.checkpoint import SafetensorsCheckpoint
from worker.llm.swarm.quant import CUDA_QUANTS, quantize_layers

__all__ = ["BlockSpan", "ModelInfo", "cache_length", "new_cache", "truncate_cache"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder holds, read from config.json and the safetensors headers only."""

    # the model's name in the swarm (the folder's name unless given)
    name: str
    # config.json `architectures[0]` (e.g. LlamaForCausalLM), else its model_type
    architecture: str
    # decoder layers ("blocks") of the model
    num_blocks: int
    hidden_size: int
    # parameters of the whole model, counted from the safetensors headers
    param_count: int
    # dtype of the stored decoder weights, e.g. "float32", "bfloat16"
    dtype: str

    @classmethod
    def read(cls, model_dir: Path, name: str | None = None) -> ModelInfo:
        """Describe `model_dir`; UnsupportedArchitecture for a family we cannot run."""
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        architecture_for(config)
        checkpoint = SafetensorsCheckpoint.open(model_dir)
        shapes = checkpoint.shapes()
        dtype = _stored_dtype(checkpoint, f"{LAYER_PREFIX}0.")
        architectures = getattr(config, "architectures", None) or [config.model_type]
        return cls(
            name=name or model_dir.resolve().name,
            architecture=str(architectures[0]),
            num_blocks=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            param_count=sum(_numel(shape) for shape in shapes.values()),
            dtype=dtype,
        )


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


_SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
}


def _stored_dtype(checkpoint: SafetensorsCheckpoint, prefix: str) -> str:
    """The dtype of the first stored tensor under `prefix`, as a torch dtype name."""
    for key, path in sorted(checkpoint.files_by_key.items()):
        if key.startswith(prefix):
            with safe_open(str(path), framework="pt") as file:
                code = str(file.get_slice(key).get_dtype())
            return _SAFETENSORS_DTYPES.get(code, code.lower())
    raise ModelError(f"{checkpoint.model_dir} has no tensors named {prefix}*")


def new_cache() -> Any:
    """An empty attention cache for one session of a span.

    Without a config every cache layer keeps all keys; sliding windows come from the mask.
    Cache layers are created lazily, so a session that enters a span past its first block
    simply leaves the earlier cache layers empty.
    """
    from transformers import DynamicCache

    return DynamicCache()


def cache_length(cache: Any) -> int:
    """Tokens held by a `new_cache()` (the longest of its layers; unused layers hold none)."""
    return max((int(layer.get_seq_length()) for layer in cache.layers), default=0)


def truncate_cache(cache: Any, length: int) -> None:
    """Cut a `new_cache()` to its first `length` tokens (a rollback: speculative decoding's
    rejected drafts, a conversation cut back to a common prefix)."""
    if length < 0:
        raise ValueError(f"cannot cut a cache to {length} tokens")
    for layer in cache.layers:
        extra = int(layer.get_seq_length()) - length
        if extra > 0:
            layer.crop(-extra)


class BlockSpan:
    """Decoder layers [start, end) of a model, ready for inference on CPU or GPU."""

    def __init__(
        self,
        config: Any,
        layers: list[torch.nn.Module],
        rotary: torch.nn.Module,
        start: int,
        end: int,
    ) -> None:
        self.config = config
        self.layers = layers
        self.start = start
        self.end = end
        self.windows = [sliding_window(config, index) for index in range(start, end)]
        # the dtype of the span's float tensors (a quantized weight may be stored as int8)
        # and the device it runs on (the GPU for bitsandbytes' quantizations)
        floats = [p for p in layers[0].parameters() if p.is_floating_point()]
        self.dtype = floats[0].dtype
        self.device = floats[0].device
        self.rotary = rotary.to(self.device)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        start: int,
        end: int,
        dtype: torch.dtype | None = None,
        quant: str = "none",
    ) -> BlockSpan:
        """Read layers [start, end) of `model_dir` (`dtype` None keeps the stored dtype),
        quantized as `quant` says (`worker.llm.swarm.quant`)."""
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        architecture = architecture_for(config)
        num_blocks = int(config.num_hidden_layers)
        if not 0 <= start < end <= num_blocks:
            raise ModelError(
                f"blocks {start}:{end} are outside the model's {num_blocks} blocks; "
                f"use START:END with 0 <= START < END <= {num_blocks}"
            )
        config._attn_implementation = "sdpa"
        checkpoint = SafetensorsCheckpoint.open(model_dir)
        began = time.perf_counter()
        layers = []
        for index in range(start, end):
            prefix = f"{LAYER_PREFIX}{index}."
            keys = [key for key in checkpoint.files_by_key if key.startswith(prefix)]
            if not keys:
                raise ModelError(f"{model_dir} has no weights for block {index} ({prefix}*)")
            tensors = checkpoint.load(keys, dtype)
            # Built with the model-wide index so per-layer settings (sliding or full
            # attention) come from config.layer_types; the cache index is span-local.
            with torch.device("meta"):
                layer = architecture.decoder_layer(config, layer_idx=index)
            state = {key.removeprefix(prefix): tensor for key, tensor in tensors.items()}
            layer.load_state_dict(state, strict=True, assign=True)
            attention: Any = layer.self_attn
            attention.layer_idx = index - start
            layers.append(layer.requires_grad_(False).eval())
        if quant in CUDA_QUANTS:
            # bitsandbytes computes in 16 bits (Petals' spans do too)
            half = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
            layers = [layer.to(half) for layer in layers]
        quantize_layers(layers, quant)
        rotary = architecture.rotary_embedding(config=config)
        log.info(
            "loaded blocks %d:%d of %s in %.2fs (quantization: %s)",
            start,
            end,
            model_dir,
            time.perf_counter() - began,
            quant,
        )
        return cls(config, layers, rotary, start, end)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: Any | None,
        *,
        past: int | None = None,
        start: int | None = None,
        end: int | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, n, H] of new tokens -> outputs of block `end - 1`, same shape.

        `cache` (a `new_cache()`, or None for a stateless pass) holds the keys of the `past`
        tokens before these; `past` defaults to the cache's length. `start`/`end` select a
        sub-range of this span (absolute block indices).
        """
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks {start}:{end} are not within {self.start}:{self.end}")
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"expected hidden states [B, n, {self.hidden_size}], got {tuple(hidden.shape)}"
            )
        if past is None:
            past = 0 if cache is None else int(cache.get_seq_length(start - self.start))
        new = hidden.shape[1]
        with torch.inference_mode():
            hidden = hidden.to(self.device, self.dtype)
            positions = torch.arange(past, past + new, device=self.device)[None]
            position_embeddings = self.rotary(hidden, positions)
            masks: dict[int | None, torch.Tensor | None] = {}
            for offset in range(start - self.start, end - self.start):
                window = self.windows[offset]
                if window not in masks:
                    # One new token that may see every cached key needs no mask (as in
                    # transformers' own decoding step); saves building one per step.
                    sees_all = new == 1 and (window is None or past < window)
                    mask = None if sees_all else causal_mask(past, new, window)
                    masks[window] = None if mask is None else mask.to(self.device)
                mask = masks[window]
                hidden = self.layers[offset](
                    hidden,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=cache is not None,
                    position_embeddings=position_embeddings,
                )
        return hidden.cpu()

    def measure_throughput(self, steps: int = 16, prefix: int = 8) -> float:
        """Tokens per second through the whole span, one token per step after a short prefix."""
        cache = new_cache()
        hidden = torch.zeros(1, prefix, self.hidden_size, dtype=self.dtype)
        self.forward(hidden, cache, past=0)
        token = torch.zeros(1, 1, self.hidden_size, dtype=self.dtype)
        began = time.perf_counter()
        for step in range(steps):
            self.forward(token, cache, past=prefix + step)
        return steps / max(time.perf_counter() - began, 1e-9)
