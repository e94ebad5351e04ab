"""The model families the image engine serves: SD 1.x, SD 2 and SDXL (inside the sandbox).

The pipeline follows the model. `load_pipeline` reads the family from the model's
`model_index.json` (the folder's own, or the `--model-config` folder of a single file): a
second text encoder means SDXL (`StableDiffusionXLPipeline`: two text encoders whose
hidden states are concatenated, the second's pooled output and the image size as added
conditioning); otherwise `StableDiffusionPipeline`, for SD 1.x and SD 2 alike (SD 2's
v-prediction comes with its scheduler config, which every sampler keeps).

`baseline_of` names the family as LoRAs are made for it (protocol.loras.Baseline): "sdxl"
with a second text encoder; "sd2" when the text encoder is OpenCLIP's (1024 wide, or its
gelu activation, where SD 1's OpenAI CLIP has quick_gelu); else "sd1". The architecture
decides, not the prediction type: an SD 1.5 fine-tune trained for v-prediction still
takes SD 1 LoRAs.

img2img and inpainting run diffusers' pipeline of the same family on the loaded modules
(`source_pipelines`); `text_encoding` encodes prompts A1111's way for the family
(worker.image.conditioning).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline,
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
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import (
    StableDiffusionXLInpaintPipeline,
)

from protocol.loras import Baseline
from worker.errors import ModelNotFound, UnsupportedArchitecture
from worker.image.conditioning import DualTextEncoding, TextEncoding
from worker.image.model_source import ModelSource

__all__ = [
    "BasePipeline",
    "SourcePipeline",
    "baseline_of",
    "load_from",
    "load_pipeline",
    "source_pipeline",
    "text_encoding",
]

# the txt2img pipeline of a family, and the pipelines for a source image
BasePipeline = StableDiffusionPipeline | StableDiffusionXLPipeline
SourcePipeline = (
    StableDiffusionImg2ImgPipeline
    | StableDiffusionInpaintPipeline
    | StableDiffusionXLImg2ImgPipeline
    | StableDiffusionXLInpaintPipeline
)

# the width of OpenCLIP ViT-H's text encoder (SD 2); OpenAI's CLIP ViT-L (SD 1) is 768 wide
_OPENCLIP_H_WIDTH = 1024


def _family(source: ModelSource) -> type[BasePipeline]:
    folder = Path(source.location) if source.config_dir is None else source.config_dir
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    name = str(index.get("_class_name", ""))

    def present(component: str) -> bool:
        value = index.get(component)
        return isinstance(value, list) and value[0] is not None

    if present("text_encoder_2") and not present("text_encoder"):
        raise UnsupportedArchitecture(
            f"{source.location} is an SDXL refiner ({name}: one text encoder, OpenCLIP's): it "
            "refines another model's latents and cannot make images alone; serve an SDXL "
            "base model as --model and give this one as --refiner"
        )
    if present("text_encoder_2"):
        return StableDiffusionXLPipeline
    if name.startswith("StableDiffusion") and "XL" not in name and present("text_encoder"):
        return StableDiffusionPipeline
    raise UnsupportedArchitecture(
        f"{source.location} holds a {name or 'pipeline of unknown class'}; this worker serves "
        "Stable Diffusion 1.x, 2.x and SDXL pipelines (StableDiffusionPipeline, "
        "StableDiffusionXLPipeline and their inpainting forms)"
    )


def load_from(pipeline_class: Any, source: ModelSource) -> Any:
    """`pipeline_class` loaded from the diffusers folder or the single file (with its config
    folder) that `source` names: safetensors only, in float32 on the CPU."""
    if source.kind == "folder":
        return pipeline_class.from_pretrained(
            source.location, use_safetensors=True, local_files_only=True, dtype=torch.float32
        )
    return pipeline_class.from_single_file(
        source.location,
        config=str(source.config_dir),
        local_files_only=True,
        dtype=torch.float32,
    )


def load_pipeline(source: ModelSource) -> BasePipeline:
    """Load the pipeline of the model's family that `source` describes, safetensors only,
    in float32 on the CPU."""
    if source.kind == "hub":
        # The worker downloads hub models before the engine starts (download_hub_model): the
        # engine has no network, so a hub id here means nothing was downloaded.
        raise ModelNotFound(
            f"{source.location!r} is not a local folder or file; the worker downloads hub "
            "models before starting the engine, so pass the id to `idlegrid worker image "
            "--model`"
        )
    pipe: BasePipeline = load_from(_family(source), source)
    if isinstance(pipe, StableDiffusionXLPipeline):
        # (installed, invisible-watermark would mark every image: A1111 does not, and the
        # pixels would then depend on whether that package happens to be installed)
        pipe.watermark = None  # type: ignore[assignment]
    pipe.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    return pipe


def baseline_of(pipe: BasePipeline) -> Baseline:
    """The family of the loaded pipeline (see the module)."""
    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    config = pipe.text_encoder.config
    if config.hidden_size == _OPENCLIP_H_WIDTH or config.hidden_act == "gelu":
        return "sd2"
    return "sd1"


def source_pipeline(pipe: BasePipeline, inpaint: bool) -> SourcePipeline:
    """diffusers' img2img (or, with `inpaint`, inpainting) pipeline of the family of `pipe`,
    on its modules (never a second copy of the weights)."""
    made: SourcePipeline
    if isinstance(pipe, StableDiffusionXLPipeline):
        xl_class = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLImg2ImgPipeline
        # (no aesthetic score: the base model's size conditioning, as its txt2img pipeline)
        made = xl_class(**pipe.components, requires_aesthetics_score=False)
        made.watermark = None  # type: ignore[assignment]
    else:
        sd_class = StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline
        made = sd_class(**pipe.components, requires_safety_checker=False)
    made.set_progress_bar_config(disable=True)  # type: ignore[no-untyped-call]
    return made


def text_encoding(pipe: BasePipeline, device: torch.device) -> TextEncoding | DualTextEncoding:
    """A1111's prompt encoding with the pipeline's text encoder(s)."""

    # (a textual inversion of several vectors is spelled as all of its tokens, as diffusers'
    # own prompt encoding does)
    def converter(tokenizer: Any) -> Any:
        return lambda text: str(pipe.maybe_convert_prompt(text, tokenizer))

    if isinstance(pipe, StableDiffusionXLPipeline):
        return DualTextEncoding(
            TextEncoding(
                pipe.tokenizer,
                pipe.text_encoder,
                device,
                convert=converter(pipe.tokenizer),
                penultimate=True,
            ),
            TextEncoding(
                pipe.tokenizer_2,
                pipe.text_encoder_2,
                device,
                convert=converter(pipe.tokenizer_2),
                penultimate=True,
            ),
        )
    return TextEncoding(
        pipe.tokenizer, pipe.text_encoder, device, convert=converter(pipe.tokenizer)
    )
