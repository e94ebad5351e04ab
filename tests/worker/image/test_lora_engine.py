"""The engine with LoRAs and textual inversions equals plain diffusers with
`load_lora_weights` + `set_adapters` (not fused) and `load_textual_inversion`; a plain job
after them runs on the original weights again."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from protocol.params import ImageParams
from tests.civitai import random_lora, random_ti
from tests.reference import plain_image, plain_pipeline
from worker.errors import AdapterUnavailable, InvalidGenerationInput
from worker.image.engine import ImageEngine

pytestmark = [
    pytest.mark.slow,
    # peft says so for every LoRA after the first: several adapters are what we want
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
]

BASE: dict[str, Any] = {
    "prompt": "tinytok a red cat",
    "negative_prompt": "blurry",
    "width": 64,
    "height": 64,
    "steps": 3,
    "seed": 42,
}


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def test_adapted_images_equal_plain_diffusers_and_leave_no_trace(
    tiny_sd: Path, tmp_path: Path
) -> None:
    lora = random_lora(tiny_sd, tmp_path / "lora.safetensors", seed=1)
    lora2 = random_lora(tiny_sd, tmp_path / "lora2.safetensors", seed=2)
    ti = random_ti(tiny_sd, tmp_path / "ti.safetensors", seed=3)
    engine = ImageEngine({"model": str(tiny_sd), "threads": 1})
    params = {
        **BASE,
        "loras": [{"name": "1", "model": 0.8, "clip": 0.5}, {"name": "2", "model": 0.3}],
        "tis": [{"name": "tinytok"}],
    }
    request: dict[str, Any] = {
        "params": params,
        "loras": [
            {
                "path": str(lora),
                "adapter": "lora0",
                "model": 0.8,
                "clip": 0.5,
                "name": "1",
                "sha256": "ab" * 32,
            },
            {"path": str(lora2), "adapter": "lora1", "model": 0.3, "clip": 1.0},
        ],
        "tis": [{"path": str(ti), "token": "tinytok", "strength": 1.0, "sha256": "cd" * 32}],
    }
    _, (adapted_png,) = engine.handle("adapted_image", request, lambda _: None)
    _, (plain_png,) = engine.handle("image", BASE, lambda _: None)
    # the IMAGE call alone never serves LoRAs
    with pytest.raises(InvalidGenerationInput, match="adapted_image"):
        engine.handle("image", params, lambda _: None)

    job = ImageParams.model_validate(BASE)
    pipe = plain_pipeline(tiny_sd)
    plain = plain_image(pipe, job, 42)
    pipe.load_lora_weights(str(lora), adapter_name="a")
    pipe.load_lora_weights(str(lora2), adapter_name="b")
    pipe.set_adapters(
        ["a", "b"],
        adapter_weights=[{"unet": 0.8, "text_encoder": 0.5}, {"unet": 0.3, "text_encoder": 1.0}],
    )
    pipe.load_textual_inversion(str(ti), token="tinytok")
    expected = plain_image(pipe, job, 42)

    adapted = _pixels(adapted_png)
    assert np.abs(adapted.astype(int) - expected.astype(int)).max() <= 2
    # the LoRAs visibly change the image, and are gone for the next plain job
    assert np.abs(adapted.astype(int) - plain.astype(int)).mean() > 10
    assert np.array_equal(_pixels(plain_png), plain)
    # A1111's hashes in the PNG's parameters (a plain job has none)
    with Image.open(io.BytesIO(adapted_png)) as png:
        assert (
            'Lora hashes: "1: ababababab", TI hashes: "tinytok: cdcdcdcdcd"'
            in png.info["parameters"]
        )
    with Image.open(io.BytesIO(plain_png)) as png:
        assert "hashes" not in png.info["parameters"]

    # a file diffusers cannot load is the LoRA's fault (AI Horde's parse_failed) and leaves
    # the engine serving plain jobs as before
    bogus = tmp_path / "bogus.safetensors"
    save_file({"not_a_lora.weight": torch.ones(3)}, bogus)
    request["loras"] = [{"path": str(bogus), "adapter": "lora0", "model": 1.0, "clip": 1.0}]
    request["tis"] = []
    request["params"] = {**BASE, "loras": [{"name": "bogus"}]}
    with pytest.raises(AdapterUnavailable, match="^parse_failed: LoRA 'lora0' cannot be loaded"):
        engine.handle("adapted_image", request, lambda _: None)
    _, (again,) = engine.handle("image", BASE, lambda _: None)
    assert np.array_equal(_pixels(again), plain)
