"""Tiny random models built offline, for tests and the demo.

`build_tiny_models(out_dir)` writes six deterministic model folders, weights in
safetensors only:

- `out_dir/sd`: a diffusers-format Stable Diffusion 1 pipeline (UNet with SD-1 block names,
  4-level VAE, 2-layer CLIP text encoder, hand-written CLIP BPE vocabulary, Euler scheduler
  with SD's betas). As in SD 1, the VAE's latent scale factor is 8 and the default image
  512x512, so a test image has the latent a real one has (64x64 at 512x512, 128x128 at
  1024x1024) and takes seconds, not minutes. `write_single_file_checkpoint` turns it into
  an original (CompVis / SD-1) single `.safetensors` file, to exercise `from_single_file`.
- `out_dir/sd-inpaint`: the same pipeline as an inpainting checkpoint
  (`StableDiffusionInpaintPipeline`): its UNet takes 9 channels, the noisy latent, the
  mask and the masked image's latent, as SD 1's inpainting models do.
- `out_dir/sd2`: an SD 2 (768-v) shaped pipeline: OpenCLIP-style text encoder (gelu
  activation, a tokenizer padding with "!"), linear attention projections, v-prediction.
- `out_dir/sdxl`: a StableDiffusionXLPipeline built the way diffusers' SDXL tests build
  theirs: two text encoders (the second with a projection: the pooled text), a UNet with
  size conditioning ("text_time" added embeddings); the tiny SD VAE (factor 8).
- `out_dir/sdxl-refiner`: an SDXL refiner (`StableDiffusionXLImg2ImgPipeline`), built as
  diffusers' refiner tests build theirs: only the second text encoder (its hidden states
  alone are the UNet's context), a UNet whose added conditioning takes an aesthetic score
  instead of the target size (`requires_aesthetics_score`); the tiny SDXL's VAE.
- `out_dir/llm`: a Llama-family causal LM with a byte-level BPE tokenizer trained on a
  seeded synthetic corpus, and a chat template.

The same call on the same library versions gives byte-identical files. The images and text
these models make are noise; only shapes, plumbing and determinism matter.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

# (from its module: mypy resolves `diffusers.StableDiffusionPipeline` to a placeholder class)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import (
    StableDiffusionInpaintPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

__all__ = [
    "LLM_CHAT_TEMPLATE",
    "build_tiny_llm",
    "build_tiny_models",
    "build_tiny_sd",
    "build_tiny_sdxl",
    "build_tiny_sdxl_refiner",
    "bytes_to_unicode",
    "write_single_file_checkpoint",
]

SEED = 0
CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77
# Words that the CLIP vocabulary knows whole; everything else falls back to characters.
CLIP_WORDS = ("a", "the", "of", "photo", "cat", "dog", "red", "blue", "tree", "house", "sky")

LLM_VOCAB_SIZE = 1000
LLM_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
LLM_CHAT_TEMPLATE = (
    # transformers renders with trim_blocks, so newlines are written as expressions.
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
_LLM_WORDS = (  # split on spaces
    "the of and to in is you that it he was for on are as with his they at be this have "
    "from or one had by word but not what all were we when your can said there use an each "
    "which she do how their if will up other about out many then them these so some her "
    "would make like him into time has look two more write go see number no way could "
    "people my than first water been call who its now find long down day did get come made "
    "may part model image prompt worker network grid idle compute token kudos"
)
_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]


# -- Stable Diffusion --------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters.

    Printable latin-1 bytes map to themselves; the rest are shifted past 255 so that no
    byte maps to whitespace or a control character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table  # printable bytes first, as CLIP's vocabulary lists them


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's layout: bytes, bytes + `</w>`, merge results, then the two special tokens."""
    merges: list[str] = []
    for word in CLIP_WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1], *parts[2:]]
    alphabet = list(bytes_to_unicode().values())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(m.replace(" ", "") for m in merges)]
    tokens = [*dict.fromkeys(tokens), CLIP_BOS, CLIP_EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def _write_clip_tokenizer(directory: Path, pad_token: str = CLIP_EOS) -> None:
    """`pad_token`: SD 1's tokenizer pads with the end token, SD 2's and SDXL's second one
    with "!"."""
    vocab, merges = _clip_vocab_and_merges()
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "vocab.json", vocab)
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8"
    )
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": CLIP_MAX_LENGTH,
            "do_lower_case": True,
            "bos_token": CLIP_BOS,
            "eos_token": CLIP_EOS,
            "unk_token": CLIP_EOS,
            "pad_token": pad_token,
        },
    )


