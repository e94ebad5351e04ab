"""The SDXL single-file writer (worker.models.tiny_single_file): the original (Stability
"sgm") names and shapes, byte-identical files; loading them is tested with the engine
(tests/worker/image/test_baselines.py, test_refiner.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from worker.models.tiny_single_file import WIDE_SECOND_ENCODER, write_sdxl_single_file


def _shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_slice(key).get_shape() for key in f.keys()}  # noqa: SIM118


def test_sdxl_single_file_has_the_original_layout(tiny_sdxl_single_file: Path) -> None:
    shapes = _shapes(tiny_sdxl_single_file)
    unet = "model.diffusion_model."
    open_clip = "conditioner.embedders.1.model."
    for key in (
        f"{unet}label_emb.0.0.weight",  # the size conditioning's MLP
        f"{unet}label_emb.0.2.bias",
        f"{unet}input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight",  # two layers deep
        f"{unet}middle_block.1.transformer_blocks.1.ff.net.2.weight",
        f"{unet}output_blocks.1.2.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        f"{open_clip}token_embedding.weight",
        f"{open_clip}transformer.resblocks.1.mlp.c_proj.bias",
        f"{open_clip}ln_final.bias",
    ):
        assert key in shapes, key
    width = WIDE_SECOND_ENCODER
    assert shapes[f"{open_clip}positional_embedding"] == [77, width]
    # query, key and value stacked; the projection applied as x @ text_projection
    assert shapes[f"{open_clip}transformer.resblocks.0.attn.in_proj_weight"] == [3 * width, width]
    assert shapes[f"{open_clip}transformer.resblocks.0.attn.in_proj_bias"] == [3 * width]
    assert shapes[f"{open_clip}text_projection"] == [width, 32]
    assert shapes["first_stage_model.decoder.mid.attn_1.q.weight"][2:] == [1, 1]
    diffusers_names = ("blocks.0.resnets", "mid_block", "add_embedding", "q_proj", "layer_norm1")
    renamed = [key for key in shapes if key.startswith((unet, open_clip))]
    assert not [key for key in renamed if any(name in key for name in diffusers_names)]
    assert not any(k.startswith("conditioner.embedders.2") for k in shapes)


def test_refiner_single_file_has_openclip_alone_as_embedder_0(
    tiny_sdxl_refiner_single_file: Path,
) -> None:
    shapes = _shapes(tiny_sdxl_refiner_single_file)
    assert shapes["conditioner.embedders.0.model.text_projection"] == [32, 32]
    assert "model.diffusion_model.label_emb.0.0.weight" in shapes
    assert not any(key.startswith("conditioner.embedders.1") for key in shapes)
    assert not any(".transformer.text_model." in key for key in shapes)


def test_sdxl_single_file_is_deterministic(
    tiny_sdxl_wide: Path, tiny_sdxl_single_file: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again.safetensors"
    write_sdxl_single_file(tiny_sdxl_wide, again)
    assert again.read_bytes() == tiny_sdxl_single_file.read_bytes()


def test_only_sdxl_pipelines_are_written(tiny_sd: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no text_encoder_2"):
        write_sdxl_single_file(tiny_sd, tmp_path / "sd.safetensors")
