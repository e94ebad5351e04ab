"""LoRAs and textual inversions end to end, with real processes on loopback: a coordinator,
an image worker that resolves them through a CivitAI stand-in, the CLI and the SDK.

Images equal plain diffusers with `load_lora_weights` + `set_adapters` (not fused) and
`load_textual_inversion`; a LoRA that cannot be used (wrong hash, too large, another
baseline, not loadable, CivitAI unreachable) fails the attempt with its reason and charges
nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.sdk import Client
from protocol.cost import image_cost
from protocol.params import ImageParams
from tests.civitai import CivitaiStandIn, Entry, fake_safetensors, random_lora, random_ti, standin
from tests.e2e.test_image_network import Network
from tests.reference import plain_image, plain_pipeline

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
]

SIZE = {"width": 64, "height": 64, "steps": 3}


@pytest.fixture
def files(tiny_models: Path, tmp_path: Path) -> dict[str, bytes]:
    sd = tiny_models / "sd"
    return {
        "lora": random_lora(sd, tmp_path / "lora.safetensors", seed=5).read_bytes(),
        "ti": random_ti(sd, tmp_path / "ti.safetensors", seed=6).read_bytes(),
    }


@pytest.fixture
def civitai(files: dict[str, bytes]) -> Iterator[CivitaiStandIn]:
    entries = [
        Entry(101, "Tiny Watercolor", "LORA", 1010, files["lora"], trained_words=["wtrclr"]),
        Entry(202, "tinytok", "TextualInversion", 2020, files["ti"]),
        Entry(303, "Swapped", "LORA", 3030, files["lora"], sha256="CD" * 32),
        Entry(404, "Huge", "LORA", 4040, fake_safetensors(2 * 2**20)),
        Entry(505, "XL Only", "LORA", 5050, files["lora"], base_model="Pony"),
        Entry(606, "Not A LoRA", "LORA", 6060, fake_safetensors(64)),
    ]
    with standin(entries) as server:
        yield server


@pytest.fixture
def network(tmp_path: Path, tiny_models: Path) -> Iterator[Network]:
    net = Network(tmp_path, tiny_models, lease_timeout=5)
    try:
        yield net
    finally:
        net.close()


def _start_worker(network: Network, civitai_url: str) -> None:
    args = network.worker_args("painter") + [
        "--civitai-url",
        civitai_url,
        "--civitai-token",
        "tok-123",
        "--lora-cache",
        str(network.tmp / "lora-cache"),
        "--lora-max-mb",
        "1",
    ]
    network.start("painter", args).wait_for("ready", 180)


def _pixels(path: Path | str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _job(prompt: str) -> ImageParams:
    return ImageParams.model_validate({"prompt": prompt, **SIZE})


def _cat(lora: str) -> ImageParams:
    return ImageParams.model_validate({"prompt": "a cat", **SIZE, "loras": [{"name": lora}]})


def _error_of(grid: Client, job_id: str, timeout: float = 60) -> str:
    """The reason the job's last attempt failed (it waits in the queue for another worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = grid.job(job_id)
        if status.error:
            return status.error
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never failed an attempt")


def test_loras_and_tis_equal_plain_diffusers_and_unusable_ones_charge_nothing(
    network: Network, civitai: CivitaiStandIn, tiny_models: Path, tmp_path: Path
) -> None:
    # (one worker for both halves: a worker takes about 10 s to start here)
    _start_worker(network, civitai.url)
    key = network.register("alice")
    _adapted_images_equal_plain_diffusers(network, civitai, tiny_models, tmp_path, key)
    _unusable_loras_fail_clearly_and_charge_nothing(network, civitai, key)


def _adapted_images_equal_plain_diffusers(
    network: Network, civitai: CivitaiStandIn, tiny_models: Path, tmp_path: Path, key: str
) -> None:
    out = tmp_path / "out"
    # the CLI: a LoRA by model id with both strengths, a TI by name written in the prompt
    done = network.cli(
        "generate",
        "tinytok a lighthouse",
        "--lora",
        "101:0.8:0.5",
        "--ti",
        "tinytok",
        "--seed",
        "7",
        "--steps",
        "3",
        "--size",
        "64x64",
        "-o",
        str(out),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    by_id = _pixels(report["paths"][0])

    # the SDK: the same LoRA by name, its trigger word injected
    with Client(network.url, key) as grid:
        params = ImageParams.model_validate(
            {
                "prompt": "a lighthouse",
                "seed": 7,
                **SIZE,
                "loras": [{"name": "Tiny Watercolor", "inject_trigger": "any"}],
            }
        )
        result = grid.generate(params, out)
        by_name = _pixels(result.paths[0])
        assert result.kudos_cost == image_cost(params) == 1 + 3
    assert civitai.downloads == {1010: 1, 2020: 1}  # the cache serves the second job
    assert set(civitai.tokens) == {"Bearer tok-123"}

    import torch

    torch.set_num_threads(1)
    sd = tiny_models / "sd"
    pipe = plain_pipeline(sd)
    lora = tmp_path / "lora.safetensors"
    plain = plain_image(pipe, _job("a lighthouse"), 7)
    pipe.load_lora_weights(str(lora), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[{"unet": 0.8, "text_encoder": 0.5}])
    pipe.load_textual_inversion(str(tmp_path / "ti.safetensors"), token="tinytok")
    expected_id = plain_image(pipe, _job("tinytok a lighthouse"), 7)
    pipe.set_adapters(["x"], adapter_weights=[{"unet": 1.0, "text_encoder": 1.0}])
    expected_name = plain_image(pipe, _job("a lighthouse, wtrclr"), 7)

    assert np.abs(by_id.astype(int) - expected_id.astype(int)).max() <= 2
    assert np.abs(by_name.astype(int) - expected_name.astype(int)).max() <= 2
    # the random LoRA visibly changes the image
    assert np.abs(by_name.astype(int) - plain.astype(int)).mean() > 10
    with Image.open(result.paths[0]) as png:
        assert "a lighthouse, wtrclr" in png.info["parameters"]
        sha = hashlib.sha256(lora.read_bytes()).hexdigest()
        assert f'Lora hashes: "Tiny Watercolor: {sha[:10]}"' in png.info["parameters"]
    assert hashlib.sha256(lora.read_bytes()).hexdigest() in {
        p.stem for p in (network.tmp / "lora-cache").iterdir()
    }


def _unusable_loras_fail_clearly_and_charge_nothing(
    network: Network, civitai: CivitaiStandIn, key: str
) -> None:
    with Client(network.url, key) as grid:
        before = grid.me().kudos
        cases = [
            ("303", "download_failed: the file of '303' (version 3030) has SHA256"),
            ("404", "download_failed: '404' (version 4040) is 2 MB, over this worker's"),
            ("505", "baseline_mismatch: LoRA '505' (version 5050) is made for 'Pony' (sdxl)"),
            # safetensors, but nothing diffusers can load: found in the engine
            ("606", "parse_failed: LoRA '606' cannot be loaded"),
        ]
        for name, reason in cases:
            params = _cat(name)
            job = grid.submit_image(params)
            assert reason in _error_of(grid, job.id)
            assert not grid.job(job.id).images
            grid.cancel(job.id)
        civitai.shutdown()
        job = grid.submit_image(_cat("101"))
        assert "download_failed: CivitAI's API at" in _error_of(grid, job.id)
        assert "is unreachable" in str(grid.job(job.id).error)
        grid.cancel(job.id)
        assert grid.me().kudos == before
