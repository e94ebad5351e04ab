"""SDXL pipelines written as one original-layout (Stability "sgm") `.safetensors` file.

`write_sdxl_single_file(folder, out)` turns a diffusers StableDiffusionXLPipeline folder
(such as the tiny `sdxl`) into the single file SDXL was published as, and an SDXL refiner
folder (StableDiffusionXLImg2ImgPipeline with only the second text encoder, such as the
tiny `sdxl-refiner`) into the refiner's, to exercise `from_single_file` with `config=`:

- the UNet under `model.diffusion_model.` in the original block numbering
  (`input_blocks`, `middle_block`, `output_blocks`; the size conditioning's MLP, diffusers'
  `add_embedding`, is `label_emb.0.0` and `label_emb.0.2`), as for SD 1
  (`worker.models.tiny_models.write_single_file_checkpoint`, whose tables this reuses);
- the VAE under `first_stage_model.` (attention projections as 1x1 convolutions);
- OpenAI's CLIP (the base's first text encoder) under `conditioner.embedders.0.transformer.`
  in Hugging Face's layout, as it was trained;
- OpenCLIP (the second text encoder: the base's embedder 1, the refiner's only one,
  embedder 0) under `conditioner.embedders.N.model.` in OpenCLIP's own layout: one
  `attn.in_proj_weight` holding the query, key and value projections stacked, `ln_1`/`ln_2`,
  `mlp.c_fc`/`mlp.c_proj`, `positional_embedding` (a bare parameter), `ln_final`, and
  `text_projection` applied as `x @ text_projection`, that is the transposed weight of
  Hugging Face's `text_projection` linear layer.

Like any single file it holds only weights: loading it back needs the folder as `config`.

diffusers' loader tells the base's two text encoders apart by width (OpenAI's CLIP ViT-L is
768 wide, OpenCLIP ViT-bigG 1280): given the second encoder, it takes embedder 0's weights
when their width is the second encoder's. In the tiny SDXL both are 32 wide, so its single
file would load with the first encoder's weights in the second's place.
`build_tiny_sdxl_wide(sdxl_dir, out_dir)` therefore makes the tiny SDXL with a wider
(48) second encoder, whose projection (to 32) is no longer square either, as SDXL's own
differ; the refiner has one encoder and needs no such variant.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import cast

import torch
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import save_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from worker.models.tiny_models import (
    SEED,
    _load,
    _rename,
    _tiny_clip_config,
    _tiny_xl_unet,
    _unet_prefixes,
    _vae_prefixes,
)

__all__ = ["WIDE_SECOND_ENCODER", "build_tiny_sdxl_wide", "write_sdxl_single_file"]

# the width of `build_tiny_sdxl_wide`'s second text encoder (the first's is 32)
WIDE_SECOND_ENCODER = 48

_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX = "first_stage_model."
_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
_OPEN_CLIP_PREFIX = "conditioner.embedders.{index}.model."

# the size (or aesthetic score) conditioning's MLP: a linear, SiLU, a linear
_UNET_ADDED: dict[str, tuple[str, dict[str, str]]] = {
    "add_embedding.linear_1.": ("label_emb.0.0.", {}),
    "add_embedding.linear_2.": ("label_emb.0.2.", {}),
}
# Hugging Face CLIP encoder layer -> OpenCLIP residual block (inside `transformer.resblocks.N.`)
_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def write_sdxl_single_file(folder: Path, out_file: Path) -> None:
    """Write the SDXL pipeline (or refiner) in `folder` as one original-layout file."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))

    def present(component: str) -> bool:
        value = index.get(component)
        return isinstance(value, list) and value[0] is not None

    if not present("text_encoder_2"):
        raise ValueError(f"{folder} is not an SDXL pipeline: it has no text_encoder_2")
    out = {**_unet(folder), **_vae(folder)}
    if present("text_encoder"):  # a base: OpenAI's CLIP is embedder 0, OpenCLIP embedder 1
        for key, tensor in _load(folder / "text_encoder" / "model.safetensors").items():
            out[_CLIP_PREFIX + key.removeprefix("text_model.")] = tensor
        open_clip = _OPEN_CLIP_PREFIX.format(index=1)
    else:  # a refiner: OpenCLIP alone, embedder 0
        open_clip = _OPEN_CLIP_PREFIX.format(index=0)
    weights = _load(folder / "text_encoder_2" / "model.safetensors")
    for key, tensor in _open_clip(weights).items():
        out[open_clip + key] = tensor
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {key: out[key].contiguous() for key in sorted(out)}, out_file, metadata={"format": "pt"}
    )


