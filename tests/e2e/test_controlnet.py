"""ControlNet end to end with real processes on loopback (issue 24): a worker started with
`--controlnet canny=DIR --controlnet depth=FILE` (a single file in the original layout)
serves a CLI `--control canny` job and an AI Horde `image_is_control` job, each identical
(|diff| <= 2) to diffusers' ControlNet pipeline with the same map and seed, and returns a
canny map when asked."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from protocol.params import ImageParams
from tests.e2e.test_image_network import Network, horde
from tests.e2e.test_image_sources import _finished_image, _v1
from tests.reference import plain_controlnet, plain_pipeline
from worker.image.control import load_controlnet
from worker.models.tiny_controlnet import build_tiny_controlnet

pytestmark = pytest.mark.slow


def _source() -> Image.Image:
    """96x80 with sharp edges (canny finds them), resized to the job's size by both sides."""
    pixels = np.full((80, 96, 3), 20, np.uint8)
    cv2.rectangle(pixels, (8, 10), (60, 50), (230, 200, 30), -1)
    cv2.circle(pixels, (70, 55), 16, (30, 180, 240), -1)
    return Image.fromarray(pixels)


def _sized(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)


def _canny(image: Image.Image) -> Image.Image:
    edges = cv2.Canny(np.asarray(_sized(image)), 100, 200)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def _b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def test_controlnet_jobs_through_a_real_worker_equal_diffusers(
    image_network: Network, tiny_models: Path
) -> None:
    network = image_network
    canny_dir = build_tiny_controlnet(tiny_models / "sd", network.tmp / "control-canny")
    depth_file = network.tmp / "control-depth.safetensors"
    build_tiny_controlnet(tiny_models / "sd", depth_file, single_file=True, original=True)
    args = network.worker_args("controller")
    args += ["--controlnet", f"canny={canny_dir}", "--controlnet", f"depth={depth_file}"]
    network.start("controller", args).wait_for("ready", 180)
    alice = network.register("alice")  # (the CLI's saved key too)
    source = network.tmp / "source.png"
    _source().save(source)

    # AI Horde's door: a ready depth map (the worker has no depth annotator)
    ask = {
        "prompt": "a lighthouse",
        "params": {
            "sampler_name": "k_euler",
            "seed": "21",
            "width": 64,
            "height": 64,
            "steps": 4,
            "control_type": "depth",
            "image_is_control": True,
        },
        "source_image": _b64(_source()),
    }
    status, created = horde(network.url, "POST", "/generate/async", alice, ask)
    assert status == 202, created
    # v1: the canny map itself
    ask_map = {
        "prompt": "a lighthouse",
        "width": 64,
        "height": 64,
        "steps": 4,
        "seed": 21,
        "source_processing": "img2img",
        "control_type": "canny",
        "return_control_map": True,
        "source_image": _b64(_source()),
    }
    map_job = json.loads(_v1(network.url, alice, "POST", "/api/v1/jobs/image", ask_map))["id"]
    # the CLI: a canny-guided image
    done = network.cli(
        "generate",
        "a lighthouse",
        "--control",
        "canny",
        "--control-image",
        str(source),
        "--size",
        "64x64",
        "--steps",
        "4",
        "--seed",
        "21",
        "-o",
        str(network.tmp / "out"),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    (written,) = json.loads(done.stdout)["paths"]

    import torch

    torch.set_num_threads(1)
    pipe = plain_pipeline(tiny_models / "sd")
    base = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4}
    canny = ImageParams.model_validate({**base, "source_processing": "img2img"})
    canny_model = load_controlnet(canny_dir, pipe)
    with Image.open(written) as image:
        got = np.asarray(image.convert("RGB")).astype(int)
    expected = plain_controlnet(pipe, canny, 21, canny_model, _canny(_source())).astype(int)
    assert np.abs(got - expected).max() <= 2

    depth = canny.model_copy(update={"sampler": "Euler", "cfg_scale": 7.5})
    depth_model = load_controlnet(depth_file, pipe)
    got = _finished_image(network.url, alice, created["id"]).astype(int)
    expected = plain_controlnet(pipe, depth, 21, depth_model, _sized(_source())).astype(int)
    assert np.abs(got - expected).max() <= 2

    control_map = _finished_image(network.url, alice, map_job)
    assert np.array_equal(control_map, np.asarray(_canny(_source())))
