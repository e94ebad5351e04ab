"""clip_skip, tiling, karras, seed_variation and A1111's prompt syntax in the engine, each
against plain diffusers given the same inputs and seed (|diff| <= 2)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

# (from its module: mypy resolves `diffusers.StableDiffusionPipeline` to a placeholder class)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
)
from PIL import Image

from protocol.params import ImageParams
from tests.reference import plain_pipeline
from worker.errors import InvalidGenerationInput
from worker.image.engine import ImageEngine
from worker.image.samplers import KarrasEulerAncestralScheduler, make_scheduler

BASE: dict[str, Any] = {
    "prompt": "a photo of a red cat",
    "width": 64,
    "height": 64,
    "steps": 3,
    "cfg_scale": 7.0,
    "sampler": "Euler",
    "seed": 77,
}


def give_the_norm_a_bias(text_encoder: Any) -> None:
    """The random tiny text encoder's final layer norm has no bias, so its outputs average
    0 and A1111's rescaling to the original mean would divide by about 0 (a trained CLIP's
    do not): give it one, the same in the engine and in the reference."""
    with torch.no_grad():
        text_encoder.final_layer_norm.bias.copy_(torch.linspace(-0.2, 0.5, 32))


@pytest.fixture(scope="module")
def engine(tiny_sd: Path) -> ImageEngine:
    engine = ImageEngine({"model": str(tiny_sd), "model_config": None, "threads": None})
    give_the_norm_a_bias(engine.pipe.text_encoder)
    return engine


@pytest.fixture(scope="module")
def pipe(tiny_sd: Path) -> StableDiffusionPipeline:
    pipe = plain_pipeline(tiny_sd)
    give_the_norm_a_bias(pipe.text_encoder)
    return pipe


def _engine_pixels(engine: ImageEngine, **fields: Any) -> list[np.ndarray]:
    _, blobs = engine.handle("image", {**BASE, **fields}, lambda _: None)
    out = []
    for png in blobs:
        with Image.open(io.BytesIO(png)) as image:
            out.append(np.asarray(image.convert("RGB")).astype(np.int16))
    return out


@contextmanager
def _euler(pipe: StableDiffusionPipeline, **options: Any) -> Iterator[None]:
    original = pipe.scheduler
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(original.config, **options)
    try:
        yield
    finally:
        pipe.scheduler = original


def _plain(
    pipe: StableDiffusionPipeline, scheduler: dict[str, Any] | None = None, **arguments: Any
) -> np.ndarray:
    defaults: dict[str, Any] = {
        "num_inference_steps": BASE["steps"],
        "guidance_scale": BASE["cfg_scale"],
        "width": 64,
        "height": 64,
        "generator": torch.Generator("cpu").manual_seed(BASE["seed"]),
        "output_type": "pil",
    }
    if "prompt_embeds" not in arguments:
        defaults["prompt"] = BASE["prompt"]
    with _euler(pipe, **(scheduler or {})):
        image = pipe(**{**defaults, **arguments}).images[0]
    return np.asarray(image).astype(np.int16)


def _unet_inputs(engine: ImageEngine, **fields: Any) -> tuple[np.ndarray, list[torch.Tensor]]:
    """The job's image and the text embeddings its UNet received, call by call."""
    seen: list[torch.Tensor] = []
    hook = engine.pipe.unet.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        (image,) = _engine_pixels(engine, **fields)
    finally:
        hook.remove()
    return image, seen


def _close(a: np.ndarray, b: np.ndarray) -> None:
    assert int(np.abs(a - b).max()) <= 2


