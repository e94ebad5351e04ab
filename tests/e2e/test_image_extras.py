"""Image extras end to end with real processes on loopback: jobs reach one real (sandboxed)
image worker started with `--post-processors DIR` (an x2 RRDBNet and a random-weight GFPGAN)
and come back equal (|diff| <= 2) to diffusers' pipelines and spandrel's architectures called
directly (tests/reference_extras.py): the hires fix with an upscaler, and the face fixer."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from protocol.params import ImageParams
from tests.e2e.test_image_network import Network, image_worker_args
from tests.e2e.test_image_sources import _finished_image, _v1
from tests.reference import plain_image, plain_pipeline
from tests.reference_extras import (
    gfpgan_model,
    plain_face_fix,
    plain_hires,
    plain_upscale,
    rrdbnet,
)

pytestmark = pytest.mark.slow


@dataclass
class Extras:
    network: Network
    key: str  # a requester's API key
    model: Path  # the worker's model folder
    upscaler: torch.nn.Module  # RealESRGAN_x2plus's weights, as a module
    gfpgan: torch.nn.Module  # GFPGAN's weights, as a module


def _save(model: torch.nn.Module, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


@pytest.fixture(scope="module")
def extras(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[Extras]:
    """One coordinator and one worker for the module: GFPGAN's weights (about 350 MB) are
    built, written and loaded once."""
    tmp = tmp_path_factory.mktemp("extras")
    # the tiny model declaring a 64 px native side, so the hires fix runs at a test size
    model = tmp / "native64"
    shutil.copytree(tiny_models / "sd", model)
    unet = model / "unet" / "config.json"
    unet.write_text(json.dumps({**json.loads(unet.read_text()), "sample_size": 8}))
    post = tmp / "post"
    post.mkdir()
    upscaler = rrdbnet(2, seed=4)
    _save(upscaler, post / "RealESRGAN_x2plus.safetensors")
    gfpgan = gfpgan_model(seed=3)
    _save(gfpgan, post / "GFPGAN.safetensors")
    # the lease covers GFPGAN's 512x512 pass on one thread of a busy machine
    network = Network(tmp, tiny_models, lease_timeout=120)
    try:
        args = image_worker_args(network.url, tiny_models, tmp, "extras")
        args[args.index("--model") + 1] = str(model)
        worker = network.start("extras", [*args, "--post-processors", str(post)])
        worker.wait_for("ready", 180)
        assert network.sandboxed(worker) is True
        key = network.register("alice")
        torch.set_num_threads(1)
        yield Extras(network, key, model, upscaler, gfpgan)
    finally:
        network.close()


def _submit(extras: Extras, body: dict[str, object]) -> str:
    url, key = extras.network.url, extras.key
    job: str = json.loads(_v1(url, key, "POST", "/api/v1/jobs/image", body))["id"]
    return job


def _parameters(extras: Extras, job: str) -> str:
    png = _v1(extras.network.url, extras.key, "GET", f"/api/v1/jobs/{job}/images/0")
    return str(Image.open(io.BytesIO(png)).info["parameters"])


def _max_diff(actual: np.ndarray, expected: np.ndarray) -> int:
    assert actual.shape == expected.shape
    return int(np.abs(actual.astype(int) - expected.astype(int)).max())


def test_hires_fix_and_an_upscaler_through_a_real_worker(extras: Extras) -> None:
    body = {
        "prompt": "a lighthouse",
        "width": 128,
        "height": 96,
        "steps": 4,
        "seed": 21,
        "hires_fix": True,
        "hires_fix_denoising_strength": 0.5,
        "post_processing": ["RealESRGAN_x2plus"],
    }
    job = _submit(extras, body)
    pixels = _finished_image(extras.network.url, extras.key, job)
    text = _parameters(extras, job)
    assert "Hires upscale: 1.6" in text
    assert "Postprocessing: RealESRGAN_x2plus" in text
    params = ImageParams.model_validate(body)
    hires = plain_hires(plain_pipeline(extras.model), params, 21, (80, 64))
    expected = np.asarray(plain_upscale(extras.upscaler, Image.fromarray(hires)))
    assert pixels.shape == (192, 256, 3)
    assert _max_diff(pixels, expected) <= 2


def test_face_fixer_through_a_real_worker(extras: Extras) -> None:
    # not square, so the restored 512x512 is resized back to the image's own shape
    body = {
        "prompt": "a portrait",
        "width": 64,
        "height": 72,
        "steps": 2,
        "seed": 17,
        "post_processing": ["GFPGAN"],
        "facefixer_strength": 0.6,
    }
    job = _submit(extras, body)
    # the reference runs while the worker does the same work
    params = ImageParams.model_validate(body)
    plain = Image.fromarray(plain_image(plain_pipeline(extras.model), params, 17))
    # the decoder's noise is seeded with the image's seed, and 0.6 of the restored image
    # is blended over the generated one
    expected = np.asarray(plain_face_fix(extras.gfpgan, plain, 0.6, seed=17))
    pixels = _finished_image(extras.network.url, extras.key, job)
    assert pixels.shape == (72, 64, 3)
    assert _max_diff(pixels, expected) <= 2
    assert _max_diff(pixels, np.asarray(plain)) > 10  # the face fixer changed the image
    text = _parameters(extras, job)
    assert "Postprocessing: GFPGAN" in text
    assert "Face restoration strength: 0.6" in text
