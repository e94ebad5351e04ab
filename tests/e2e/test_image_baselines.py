"""SD 2 and SDXL end to end, with real processes on loopback: a coordinator, an image worker
on each model (each found its model's family itself), the SDK and a CivitAI stand-in.

Images equal plain diffusers' pipeline of the family (`StableDiffusionXLPipeline`,
`StableDiffusionPipeline` with SD 2's v-prediction scheduler), LoRAs and textual inversions
included (on SDXL: the clip strength for both text encoders, an embedding's `clip_l` and
`clip_g` in each); the detected baseline is the one LoRAs are checked against; a
`--baseline` that contradicts the model stops the worker.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from client.sdk import Client
from protocol.params import ImageParams
from tests.civitai import Entry, random_lora, random_ti, standin
from tests.e2e.test_image_loras import _error_of
from tests.e2e.test_image_network import Network, image_worker_args
from tests.reference import plain_image, plain_pipeline, plain_xl_pipeline

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
]

SIZE = {"width": 64, "height": 64, "steps": 3, "seed": 7, "sampler": "Euler a"}
# |diff| allowed between the worker and the reference (the bound)
TOLERANCE = 2


def _worker_args(network: Network, model: str) -> list[str]:
    args = image_worker_args(network.url, network.models, network.tmp, f"{model}-painter")
    args[args.index("--model") + 1] = str(network.models / model)
    return args


def _sd2(lora: str | None = None) -> ImageParams:
    loras = [{"name": lora}] if lora else []
    fields = {"prompt": "a red cat", "model": "sd2", **SIZE, "loras": loras}
    return ImageParams.model_validate(fields)


def _pixels(path: Path | str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_sdxl_and_sd2_workers_follow_their_models(tmp_path: Path, tiny_models: Path) -> None:
    sd1_lora = random_lora(tiny_models / "sd", tmp_path / "sd1.safetensors", seed=5)
    sd2_lora = random_lora(tiny_models / "sd2", tmp_path / "sd2.safetensors", seed=6)
    xl_lora = random_lora(tiny_models / "sdxl", tmp_path / "xl.safetensors", seed=8)
    xl_ti = random_ti(tiny_models / "sdxl", tmp_path / "xl-ti.safetensors", seed=9)
    entries = [
        Entry(101, "For SD 1.5", "LORA", 1010, sd1_lora.read_bytes()),
        Entry(202, "For SD 2.1", "LORA", 2020, sd2_lora.read_bytes(), base_model="SD 2.1"),
        Entry(303, "For Pony", "LORA", 3030, xl_lora.read_bytes(), base_model="Pony"),
        Entry(404, "xltok", "TextualInversion", 4040, xl_ti.read_bytes(), base_model="SDXL 1.0"),
    ]
    network = Network(tmp_path, tiny_models, lease_timeout=5)
    try:
        with standin(entries) as civitai:
            lora_flags = ["--civitai-url", civitai.url, "--lora-cache", str(tmp_path / "loras")]
            sd2 = network.start("sd2", _worker_args(network, "sd2") + lora_flags)
            sdxl = network.start("sdxl", _worker_args(network, "sdxl") + lora_flags)
            sd2.wait_for("ready", 180)
            sdxl.wait_for("ready", 180)
            key = network.register("alice")
            out = tmp_path / "out"
            with Client(network.url, key) as grid:
                xl_params = ImageParams.model_validate(
                    {"prompt": "a red cat", "negative_prompt": "blurry", "model": "sdxl", **SIZE}
                )
                xl_image = _pixels(grid.generate(xl_params, out).paths[0])
                # SDXL takes LoRAs and textual inversions too
                xl_adapted = ImageParams.model_validate(
                    {
                        **xl_params.model_dump(),
                        "prompt": "xltok a red cat",
                        "loras": [{"name": "303", "model": 0.8, "clip": 0.5}],
                        "tis": [{"name": "xltok"}],
                    }
                )
                xl_adapted_image = _pixels(grid.generate(xl_adapted, out).paths[0])
                sd2_params = _sd2()
                sd2_image = _pixels(grid.generate(sd2_params, out).paths[0])
                lora_image = _pixels(grid.generate(_sd2("202"), out).paths[0])
                # the baseline the worker found is the one LoRAs are held against
                wrong = grid.submit_image(_sd2("101"))
                reason = _error_of(grid, wrong.id)
                grid.cancel(wrong.id)
    finally:
        network.close()
    assert "baseline_mismatch: LoRA '101' (version 1010) is made for 'SD 1.5' (sd1)" in reason
    assert "this worker's checkpoint is sd2" in reason

    import torch

    torch.set_num_threads(1)
    xl_pipe = plain_xl_pipeline(tiny_models / "sdxl")
    xl_expected = plain_image(xl_pipe, xl_params, 7)
    assert np.abs(xl_image - xl_expected.astype(int)).max() <= TOLERANCE
    xl_pipe.load_lora_weights(str(xl_lora), adapter_name="x")
    xl_pipe.set_adapters(
        ["x"], adapter_weights=[{"unet": 0.8, "text_encoder": 0.5, "text_encoder_2": 0.5}]
    )
    embedding = load_file(xl_ti)
    for half, encoder, tokenizer in (
        ("clip_l", xl_pipe.text_encoder, xl_pipe.tokenizer),
        ("clip_g", xl_pipe.text_encoder_2, xl_pipe.tokenizer_2),
    ):
        # (diffusers' SDXL recipe passes the tensor itself, which its annotation omits)
        xl_pipe.load_textual_inversion(
            embedding[half],  # type: ignore[arg-type]
            token="xltok",
            text_encoder=encoder,
            tokenizer=tokenizer,
        )
    xl_adapted_expected = plain_image(xl_pipe, xl_adapted, 7).astype(int)
    assert np.abs(xl_adapted_image - xl_adapted_expected).max() <= TOLERANCE
    assert np.abs(xl_adapted_image - xl_image).mean() > 10  # visibly changed
    pipe = plain_pipeline(tiny_models / "sd2")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert np.abs(sd2_image - plain_image(pipe, sd2_params, 7).astype(int)).max() <= TOLERANCE
    pipe.load_lora_weights(str(sd2_lora), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[{"unet": 1.0, "text_encoder": 1.0}])
    lora_expected = plain_image(pipe, sd2_params, 7).astype(int)
    assert np.abs(lora_image - lora_expected).max() <= TOLERANCE
    assert np.abs(lora_image - sd2_image).mean() > 10  # the LoRA visibly changes the image


def test_a_baseline_flag_against_the_model_stops_the_worker(
    tmp_path: Path, tiny_models: Path
) -> None:
    # (the engine loads before the worker first calls the coordinator: nothing listens here)
    args = image_worker_args("http://127.0.0.1:9", tiny_models, tmp_path, "liar")
    args[args.index("--model") + 1] = str(tiny_models / "sd2")
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", *args, "--baseline", "sd1"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--baseline sd1: sd2 is an sd2 checkpoint" in done.stderr
    assert "give --baseline sd2 or leave the flag out" in done.stderr
