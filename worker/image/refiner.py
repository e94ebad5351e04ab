"""The SDXL refiner (`idlegrid worker image --refiner PATH`), inside the sandbox.

diffusers' "ensemble of expert denoisers": for a plain SDXL txt2img job the base model
samples the first part of the schedule (`denoising_end=switch`, kept as latents) and the
refiner (a `StableDiffusionXLImg2ImgPipeline` with only the second text encoder and an
aesthetic score in its added conditioning) the rest (`denoising_start=switch`) on those
latents, with the same sampler, the steps and guidance of the job, and the images' own
generators continuing. `--refiner-switch F` (default 0.8) is the fraction of the noise
schedule the base runs, as A1111's "Refiner switch at".

Which jobs: plain txt2img only. img2img, inpainting, outpainting, a hires fix that runs its
second pass, ControlNet and LoRA/TI jobs run on the base alone, as without a refiner (the
refiner has no LoRAs loaded and diffusers defines the hand-over for txt2img).

The refiner shares the base's VAE and second text encoder when its own are the same
weights (the published refiner's are), else keeps its own: pixels are always those of
the refiner's own modules. Its prompt is encoded A1111's way like the base's
(`worker.image.conditioning`: weights, BREAK, long prompts, prompt editing, which keeps
counting the job's steps), with its one text encoder: the penultimate layer's hidden
states and the pooled text; an empty negative prompt is zeros, as for the base. The
aesthetic scores are diffusers' and A1111's defaults (6 and 2.5).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)

from worker.errors import UnsupportedArchitecture
from worker.image.baselines import load_from
from worker.image.conditioning import Conditioning, DualTextEncoding, TextEncoding
from worker.image.model_source import ModelSource

__all__ = [
    "DEFAULT_SWITCH",
    "Refiner",
    "RefinerTextEncoding",
    "base_steps",
    "load_refiner",
]

# the fraction of the schedule the base samples (diffusers' example, A1111's usual choice)
DEFAULT_SWITCH = 0.8
# the modules a refiner may share with its base
_SHARED = ("vae", "text_encoder_2")


class RefinerTextEncoding(DualTextEncoding):
    """The refiner's one text encoder (SDXL's second) used A1111's way: the chunks' hidden
    states (no first encoder to concatenate) and the first chunk's pooled text."""

    def __init__(self, encoding: TextEncoding) -> None:
        super().__init__(encoding, encoding)

    def encode_pooled(
        self, text: str, clip_skip: int, field: str = "prompt"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = self.second.encoded_chunks(text, clip_skip, field)
        pooled = chunks[0][1]
        if pooled is None:
            raise ValueError("the refiner's text encoder has no projection (pooled text)")
        return torch.cat([z for z, _ in chunks], dim=1), pooled


class Refiner:
    """A loaded refiner: its pipeline, prompt encoding and switch point."""

    def __init__(
        self,
        pipe: StableDiffusionXLImg2ImgPipeline,
        switch: float,
        name: str,
        shared: tuple[str, ...] = (),
    ) -> None:
        self.pipe = pipe
        self.switch = switch
        self.name = name
        # the base's modules it uses (the same weights as its own)
        self.shared = shared
        self.scheduler_config = dict(pipe.scheduler.config)
        self.text: RefinerTextEncoding | None = None

    def encoding(self, device: torch.device) -> RefinerTextEncoding:
        if self.text is None:
            self.text = RefinerTextEncoding(
                TextEncoding(
                    self.pipe.tokenizer_2,
                    self.pipe.text_encoder_2,
                    device,
                    convert=lambda text: str(
                        self.pipe.maybe_convert_prompt(text, self.pipe.tokenizer_2)
                    ),
                    penultimate=True,
                )
            )
        return self.text

    def infotext(self) -> dict[str, str]:
        """A1111's `Refiner` and `Refiner switch at` keys for the PNG's parameters."""
        return {"Refiner": self.name, "Refiner switch at": f"{self.switch:g}"}


def _refiner_index(source: ModelSource) -> dict[str, Any]:
    folder = Path(source.location) if source.config_dir is None else source.config_dir
    index: dict[str, Any] = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))

    def present(component: str) -> bool:
        value = index.get(component)
        return isinstance(value, list) and value[0] is not None

    if not present("text_encoder_2") or present("text_encoder") or not present("unet"):
        raise UnsupportedArchitecture(
            f"--refiner {source.location}: not an SDXL refiner (a "
            f"{index.get('_class_name') or 'pipeline of unknown class'} with "
            f"{'a first text encoder' if present('text_encoder') else 'no second text encoder'}"
            "); give a StableDiffusionXLImg2ImgPipeline folder with only text_encoder_2, such "
            "as stabilityai/stable-diffusion-xl-refiner-1.0, or leave --refiner out"
        )
    return index


