"""The image extras end to end: the CLI asks for clip skip, tiling, Karras sigmas, a seed
variation and A1111's prompt editing and BREAK; a real worker process makes the images,
identical (|diff| <= 2) to the engine run in this process (whose extras the tests in
tests/worker/image/test_prompt_extras.py hold to plain diffusers), with A1111's keys in the PNGs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.test_image_network import Network

pytestmark = pytest.mark.slow


PROMPT = "a lighthouse [in a storm:at dawn:2] BREAK oil painting"


def test_cli_extras_reach_a_real_worker(image_network: Network, tiny_models: Path) -> None:
    image_network.worker("painter")
    image_network.register("alice")
    out = image_network.tmp / "out"
    done = image_network.cli(
        "generate",
        PROMPT,
        "--negative",
        "blurry",
        "--seed",
        "40",
        "-n",
        "2",
        "--seed-variation",
        "3",
        "--steps",
        "4",
        "--size",
        "64x64",
        "--sampler",
        "Euler",
        "--karras",
        "--clip-skip",
        "2",
        "--tiling",
        "-o",
        str(out),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["seeds"] == [40, 43]

    import torch

    from worker.image.engine import ImageEngine

    torch.set_num_threads(1)
    engine = ImageEngine({"model": str(tiny_models / "sd"), "model_config": None})
    fields = {
        "prompt": PROMPT,
        "negative_prompt": "blurry",
        "width": 64,
        "height": 64,
        "steps": 4,
        "sampler": "Euler",
        "karras": True,
        "clip_skip": 2,
        "tiling": True,
    }
    for index, path in enumerate(report["paths"]):
        seed = 40 + 3 * index
        png = Image.open(path)
        text = png.text["parameters"]  # type: ignore[attr-defined]
        assert text.startswith(f"{PROMPT}\nNegative prompt: blurry\n")
        assert f"Seed: {seed}," in text and "Sampler: Euler, Schedule type: Karras," in text
        assert text.endswith("Clip skip: 2, Tiling: True")
        _, (expected,) = engine.handle("image", {**fields, "seed": seed}, lambda _: None)
        want = np.asarray(Image.open(io.BytesIO(expected)).convert("RGB")).astype(np.int16)
        got = np.asarray(png.convert("RGB")).astype(np.int16)
        assert int(np.abs(got - want).max()) <= 2
