"""LoRAs and textual inversions on SDXL: the engine equals plain `StableDiffusionXLPipeline`
with `load_lora_weights` + `set_adapters` (the clip strength for both text encoders, not
fused) and an SDXL embedding's `clip_l`/`clip_g` loaded into each encoder with
`load_textual_inversion`; a plain job after them runs on the original weights again."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from protocol.params import ImageParams
from tests.civitai import random_lora, random_ti
from tests.reference import plain_image, plain_xl_pipeline
from tests.worker.image.test_lora_engine import BASE  # (the same job as on SD 1)
from worker.errors import AdapterUnavailable
from worker.image.engine import ImageEngine

pytestmark = [
    pytest.mark.slow,
]

# |diff| allowed between the engine and the reference (the bound)
TOLERANCE = 2


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def _request(loras: list[dict[str, Any]], tis: list[dict[str, Any]]) -> dict[str, Any]:
    params = {
        **BASE,
        "loras": [{"name": x["adapter"], "model": x["model"], "clip": x["clip"]} for x in loras],
        "tis": [{"name": ti["token"]} for ti in tis],
    }
    return {"params": params, "loras": loras, "tis": tis}


@pytest.fixture(scope="module")
def engine(tiny_sdxl: Path) -> ImageEngine:
    return ImageEngine({"model": str(tiny_sdxl), "threads": 1})


def test_sdxl_loras_and_tis_equal_plain_diffusers_and_leave_no_trace(
    engine: ImageEngine, tiny_sdxl: Path, tmp_path: Path
) -> None:
    lora = random_lora(tiny_sdxl, tmp_path / "lora.safetensors", seed=1)
    ti = random_ti(tiny_sdxl, tmp_path / "ti.safetensors", seed=3)
    # (kohya's names for SDXL: the UNet and both text encoders)
    keys = load_file(lora).keys()
    assert {key.split("_")[1] for key in keys} == {"unet", "te1", "te2"}
    lora_entry = {"path": str(lora), "adapter": "lora0", "model": 0.8, "clip": 0.5}
    ti_entry = {"path": str(ti), "token": "tinytok", "strength": 1.0}

    def run(kind: str, payload: dict[str, Any]) -> np.ndarray:
        _, (png,) = engine.handle(kind, payload, lambda _: None)
        return _pixels(png)

    with_lora = run("adapted_image", _request([lora_entry], []))
    with_ti = run("adapted_image", _request([], [ti_entry]))
    plain_after = run("image", BASE)

    job = ImageParams.model_validate(BASE)
    pipe = plain_xl_pipeline(tiny_sdxl)
    plain = plain_image(pipe, job, 42).astype(int)
    pipe.load_lora_weights(str(lora), adapter_name="a")
    # the job's clip strength is each text encoder's
    pipe.set_adapters(
        ["a"], adapter_weights=[{"unet": 0.8, "text_encoder": 0.5, "text_encoder_2": 0.5}]
    )
    lora_expected = plain_image(pipe, job, 42).astype(int)
    pipe.unload_lora_weights()
    state = load_file(ti)
    for half, encoder, tokenizer in (
        ("clip_l", pipe.text_encoder, pipe.tokenizer),
        ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2),
    ):
        # (diffusers' SDXL recipe passes the tensor itself, which its annotation omits)
        pipe.load_textual_inversion(
            state[half],  # type: ignore[arg-type]
            token="tinytok",
            text_encoder=encoder,
            tokenizer=tokenizer,
        )
    ti_expected = plain_image(pipe, job, 42).astype(int)

    assert np.abs(with_lora - lora_expected).max() <= TOLERANCE
    assert np.abs(with_ti - ti_expected).max() <= TOLERANCE
    # both visibly change the image, and are gone for the next plain job
    assert np.abs(with_lora - plain).mean() > 10
    assert np.abs(with_ti - plain).mean() > 3
    assert np.array_equal(plain_after, plain)

    # the clip strength reaches the second text encoder too: with 0 on both, only the
    # UNet's part of the LoRA is left
    pipe.unload_textual_inversion(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    pipe.unload_textual_inversion(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)
    pipe.load_lora_weights(str(lora), adapter_name="b")
    pipe.set_adapters(
        ["b"], adapter_weights=[{"unet": 0.8, "text_encoder": 0.0, "text_encoder_2": 0.0}]
    )
    unet_only = plain_image(pipe, job, 42).astype(int)
    no_clip = run("adapted_image", _request([{**lora_entry, "clip": 0.0}], []))
    assert np.abs(no_clip - unet_only).max() <= TOLERANCE
    assert np.abs(no_clip - with_lora).mean() > 3


def test_an_sdxl_embedding_needs_both_tensors(
    engine: ImageEngine, tiny_sdxl: Path, tmp_path: Path
) -> None:
    ti = load_file(random_ti(tiny_sdxl, tmp_path / "ti.safetensors"))
    half = tmp_path / "half.safetensors"
    save_file({"clip_l": ti["clip_l"]}, half)
    request = _request([], [{"path": str(half), "token": "tinytok", "strength": 1.0}])
    with pytest.raises(
        AdapterUnavailable, match="^parse_failed: textual inversion 'tinytok' has no clip_g"
    ):
        engine.handle("adapted_image", request, lambda _: None)
    # an SD 1 embedding is no SDXL one either
    sd1_style = tmp_path / "sd1.safetensors"
    save_file({"emb_params": ti["clip_l"]}, sd1_style)
    request = _request([], [{"path": str(sd1_style), "token": "tinytok", "strength": 1.0}])
    with pytest.raises(AdapterUnavailable, match="has no clip_l or clip_g tensor"):
        engine.handle("adapted_image", request, lambda _: None)
