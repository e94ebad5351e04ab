from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer, BatchEncoding, CLIPTokenizer, LlamaForCausalLM

from worker.models.tiny_models import (
    build_tiny_models,
    bytes_to_unicode,
    write_single_file_checkpoint,
)

# diffusers' schedulers hand torch tensors to numpy functions; numpy 2 warns that torch's
# Tensor.__array__ / __array_wrap__ lack its newer keywords. Harmless; nothing else muted.


def _files(root: Path) -> dict[str, bytes]:
    # (scripts/test marks a finished prebuilt directory with a `.complete` file)
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.name != ".complete"
    }


def test_build_is_byte_identical(tiny_models: Path, tmp_path: Path) -> None:
    build_tiny_models(tmp_path)
    first, second = _files(tiny_models), _files(tmp_path)
    assert sorted(first) == sorted(second)
    for name, content in first.items():
        assert content == second[name], name


def test_build_writes_only_safetensors_weights(tiny_models: Path) -> None:
    suffixes = {p.suffix for p in tiny_models.rglob("*") if p.is_file() and p.name != ".complete"}
    assert suffixes <= {".json", ".txt", ".safetensors", ".jinja"}
    assert (tiny_models / "sd" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_models / "sd-inpaint" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_models / "llm" / "model.safetensors").is_file()


def test_bytes_to_unicode_is_a_printable_bijection() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a"
    assert table[ord(" ")] == "Ġ"  # GPT-2's well-known space marker


def test_clip_tokenizer_is_hand_written_and_loads(tiny_sd: Path) -> None:
    directory = tiny_sd / "tokenizer"
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["a"] == 64  # byte 'a' comes right after the other printable ASCII bytes
    assert "a</w>" in vocab
    assert max(vocab, key=vocab.__getitem__) == "<|endoftext|>"
    tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    assert tokenizer.model_max_length == 77
    ids = tokenizer("A photo of a cat").input_ids
    assert ids[0] == vocab["<|startoftext|>"]
    assert ids[-1] == vocab["<|endoftext|>"]
    assert vocab["photo</w>"] in ids
    assert vocab["cat</w>"] in ids
    model_index = json.loads((tiny_sd / "model_index.json").read_text(encoding="utf-8"))
    assert model_index["safety_checker"] == [None, None]
    assert model_index["requires_safety_checker"] is False


def test_sd_has_sd1_latent_geometry(tiny_sd: Path) -> None:
    """SD 1's VAE scale factor (8) and default size (512x512): test images have the latent
    sizes of real ones (64x64 at 512x512, 128x128 at 1024x1024), and the VAE really
    downsamples that much (the pipeline only reads the factor off the config)."""
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd, use_safetensors=True, local_files_only=True
    )
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 512
    with torch.no_grad():
        latent = pipe.vae.encode(torch.zeros(1, 3, 64, 48)).latent_dist.mode()
        image = pipe.vae.decode(latent).sample
    assert latent.shape == (1, 4, 8, 6)
    assert image.shape == (1, 3, 64, 48)


def test_sd_inpaint_is_the_same_model_with_a_9_channel_unet(
    tiny_sd: Path, tiny_sd_inpaint: Path
) -> None:
    """An inpainting checkpoint as SD 1's are: the UNet also takes the mask and the masked
    image's latent; everything else is the plain model's."""
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        tiny_sd_inpaint, use_safetensors=True, local_files_only=True
    )
    assert pipe.unet.config.in_channels == 9
    assert pipe.unet.config.out_channels == 4
    index = json.loads((tiny_sd_inpaint / "model_index.json").read_text(encoding="utf-8"))
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (tiny_sd_inpaint / part).read_bytes() == (tiny_sd / part).read_bytes()
    assert _files(tiny_sd_inpaint / "tokenizer") == _files(tiny_sd / "tokenizer")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a photo of a red cat",
        image=Image.new("RGB", (64, 64), "gray"),
        mask_image=Image.new("L", (64, 64), 255),
        width=64,
        height=64,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    )
    assert np.asarray(out.images).shape == (1, 64, 64, 3)


def test_llm_loads_chats_and_generates(tiny_models: Path) -> None:
    directory = tiny_models / "llm"
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = LlamaForCausalLM.from_pretrained(directory, local_files_only=True)
    assert 900 <= len(tokenizer) <= 1000
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.num_hidden_layers == 4
    assert model.config.tie_word_embeddings is False
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<s>",
        "</s>",
        "<unk>",
    )
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    messages = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "draw a cat"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<s><|user|>\nhello there\n<|assistant|>\nhi</s>\n<|user|>\ndraw a cat\n<|assistant|>\n"
    )
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert isinstance(encoded, BatchEncoding)
    assert encoded["input_ids"][0, 0].item() == tokenizer.bos_token_id
    assert tokenizer.decode(encoded["input_ids"][0], skip_special_tokens=False) == text

    with torch.no_grad():
        first = model.generate(**encoded, max_new_tokens=4, do_sample=False)
        second = model.generate(**encoded, max_new_tokens=4, do_sample=False)
    assert torch.equal(first, second)
    assert first.shape[1] > encoded["input_ids"].shape[1]


def test_single_file_has_the_original_layout(tiny_sd_single_file: Path) -> None:
    with safe_open(tiny_sd_single_file, framework="pt") as f:
        keys = set(f.keys())
        vae_q = f.get_tensor("first_stage_model.decoder.mid.attn_1.q.weight")
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",
        "model.diffusion_model.out.2.bias",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
        # four VAE levels, three of them resampling, as in SD 1
        "first_stage_model.encoder.down.2.downsample.conv.weight",
        "first_stage_model.encoder.down.3.block.0.conv1.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in keys, key
    assert vae_q.ndim == 4  # 1x1 convolution, as in the original VAE
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in keys)


def test_single_file_is_deterministic(
    tiny_sd: Path, tiny_sd_single_file: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again.safetensors"
    write_single_file_checkpoint(tiny_sd, again)
    assert again.read_bytes() == tiny_sd_single_file.read_bytes()


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_single_file_loads_the_same_weights(
    tiny_sd: Path, tiny_sd_single_file: Path, component: str
) -> None:
    folder = StableDiffusionPipeline.from_pretrained(
        tiny_sd, use_safetensors=True, local_files_only=True
    )
    single = StableDiffusionPipeline.from_single_file(
        str(tiny_sd_single_file), config=str(tiny_sd), local_files_only=True
    )
    expected = getattr(folder, component).state_dict()
    actual = getattr(single, component).state_dict()
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_single_file_gives_pixel_identical_images(tiny_sd: Path, tiny_sd_single_file: Path) -> None:
    folder = StableDiffusionPipeline.from_pretrained(
        tiny_sd, use_safetensors=True, local_files_only=True
    )
    single = StableDiffusionPipeline.from_single_file(
        str(tiny_sd_single_file), config=str(tiny_sd), local_files_only=True
    )
    images = []
    for pipe in (folder, single):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            "a photo of a red cat",
            width=64,
            height=64,
            num_inference_steps=3,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="np",
        )
        images.append(np.asarray(out.images))
    assert images[0].std() > 0
    np.testing.assert_array_equal(images[0], images[1])
