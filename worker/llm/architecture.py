"""The LLM families we run, and what standalone decoder layers need from the full model.

`architecture_for` maps a transformers config to the classes of its family; `load_config`
reads a local model folder's config after checking its family. Block servers
(`worker.llm.swarm.blocks`) and the gateway's head (`worker.llm.gateway.lm_head`) both
build on these.

Standalone decoder layers need three things the full model normally supplies (all seen to
fail silently on this stack when missing): an attention implementation
(`config._attn_implementation = "sdpa"`), rotary position embeddings computed from the
absolute positions, and an explicit causal mask aligned to the end of the cached keys for
steps of several tokens (`causal_mask`; sdpa's own causal flag aligns top-left, which is
wrong after a cached prefix).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedConfig

from worker.errors import ModelNotFound, UnsupportedArchitecture

__all__ = [
    "LAYER_PREFIX",
    "SUPPORTED_MODEL_TYPES",
    "Architecture",
    "architecture_for",
    "causal_mask",
    "load_config",
    "sliding_window",
]

# model_type (config.json) -> transformers module and class-name prefix of that family.
_FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3"),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)

# tensor names of decoder layer i start with f"{LAYER_PREFIX}{i}."
LAYER_PREFIX = "model.layers."


@dataclass(frozen=True)
class Architecture:
    """The transformers classes that make up one model family."""

    model_type: str
    rms_norm: type[torch.nn.Module]
    decoder_layer: type[torch.nn.Module]
    rotary_embedding: type[torch.nn.Module]


def architecture_for(config: PreTrainedConfig) -> Architecture:
    """The classes for `config.model_type`; UnsupportedArchitecture for other families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; "
            f"use a model of type {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    module_name, prefix = _FAMILIES[model_type]
    module = importlib.import_module(module_name)
    return Architecture(
        model_type=model_type,
        rms_norm=getattr(module, f"{prefix}RMSNorm"),
        decoder_layer=getattr(module, f"{prefix}DecoderLayer"),
        rotary_embedding=getattr(module, f"{prefix}RotaryEmbedding"),
    )


def load_config(model_dir: Path) -> PreTrainedConfig:
    """The transformers config of a local model folder, after checking its family."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ModelNotFound(f"{config_file} does not exist; point at a transformers model folder")
    try:
        raw = json.loads(config_file.read_text())
        model_type = raw["model_type"]
    except (ValueError, KeyError) as exc:
        raise ModelNotFound(f"{config_file} is not a transformers config ({exc})") from exc
    if model_type not in _FAMILIES:
        raise UnsupportedArchitecture(
            f"{config_file} has model_type {model_type!r}; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    config: PreTrainedConfig = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    return config


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


def sliding_window(config: Any, index: int) -> int | None:
    """The sliding attention window of layer `index`, None for full attention."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and getattr(config, "model_type", None) != "mistral":
        return int(window) if layer_types[index] == "sliding_attention" else None
    return int(window)