def load_refiner(
    source: ModelSource, base: Any, switch: float, baseline: str, model_name: str
) -> Refiner:
    """Load the refiner `source` describes for the loaded `base` pipeline (float32, CPU),
    sharing the base's VAE and second text encoder where they are the same weights."""
    if not isinstance(base, StableDiffusionXLPipeline):
        raise UnsupportedArchitecture(
            f"--refiner: {model_name} is an {baseline} checkpoint; an SDXL refiner refines "
            "only SDXL base models' latents; leave --refiner out or serve an SDXL model"
        )
    if not 0.0 < switch < 1.0:
        raise ValueError(f"--refiner-switch {switch}: give a fraction between 0 and 1")
    _refiner_index(source)
    pipe: StableDiffusionXLImg2ImgPipeline = load_from(StableDiffusionXLImg2ImgPipeline, source)
    if pipe.text_encoder_2 is None or not pipe.config.get("requires_aesthetics_score", False):
        raise UnsupportedArchitecture(
            f"--refiner {source.location}: its pipeline does not take an aesthetic score "
            "(requires_aesthetics_score); it is not an SDXL refiner"
        )
    shared = []
    for name in _SHARED:
        theirs = getattr(base, name)
        if _same_weights(getattr(pipe, name), theirs):
            pipe.register_modules(**{name: theirs})
            shared.append(name)
    pipe.watermark = None  # type: ignore[assignment]
    pipe.set_progress_bar_config(disable=True)
    return Refiner(pipe, switch, source.name, tuple(shared))


def _same_weights(own: Any, theirs: Any) -> bool:
    if own is None or theirs is None or type(own) is not type(theirs):
        return False
    if _settings(own.config) != _settings(theirs.config):
        return False
    mine, other = own.state_dict(), theirs.state_dict()
    return mine.keys() == other.keys() and all(
        mine[key].shape == other[key].shape and torch.equal(mine[key], other[key]) for key in mine
    )


def _settings(config: Any) -> dict[str, Any]:
    """A module's config without its bookkeeping (where it was loaded from)."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: value for key, value in values.items() if not key.startswith("_")}


def base_steps(scheduler: Any, steps: int, switch: float) -> int:
    """How many of the job's `steps` sampling steps the base runs before the refiner
    (diffusers' `denoising_end` cut-off: the timesteps at or above it)."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps)
    timesteps = [float(t) for t in probe.timesteps]
    train = int(probe.config.num_train_timesteps)
    cutoff = round(train - switch * train)
    ran = sum(1 for t in timesteps if t >= cutoff)
    return min(steps, ran * steps // max(len(timesteps), 1))


def arguments_at(positive: Conditioning, negative: Conditioning, step: int) -> dict[str, Any]:
    """The refiner call's prompt keywords at the 0-based sampling step `step` (its first)."""
    p, n = positive.index_at(step), negative.index_at(step)
    if positive.pooled is None or negative.pooled is None:
        raise ValueError("the refiner's conditionings have no pooled text")
    return {
        "prompt_embeds": positive.embeds[p],
        "negative_prompt_embeds": negative.embeds[n],
        "pooled_prompt_embeds": positive.pooled[p],
        "negative_pooled_prompt_embeds": negative.pooled[n],
    }