def _config(path: Path) -> dict[str, object]:
    config: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    return config


def _unet(folder: Path) -> dict[str, torch.Tensor]:
    table = {**_unet_prefixes(_config(folder / "unet" / "config.json")), **_UNET_ADDED}
    weights = _load(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return {_UNET_PREFIX + _rename(key, table, "UNet")[0]: value for key, value in weights.items()}


def _vae(folder: Path) -> dict[str, torch.Tensor]:
    table = _vae_prefixes(_config(folder / "vae" / "config.json"))
    out = {}
    for key, tensor in _load(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        name, is_attention = _rename(key, table, "VAE")
        # The original VAE attention uses 1x1 convolutions where diffusers uses linears.
        out[_VAE_PREFIX + name] = (
            tensor[:, :, None, None] if is_attention and tensor.ndim == 2 else tensor
        )
    return out


def _open_clip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIPTextModelWithProjection state dict in OpenCLIP's layout."""
    out: dict[str, torch.Tensor] = {}
    attention: dict[str, dict[str, torch.Tensor]] = {}  # block prefix -> "q.weight" -> tensor
    for full_key, tensor in weights.items():
        if full_key == "text_projection.weight":
            # (OpenCLIP multiplies x @ text_projection: the linear layer's weight transposed)
            out["text_projection"] = tensor.T
            continue
        key = full_key.removeprefix("text_model.")
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = tensor
            continue
        layer, _, rest = key.removeprefix("encoder.layers.").partition(".")
        if not key.startswith("encoder.layers.") or not layer.isdigit():
            raise KeyError(f"no OpenCLIP name for text encoder weight {full_key!r}")
        block = f"transformer.resblocks.{layer}."
        projection, _, kind = rest.removeprefix("self_attn.").partition(".")
        if rest.startswith("self_attn.") and projection in ("q_proj", "k_proj", "v_proj"):
            attention.setdefault(block, {})[f"{projection[0]}.{kind}"] = tensor
            continue
        for old, new in _OPEN_CLIP_LAYER.items():
            if rest.startswith(old):
                out[block + new + rest[len(old) :]] = tensor
                break
        else:
            raise KeyError(f"no OpenCLIP name for text encoder weight {full_key!r}")
    for block, parts in attention.items():
        for kind in ("weight", "bias"):
            # one projection to query, key and value stacked, in that order
            out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts[f"{p}.{kind}"] for p in "qkv"])
    return out


def build_tiny_sdxl_wide(sdxl_dir: Path, out_dir: Path) -> None:
    """Write to `out_dir` the tiny SDXL in `sdxl_dir` (tokenizers, first text encoder, VAE,
    scheduler) with a second text encoder `WIDE_SECOND_ENCODER` wide, projecting to 32, and
    a UNet for the wider context (see the module), seeded as the tiny SDXL."""
    shutil.copytree(sdxl_dir, out_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(out_dir / "tokenizer_2", local_files_only=True)
    config = _tiny_clip_config(tokenizer_2, "gelu")
    config.hidden_size = WIDE_SECOND_ENCODER
    torch.manual_seed(SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(config)
    first_width = int(_config(sdxl_dir / "text_encoder" / "config.json")["hidden_size"])  # type: ignore[call-overload]
    torch.manual_seed(SEED)
    # (six size numbers, as the tiny SDXL's)
    unet = _tiny_xl_unet(first_width + WIDE_SECOND_ENCODER, 6, text_encoder_2)
    for name in ("text_encoder_2", "unet"):
        shutil.rmtree(out_dir / name)
    text_encoder_2.save_pretrained(out_dir / "text_encoder_2", safe_serialization=True)
    # (mypy resolves `diffusers.UNet2DConditionModel` to a placeholder class)
    cast(ModelMixin, unet).save_pretrained(out_dir / "unet", safe_serialization=True)