def _tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    torch.manual_seed(SEED)
    # Four levels, three of them downsampling, as in SD's VAE: the latent is 1/8 of the
    # image per side. Channels follow SD's 1:2:4:4 (128, 256, 512, 512) at 1/16 the width;
    # norm_num_groups must divide each of them (SD's 32 would not).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,  # only used by tiled decoding, as in SD 1's VAE config
        scaling_factor=scaling_factor,
    )


def _tiny_clip_config(tokenizer: CLIPTokenizer, hidden_act: str = "quick_gelu") -> CLIPTextConfig:
    """`hidden_act`: OpenAI's CLIP (SD 1, SDXL's first encoder) uses quick_gelu, OpenCLIP
    (SD 2, SDXL's second encoder) gelu."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _sd_scheduler(**options: Any) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        **options,
    )


def _keep_hand_written_tokenizers(out_dir: Path, pads: dict[str, str]) -> None:
    # save_pretrained re-serialises the tokenizers (with load-time keys such as `is_local`);
    # keep the hand-written files as the single source instead.
    for folder, pad in pads.items():
        shutil.rmtree(out_dir / folder)
        _write_clip_tokenizer(out_dir / folder, pad)


def build_tiny_sd(out_dir: Path, *, inpainting: bool = False, sd2: bool = False) -> None:
    """Write a tiny diffusers-format StableDiffusionPipeline folder to `out_dir`; with
    `inpainting`, a StableDiffusionInpaintPipeline (9-channel UNet) instead; with `sd2`, an
    SD 2 (768-v) shaped one: an OpenCLIP-style text encoder (gelu), a tokenizer padding
    with "!", linear attention projections and a v-prediction scheduler."""
    pad = "!" if sd2 else CLIP_EOS
    staging_tokenizer = out_dir / "tokenizer"
    _write_clip_tokenizer(staging_tokenizer, pad)
    tokenizer = CLIPTokenizer.from_pretrained(staging_tokenizer, local_files_only=True)

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=64,  # latent side; with the VAE's factor 8 the default image is 512x512
        # latent (4), mask (1) and masked image latent (4) for an inpainting UNet
        in_channels=9 if inpainting else 4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=sd2,
    )
    vae = _tiny_vae()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer, "gelu" if sd2 else "quick_gelu"))
    scheduler = _sd_scheduler(prediction_type="v_prediction") if sd2 else _sd_scheduler()
    # (a dict: diffusers annotates these parameters too narrowly, e.g. no None, an enum for
    # the scheduler)
    components: dict[str, Any] = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = pipeline_class(**components, requires_safety_checker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _keep_hand_written_tokenizers(out_dir, {"tokenizer": pad})


def build_tiny_sdxl(out_dir: Path) -> None:
    """Write a tiny diffusers-format StableDiffusionXLPipeline folder to `out_dir`, shaped
    as diffusers' own SDXL tests shape theirs: two text encoders (the second with a
    projection, whose pooled output joins the size conditioning), their hidden states
    concatenated as the UNet's context, and a UNet with "text_time" added embeddings. The
    VAE is the tiny SD one (scale factor 8) with SDXL's latent scaling."""
    _write_clip_tokenizer(out_dir / "tokenizer")
    _write_clip_tokenizer(out_dir / "tokenizer_2", "!")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer", local_files_only=True)
    tokenizer_2 = CLIPTokenizer.from_pretrained(out_dir / "tokenizer_2", local_files_only=True)
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer))
    text_encoder_2 = _tiny_xl_second_encoder(tokenizer_2)
    torch.manual_seed(SEED)
    # six size numbers (original size, crop corner, target size), each embedded
    unet = _tiny_xl_unet(
        text_encoder.config.hidden_size + text_encoder_2.config.hidden_size, 6, text_encoder_2
    )
    components: dict[str, Any] = {
        "vae": _tiny_vae(scaling_factor=0.13025),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "unet": unet,
        "scheduler": _sd_scheduler(timestep_spacing="leading"),
    }
    pipe = StableDiffusionXLPipeline(
        **components, force_zeros_for_empty_prompt=True, add_watermarker=False
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _keep_hand_written_tokenizers(out_dir, {"tokenizer": CLIP_EOS, "tokenizer_2": "!"})


def _tiny_xl_second_encoder(tokenizer_2: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """SDXL's second (OpenCLIP-style, projected) text encoder; the same weights each call."""
    torch.manual_seed(SEED + 1)
    return CLIPTextModelWithProjection(_tiny_clip_config(tokenizer_2, "gelu"))


def _tiny_xl_unet(
    cross_attention_dim: int, time_ids: int, text_encoder_2: CLIPTextModelWithProjection
) -> UNet2DConditionModel:
    """SDXL's UNet shape: `time_ids` size (or aesthetic score) numbers, each embedded, and
    the pooled text as the added conditioning."""
    time_embed_dim = 8
    pooled_dim = int(text_encoder_2.config.projection_dim or 0)
    return UNet2DConditionModel(
        sample_size=128,  # latent side: the default image is 1024x1024, as SDXL's
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=time_ids * time_embed_dim + pooled_dim,
    )


def build_tiny_sdxl_refiner(out_dir: Path) -> None:
    """Write a tiny SDXL refiner (StableDiffusionXLImg2ImgPipeline) to `out_dir`, as
    diffusers' refiner tests shape theirs (no first text encoder, `requires_aesthetics_score`):
    the tiny SDXL's second text encoder and VAE, the same weights (as the published refiner
    has its base's), and its own random UNet, whose context is the second encoder's hidden
    states alone and whose added conditioning is original size, crop corner and aesthetic
    score (five numbers) with the pooled text."""
    _write_clip_tokenizer(out_dir / "tokenizer_2", "!")
    tokenizer_2 = CLIPTokenizer.from_pretrained(out_dir / "tokenizer_2", local_files_only=True)
    text_encoder_2 = _tiny_xl_second_encoder(tokenizer_2)
    vae = _tiny_vae(scaling_factor=0.13025)
    torch.manual_seed(SEED + 2)
    unet = _tiny_xl_unet(text_encoder_2.config.hidden_size, 5, text_encoder_2)
    components: dict[str, Any] = {
        "vae": vae,
        "text_encoder": None,
        "text_encoder_2": text_encoder_2,
        "tokenizer": None,
        "tokenizer_2": tokenizer_2,
        "unet": unet,
        "scheduler": _sd_scheduler(timestep_spacing="leading"),
    }
    # (as the published refiner: an empty negative prompt is encoded, not zeros)
    pipe = StableDiffusionXLImg2ImgPipeline(
        **components,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _keep_hand_written_tokenizers(out_dir, {"tokenizer_2": "!"})


# -- Llama-family LM ---------------------------------------------------------------------


def _llm_corpus() -> list[str]:
    """A synthetic corpus: common words mixed with seeded pseudo-words, one line each."""
    rng = random.Random(1234)
    common = _LLM_WORDS.split()
    pseudo = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(600)]
    lines = []
    for _ in range(4000):
        words = [
            rng.choice(common) if rng.random() < 0.6 else rng.choice(pseudo)
            for _ in range(rng.randint(3, 16))
        ]
        if rng.random() < 0.2:
            words.append(str(rng.randint(0, 9999)))
        lines.append(" ".join(words).capitalize() + rng.choice(".?!,:;"))
    return lines


def _train_llm_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LLM_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(LLM_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_llm_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        chat_template=LLM_CHAT_TEMPLATE,
    )


def build_tiny_llm(out_dir: Path) -> None:
    """Write a tiny Llama-family causal LM and its tokenizer to `out_dir`."""
    tokenizer = _train_llm_tokenizer()
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def build_tiny_models(out_dir: Path) -> None:
    """Write `out_dir/sd` (Stable Diffusion 1 pipeline), `out_dir/sd-inpaint` (its
    inpainting form), `out_dir/sd2` (SD 2, v-prediction), `out_dir/sdxl` (SDXL),
    `out_dir/sdxl-refiner` (its refiner) and `out_dir/llm` (Llama LM)."""
    build_tiny_sd(out_dir / "sd")
    build_tiny_sd(out_dir / "sd-inpaint", inpainting=True)
    build_tiny_sd(out_dir / "sd2", sd2=True)
    build_tiny_sdxl(out_dir / "sdxl")
    build_tiny_sdxl_refiner(out_dir / "sdxl-refiner")
    build_tiny_llm(out_dir / "llm")


# -- Original (CompVis / SD-1) single-file layout ----------------------------------------
# The inverse of diffusers.loaders.single_file_utils.convert_ldm_{unet,vae,clip}_checkpoint.

_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX = "first_stage_model."
_CLIP_PREFIX = "cond_stage_model.transformer.text_model."

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _unet_prefixes(config: dict[str, object]) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers prefix -> (original prefix, renames inside that module)."""
    per_block = int(config["layers_per_block"])  # type: ignore[call-overload]
    down_types = list(config["down_block_types"])  # type: ignore[call-overload]
    up_types = list(config["up_block_types"])  # type: ignore[call-overload]
    table: dict[str, tuple[str, dict[str, str]]] = {
        key: (value, {}) for key, value in _UNET_TOP.items()
    }
    index = 1
    for block, _ in enumerate(down_types):
        for layer in range(per_block):
            table[f"down_blocks.{block}.resnets.{layer}."] = (
                f"input_blocks.{index}.0.",
                _UNET_RESNET,
            )
            table[f"down_blocks.{block}.attentions.{layer}."] = (f"input_blocks.{index}.1.", {})
            index += 1
        if block < len(down_types) - 1:
            table[f"down_blocks.{block}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", {})
            index += 1
    table["mid_block.resnets.0."] = ("middle_block.0.", _UNET_RESNET)
    table["mid_block.attentions.0."] = ("middle_block.1.", {})
    table["mid_block.resnets.1."] = ("middle_block.2.", _UNET_RESNET)
    index = 0
    for block, block_type in enumerate(up_types):
        for layer in range(per_block + 1):
            table[f"up_blocks.{block}.resnets.{layer}."] = (
                f"output_blocks.{index}.0.",
                _UNET_RESNET,
            )
            table[f"up_blocks.{block}.attentions.{layer}."] = (f"output_blocks.{index}.1.", {})
            index += 1
        if block < len(up_types) - 1:
            slot = 2 if "CrossAttn" in block_type else 1
            table[f"up_blocks.{block}.upsamplers.0.conv."] = (
                f"output_blocks.{index - 1}.{slot}.conv.",
                {},
            )
    return table


def _vae_prefixes(config: dict[str, object]) -> dict[str, tuple[str, dict[str, str]]]:
    per_block = int(config["layers_per_block"])  # type: ignore[call-overload]
    n_down = len(config["down_block_types"])  # type: ignore[arg-type]
    n_up = len(config["up_block_types"])  # type: ignore[arg-type]
    table: dict[str, tuple[str, dict[str, str]]] = {
        "quant_conv.": ("quant_conv.", {}),
        "post_quant_conv.": ("post_quant_conv.", {}),
    }
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_in."] = (f"{part}.conv_in.", {})
        table[f"{part}.conv_out."] = (f"{part}.conv_out.", {})
        table[f"{part}.conv_norm_out."] = (f"{part}.norm_out.", {})
        table[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", _VAE_RESNET)
        table[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", _VAE_RESNET)
        table[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
    for block in range(n_down):
        for layer in range(per_block):
            table[f"encoder.down_blocks.{block}.resnets.{layer}."] = (
                f"encoder.down.{block}.block.{layer}.",
                _VAE_RESNET,
            )
        table[f"encoder.down_blocks.{block}.downsamplers.0.conv."] = (
            f"encoder.down.{block}.downsample.conv.",
            {},
        )
    for block in range(n_up):
        original = n_up - 1 - block  # the original decoder counts its levels upwards
        for layer in range(per_block + 1):
            table[f"decoder.up_blocks.{block}.resnets.{layer}."] = (
                f"decoder.up.{original}.block.{layer}.",
                _VAE_RESNET,
            )
        table[f"decoder.up_blocks.{block}.upsamplers.0.conv."] = (
            f"decoder.up.{original}.upsample.conv.",
            {},
        )
    return table


def _rename(key: str, table: dict[str, tuple[str, dict[str, str]]], what: str) -> tuple[str, bool]:
    """Map one diffusers key; returns (original key, is a VAE attention key)."""
    for prefix in sorted(table, key=len, reverse=True):
        if key.startswith(prefix):
            original, inner = table[prefix]
            rest = key[len(prefix) :]
            for old, new in inner.items():
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            return original + rest, inner is _VAE_ATTENTION
    raise KeyError(f"no original-format name for {what} weight {key!r}")


def _load(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118


def write_single_file_checkpoint(sd_dir: Path, out_file: Path) -> None:
    """Write the pipeline in `sd_dir` as one original-format (SD-1) `.safetensors` file.

    Only the weights travel; loading it back needs `config=sd_dir` for the configs, the
    tokenizer and the scheduler, as with any single-file checkpoint.
    """
    unet_config = json.loads((sd_dir / "unet" / "config.json").read_text(encoding="utf-8"))
    vae_config = json.loads((sd_dir / "vae" / "config.json").read_text(encoding="utf-8"))
    out: dict[str, torch.Tensor] = {}

    unet_table = _unet_prefixes(unet_config)
    for key, tensor in _load(sd_dir / "unet" / "diffusion_pytorch_model.safetensors").items():
        out[_UNET_PREFIX + _rename(key, unet_table, "UNet")[0]] = tensor

    vae_table = _vae_prefixes(vae_config)
    for key, tensor in _load(sd_dir / "vae" / "diffusion_pytorch_model.safetensors").items():
        name, is_attention = _rename(key, vae_table, "VAE")
        # The original VAE attention uses 1x1 convolutions where diffusers uses linears.
        value = tensor[:, :, None, None] if is_attention and tensor.ndim == 2 else tensor
        out[_VAE_PREFIX + name] = value

    for key, tensor in _load(sd_dir / "text_encoder" / "model.safetensors").items():
        out[_CLIP_PREFIX + key.removeprefix("text_model.")] = tensor

    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {key: out[key].contiguous() for key in sorted(out)}, out_file, metadata={"format": "pt"}
    )


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
