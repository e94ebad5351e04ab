"""The text gateway's share of an LLM: token embeddings, the final norm and the LM head.

The decoder layers live on volunteer block servers; the gateway only turns token ids into
hidden states (`LMHead.embed`) and the last block's outputs into logits (`LMHead.logits`).
`LMHead.load` reads just those tensors from the model's safetensors, never a decoder layer,
so a gateway for a 70B model needs memory for about 2 × vocab × hidden parameters.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedConfig

from worker.llm.architecture import architecture_for, load_config
from worker.llm.checkpoint import SafetensorsCheckpoint

__all__ = ["LMHead"]

logger = logging.getLogger(__name__)

EMBED_KEY = "model.embed_tokens.weight"
NORM_KEY = "model.norm.weight"
HEAD_KEY = "lm_head.weight"


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
