"""Source images end to end with real processes on loopback: a requester's img2img job (v1,
AI Horde v2 and the CLI), inpainting and outpainting jobs reach a real image worker, which
downloads the source image and mask by digest and makes images identical (|diff| <= 2) to
diffusers' img2img and inpaint pipelines (tests/reference.py)."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngImageFile

from protocol.params import ImageParams, SourceProcessing
from tests.e2e.test_image_network import Network, horde
from tests.reference import plain_img2img, plain_inpaint, plain_pipeline

pytestmark = pytest.mark.slow


def _source() -> Image.Image:
    """A 96x80 picture with some structure (resized to the job's size by both sides)."""
    ramp = np.linspace(0, 255, 96, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (80, 1)), np.full((80, 96), 90, np.uint8)], -1)
    pixels = np.concatenate([pixels, np.tile(ramp[:80, None], (1, 96))[..., None]], -1)
    return Image.fromarray(pixels, "RGB")


def _b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def _v1(url: str, key: str, method: str, path: str, body: Any = None) -> bytes:
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        data: bytes = response.read()
        return data


def _finished_image(url: str, key: str, job_id: str) -> np.ndarray:
    deadline = time.monotonic() + 240
    while True:
        status = json.loads(_v1(url, key, "GET", f"/api/v1/jobs/{job_id}"))
        if status["state"] == "done":
            break
        assert status["state"] in ("queued", "leased"), status
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    png = _v1(url, key, "GET", f"/api/v1/jobs/{job_id}/images/0")
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_img2img_through_both_doors_equals_diffusers_img2img(
    image_network: Network, tiny_models: Path
) -> None:
    network = image_network
    network.worker("painter")
    alice = network.register("alice")  # (the CLI's saved key too)
    source = _b64(_source())
    v1_body = {
        "prompt": "a lighthouse",
        "width": 64,
        "height": 64,
        "steps": 4,
        "seed": 21,
        "source_processing": "img2img",
        "denoising_strength": 0.5,
        "source_image": source,
    }
    v1_job = json.loads(_v1(network.url, alice, "POST", "/api/v1/jobs/image", v1_body))["id"]
    ask = {
        "prompt": "a lighthouse",
        "params": {
            "sampler_name": "k_euler",
            "seed": "21",
            "width": 64,
            "height": 64,
            "steps": 4,
            "denoising_strength": 0.5,
        },
        "source_image": source,
    }
    status, created = horde(network.url, "POST", "/generate/async", alice, ask)
    assert status == 202, created
    import torch

    torch.set_num_threads(1)
    pipe = plain_pipeline(tiny_models / "sd")
    for job_id, sampler, cfg in ((v1_job, "Euler a", 7.0), (created["id"], "Euler", 7.5)):
        params = ImageParams(
            prompt="a lighthouse",
            width=64,
            height=64,
            steps=4,
            sampler=sampler,
            cfg_scale=cfg,
            source_processing="img2img",
            denoising_strength=0.5,
        )
        expected = plain_img2img(pipe, params, 21, _source()).astype(int)
        got = _finished_image(network.url, alice, job_id).astype(int)
        assert np.abs(got - expected).max() <= 2, job_id
    # inpainting (a mask, white = repaint) and outpainting (the source's transparent part)
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (24, 16, 72, 64))
    holed = _source().convert("RGBA")
    holed.paste((0, 0, 0, 0), (0, 0, 32, 80))
    outpaint_mask = Image.new("L", (96, 80), 0)
    outpaint_mask.paste(255, (0, 0, 32, 80))
    cases: list[tuple[SourceProcessing, Image.Image, Image.Image | None, Image.Image]] = [
        ("inpainting", _source(), mask, mask),
        ("outpainting", holed, None, outpaint_mask),
    ]
    for mode, image, sent_mask, repaint in cases:
        body: dict[str, Any] = {**v1_body, "source_processing": mode, "denoising_strength": 1.0}
        body["source_image"] = _b64(image)
        if sent_mask is not None:
            body["source_mask"] = _b64(sent_mask)
        job_id = json.loads(_v1(network.url, alice, "POST", "/api/v1/jobs/image", body))["id"]
        params = ImageParams(
            prompt="a lighthouse",
            width=64,
            height=64,
            steps=4,
            source_processing=mode,
            denoising_strength=1.0,
        )
        expected = plain_inpaint(pipe, params, 21, image, repaint).astype(int)
        got = _finished_image(network.url, alice, job_id).astype(int)
        assert np.abs(got - expected).max() <= 2, mode
    # the CLI: without --size the image takes the source's size (96x80)
    path = network.tmp / "source.png"
    _source().save(path)
    done = network.cli(
        "generate",
        "a lighthouse",
        "--image",
        str(path),
        "--strength",
        "0.5",
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
    with Image.open(written) as image:
        assert image.size == (96, 80)
        got = np.asarray(image.convert("RGB")).astype(int)
    params = ImageParams(
        prompt="a lighthouse",
        width=96,
        height=80,
        steps=4,
        source_processing="img2img",
        denoising_strength=0.5,
    )
    assert np.abs(got - plain_img2img(pipe, params, 21, _source()).astype(int)).max() <= 2


@pytest.fixture
def derived_leases(tmp_path: Path, tiny_models: Path) -> Iterator[Network]:
    """The coordinator's own leases (derived from each job's size, no --lease-timeout)."""
    net = Network(tmp_path, tiny_models, lease_timeout=None)
    try:
        yield net
    finally:
        net.close()


def test_img2img_at_512_through_ai_horde_equals_diffusers(
    derived_leases: Network, tiny_models: Path
) -> None:
    """The default size through AI Horde's door, on the coordinator's default leases: a
    photo-sized source (incompressible, a request body over 1 MB), one sampling step, and
    nearly all the time in the source's VAE encode and the result's decode, which report no
    step; the worker's heartbeat and the lease cap's count of those phases keep the lease,
    so the job is done on the first attempt and equals diffusers' img2img."""
    network = derived_leases
    network.worker("painter")
    alice = network.register("alice")
    noise = np.random.default_rng(3).integers(0, 256, (450, 600, 3), dtype=np.uint8)
    source = Image.fromarray(noise, "RGB")
    ask = {
        "prompt": "a lighthouse",
        "params": {"seed": "5", "width": 512, "height": 512, "steps": 1, "denoising_strength": 1.0},
        "source_image": _b64(source),
    }
    assert len(json.dumps(ask)) > 1024 * 1024
    status, created = horde(network.url, "POST", "/generate/async", alice, ask)
    assert status == 202, created
    # the reference meanwhile, on the core the worker (one thread) leaves free
    import torch

    torch.set_num_threads(1)
    params = ImageParams(
        prompt="a lighthouse",
        width=512,
        height=512,
        steps=1,
        cfg_scale=7.5,  # (AI Horde's default)
        seed=5,
        source_processing="img2img",
        denoising_strength=1.0,
    )
    expected = plain_img2img(plain_pipeline(tiny_models / "sd"), params, 5, source).astype(int)
    deadline = time.monotonic() + 600
    while True:
        status, check = horde(network.url, "GET", f"/generate/check/{created['id']}", alice)
        assert status == 200 and not check["faulted"], check
        if check["done"]:
            break
        assert time.monotonic() < deadline, check
        time.sleep(0.5)
    assert check["restarted"] == 0, check  # no lease was lost on the way
    status, done = horde(network.url, "GET", f"/generate/status/{created['id']}", alice)
    (generation,) = done["generations"]
    with urllib.request.urlopen(generation["img"], timeout=30) as response:
        png = PngImageFile(io.BytesIO(response.read()))
    assert png.size == (512, 512)
    assert "Denoising strength: 1, Source processing: img2img" in png.text["parameters"]
    got = np.asarray(png.convert("RGB")).astype(int)
    assert np.abs(got - expected).max() <= 2