def _chunk(pipe: StableDiffusionPipeline, words: str, weights: list[float] | None = None) -> Any:
    """One 77-token chunk encoded by hand: diffusers' tokens, A1111's weighting."""
    ids = pipe.tokenizer(
        words, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        z = pipe.text_encoder(ids)[0]
    if weights is not None:
        mean = z.mean()
        w = torch.ones(77)
        w[1 : 1 + len(weights)] = torch.tensor(weights)
        z = z * w.reshape(1, -1, 1)
        z = z * (mean / z.mean())
    return z


def _tokens(pipe: StableDiffusionPipeline, words: str) -> int:
    return len(pipe.tokenizer(words, add_special_tokens=False).input_ids)


@pytest.mark.slow
def test_clip_skip_is_diffusers_clip_skip_minus_one(
    engine: ImageEngine, pipe: StableDiffusionPipeline
) -> None:
    (got,) = _engine_pixels(engine, clip_skip=2)

    # (diffusers' own `clip_skip` looks for `text_model`, which transformers 5's
    # CLIPTextModel no longer has: its arithmetic, by hand)
    def skipped(words: str) -> Any:
        ids = pipe.tokenizer(
            words, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            return pipe.text_encoder.final_layer_norm(hidden)

    embeds, negative = skipped(BASE["prompt"]), skipped("")
    _close(got, _plain(pipe, prompt_embeds=embeds, negative_prompt_embeds=negative))
    assert np.abs(got - _plain(pipe)).max() > 2
    with pytest.raises(InvalidGenerationInput, match="clip_skip"):
        _engine_pixels(engine, clip_skip=3)  # the tiny text encoder has 2 layers


@pytest.mark.slow
def test_tiling_pads_every_convolution_circularly(
    engine: ImageEngine, pipe: StableDiffusionPipeline
) -> None:
    (got,) = _engine_pixels(engine, tiling=True)
    convs = [m for part in (pipe.unet, pipe.vae) for m in part.modules()]
    convs = [m for m in convs if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        expected = _plain(pipe)
    finally:
        for conv in convs:
            conv.padding_mode = "zeros"
    _close(got, expected)
    # and the next job is plain again
    (after,) = _engine_pixels(engine)
    np.testing.assert_array_equal(after, _plain(pipe))
    assert np.abs(got - after).max() > 2


@pytest.mark.slow
def test_karras_and_seed_variation(engine: ImageEngine, pipe: StableDiffusionPipeline) -> None:
    # (a plain prompt's pixels are held to diffusers' in test_engine.py)
    pair = _engine_pixels(engine, karras=True, n=2, seed_variation=5)
    karras = {"use_karras_sigmas": True}
    _close(pair[0], _plain(pipe, karras))
    second = _plain(pipe, karras, generator=torch.Generator("cpu").manual_seed(77 + 5))
    _close(pair[1], second)
    # (the tiny model's pixels barely show the sigmas: the scheduler the job ran shows them)
    assert engine.pipe.scheduler.config.use_karras_sigmas is True


def test_euler_a_karras_uses_eulers_karras_sigmas() -> None:
    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    ours = make_scheduler("Euler a", config, karras=True)
    assert isinstance(ours, KarrasEulerAncestralScheduler)
    euler = diffusers.EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)
    ours.set_timesteps(8)
    euler.set_timesteps(8)
    torch.testing.assert_close(ours.sigmas, euler.sigmas)
    torch.testing.assert_close(ours.timesteps, euler.timesteps)
    with pytest.raises(ValueError, match="Karras"):
        make_scheduler("DDIM", config, karras=True)
    with pytest.raises(ValueError, match="karras"):
        ImageParams(prompt="x", sampler="LCM", karras=True)


@pytest.mark.slow
def test_weights_are_a1111s(engine: ImageEngine, pipe: StableDiffusionPipeline) -> None:
    prompt = "a photo of a (red:1.5) [cat]"
    got, seen = _unet_inputs(engine, prompt=prompt)
    head, red, cat = _tokens(pipe, "a photo of a "), _tokens(pipe, "red"), _tokens(pipe, "cat")
    weights = [1.0] * head + [1.5] * red + [1 / 1.1] * cat
    embeds = _chunk(pipe, "a photo of a red cat", weights)
    empty = _chunk(pipe, "")
    _close(got, _plain(pipe, prompt_embeds=embeds, negative_prompt_embeds=empty))
    # (the tiny model's pixels barely show the weights: the UNet's inputs do)
    assert not torch.allclose(embeds, _chunk(pipe, "a photo of a red cat"), atol=1e-3)
    for s in seen:
        torch.testing.assert_close(s, torch.cat([empty, embeds]))


@pytest.mark.slow
def test_break_starts_a_chunk_and_the_negative_is_padded(
    engine: ImageEngine, pipe: StableDiffusionPipeline
) -> None:
    got, seen = _unet_inputs(engine, prompt="a photo BREAK of a red cat")
    embeds = torch.cat([_chunk(pipe, "a photo"), _chunk(pipe, "of a red cat")], dim=1)
    negative = torch.cat([_chunk(pipe, ""), _chunk(pipe, "")], dim=1)
    _close(got, _plain(pipe, prompt_embeds=embeds, negative_prompt_embeds=negative))
    torch.testing.assert_close(seen[0], torch.cat([negative, embeds]))


@pytest.mark.slow
def test_prompt_editing_switches_after_the_step(
    engine: ImageEngine, pipe: StableDiffusionPipeline
) -> None:
    # of 4 steps, 0 and 1 read "red" (A1111: while step <= 1), 2 and 3 read "blue"
    texts = ("a photo of a red cat", "a photo of a blue cat", "")
    red, blue, empty = (_chunk(pipe, t) for t in texts)
    got, seen = _unet_inputs(engine, prompt="a photo of a [red:blue:1] cat", steps=4)
    # (the tiny model's pixels barely show a late change: the UNet's inputs show it)
    assert [bool(torch.equal(s, torch.cat([empty, red]))) for s in seen] == [1, 1, 0, 0]
    assert [bool(torch.equal(s, torch.cat([empty, blue]))) for s in seen] == [0, 0, 1, 1]

    def swap(p: Any, step: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if step == 1:
            kwargs["prompt_embeds"] = torch.cat([empty, blue])
        return kwargs

    expected = _plain(
        pipe,
        prompt_embeds=red,
        negative_prompt_embeds=empty,
        callback_on_step_end=swap,
        num_inference_steps=4,
    )
    _close(got, expected)
