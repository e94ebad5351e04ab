"""The text gateway's share of an LLM: token embeddings, the final norm and the LM head.

The decoder layers live on volunteer block servers; the gateway only turns token ids into
hidden states (`LMHead.embed`) and the last block's outputs into logits (`LMHead.logits`).
`LMHead.load` reads just those tensors from the model's safetensors, never a decoder layer,
so a gateway for a 70B model needs memory for about 2 × vocab × hidden parameters.

`SafetensorsCheckpoint` resolves tensor names to files (single `model.safetensors` or a
sharded `model.safetensors.index.json`) and reads shapes from the file headers without
loading data; `architecture_for` maps a config to the transformers classes of its family.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedConfig

from worker.errors import ModelNotFound, UnsafeWeights, UnsupportedArchitecture

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Architecture",
    "LMHead",
    "SafetensorsCheckpoint",
    "architecture_for",
    "load_config",
]

logger = logging.getLogger(__name__)

# model_type (config.json) -> transformers module and class-name prefix of that family.
_FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3"),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)

EMBED_KEY = "model.embed_tokens.weight"
NORM_KEY = "model.norm.weight"
HEAD_KEY = "lm_head.weight"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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


def _read_header(path: Path) -> dict[str, dict[str, object]]:
    """A safetensors file's JSON header (names, dtypes, shapes), without touching the data."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header: dict[str, dict[str, object]] = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header


class SafetensorsCheckpoint:
    """The safetensors files of a model folder: which file holds which tensor, and shapes."""

    def __init__(self, model_dir: Path, files_by_key: dict[str, Path]) -> None:
        self.model_dir = model_dir
        self.files_by_key = files_by_key

    @classmethod
    def open(cls, model_dir: Path) -> SafetensorsCheckpoint:
        model_dir = Path(model_dir)
        index = model_dir / INDEX_FILE
        single = model_dir / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls(model_dir, {key: model_dir / name for key, name in weight_map.items()})
        if single.is_file():
            return cls(model_dir, {key: single for key in _read_header(single)})
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
            raise UnsafeWeights(
                f"{model_dir} has only pickle-based weights; convert them to safetensors"
            )
        raise ModelNotFound(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")

    def __contains__(self, key: str) -> bool:
        return key in self.files_by_key

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, read from the file headers only."""
        shapes: dict[str, tuple[int, ...]] = {}
        for path in sorted(set(self.files_by_key.values())):
            for key, info in _read_header(path).items():
                shape = info["shape"]
                assert isinstance(shape, list)
                shapes[key] = tuple(int(n) for n in shape)
        return shapes

    def param_count(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes().values())

    def load(
        self, keys: Iterable[str], dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """The named tensors (opening only the files that hold them), cast to `dtype` if given."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self.files_by_key:
                raise ModelNotFound(
                    f"tensor {key!r} is missing from the weights in {self.model_dir}"
                )
            by_file.setdefault(self.files_by_key[key], []).append(key)
        tensors: dict[str, torch.Tensor] = {}
        for path, file_keys in by_file.items():
            with safe_open(str(path), framework="pt") as file:
                for key in file_keys:
                    tensor = file.get_tensor(key)
                    tensors[key] = tensor if dtype is None else tensor.to(dtype)
        return tensors


class LMHead:
    """Embeddings, final norm and LM head of a decoder-only LM, without its decoder layers."""

    def __init__(
        self,
        config: PreTrainedConfig,
        embed_weight: torch.Tensor,
        norm: torch.nn.Module,
        head_weight: torch.Tensor,
        *,
        param_count: int,
        loaded_keys: tuple[str, ...],
        eos_token_ids: frozenset[int],
    ) -> None:
        self.config = config
        self.embed_weight = embed_weight
        self.norm = norm
        self.head_weight = head_weight
        # parameters of the whole model (all blocks included), from the safetensors headers
        self.param_count = param_count
        # the tensor names actually read from disk
        self.loaded_keys = loaded_keys
        # end-of-sequence ids from config.json and generation_config.json
        self.eos_token_ids = eos_token_ids

    @classmethod
    def load(
        cls, model_dir: Path, dtype: torch.dtype | None = None, threads: int | None = None
    ) -> LMHead:
        """Read the head tensors of `model_dir`; `dtype` None keeps the stored dtype.

        `threads` sets torch's intra-op thread count for this process (None leaves it).
        """
        model_dir = Path(model_dir)
        if threads is not None:
            torch.set_num_threads(threads)
        config = load_config(model_dir)
        architecture = architecture_for(config)
        checkpoint = SafetensorsCheckpoint.open(model_dir)
        tied = bool(getattr(config, "tie_word_embeddings", False)) or HEAD_KEY not in checkpoint
        keys = (EMBED_KEY, NORM_KEY) if tied else (EMBED_KEY, NORM_KEY, HEAD_KEY)
        tensors = checkpoint.load(keys, dtype)
        embed = tensors[EMBED_KEY]
        norm = architecture.rms_norm(config.hidden_size, eps=config.rms_norm_eps)
        norm.load_state_dict({"weight": tensors[NORM_KEY]})
        norm.to(embed.dtype).requires_grad_(False).eval()
        logger.info("loaded LM head of %s (%s, tied=%s)", model_dir, architecture.model_type, tied)
        return cls(
            config,
            embed,
            norm,
            embed if tied else tensors[HEAD_KEY],
            param_count=checkpoint.param_count(),
            loaded_keys=keys,
            eos_token_ids=_eos_ids(model_dir, config),
        )

    @property
    def num_blocks(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.embed_weight.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_weight.dtype

    @property
    def loaded_param_count(self) -> int:
        norm_params = sum(p.numel() for p in self.norm.parameters())
        head_params = 0 if self.head_weight is self.embed_weight else self.head_weight.numel()
        return self.embed_weight.numel() + head_params + norm_params

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [1, n] -> hidden states [1, n, H] in the head's dtype."""
        return F.embedding(ids, self.embed_weight)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last-block outputs [1, n, H] -> float32 logits [1, n, V] (final norm, then head)."""
        normed = self.norm(hidden.to(self.dtype))
        return F.linear(normed, self.head_weight).float()


def _eos_ids(model_dir: Path, config: PreTrainedConfig) -> frozenset[int]:
    ids: set[int] = set()
    sources: list[object] = [getattr(config, "eos_token_id", None)]
    generation_config = model_dir / "generation_config.json"
    if generation_config.is_file():
        sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
