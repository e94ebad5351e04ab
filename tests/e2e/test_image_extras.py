"""Image extras end to end with real processes on loopback: a job with the hires fix and an
upscaler reaches a real (sandboxed) image worker started with `--post-processors DIR`, and
comes back equal (|diff| <= 2) to diffusers' pipelines and spandrel's RRDBNet called
directly (tests/reference_extras.py)."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from protocol.params import ImageParams
from tests.e2e.test_image_network import Network, image_worker_args
from tests.e2e.test_image_sources import _finished_image, _v1
from tests.reference import plain_pipeline
from tests.reference_extras import plain_hires, plain_upscale, rrdbnet

pytestmark = pytest.mark.slow


@pytest.fixture
def extras_network(tmp_path: Path, tiny_models: Path) -> Iterator[Network]:
    net = Network(tmp_path, tiny_models, lease_timeout=30)
    try:
        yield net
    finally:
        net.close()


def test_hires_fix_and_an_upscaler_through_a_real_worker(
    extras_network: Network, tmp_path: Path, tiny_models: Path
) -> None:
    network = extras_network
    # the tiny model declaring a 64 px native side, so the hires fix runs at a test size
    model = tmp_path / "native64"
    shutil.copytree(tiny_models / "sd", model)
    unet = model / "unet" / "config.json"
    unet.write_text(json.dumps({**json.loads(unet.read_text()), "sample_size": 8}))
    post = tmp_path / "post"
    post.mkdir()
    upscaler = rrdbnet(2, seed=4)
    save_file(
        {k: v.contiguous() for k, v in upscaler.state_dict().items()},
        post / "RealESRGAN_x2plus.safetensors",
    )
    args = image_worker_args(network.url, tiny_models, tmp_path, "extras")
    args[args.index("--model") + 1] = str(model)
    proc = network.start("extras", [*args, "--post-processors", str(post)])
    proc.wait_for("ready", 180)
    alice = network.register("alice")
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
    job = json.loads(_v1(network.url, alice, "POST", "/api/v1/jobs/image", body))["id"]
    pixels = _finished_image(network.url, alice, job)
    text = Image.open(io.BytesIO(_v1(network.url, alice, "GET", f"/api/v1/jobs/{job}/images/0")))
    assert "Hires upscale: 1.6" in text.info["parameters"]
    assert "Postprocessing: RealESRGAN_x2plus" in text.info["parameters"]
    torch.set_num_threads(1)
    params = ImageParams.model_validate(body)
    hires = plain_hires(plain_pipeline(model), params, 21, (80, 64))
    expected = np.asarray(plain_upscale(upscaler, Image.fromarray(hires)))
    assert pixels.shape == (192, 256, 3)
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 2
